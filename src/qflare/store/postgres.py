"""The production backend: PostgreSQL through asyncpg, with a connection pool of its own.

* Every connection runs as the application role (``qflare_app`` by default: the pool's login
  user ``SET ROLE``s to it, or logs in as it), which row-level security confines to the tenant
  the store names with ``set_config('app.tenant_id', $1, true)`` at the start of each
  transaction. ``true`` makes the setting transaction-local, so a pooled connection never
  carries one tenant's scope into another's transaction.
* Read-only operations run in ``READ ONLY`` transactions: a bug there cannot write.
* The hot single-row reads (``get_session``, ``get_device``, ``get_device_key``,
  ``get_active_server_key``, and ``list_server_keys``) are one round trip instead of four: one
  statement, ``SELECT * FROM read_session($1, $2)`` and the like, outside any explicit
  transaction. The function (migration 0002; ``SECURITY INVOKER``, ``STABLE``) sets the tenant
  with ``set_config(..., true)`` and runs the shared query as the caller, so row-level security
  applies to it as to everything else, and the setting ends with the statement's implicit
  transaction. ``STABLE`` makes PostgreSQL refuse any write inside it.
* The handshake's calls are one statement each as well: ``get_device_with_key`` through a
  read function (migration 0003), ``accept_handshake`` and ``finish_handshake`` through
  ``VOLATILE`` functions (migrations 0003, 0004) that lock the device row and write in the
  statement's implicit transaction (all or nothing).
* Connections come from ``pgpool.ConnectionPool``, not asyncpg's ``Pool``, whose acquire and
  release cost nearly as much event-loop CPU as a one-statement call (a task and a timeout
  context per release). Taking and returning a connection is a list pop and push; a
  connection returned inside a transaction or after a cancellation is settled and rolled back
  by a task of the pool's before it is reused, and a broken one is replaced. ``_transaction``
  sends ``BEGIN`` and ``COMMIT`` itself and leaves rollback to the pool.
* The pool sends nothing when a connection goes back (asyncpg's pool sent its reset query,
  ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``, one more round trip per
  operation, until the store turned it off): the store leaves nothing for it to reset. Every
  setting it makes is transaction-local except the role, which must survive (and which ``RESET
  ALL`` leaves alone anyway); its advisory locks are transaction-scoped; it opens no cursor
  outside a transaction and listens to nothing.
* Queries are prepared statements with parameters. The only names put into SQL text are the
  schema (validated, and only at migration time) and fixed table names.
* Per-key serialization (rotations, device key versions, audit indexes) uses transaction-scoped
  advisory locks, which the application role may take without any table privilege.
* Migrations connect as the login user without ``SET ROLE``: they need the owner's rights.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

import asyncpg

from qflare.errors import Conflict, NotFound, StoreError, StoreUnavailable
from qflare.store import validate as v
from qflare.store.errors import InvalidInput
from qflare.store.models import HandshakeFinish
from qflare.store.pgpool import ConnectionPool
from qflare.store.schema import (
    AppliedMigration,
    Migration,
    MigrationTx,
    Migrator,
    require_current,
)
from qflare.store.sql import Row, SessionArgs, SqlStore, Tx, finished, nonce_args

DEFAULT_SCHEMA: Final = "qflare"
APP_ROLE: Final = "qflare_app"
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

SET_TENANT: Final = "SELECT set_config('app.tenant_id', $1, true)"
# The statements asyncpg's Connection.transaction() sends.
BEGIN_READ: Final = "BEGIN READ ONLY;"
BEGIN_WRITE: Final = "BEGIN;"
COMMIT: Final = "COMMIT;"
SET_ROLE: Final = "SELECT set_config('role', $1, false)"
# Keyed by schema too, so two QFLARE schemas in one database do not serialize each other.
ADVISORY_LOCK: Final = (
    "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '/' || $1, 0))"
)
_DELETE_EXPIRED: Final = {
    "sessions": "SELECT delete_expired_sessions($1, $2)",
    "handshake_nonces": "SELECT delete_expired_nonces($1, $2)",
    "enrollment_tokens": "SELECT delete_expired_tokens($1, $2)",
}
_READ_APPLIED: Final = (
    "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
)
# The one-round-trip read functions (migrations 0002 and 0003), by name: the statements that
# call them.
READ_CALLS: Final = {
    "read_device": "SELECT * FROM read_device($1, $2)",
    "read_active_device_key": "SELECT * FROM read_active_device_key($1, $2)",
    "read_device_key": "SELECT * FROM read_device_key($1, $2, $3)",
    "read_active_server_key": "SELECT * FROM read_active_server_key($1, $2)",
    "read_server_keys": "SELECT * FROM read_server_keys($1, $2, $3, $4)",
    "read_session": "SELECT * FROM read_session($1, $2)",
    "read_device_with_key": "SELECT * FROM read_device_with_key($1, $2)",
}
# The handshake's replay check as one statement (migration 0003).
ACCEPT_HANDSHAKE_CALL: Final = "SELECT accept_handshake($1, $2, $3, $4, $5)"
# A ClientFinish's writes as one statement (migration 0004): INSERT_SESSION's fourteen
# parameters.
FINISH_HANDSHAKE_CALL: Final = (
    "SELECT outcome, device, session, previous_last_seen FROM finish_handshake($1, $2, $3, $4, "
    "$5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)
_MIGRATIONS_EXIST: Final = "SELECT to_regclass('schema_migrations') IS NOT NULL"
_CREATE_MIGRATIONS: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
    "name text NOT NULL, checksum bytea NOT NULL, applied_at timestamptz NOT NULL)"
)

_UNAVAILABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now, cancel
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # deadlock, serialization failure
)


def map_error(exc: BaseException) -> StoreError | None:
    """Driver errors to store errors, or None if ``exc`` is not a database error.

    The server's message text is not passed on: it can quote the offending value.
    """
    if isinstance(exc, asyncpg.UniqueViolationError):
        return Conflict(f"already exists ({exc.constraint_name})")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFound("a row it refers to does not exist")
    if isinstance(
        exc,
        asyncpg.CheckViolationError | asyncpg.NotNullViolationError | asyncpg.exceptions.DataError,
    ):
        return InvalidInput(f"value refused by the database ({exc.sqlstate})")
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        # asyncpg could not encode an argument: a caller's bug, not an outage.
        return InvalidInput("argument of the wrong type for the database")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return StoreError("permission denied by the database")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"PostgreSQL unavailable ({type(exc).__name__})")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"PostgreSQL error {exc.sqlstate}")
    return None


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        mapped = map_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


def check_schema_name(name: object) -> str:
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise InvalidInput("schema must be 1..63 of [a-z0-9_], not starting with a digit")
    return name


def safe_dsn(dsn: str) -> str:
    """The DSN without credentials, for reprs and messages."""
    parts = urlsplit(dsn)
    return f"{parts.scheme}://{parts.hostname or ''}:{parts.port or 5432}{parts.path}"


def _count(status: str) -> int:
    # asyncpg returns the command tag: "UPDATE 3", "DELETE 0", "INSERT 0 1".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: object) -> int:
        return _count(await self._conn.execute(sql, *args))

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        row = await self._conn.fetchrow(sql, *args)
        return None if row is None else dict(row)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        return [dict(r) for r in await self._conn.fetch(sql, *args)]

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        # asyncpg sends every row's Bind/Execute and one Sync: one round trip for the lot.
        await self._conn.executemany(sql, rows)

    async def lock(self, key: str) -> None:
        await self._conn.execute(ADVISORY_LOCK, key)


async def _read_applied(conn: Any) -> list[AppliedMigration]:
    if not await conn.fetchval(_MIGRATIONS_EXIST):
        return []
    return [
        AppliedMigration(r["version"], r["name"], bytes(r["checksum"]), r["applied_at"])
        for r in await conn.fetch(_READ_APPLIED)
    ]


class PostgresStore(SqlStore):
    dialect: ClassVar[str] = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        role: str | None = APP_ROLE,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        close_timeout: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self.schema = check_schema_name(schema)
        self.role = None if role is None else v.identifier(role, "role")
        self._pool_args: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "idle_timeout": idle_timeout,
            "close_timeout": close_timeout,
        }
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._pool: ConnectionPool | None = None

    def __repr__(self) -> str:
        return f"<PostgresStore {safe_dsn(self._dsn)} schema={self.schema} role={self.role}>"

    async def _init_connection(self, conn: Any) -> None:
        if self.role is not None:
            await conn.execute(SET_ROLE, self.role)

    async def _connect(self) -> Any:
        """A new connection for the pool, initialized."""
        conn = await asyncpg.connect(
            self._dsn,
            server_settings={"search_path": self.schema, "application_name": "qflare"},
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
        )
        try:
            await self._init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def open(self, *, check_schema: bool = True) -> None:
        if self._pool is not None:
            return
        pool = ConnectionPool(self._connect, **self._pool_args)
        with _mapped():
            await pool.open()
        try:
            if check_schema:
                with _mapped():
                    async with pool.connection() as conn:
                        applied = await _read_applied(conn)
                require_current(self.dialect, applied)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def migrator(self) -> Migrator:
        return PostgresMigrator(self._dsn, self.schema, self._connect_timeout)

    @asynccontextmanager
    async def _transaction(self, tenant_id: str | None, *, write: bool) -> AsyncIterator[Tx]:
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        with _mapped():
            # BEGIN and COMMIT by hand rather than conn.transaction(): a connection that leaves
            # inside a transaction (an exception, a cancelled task) is rolled back by the pool.
            async with self._pool.connection() as conn:
                await conn.execute(BEGIN_WRITE if write else BEGIN_READ)
                if tenant_id is not None:
                    await conn.execute(SET_TENANT, tenant_id)
                yield _PgTx(conn)
                await conn.execute(COMMIT)

    async def _read_rows(
        self,
        tid: str,
        sql: str,
        args: Sequence[object],
        function: str,
        function_args: Sequence[object] | None = None,
    ) -> list[Row]:
        call = READ_CALLS[function]
        return await self._call(call, args if function_args is None else function_args)

    async def _call(self, statement: str, args: Sequence[object]) -> list[Row]:
        """One statement in its own implicit transaction: the tenant a function sets (with
        is_local) is gone when it returns, and no BEGIN or COMMIT round trip is needed."""
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        with _mapped():
            async with self._pool.connection() as conn:
                rows = await conn.fetch(statement, *args)
        return [dict(r) for r in rows]

    async def _read_row(
        self,
        tid: str,
        sql: str,
        args: Sequence[object],
        function: str,
        function_args: Sequence[object] | None = None,
    ) -> Row | None:
        rows = await self._read_rows(tid, sql, args, function, function_args)
        if len(rows) > 1:  # the queries are lookups by unique keys
            raise StoreError(f"{function} returned {len(rows)} rows")
        return rows[0] if rows else None

    async def accept_handshake(
        self,
        tenant_id: str,
        device_id: str,
        nonce: bytes,
        *,
        timestamp: int,
        expires_at: datetime,
    ) -> bool:
        # One round trip: the function (migration 0003) sets the tenant and runs what the
        # shared implementation runs, inside the statement's own implicit transaction.
        args = nonce_args(tenant_id, device_id, nonce, timestamp, expires_at)
        rows = await self._call(ACCEPT_HANDSHAKE_CALL, args)
        return rows[0]["accept_handshake"] is True

    async def _finish_handshake(self, session: SessionArgs) -> HandshakeFinish:
        # One round trip: the function (migration 0004) sets the tenant, locks the device row
        # and runs what the shared implementation runs, in the statement's implicit
        # transaction. The device and the session come back as composite columns.
        row = (await self._call(FINISH_HANDSHAKE_CALL, session))[0]
        return finished(
            row["outcome"],
            dict(row["device"]),
            None if row["session"] is None else dict(row["session"]),
            row["previous_last_seen"],
        )

    async def _delete_expired(self, table: str, now: datetime, batch_size: int) -> int:
        async with self._transaction(None, write=True) as tx:
            row = await tx.fetchrow(_DELETE_EXPIRED[table], now, batch_size)
            return 0 if row is None else int(next(iter(row.values())))


class _PgMigrationTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def applied(self) -> list[AppliedMigration]:
        return await _read_applied(self._conn)

    async def run(self, migration: Migration, now: datetime) -> None:
        # No arguments: the simple query protocol runs the whole multi-statement file.
        await self._conn.execute(migration.sql)
        await self._conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) "
            "VALUES ($1, $2, $3, $4)",
            migration.version,
            migration.name,
            migration.checksum,
            now,
        )


class PostgresMigrator(Migrator):
    dialect = "postgres"

    def __init__(self, dsn: str, schema: str, connect_timeout: float = 10.0) -> None:
        self._dsn, self._schema = dsn, check_schema_name(schema)
        self._connect_timeout = connect_timeout
        self._conn: Any = None

    async def _connection(self) -> Any:
        if self._conn is None:
            with _mapped():
                # pg_temp last: the SECURITY DEFINER functions capture this search_path, and
                # a temporary object must never shadow theirs.
                self._conn = await asyncpg.connect(
                    self._dsn,
                    server_settings={
                        "search_path": f"{self._schema}, pg_temp",
                        "application_name": "qflare-migrate",
                    },
                    timeout=self._connect_timeout,
                )
        return self._conn

    async def applied(self) -> list[AppliedMigration]:
        conn = await self._connection()
        with _mapped():
            return await _read_applied(conn)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[MigrationTx]:
        conn = await self._connection()
        with _mapped():
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('qflare-migrate/' || $1, 0))",
                    self._schema,
                )
                # DDL takes no parameters; the name passed check_schema_name above.
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                await conn.execute(_CREATE_MIGRATIONS)
                yield _PgMigrationTx(conn)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
