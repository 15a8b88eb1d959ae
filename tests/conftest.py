"""Shared fixtures: real PostgreSQL and Redis, never mocks.

On a developer's machine without the service, tests that need it skip with the reason.
With ``CI=true`` a missing service is a failure: CI must exercise both for real.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from qflare.store import migrate

IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get(
    "QFLARE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("QFLARE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, default_port: int) -> str:
    if not _reachable(url, default_port):
        msg = f"{name} is not reachable at {url}"
        if IN_CI:
            pytest.fail(f"{msg} and CI=true: CI must run the {name} tests")
        pytest.skip(msg)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return require_service("PostgreSQL", POSTGRES_URL, 5432)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return require_service("Redis", REDIS_URL, 6379)


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[str]:
    """A freshly migrated database on each backend: a SQLite file, or a PostgreSQL schema of
    its own (dropped afterwards) reached as the application role with row-level security."""
    if request.param == "sqlite":
        assert isinstance(tmp_path, Path)
        url = f"sqlite:///{tmp_path / 'qflare.db'}"
        await migrate(url)
        yield url
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"qflare_t_{uuid.uuid4().hex[:16]}"
    url = f"{base}{'&' if '?' in base else '?'}schema={schema}"
    try:
        await migrate(url)
        yield url
    finally:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
