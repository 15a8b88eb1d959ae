"""Store fixtures: a migrated database per test, on SQLite or on the real PostgreSQL.

Each PostgreSQL test gets a schema of its own (``qflare_t_<random>``), migrated from scratch and
dropped afterwards, so tests cannot see each other's rows and leave nothing behind. The role
``qflare_app`` is cluster-wide; the migration creates it once if it is missing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from store_support import NOW, with_query

from qflare.store import migrate


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'data' / 'qflare.db'}"
    await migrate(url, now=NOW)
    return url


@pytest.fixture
def pg_schema() -> str:
    return f"qflare_t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def pg_url(postgres_url: str, pg_schema: str) -> AsyncIterator[str]:
    url = with_query(postgres_url, schema=pg_schema)
    try:
        await migrate(url, now=NOW)
        yield url
    finally:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def pg_owner(
    postgres_url: str, pg_url: str, pg_schema: str
) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the schema owner (the test superuser), for set-up and inspection."""
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": pg_schema})
    try:
        yield conn
    finally:
        await conn.close()
