"""The embedded backend: one SQLite file under the data directory, no set-up.

Pragmas, and why:

* ``journal_mode=WAL``: readers never block the writer and the writer never blocks readers,
  and a crash (even SIGKILL mid-transaction) leaves the last committed state: the WAL is
  replayed or ignored on the next open, never half-applied.
* ``synchronous=FULL``: every commit is fsynced before it returns. ``NORMAL`` in WAL mode is
  safe against a process crash but can lose the last commits on power loss, and what this
  store commits is security state: a redeemed single-use token or a recorded handshake nonce
  that "un-happens" after a power cut can be used again. One fsync per commit is affordable at
  the lab scale SQLite serves; production runs on PostgreSQL.
* ``foreign_keys=ON``: SQLite leaves them off unless asked, per connection.
* ``secure_delete=ON``: deleted rows are overwritten with zeros instead of lingering in free
  pages, so an expired session's (sealed) chain state does not outlive its row in the file.
* ``trusted_schema=OFF``: a tampered database file cannot make schema objects call functions.

One connection serves the store's transactions, owned by one thread of the store's own
(``_DbThread``), which runs one job at a time: SQLite has one writer at a time anyway, and the
queue gives each transaction the connection to itself. A store operation is one job, so it
costs one hop to the thread and back however many statements it runs: the shared
implementation in ``sql.py`` (a coroutine) is driven to its end on the database thread, where
this backend's ``Tx`` and ``_transaction`` run every statement synchronously and so never
suspend (``_run_to_end`` refuses an operation that does). Write transactions start with
``BEGIN IMMEDIATE``, which takes the write lock up front and waits up to ``busy_timeout`` for
another process (the CLI running cleanup, say) instead of failing halfway through.

The one-statement reads (``_read_row``/``_read_rows``: the point lookups ``get_device``,
``get_device_with_key``, ``get_session``, ...; the tuple ``ON_LOOP``) skip the hop, which costs
far more CPU than their SQL: they run on the calling thread, on a second connection opened
read-only (``mode=ro``, ``query_only=ON``, ``trusted_schema=OFF``) by ``open()`` on the thread
that opened the store. Each is one statement in autocommit, so its own read transaction,
started after every write the caller has awaited committed: it sees them. In WAL mode a reader
never waits for the writer, and ``busy_timeout = 0`` makes sure it never waits for a lock
either: if SQLite answers BUSY or LOCKED anyway (recovery after a crash, say), that one read
takes the thread path instead, where waiting blocks only the database thread. A read on
another thread (the database thread itself, inside a job) takes the thread path too.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import queue
import re
import sqlite3
import threading
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar, cast

from qflare.errors import Conflict, NotFound, StoreError, StoreUnavailable
from qflare.store.errors import InvalidInput
from qflare.store.schema import (
    AppliedMigration,
    Migration,
    MigrationTx,
    Migrator,
    require_current,
    split_statements,
)
from qflare.store.sql import Row, SqlStore, Tx

T = TypeVar("T")

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)
# Columns stored as INTEGER microseconds since the epoch, handed out as datetimes.
_TIME_COLUMNS: Final = frozenset(
    {
        "created_at",
        "expires_at",
        "used_at",
        "activated_at",
        "retire_after",
        "updated_at",
        "last_seen",
        "ts",
        "applied_at",
        "key_created_at",
    }
)
_PRAGMAS: Final = (
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = FULL",
    "PRAGMA secure_delete = ON",
    "PRAGMA trusted_schema = OFF",
)
_DELETE_EXPIRED: Final = {
    "sessions": "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions "
    "WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
    "handshake_nonces": "DELETE FROM handshake_nonces WHERE rowid IN (SELECT rowid FROM "
    "handshake_nonces WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
    "enrollment_tokens": "DELETE FROM enrollment_tokens WHERE rowid IN (SELECT rowid FROM "
    "enrollment_tokens WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
}
_CREATE_MIGRATIONS: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
    "name TEXT NOT NULL, checksum BLOB NOT NULL, applied_at INTEGER NOT NULL) STRICT"
)
_UNAVAILABLE: Final = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
    "SQLITE_PROTOCOL",
    "SQLITE_NOTADB",
    "SQLITE_CORRUPT",
)


def to_micros(value: datetime) -> int:
    return (value - _EPOCH) // _MICRO


def from_micros(value: int) -> datetime:
    return _EPOCH + value * _MICRO


@lru_cache(maxsize=256)
def _numbered(sql: str) -> str:
    # The shared statements use PostgreSQL's $n; SQLite's ?n means the same.
    return re.sub(r"\$(\d+)", r"?\1", sql)


def _param(value: object) -> object:
    return to_micros(value) if isinstance(value, datetime) else value


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in row.keys():  # noqa: SIM118 - sqlite3.Row iterates values, not keys
        value = row[key]
        out[key] = from_micros(value) if key in _TIME_COLUMNS and value is not None else value
    return out


def map_error(exc: sqlite3.Error) -> StoreError:
    """Driver errors to store errors; driver text (it may quote a value) is not passed on."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if isinstance(exc, sqlite3.IntegrityError):
        if name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"):
            return Conflict("already exists")
        if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
            return NotFound("a row it refers to does not exist")
        if name == "SQLITE_CONSTRAINT_TRIGGER":
            return StoreError("refused by the database: audit_entries is append-only")
        return InvalidInput("value refused by a database constraint")
    if name.startswith(_UNAVAILABLE) or "locked" in str(exc):
        return StoreUnavailable(f"SQLite database unavailable ({name or 'error'})")
    return StoreError(f"SQLite error ({name or type(exc).__name__})")


def _busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): the lock was not free right now."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc)


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise map_error(exc) from exc


def _prepare_file(path: Path) -> None:
    # Only the service account may read the database: it holds hashes and sealed secrets.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open and configure the connection; called on the thread that will own it."""
    try:
        _prepare_file(path)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create database file {path}: {exc.strerror}") from None
    with _mapped():
        # isolation_level=None: the store issues BEGIN/COMMIT itself, nothing implicit.
        db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        with _mapped():
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreUnavailable(f"{path} cannot use WAL journaling")
            for pragma in _PRAGMAS:
                db.execute(pragma)
    except BaseException:
        db.close()
        raise
    return db


def _connect_reader(
    path: Path, factory: type[sqlite3.Connection] = sqlite3.Connection
) -> sqlite3.Connection:
    """The read-only connection for one-statement reads on the event loop's thread.

    ``mode=ro``: SQLite refuses every write on it, and it cannot create the file (``open()``
    made it). ``busy_timeout = 0`` (``timeout=0``): a lock that is not free is answered with
    SQLITE_BUSY at once, never waited for on the loop. ``query_only`` and ``trusted_schema``
    as on the main connection; the other pragmas only matter to writes. ``check_same_thread``
    is off because ``SqliteStore`` checks the thread itself: only the thread that opened the
    store reads on it (each read runs to its end without awaiting, so never two at once), and
    ``close()`` may then close it from wherever it is called.
    """
    uri = path.absolute().as_uri() + "?mode=ro"
    with _mapped():
        db = sqlite3.connect(
            uri,
            timeout=0,
            isolation_level=None,
            check_same_thread=False,
            uri=True,
            factory=factory,
        )
    try:
        db.row_factory = sqlite3.Row
        with _mapped():
            db.execute("PRAGMA query_only = ON")
            db.execute("PRAGMA trusted_schema = OFF")
    except BaseException:
        db.close()
        raise
    return db


def _query(
    db: sqlite3.Connection, sql: str, args: Sequence[object], take: Callable[[sqlite3.Cursor], T]
) -> T:
    """Run one statement and ``take`` what it answers."""
    cur = db.execute(_numbered(sql), [_param(a) for a in args])
    try:
        return take(cur)
    finally:
        cur.close()  # ends the statement: a RETURNING statement is complete, a read is over


def _rowcount(cur: sqlite3.Cursor) -> int:
    return int(cur.rowcount)


def _first(cur: sqlite3.Cursor) -> Row | None:
    row = cur.fetchone()
    return None if row is None else _row(row)


def _all(cur: sqlite3.Cursor) -> list[Row]:
    return [_row(r) for r in cur.fetchall()]


class _Busy(Exception):
    """The read connection found a lock taken: this read takes the thread path instead."""


def _read_now(
    db: sqlite3.Connection, sql: str, args: Sequence[object], take: Callable[[sqlite3.Cursor], T]
) -> T:
    """One statement on the read connection, here and now; errors mapped as on the thread."""
    try:
        return _query(db, sql, args, take)
    except sqlite3.Error as exc:
        if _busy(exc):
            raise _Busy from exc
        raise map_error(exc) from exc


def _read_applied(db: sqlite3.Connection) -> list[AppliedMigration]:
    with _mapped():
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        if db.execute(exists).fetchone() is None:
            return []
        query = "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
        rows = [_row(r) for r in db.execute(query).fetchall()]
    return [
        AppliedMigration(r["version"], r["name"], bytes(r["checksum"]), r["applied_at"])
        for r in rows
    ]


@contextmanager
def _begin(db: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """BEGIN, then COMMIT, or ROLLBACK on any exception (the transaction is all or nothing)."""
    with _mapped():
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except BaseException:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise


def _run_to_end(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end here and now, on this thread; it must never suspend.

    The store's coroutines only await this backend's ``_transaction`` and ``_SqliteTx``, which
    do their work synchronously and return without suspending, so one ``send`` finishes them.
    A coroutine that suspends anyway (awaits real I/O, a lock, a sleep) is a bug: it is closed
    at that point, which rolls its transaction back, and refused.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("a SQLite store operation suspended on the database thread")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _DbThread:
    """One thread that runs jobs one at a time, in order; the connection lives on it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="qflare-sqlite", daemon=True)
        self._thread.start()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    async def call(self, job: Callable[[], T]) -> T:
        """Run ``job`` on the thread: one hop there and one back, whatever the job does."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((job, loop, future))
        return await future

    def stop(self) -> None:
        """The thread ends after the jobs already queued."""
        self._jobs.put(None)

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, loop, future = item
            result: Any = None
            error: BaseException | None = None
            try:
                result = job()
            except BaseException as exc:  # handed to the awaiting coroutine
                error = exc
            with suppress(RuntimeError):  # the loop closed while the job ran: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)
            del item, job, loop, future, result, error


class _SqliteTx:
    """Runs each statement synchronously: used only on the database thread (``_run_to_end``)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, *args: object) -> int:
        return _query(self._db, sql, args, _rowcount)

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        return _query(self._db, sql, args, _first)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        return _query(self._db, sql, args, _all)

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        params = [[_param(a) for a in row] for row in rows]
        self._db.executemany(_numbered(sql), params).close()

    async def lock(self, key: str) -> None:
        # BEGIN IMMEDIATE already holds the database's only write lock.
        return None


class SqliteStore(SqlStore):
    """Every public operation of ``SqlStore`` that runs a transaction runs as one job on the
    database thread (``_on_thread``; wrapped below the class, ``ON_THREAD``), so a transaction
    is one hop however many statements it runs. The rest stay on the event loop: the
    one-statement reads (``ON_LOOP``) run on the read connection there (``_read_row``), and
    each of ``cleanup``'s batches is a job of its own (``_delete_expired``), so live traffic
    gets the thread between batches."""

    dialect: ClassVar[str] = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._thread: _DbThread | None = None
        self._db: sqlite3.Connection | None = None
        # The read-only connection and the thread that may use it (the one that opened us).
        self._reader: sqlite3.Connection | None = None
        self._reader_owner = 0

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    async def open(self, *, check_schema: bool = True) -> None:
        if self._thread is not None:
            return
        thread = _DbThread()
        try:
            db = await thread.call(lambda: _connect(self.path, self._busy_timeout))
            try:
                if check_schema:
                    require_current(self.dialect, await thread.call(lambda: _read_applied(db)))
                # After _connect: the file exists and is in WAL mode.
                reader = _connect_reader(self.path)
            except BaseException:
                await thread.call(db.close)
                raise
        except BaseException:
            thread.stop()
            raise
        self._thread, self._db = thread, db
        self._reader, self._reader_owner = reader, threading.get_ident()

    async def close(self) -> None:
        thread, db, reader = self._thread, self._db, self._reader
        self._thread = self._db = self._reader = None
        if reader is not None:
            reader.close()  # first: the main connection, closed last, checkpoints the WAL
        if thread is not None and db is not None:
            # Queued after every job already submitted: the transaction running now ends first;
            # the ones behind it find the store closed (StoreUnavailable).
            try:
                await thread.call(db.close)
            finally:
                thread.stop()

    def migrator(self) -> Migrator:
        return SqliteMigrator(self.path, self._busy_timeout)

    async def _on_thread(self, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run the coroutine ``body()`` makes to its end on the database thread: one hop."""
        thread = self._thread
        if thread is None or thread.is_current():
            # Closed: run here, so the arguments are checked as always and then
            # _transaction answers StoreUnavailable. Already on the thread (an operation
            # calling another): it runs to its end without suspending anyway.
            return await body()
        return await thread.call(lambda: _run_to_end(body()))

    async def _read_row(
        self,
        tid: str,
        sql: str,
        args: Sequence[object],
        function: str,
        function_args: Sequence[object] | None = None,
    ) -> Row | None:
        read = super()._read_row
        return await self._read(
            sql, args, _first, lambda: read(tid, sql, args, function, function_args)
        )

    async def _read_rows(
        self,
        tid: str,
        sql: str,
        args: Sequence[object],
        function: str,
        function_args: Sequence[object] | None = None,
    ) -> list[Row]:
        read = super()._read_rows
        return await self._read(
            sql, args, _all, lambda: read(tid, sql, args, function, function_args)
        )

    async def _read(
        self,
        sql: str,
        args: Sequence[object],
        take: Callable[[sqlite3.Cursor], T],
        on_thread: Callable[[], Coroutine[Any, Any, T]],
    ) -> T:
        """A one-statement read, here on the read connection if this is the thread that opened
        the store. Otherwise (closed, another thread, the database thread itself), or if SQLite
        answers BUSY/LOCKED, ``on_thread()``: SqlStore's read transaction, as one job."""
        reader = self._reader
        if reader is not None and threading.get_ident() == self._reader_owner:
            with suppress(_Busy):
                return _read_now(reader, sql, args, take)
        return await self._on_thread(on_thread)

    @asynccontextmanager
    async def _transaction(self, tenant_id: str | None, *, write: bool) -> AsyncIterator[Tx]:
        db, thread = self._db, self._thread
        if db is None or thread is None:
            raise StoreUnavailable("store is not open")
        if not thread.is_current():
            raise RuntimeError("a SQLite transaction runs on the database thread (_on_thread)")
        with _begin(db, write=write):
            yield _SqliteTx(db)

    async def _delete_expired(self, table: str, now: datetime, batch_size: int) -> int:
        async def batch() -> int:
            async with self._transaction(None, write=True) as tx:
                return await tx.execute(_DELETE_EXPIRED[table], now, batch_size)

        return await self._on_thread(batch)


def _on_db_thread(
    operation: Callable[..., Coroutine[Any, Any, Any]],
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(operation)
    async def run(self: SqliteStore, *args: Any, **kwargs: Any) -> Any:
        return await self._on_thread(lambda: operation(self, *args, **kwargs))

    return run


def _names(code: types.CodeType) -> set[str]:
    """The attribute and global names ``code`` uses, its nested functions' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


_OPERATIONS: Final = {
    name: _names(member.__code__)
    for name, member in vars(SqlStore).items()
    if not name.startswith("_") and inspect.iscoroutinefunction(member)
}
# The operations that stay on the calling thread: those that read only through _read_row and
# _read_rows, never opening a transaction (one that did would be refused there, loudly).
ON_LOOP: Final = tuple(
    name
    for name, names in _OPERATIONS.items()
    if names & {"_read_row", "_read_rows"} and "_transaction" not in names
)
# The store operations SqliteStore runs on its database thread: every other public coroutine
# SqlStore defines, except cleanup (see SqliteStore).
ON_THREAD: Final = tuple(name for name in _OPERATIONS if name not in ON_LOOP and name != "cleanup")
for _name in ON_THREAD:
    setattr(SqliteStore, _name, _on_db_thread(getattr(SqlStore, _name)))
del _name


class _SqliteMigrationTx:
    def __init__(self, db: sqlite3.Connection, thread: _DbThread) -> None:
        self._db, self._thread = db, thread

    async def applied(self) -> list[AppliedMigration]:
        return await self._thread.call(lambda: _read_applied(self._db))

    async def run(self, migration: Migration, now: datetime) -> None:
        def apply() -> None:
            with _mapped():
                for statement in split_statements(migration.sql, sqlite3.complete_statement):
                    self._db.execute(statement)
                self._db.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at) "
                    "VALUES (?, ?, ?, ?)",
                    (migration.version, migration.name, migration.checksum, to_micros(now)),
                )

        await self._thread.call(apply)


class SqliteMigrator(Migrator):
    """Migrations are not on a hot path: each statement batch is a hop of its own."""

    dialect = "sqlite"

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self._path, self._busy_timeout = path, busy_timeout
        self._thread: _DbThread | None = None
        self._db: sqlite3.Connection | None = None

    async def _connection(self) -> tuple[sqlite3.Connection, _DbThread]:
        if self._db is None or self._thread is None:
            thread = _DbThread()
            try:
                db = await thread.call(lambda: _connect(self._path, self._busy_timeout))
            except BaseException:
                thread.stop()
                raise
            self._thread, self._db = thread, db
        return self._db, self._thread

    async def applied(self) -> list[AppliedMigration]:
        db, thread = await self._connection()
        return await thread.call(lambda: _read_applied(db))

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[MigrationTx]:
        db, thread = await self._connection()

        def run(sql: str) -> None:
            with _mapped():
                db.execute(sql)

        await thread.call(lambda: run("BEGIN IMMEDIATE"))
        try:
            await thread.call(lambda: run(_CREATE_MIGRATIONS))
            yield _SqliteMigrationTx(db, thread)
        except BaseException:
            await thread.call(lambda: _rollback(db))
            raise
        try:
            await thread.call(lambda: run("COMMIT"))
        except BaseException:
            await thread.call(lambda: _rollback(db))
            raise

    async def close(self) -> None:
        thread, db = self._thread, self._db
        self._thread = self._db = None
        if thread is not None and db is not None:
            try:
                await thread.call(db.close)
            finally:
                thread.stop()


def _rollback(db: sqlite3.Connection) -> None:
    with suppress(sqlite3.Error):
        db.execute("ROLLBACK")
