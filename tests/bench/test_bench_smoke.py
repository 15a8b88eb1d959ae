"""Smoke test of the HTTP, throughput, growth and store CPU benches: each ``main`` runs on
tiny sizes and prints a RESULT line. Numbers are not checked (they are the benches' business;
store_cpu's are only checked to be there and positive); this only keeps the scripts runnable.
PostgreSQL sides included (``postgres_url``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres


@pytest.fixture(autouse=True, scope="module")
def _bench_importable() -> None:
    # bench/ is a folder of scripts, importable as the namespace package ``bench`` from the
    # repository root; appended, so it shadows nothing.
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))


def run(module: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    bench: Any = importlib.import_module(f"bench.{module}")
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out
    return dict(part.split("=", 1) for part in lines[0].split()[1:])


def test_http_handshake(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(
        "http_handshake",
        [
            *("--quick", "--rounds", "1", "--iterations", "2", "--devices", "3"),
            *("--stores", "sqlite,postgres", "--postgres-url", postgres_url),
        ],
        capsys,
    )
    assert float(result["mtls_us"]) > 0
    assert float(result["qflare_postgres_db_us"]) >= 0
    assert result["status"] in ("PASS", "FAIL")


def test_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(
        "throughput",
        [
            "--quick",
            "--concurrency",
            "1,2",
            "--seconds",
            "0.3",
            "--rounds",
            "1",
            "--iterations",
            "2",
        ],
        capsys,
    )
    assert float(result["hs_per_s_c2"]) > 0
    assert float(result["record_seal_ratio"]) > 0


def test_growth(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(
        "growth",
        [
            *("--quick", "--sizes", "20,40", "--cleanup-sizes", "20,40"),
            *("--rounds", "1", "--samples", "2", "--postgres-url", postgres_url),
        ],
        capsys,
    )
    assert float(result["pg_hs_growth"]) > 0
    assert float(result["sqlite_cleanup_us_per_row"]) > 0


def test_store_cpu(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(
        "store_cpu",
        [
            *("--quick", "--rounds", "2", "--iterations", "3", "--devices", "4"),
            *("--backends", "sqlite,postgres", "--postgres-url", postgres_url),
        ],
        capsys,
    )
    ops = ("read", "accept", "finish", "commit", "handshake_store")
    keys = [f"{p}_{op}_us" for p in ("sqlite", "pg") for op in ops]
    keys += [f"pg_backend_{op}_us" for op in ops]
    for key in keys:
        assert float(result[key]) > 0, key
    assert result["loop"] in ("uvloop", "asyncio")
    assert result["clock"] == "process_time_ns"
