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

One connection serves the store; an asyncio lock gives each transaction the connection to
itself (SQLite has one writer at a time anyway). Write transactions start with
``BEGIN IMMEDIATE``, which takes the write lock up front and waits up to ``busy_timeout`` for
another process (the CLI running cleanup, say) instead of failing halfway through.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Final

import aiosqlite

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


async def _connect(path: Path, busy_timeout: float) -> aiosqlite.Connection:
    try:
        _prepare_file(path)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create database file {path}: {exc.strerror}") from None
    with _mapped():
        # isolation_level=None: the store issues BEGIN/COMMIT itself, nothing implicit.
        db = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        with _mapped():
            async with db.execute("PRAGMA journal_mode = WAL") as cur:
                mode = await cur.fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreUnavailable(f"{path} cannot use WAL journaling")
            for pragma in _PRAGMAS:
                await db.execute(pragma)
    except BaseException:
        await db.close()
        raise
    return db


async def _read_applied(db: aiosqlite.Connection) -> list[AppliedMigration]:
    exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    async with db.execute(exists) as cur:
        if await cur.fetchone() is None:
            return []
    query = "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    async with db.execute(query) as cur:
        rows = [_row(r) for r in await cur.fetchall()]
    return [
        AppliedMigration(r["version"], r["name"], bytes(r["checksum"]), r["applied_at"])
        for r in rows
    ]


@asynccontextmanager
async def _begin(db: aiosqlite.Connection, *, write: bool) -> AsyncIterator[None]:
    with _mapped():
        await db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except BaseException:
            with suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise
        try:
            await db.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise


class _SqliteTx:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, *args: object) -> int:
        async with self._db.execute(_numbered(sql), [_param(a) for a in args]) as cur:
            return int(cur.rowcount)

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        async with self._db.execute(_numbered(sql), [_param(a) for a in args]) as cur:
            row = await cur.fetchone()
        return None if row is None else _row(row)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        async with self._db.execute(_numbered(sql), [_param(a) for a in args]) as cur:
            return [_row(r) for r in await cur.fetchall()]

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        params = [[_param(a) for a in row] for row in rows]
        async with self._db.executemany(_numbered(sql), params):
            pass

    async def lock(self, key: str) -> None:
        # BEGIN IMMEDIATE already holds the database's only write lock.
        return None


class SqliteStore(SqlStore):
    dialect: ClassVar[str] = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    async def open(self, *, check_schema: bool = True) -> None:
        if self._db is not None:
            return
        db = await _connect(self.path, self._busy_timeout)
        try:
            if check_schema:
                with _mapped():
                    applied = await _read_applied(db)
                require_current(self.dialect, applied)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await db.close()

    def migrator(self) -> Migrator:
        return SqliteMigrator(self.path, self._busy_timeout)

    @asynccontextmanager
    async def _transaction(self, tenant_id: str | None, *, write: bool) -> AsyncIterator[Tx]:
        async with self._lock:
            if self._db is None:
                raise StoreUnavailable("store is not open")
            async with _begin(self._db, write=write):
                yield _SqliteTx(self._db)

    async def _delete_expired(self, table: str, now: datetime, batch_size: int) -> int:
        async with self._transaction(None, write=True) as tx:
            return await tx.execute(_DELETE_EXPIRED[table], now, batch_size)


class _SqliteMigrationTx:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def applied(self) -> list[AppliedMigration]:
        return await _read_applied(self._db)

    async def run(self, migration: Migration, now: datetime) -> None:
        for statement in split_statements(migration.sql, sqlite3.complete_statement):
            await self._db.execute(statement)
        await self._db.execute(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) "
            "VALUES (?, ?, ?, ?)",
            (migration.version, migration.name, migration.checksum, to_micros(now)),
        )


class SqliteMigrator(Migrator):
    dialect = "sqlite"

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self._path, self._busy_timeout = path, busy_timeout
        self._db: aiosqlite.Connection | None = None

    async def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            self._db = await _connect(self._path, self._busy_timeout)
        return self._db

    async def applied(self) -> list[AppliedMigration]:
        db = await self._connection()
        with _mapped():
            return await _read_applied(db)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[MigrationTx]:
        db = await self._connection()
        async with _begin(db, write=True):
            await db.execute(_CREATE_MIGRATIONS)
            yield _SqliteMigrationTx(db)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
