"""SQLite only: durability settings, file permissions, append-only audit, locking, index use,
and how transactions run (one job each on the store's database thread)."""

from __future__ import annotations

import asyncio
import inspect
import re
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from store_support import NOW

from qflare.errors import NotFound, StoreError, StoreUnavailable
from qflare.store import SqliteStore, Store, open_store
from qflare.store import sql as q
from qflare.store.sql import SqlStore
from qflare.store.sqlite import ON_THREAD, from_micros, to_micros


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    store = await open_store(sqlite_url)
    try:
        yield store
    finally:
        await store.close()


def db_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


async def test_connection_settings(store: SqliteStore) -> None:
    async def read() -> dict[str, object]:
        async with store._transaction(None, write=False) as tx:
            return {
                pragma: next(iter((await tx.fetchrow(f"PRAGMA {pragma}") or {}).values()))
                for pragma in ("journal_mode", "synchronous", "foreign_keys", "secure_delete")
            }

    got = await store._on_thread(read)
    assert got == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "secure_delete": 1}


async def test_database_file_is_private(sqlite_url: str) -> None:
    path = db_path(sqlite_url)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_audit_is_append_only(store: Store, sqlite_url: str) -> None:
    await store.append_audit(ts=NOW, kind="enroll", payload=b"p", leaf_hash=bytes(32))
    raw = sqlite3.connect(db_path(sqlite_url))
    try:
        for statement in ("UPDATE audit_entries SET kind = 'forged'", "DELETE FROM audit_entries"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                raw.execute(statement)
    finally:
        raw.close()

    async def delete() -> None:
        async with store._transaction(None, write=True) as tx:
            await tx.execute("DELETE FROM audit_entries")

    with pytest.raises(StoreError, match="append-only"):
        await store._on_thread(delete)
    assert [e.kind for e in await store.list_audit()] == ["enroll"]


async def test_locked_database_fails_closed(sqlite_url: str) -> None:
    """Another process holding the write lock makes a write fail with StoreUnavailable (the
    replay check then refuses), after the busy timeout, with nothing half-done."""
    store = SqliteStore(db_path(sqlite_url), busy_timeout=0.2)
    await store.open()
    holder = sqlite3.connect(db_path(sqlite_url), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable):
            await store.create_tenant("acme", "Acme", now=NOW)
        holder.execute("ROLLBACK")
        await store.create_tenant("acme", "Acme", now=NOW)
        assert (await store.get_tenant("acme")).name == "Acme"
    finally:
        holder.close()
        await store.close()


async def test_closed_store_is_unavailable(sqlite_url: str) -> None:
    store = await open_store(sqlite_url)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get_tenant("acme")


def test_time_encoding_is_exact() -> None:
    for value in (
        NOW,
        NOW.replace(microsecond=999_999),
        from_micros(-1),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, UTC),
    ):
        assert from_micros(to_micros(value)) == value


@pytest.mark.parametrize(
    ("statement", "index"),
    [
        (q.GET_DEVICE, "sqlite_autoindex_devices_1"),  # the (tenant_id, device_id) primary key
        (q.GET_SESSION, "sqlite_autoindex_sessions_1"),
        (q.GET_ENROLLMENT_BY_HASH, "enrollment_tokens_by_hash"),
        (q.REDEEM_ENROLLMENT, "enrollment_tokens_by_hash"),
        (q.GET_ACTIVE_SERVER_KEY, "server_keys_one_active"),
        (q.GET_ACTIVE_DEVICE_KEY, "device_keys_one_active"),
        (q.LIST_DEVICE_SESSIONS, "sessions_by_device"),
        (
            "SELECT rowid FROM sessions WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2",
            "sessions_expiry",
        ),
        (
            "SELECT rowid FROM handshake_nonces WHERE expires_at <= ?1 ORDER BY expires_at "
            "LIMIT ?2",
            "handshake_nonces_expiry",
        ),
        (
            "SELECT device_ts FROM handshake_nonces WHERE tenant_id = ?1 AND device_id = ?2 "
            "AND nonce = ?3",
            "sqlite_autoindex_handshake_nonces_1",
        ),
    ],
)
def test_lookups_use_indexes(sqlite_url: str, statement: str, index: str) -> None:
    raw = sqlite3.connect(db_path(sqlite_url))
    try:
        sql = statement.replace("$", "?")
        n = max(int(i) for i in re.findall(r"\?(\d+)", sql))
        plan = [r[3] for r in raw.execute(f"EXPLAIN QUERY PLAN {sql}", [None] * n)]
    finally:
        raw.close()
    assert any(index in step for step in plan), plan
    # "SCAN t" without an index is a full table scan.
    assert not [step for step in plan if step.startswith("SCAN ") and "INDEX" not in step], plan


def test_every_operation_runs_on_the_database_thread() -> None:
    """Each public operation but cleanup is one job on the store's thread (one hop)."""
    operations = {
        name
        for name in Store.__abstractmethods__
        if inspect.iscoroutinefunction(getattr(Store, name)) and not name.startswith("_")
    }
    assert set(ON_THREAD) == operations - {"open", "close", "cleanup"}
    for name in ON_THREAD:
        assert getattr(SqliteStore, name) is not getattr(SqlStore, name)


async def test_a_transaction_is_one_hop(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create_tenant("acme", "Acme", now=NOW)
    await store.create_token(
        "acme", token_id="t1", token_hash=b"h" * 32, now=NOW, expires_at=NOW + timedelta(1)
    )
    thread = store._thread
    assert thread is not None
    calls = 0
    call = thread.call

    async def counted(job: Callable[[], Any]) -> Any:
        nonlocal calls
        calls += 1
        return await call(job)

    monkeypatch.setattr(thread, "call", counted)
    await store.enroll_device(
        "acme", b"h" * 32, now=NOW, device_id="d1", algorithm="ML-DSA-44", public_key=b"pk"
    )
    assert calls == 1
    accepted = await store.accept_handshake(
        "acme", "d1", b"n" * 16, timestamp=5, expires_at=NOW + timedelta(1)
    )
    assert accepted
    assert calls == 2
    await store.cleanup(NOW + timedelta(2), batch_size=1)  # one job per batch
    assert calls > 2


async def test_transactions_refuse_the_event_loop_thread(store: SqliteStore) -> None:
    with pytest.raises(RuntimeError, match="database thread"):
        async with store._transaction(None, write=False):
            pass


async def test_an_operation_that_suspends_is_rolled_back(store: SqliteStore) -> None:
    """Only this backend's Tx may be awaited on the database thread: anything that suspends
    there is refused, and its transaction rolled back."""

    async def suspends() -> None:
        async with store._transaction(None, write=True) as tx:
            await tx.execute(
                "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, 0)", "a", "A"
            )
            await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="suspended"):
        await store._on_thread(suspends)
    with pytest.raises(NotFound):
        await store.get_tenant("a")
    await store.create_tenant("a", "A", now=NOW)  # the connection is usable afterwards
