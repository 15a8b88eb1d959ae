"""The vector files are the upstream files: each one's SHA-256 (of the uncompressed bytes for
the gzipped Wycheproof copies) matches the one written down in tests/vectors/PROVENANCE.md,
and every vector file is listed there."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import pytest

from .vectors import VECTORS

PROVENANCE = (VECTORS / "PROVENANCE.md").read_text(encoding="utf-8")
# Rows of the checksum table: | `path` ... | `hex` |
CHECKSUMS = dict(re.findall(r"^\| `([^`]+)`[^|]*\| `([0-9a-f]{64})` \|$", PROVENANCE, re.M))


def _upstream_bytes(listed: str) -> bytes:
    path = VECTORS / listed
    if path.exists():
        return path.read_bytes()
    return gzip.decompress((VECTORS / f"{listed}.gz").read_bytes())


def test_checksum_table_parsed() -> None:
    assert len(CHECKSUMS) >= 14


@pytest.mark.parametrize("listed", sorted(CHECKSUMS))
def test_file_matches_recorded_checksum(listed: str) -> None:
    assert hashlib.sha256(_upstream_bytes(listed)).hexdigest() == CHECKSUMS[listed]


def _published_files() -> list[Path]:
    return sorted(
        p
        for p in VECTORS.rglob("*")
        if p.is_file() and p.suffix in (".json", ".gz") and not p.name.startswith("qflare_")
    )


def test_every_published_file_is_listed() -> None:
    files = _published_files()
    assert files
    for path in files:
        rel = path.relative_to(VECTORS).as_posix()
        assert rel in CHECKSUMS or rel.removesuffix(".gz") in CHECKSUMS, f"{rel} not listed"
