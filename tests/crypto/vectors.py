"""Reading the vector files in ``tests/vectors/`` and turning their cases into pytest params.

Only ``tests/vectors/`` is read: the tests must run from a checkout alone.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).resolve().parents[1] / "vectors"

Case = dict[str, Any]
Group = dict[str, Any]


@cache
def wycheproof(name: str) -> dict[str, Any]:
    """A Wycheproof file by its upstream name (``x25519_test``), read from its gzipped copy."""
    with gzip.open(VECTORS / "wycheproof" / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def wycheproof_cases(
    name: str, keep: Callable[[Group, Case], bool] = lambda g, c: True
) -> Iterator[tuple[Group, Case]]:
    for group in wycheproof(name)["testGroups"]:
        for case in group["tests"]:
            if keep(group, case):
                yield group, case


def params(
    name: str, keep: Callable[[Group, Case], bool] = lambda g, c: True, prefix: str = ""
) -> list[Any]:
    """One ``pytest.param(group, case)`` per kept case, with an id naming its tcId and result,
    so a failure reads ``test_x[tc17-valid]`` and the case can be looked up in the file."""
    return [
        pytest.param(group, case, id=f"{prefix}tc{case['tcId']}-{case['result']}")
        for group, case in wycheproof_cases(name, keep)
    ]


def h(value: str | None) -> bytes:
    return bytes.fromhex(value or "")


def read_json(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def read_gz_lines(name: str) -> list[str]:
    with gzip.open(VECTORS / name, "rt", encoding="ascii") as f:
        return [line.strip() for line in f if line.strip()]


def fixed_rng(seed: bytes) -> Callable[[int], bytes]:
    """An ``Rng`` that hands out ``seed``, and fails the test if asked for another length:
    key generation must draw exactly the seed its standard defines."""

    def rng(n: int) -> bytes:
        assert n == len(seed), f"key generation asked for {n} random bytes, not {len(seed)}"
        return seed

    return rng
