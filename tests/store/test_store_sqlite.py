"""SQLite only: durability settings, file permissions, append-only audit, locking, index use,
how transactions run (one job each on the store's database thread) and how the one-statement
reads run (on the calling thread, on the read-only connection)."""

from __future__ import annotations

import asyncio
import inspect
import re
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from store_support import NOW

from qflare.errors import NotFound, StoreError, StoreUnavailable
from qflare.store import DeviceState, KeyPurpose, SqliteStore, Store, open_store
from qflare.store import sql as q
from qflare.store.errors import InvalidInput
from qflare.store.sql import SqlStore
from qflare.store.sqlite import ON_LOOP, ON_THREAD, _connect_reader, from_micros, to_micros

SID = b"s" * 16


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    store = await open_store(sqlite_url)
    try:
        yield store
    finally:
        await store.close()


def db_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


class Jobs:
    """Counts the jobs that reach the store's database thread."""

    def __init__(self, store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
        thread = store._thread
        assert thread is not None
        self.count = 0
        call = thread.call

        async def counted(job: Callable[[], Any]) -> Any:
            self.count += 1
            return await call(job)

        monkeypatch.setattr(thread, "call", counted)


async def add_rows(store: Store) -> None:
    """A tenant, a device with its key and a session (the device active: it completed a
    handshake), and a server key."""
    await store.create_tenant("acme", "Acme", now=NOW)
    await store.create_token(
        "acme", token_id="t1", token_hash=b"h" * 32, now=NOW, expires_at=NOW + timedelta(1)
    )
    await store.enroll_device(
        "acme", b"h" * 32, now=NOW, device_id="d1", algorithm="ML-DSA-44", public_key=b"pk"
    )
    await store.finish_handshake(
        "acme",
        session_id=SID,
        device_id="d1",
        suite=1,
        epoch=0,
        encrypted_chain_state=b"c" * 32,
        replay_window=b"w" * 8,
        now=NOW,
        expires_at=NOW + timedelta(1),
    )
    await store.rotate_server_key(
        "acme",
        key_id="k1",
        purpose=KeyPurpose.KEM_STATIC,
        algorithm="ML-KEM-768",
        public_key=b"spk",
        encrypted_private=b"ssk",
        now=NOW,
    )


async def every_read(store: Store) -> list[object]:
    """Each ON_LOOP operation once, plus two that find nothing (NotFound, as a value)."""
    reads: list[Callable[[], Any]] = [
        lambda: store.get_device("acme", "d1"),
        lambda: store.get_device_with_key("acme", "d1"),
        lambda: store.get_device_key("acme", "d1"),
        lambda: store.get_device_key("acme", "d1", 1),
        lambda: store.get_active_server_key("acme", KeyPurpose.KEM_STATIC),
        lambda: store.list_server_keys("acme"),
        lambda: store.get_session("acme", SID),
        lambda: store.get_device("acme", "nobody"),
        lambda: store.get_session("other", SID),
    ]
    out: list[object] = []
    for read in reads:
        try:
            out.append(await read())
        except NotFound as exc:
            out.append(str(exc))
    return out


@contextmanager
def held_write(path: Path) -> Iterator[None]:
    """Another connection, on a thread of its own, holds a write transaction open (BEGIN
    IMMEDIATE, a device quarantined, not committed) until the block ends; then it commits."""
    holding, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE devices SET state = 'quarantined' WHERE device_id = 'd1'")
            holding.set()
            release.wait(10)
            db.execute("COMMIT")
        except BaseException as exc:
            errors.append(exc)
            holding.set()
        finally:
            db.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10) and not errors
        yield
    finally:
        release.set()
        thread.join(10)
    assert not errors


async def test_connection_settings(store: SqliteStore) -> None:
    async def read() -> dict[str, object]:
        async with store._transaction(None, write=False) as tx:
            return {
                pragma: next(iter((await tx.fetchrow(f"PRAGMA {pragma}") or {}).values()))
                for pragma in ("journal_mode", "synchronous", "foreign_keys", "secure_delete")
            }

    got = await store._on_thread(read)
    assert got == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "secure_delete": 1}
    reader = store._reader
    assert reader is not None
    pragmas = ("journal_mode", "query_only", "trusted_schema", "busy_timeout")
    on_reader = {p: reader.execute(f"PRAGMA {p}").fetchone()[0] for p in pragmas}
    assert on_reader == {
        "journal_mode": "wal",
        "query_only": 1,
        "trusted_schema": 0,
        "busy_timeout": 0,
    }


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
    assert isinstance(store, SqliteStore)
    reader = store._reader
    assert reader is not None
    await store.close()
    assert store._reader is None
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        reader.execute("SELECT 1")
    with pytest.raises(StoreUnavailable):
        await store.get_tenant("acme")
    # The reads answer as before: the arguments checked, then StoreUnavailable.
    for read in every_read(store), store.get_device("acme", "d1"):
        with pytest.raises(StoreUnavailable, match="not open"):
            await read
    with pytest.raises(InvalidInput):
        await store.get_session("acme", b"short")


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


def test_every_operation_runs_on_the_database_thread_but_the_reads() -> None:
    """Each public operation is one job on the store's thread (one hop), but cleanup and the
    one-statement reads (ON_LOOP), which run on the calling thread."""
    operations = {
        name
        for name in Store.__abstractmethods__
        if inspect.iscoroutinefunction(getattr(Store, name)) and not name.startswith("_")
    }
    assert set(ON_THREAD) | set(ON_LOOP) == operations - {"open", "close", "cleanup"}
    assert not set(ON_THREAD) & set(ON_LOOP)
    assert {"get_device", "get_device_with_key", "get_session"} <= set(ON_LOOP)
    for name in ON_THREAD:
        assert getattr(SqliteStore, name) is not getattr(SqlStore, name)
    for name in ON_LOOP:
        assert getattr(SqliteStore, name) is getattr(SqlStore, name)


async def test_a_transaction_is_one_hop(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create_tenant("acme", "Acme", now=NOW)
    await store.create_token(
        "acme", token_id="t1", token_hash=b"h" * 32, now=NOW, expires_at=NOW + timedelta(1)
    )
    jobs = Jobs(store, monkeypatch)
    await store.enroll_device(
        "acme", b"h" * 32, now=NOW, device_id="d1", algorithm="ML-DSA-44", public_key=b"pk"
    )
    assert jobs.count == 1
    accepted = await store.accept_handshake(
        "acme", "d1", b"n" * 16, timestamp=5, expires_at=NOW + timedelta(1)
    )
    assert accepted
    assert jobs.count == 2
    await store.cleanup(NOW + timedelta(2), batch_size=1)  # one job per batch
    assert jobs.count > 2


async def test_reads_run_on_the_calling_thread(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No read reaches the database thread, and each answers what the thread path answers
    (the same operation run inside a job, where _read_row takes SqlStore's transaction)."""
    await add_rows(store)
    jobs = Jobs(store, monkeypatch)
    here = await every_read(store)
    assert jobs.count == 0
    on_thread = await store._on_thread(lambda: every_read(store))
    assert jobs.count == 1
    assert here == on_thread
    assert here[-2:] == ["device not found", "session not found"]


async def test_reads_see_the_writes_before_them(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_rows(store)
    jobs = Jobs(store, monkeypatch)
    session = await store.get_session("acme", SID)
    for i in range(1, 51):
        session = await store.update_session(
            "acme", SID, expected_version=session.version, now=NOW, replay_window=b"%d" % i
        )
        seen = await store.get_session("acme", SID)
        assert (seen.version, seen.replay_window) == (session.version, b"%d" % i)
        state = DeviceState.QUARANTINED if i % 2 else DeviceState.ACTIVE
        await store.set_device_state("acme", "d1", state, reason=str(i))
        device, _ = await store.get_device_with_key("acme", "d1")
        assert (device.state, device.state_reason) == (state, str(i))
    await store.create_device("acme", "d2", now=NOW)
    assert (await store.get_device("acme", "d2")).device_id == "d2"
    assert jobs.count == 2 * 50 + 1  # the writes; no read hopped


async def test_a_read_does_not_wait_for_an_open_write(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another connection holds a write transaction open, a read answers the committed
    state at once, on the calling thread; after the commit it answers the new one."""
    store = SqliteStore(db_path(sqlite_url), busy_timeout=5.0)
    await store.open()
    try:
        await add_rows(store)
        jobs = Jobs(store, monkeypatch)
        with held_write(db_path(sqlite_url)):
            started = time.monotonic()
            device = await store.get_device("acme", "d1")
            assert time.monotonic() - started < 1.0  # far below the 5 s busy timeout
            assert device.state is DeviceState.ACTIVE  # the committed state (add_rows)
        assert (await store.get_device("acme", "d1")).state is DeviceState.QUARANTINED
        assert jobs.count == 0
    finally:
        await store.close()


class FailingReader(sqlite3.Connection):
    """A read connection on which every statement fails with ``error``, once it is set."""

    error: sqlite3.Error | None = None

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        if self.error is not None:
            raise self.error
        return super().execute(*args, **kwargs)


def failing_reader(store: SqliteStore, error: sqlite3.Error) -> None:
    """Swap the store's read connection for one whose every statement raises ``error``
    (``close()`` then closes that one)."""
    reader = _connect_reader(store.path, FailingReader)
    assert isinstance(reader, FailingReader)
    reader.error = error
    assert store._reader is not None
    store._reader.close()
    store._reader = reader


def driver_error(kind: type[sqlite3.Error], message: str, name: str) -> sqlite3.Error:
    """An error as the driver raises it (with its SQLite error name)."""
    exc = kind(message)
    exc.sqlite_errorname = name
    return exc


@pytest.mark.parametrize(
    "error",
    [
        driver_error(sqlite3.OperationalError, "database is locked", "SQLITE_BUSY"),
        driver_error(sqlite3.OperationalError, "database is locked", "SQLITE_BUSY_RECOVERY"),
        driver_error(sqlite3.OperationalError, "database table is locked", "SQLITE_LOCKED"),
        sqlite3.OperationalError("database is locked"),  # no error name at all
    ],
)
async def test_a_busy_read_takes_the_database_thread(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch, error: sqlite3.Error
) -> None:
    """SQLITE_BUSY/LOCKED on the read connection: that read takes the thread path (where the
    busy timeout applies) and answers as usual. An in-process WAL reader cannot be made to see
    BUSY on demand (it shares the process's SHARED lock), so the error is injected."""
    await add_rows(store)
    expected = await every_read(store)
    failing_reader(store, error)
    jobs = Jobs(store, monkeypatch)
    assert await every_read(store) == expected
    assert jobs.count == len(expected)  # one hop each


@pytest.mark.parametrize(
    ("error", "mapped"),
    [
        (
            driver_error(sqlite3.OperationalError, "disk I/O error", "SQLITE_IOERR_READ"),
            StoreUnavailable,
        ),
        (
            driver_error(sqlite3.DatabaseError, "file is not a database", "SQLITE_NOTADB"),
            StoreUnavailable,
        ),
        (driver_error(sqlite3.OperationalError, "no such table: x", "SQLITE_ERROR"), StoreError),
    ],
)
async def test_read_errors_are_mapped_as_on_the_thread(
    store: SqliteStore,
    monkeypatch: pytest.MonkeyPatch,
    error: sqlite3.Error,
    mapped: type[StoreError],
) -> None:
    await add_rows(store)
    failing_reader(store, error)
    jobs = Jobs(store, monkeypatch)
    with pytest.raises(mapped) as raised:
        await store.get_device("acme", "d1")
    assert type(raised.value) is mapped
    assert raised.value.__cause__ is error
    assert jobs.count == 0


async def test_the_read_connection_is_read_only(store: SqliteStore) -> None:
    with pytest.raises(StoreUnavailable, match="SQLITE_READONLY"):
        await store._read_row(
            "acme", "INSERT INTO tenants (id, name, created_at) VALUES ($1, 'A', 0)", ["a"], "-"
        )
    with pytest.raises(NotFound):
        await store.get_tenant("a")


async def test_reads_on_other_threads_take_the_database_thread(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the thread that opened the store reads on the read connection: inside a job (the
    database thread) and on another event loop's thread, a read is SqlStore's transaction."""
    await add_rows(store)
    expected = await store.get_device("acme", "d1")
    used = driver_error(sqlite3.OperationalError, "the read connection was used", "SQLITE_ERROR")
    failing_reader(store, used)
    jobs = Jobs(store, monkeypatch)
    assert await store._on_thread(lambda: store.get_device("acme", "d1")) == expected
    assert jobs.count == 1

    def elsewhere() -> object:
        return asyncio.run(store.get_device("acme", "d1"))

    assert await asyncio.to_thread(elsewhere) == expected
    assert jobs.count == 2
    with pytest.raises(StoreError) as raised:
        await store.get_device("acme", "d1")  # the opening thread does use it
    assert raised.value.__cause__ is used


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
