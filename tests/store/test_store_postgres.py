"""PostgreSQL only: row-level security, least privilege, append-only audit, index use.

These tests run SQL as the real application role (``SET ROLE qflare_app`` after connecting as
the test superuser), so what they show is what the database enforces, not what the store's
queries happen to ask for.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from store_support import NOW, schema_of, with_query, without_query

from qflare.errors import Conflict, NotFound, StoreError, StoreUnavailable
from qflare.store import (
    FinishOutcome,
    KeyPurpose,
    KeyState,
    PostgresStore,
    SessionStatus,
    Store,
    open_store,
)
from qflare.store import sql as q
from qflare.store.pgpool import ConnectionPool
from qflare.store.postgres import FINISH_HANDSHAKE_CALL, READ_CALLS, SET_TENANT

pytestmark = pytest.mark.postgres

A, B = "acme", "globex"
TENANT_TABLES = (
    "tenants",
    "devices",
    "device_keys",
    "enrollment_tokens",
    "server_keys",
    "sessions",
    "handshake_nonces",
    "security_events",
)


def session_fields(session_id: bytes, device_id: str) -> dict[str, Any]:
    """The keyword arguments of ``finish_handshake``."""
    return {
        "session_id": session_id,
        "device_id": device_id,
        "suite": 1,
        "epoch": 1,
        "encrypted_chain_state": b"sealed",
        "replay_window": b"",
        "now": NOW,
        "expires_at": NOW + timedelta(hours=1),
    }


async def add_session(store: Store, tenant: str, device_id: str) -> None:
    """A live session of ``device_id`` (which becomes active); its id is the tenant's name
    padded with dots."""
    done = await store.finish_handshake(
        tenant, **session_fields(tenant.encode().ljust(16, b"."), device_id)
    )
    assert done.outcome is FinishOutcome.CREATED


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[Store]:
    store = await open_store(pg_url)
    try:
        for tenant in (A, B):
            await store.create_tenant(tenant, tenant.title(), now=NOW)
            for i in range(3):
                await store.create_device(tenant, f"{tenant}-dev-{i}", now=NOW)
            await add_session(store, tenant, f"{tenant}-dev-0")
        yield store
    finally:
        await store.close()


@pytest.fixture
async def app(postgres_url: str, pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection running as qflare_app, with no tenant chosen yet."""
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": schema_of(pg_url)})
    await conn.execute("SET ROLE qflare_app")
    try:
        yield conn
    finally:
        await conn.close()


async def scoped(conn: asyncpg.Connection, tenant: str) -> None:
    await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)


# -- the role -------------------------------------------------------------------------------


async def test_app_role_is_an_ordinary_role(pg_owner: asyncpg.Connection) -> None:
    row = await pg_owner.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolcanlogin "
        "FROM pg_roles WHERE rolname = 'qflare_app'"
    )
    assert row is not None
    assert tuple(row) == (False, False, False, False, False)


EXPECTED_PRIVILEGES = {
    "tenants": {"SELECT", "INSERT"},
    "devices": {"SELECT", "INSERT", "UPDATE"},
    "device_keys": {"SELECT", "INSERT", "UPDATE"},
    "enrollment_tokens": {"SELECT", "INSERT", "UPDATE"},
    "server_keys": {"SELECT", "INSERT", "UPDATE"},
    "sessions": {"SELECT", "INSERT", "UPDATE"},
    "handshake_nonces": {"SELECT", "INSERT"},
    "audit_entries": {"SELECT", "INSERT"},
    "security_events": {"SELECT", "INSERT"},
    "admin_tokens": {"SELECT", "INSERT", "UPDATE"},
    "schema_migrations": {"SELECT"},
}


@pytest.mark.parametrize("table", sorted(EXPECTED_PRIVILEGES))
async def test_app_role_has_exactly_its_privileges(
    pg_owner: asyncpg.Connection, table: str
) -> None:
    held = {
        p
        for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
        if await pg_owner.fetchval("SELECT has_table_privilege('qflare_app', $1, $2)", table, p)
    }
    assert held == EXPECTED_PRIVILEGES[table]


# -- row-level security ---------------------------------------------------------------------


@pytest.mark.usefixtures("store")
async def test_without_a_tenant_the_app_role_sees_nothing(app: asyncpg.Connection) -> None:
    for table in TENANT_TABLES:
        assert await app.fetchval(f"SELECT count(*) FROM {table}") == 0, table


@pytest.mark.usefixtures("store")
async def test_one_tenant_cannot_read_another(app: asyncpg.Connection) -> None:
    async with app.transaction():
        await scoped(app, A)
        # No WHERE on tenant: the policy alone decides what is visible.
        devices = await app.fetch("SELECT tenant_id, device_id FROM devices ORDER BY device_id")
        assert [tuple(r) for r in devices] == [(A, f"{A}-dev-{i}") for i in range(3)]
        assert await app.fetchval("SELECT count(*) FROM sessions") == 1
        assert await app.fetchval("SELECT array_agg(id) FROM tenants") == [A]
        assert await app.fetchval("SELECT count(*) FROM devices WHERE tenant_id = $1", B) == 0
    # The scope was transaction-local: it is gone after commit.
    assert await app.fetchval("SELECT count(*) FROM devices") == 0


@pytest.mark.usefixtures("store")
async def test_one_tenant_cannot_change_another(
    app: asyncpg.Connection, pg_owner: asyncpg.Connection
) -> None:
    async with app.transaction():
        await scoped(app, A)
        assert await app.execute("UPDATE devices SET state = 'revoked'") == "UPDATE 3"
        assert (
            await app.execute("UPDATE devices SET state = 'revoked' WHERE tenant_id = $1", B)
            == "UPDATE 0"
        )
        assert await app.execute("UPDATE sessions SET state = 'revoked'") == "UPDATE 1"
    states = await pg_owner.fetch(
        "SELECT tenant_id, state FROM devices ORDER BY tenant_id, device_id"
    )
    assert [tuple(r) for r in states] == [(A, "revoked")] * 3 + [
        (B, "active"),  # it completed a handshake (add_session)
        (B, "enrolled"),
        (B, "enrolled"),
    ]
    assert await pg_owner.fetchval("SELECT state FROM sessions WHERE tenant_id = $1", B) == (
        SessionStatus.ACTIVE.value
    )


@pytest.mark.usefixtures("store")
@pytest.mark.parametrize(
    "statement",
    [
        # Writing a row into another tenant.
        "INSERT INTO devices (tenant_id, device_id, state, created_at) "
        "VALUES ('globex', 'planted', 'active', now())",
        "INSERT INTO tenants (id, name, created_at) VALUES ('initech', 'Initech', now())",
        # Moving one's own row into another tenant.
        "UPDATE devices SET tenant_id = 'globex' WHERE device_id = 'acme-dev-1'",
        # No DELETE at all: expiry goes through the cleanup functions.
        "DELETE FROM devices",
        "DELETE FROM sessions",
        "TRUNCATE sessions",
    ],
)
async def test_app_role_writes_that_are_refused(
    app: asyncpg.Connection, pg_owner: asyncpg.Connection, statement: str
) -> None:
    before = await pg_owner.fetchval("SELECT count(*) FROM devices WHERE tenant_id = $1", B)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with app.transaction():
            await scoped(app, A)
            await app.execute(statement)
    assert await pg_owner.fetchval("SELECT count(*) FROM devices WHERE tenant_id = $1", B) == before
    assert await pg_owner.fetchval("SELECT count(*) FROM tenants") == 2


async def test_store_scopes_each_transaction_and_pool_does_not_leak(pg_url: str) -> None:
    store = PostgresStore(without_query(pg_url), schema=schema_of(pg_url), max_size=1)
    await store.open()
    try:
        for tenant in (A, B):
            await store.create_tenant(tenant, tenant, now=NOW)
            await store.create_device(tenant, f"{tenant}-1", now=NOW)
        # An unfiltered query inside the store's transaction sees the named tenant only ...
        async with store._transaction(A, write=False) as tx:
            assert [r["device_id"] for r in await tx.fetch("SELECT device_id FROM devices")] == [
                "acme-1"
            ]
            assert await tx.fetchrow("SELECT current_user AS u") == {"u": "qflare_app"}
        # ... and the single pooled connection forgets it with the transaction.
        async with store._transaction(None, write=False) as tx:
            assert await tx.fetch("SELECT device_id FROM devices") == []
        # Read-only operations really are read-only.
        with pytest.raises(StoreError):
            async with store._transaction(A, write=False) as tx:
                await tx.execute("UPDATE devices SET failure_count = 1")
        assert (await store.get_device(A, "acme-1")).failure_count == 0
    finally:
        await store.close()


# -- one-round-trip reads (migration 0002) -----------------------------------------------------

SID_A, SID_B = A.encode().ljust(16, b"."), B.encode().ljust(16, b".")


async def schema_functions(owner: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    """The functions of the test's schema by name, with what the tests check of them."""
    rows = await owner.fetch(
        "SELECT proname, prosecdef, provolatile::text, proconfig, "
        "has_function_privilege('qflare_app', oid, 'EXECUTE') AS app, "
        "has_function_privilege('public', oid, 'EXECUTE') AS public "
        "FROM pg_proc WHERE pronamespace = current_schema()::regnamespace"
    )
    return {r["proname"]: r for r in rows}


async def test_read_functions_are_invoker_stable_and_for_the_app_role_only(
    pg_owner: asyncpg.Connection,
) -> None:
    functions = await schema_functions(pg_owner)
    rows = [r for name, r in functions.items() if name.startswith("read_")]
    assert {r["proname"] for r in rows} == set(READ_CALLS)
    for r in rows:
        # Runs as the caller (so RLS applies), cannot write, pins nothing, EXECUTE for the app.
        assert (r["prosecdef"], r["provolatile"], r["proconfig"]) == (False, "s", None), r
        assert (r["app"], r["public"]) == (True, False), r


async def test_handshake_write_functions_are_invoker_and_for_the_app_role_only(
    pg_owner: asyncpg.Connection,
) -> None:
    functions = await schema_functions(pg_owner)
    for name in ("accept_handshake", "finish_handshake"):
        r = functions[name]
        # Runs as the caller (so RLS applies to its reads and writes), VOLATILE (it writes,
        # and each statement sees what committed before it: after the row lock, the newest).
        assert (r["prosecdef"], r["provolatile"], r["proconfig"]) == (False, "v", None), r
        assert (r["app"], r["public"]) == (True, False), r


def finish_call(tenant: str, device_id: str, session_id: bytes) -> q.SessionArgs:
    """FINISH_HANDSHAKE_CALL's arguments: a session ``session_id`` of ``device_id``."""
    fields = session_fields(session_id, device_id)
    del fields["device_id"]
    return q.session_args(tenant, device_id, state=SessionStatus.ACTIVE, counters=None, **fields)


@pytest.mark.usefixtures("store")
async def test_handshake_functions_do_not_cross_tenants(
    app: asyncpg.Connection, pg_owner: asyncpg.Connection, store: Store
) -> None:
    # Acme's device named in globex's scope is not there, for the raw call ...
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await app.fetchrow(FINISH_HANDSHAKE_CALL, *finish_call(B, "acme-dev-1", bytes(16)))
    # ... and for the store.
    with pytest.raises(NotFound):
        await store.finish_handshake(B, **session_fields(bytes(16), "acme-dev-1"))
    # Nothing was written, and the scope ended with each call.
    assert await pg_owner.fetchval("SELECT count(*) FROM sessions") == 2
    assert (await store.get_device(A, "acme-dev-1")).last_seen is None
    assert await app.fetchval("SELECT current_setting('app.tenant_id', true)") in ("", None)
    # Acme's session id is free in globex: not EXISTS, a session of globex's own.
    row = await app.fetchrow(FINISH_HANDSHAKE_CALL, *finish_call(B, "globex-dev-1", SID_A))
    assert row is not None and row["outcome"] == FinishOutcome.CREATED
    assert (row["session"]["tenant_id"], row["session"]["device_id"]) == (B, "globex-dev-1")


@pytest.mark.usefixtures("store")
async def test_handshake_functions_are_subject_to_row_level_security(
    app: asyncpg.Connection, pg_owner: asyncpg.Connection, store: Store
) -> None:
    # A devices policy that admits no row: the app role's call finds no device.
    await pg_owner.execute("ALTER POLICY tenant_isolation ON devices USING (false)")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await app.fetchrow(FINISH_HANDSHAKE_CALL, *finish_call(A, "acme-dev-1", bytes(16)))
    await pg_owner.execute(
        "ALTER POLICY tenant_isolation ON devices "
        "USING (tenant_id = current_setting('app.tenant_id', true))"
    )
    # A sessions policy that refuses every new row: the session insert is refused, the call
    # fails, and the device is not touched.
    await pg_owner.execute("ALTER POLICY tenant_isolation ON sessions WITH CHECK (false)")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        await app.fetchrow(FINISH_HANDSHAKE_CALL, *finish_call(A, "acme-dev-1", bytes(16)))
    device = await store.get_device(A, "acme-dev-1")
    assert (device.state, device.last_seen) == ("enrolled", None)


@pytest.mark.usefixtures("store")
async def test_read_functions_do_not_cross_tenants(app: asyncpg.Connection) -> None:
    session = READ_CALLS["read_session"]
    device = READ_CALLS["read_device"]
    own = await app.fetchrow(session, A, SID_A)
    assert own is not None and own["tenant_id"] == A
    assert await app.fetchrow(session, B, SID_A) is None
    assert await app.fetchrow(session, A, SID_B) is None
    assert await app.fetchrow(device, B, "acme-dev-0") is None
    assert await app.fetch(READ_CALLS["read_server_keys"], B, None, None, 100) == []
    # Each call was its own transaction: the tenant it set is gone, the policies see nothing.
    assert await app.fetchval("SELECT current_setting('app.tenant_id', true)") in ("", None)
    assert await app.fetchval("SELECT count(*) FROM sessions") == 0


@pytest.mark.usefixtures("store")
async def test_read_functions_are_subject_to_row_level_security(
    app: asyncpg.Connection, pg_owner: asyncpg.Connection
) -> None:
    session = READ_CALLS["read_session"]
    # The policy, not the function's WHERE, has the last word: with a policy that admits no
    # row, the app role reads nothing through the function, while the owner (not subject to
    # RLS, and running the same SECURITY INVOKER function as itself) still reads the row.
    await pg_owner.execute("ALTER POLICY tenant_isolation ON sessions USING (false)")
    assert await app.fetchrow(session, A, SID_A) is None
    as_owner = await pg_owner.fetchrow(session, A, SID_A)
    assert as_owner is not None and as_owner["tenant_id"] == A
    # And with row_security off, PostgreSQL refuses the app role's query outright because a
    # policy applies to it, which is how it reports that RLS is in force for that role.
    await app.execute("SET row_security = off")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        await app.fetchrow(session, A, SID_A)


@pytest.mark.usefixtures("store")
async def test_read_functions_return_what_the_shared_statements_return(
    app: asyncpg.Connection, store: Store
) -> None:
    await store.rotate_server_key(
        A,
        key_id="k1",
        purpose=KeyPurpose.KEM_STATIC,
        algorithm="x",
        public_key=b"p",
        encrypted_private=b"s",
        now=NOW,
    )
    await store.add_device_key(A, "acme-dev-1", algorithm="x", public_key=b"k", now=NOW)
    cases: list[tuple[str, tuple[Any, ...], str, tuple[Any, ...]]] = [
        ("read_device", (A, "acme-dev-1"), q.GET_DEVICE, ()),
        ("read_device", (A, "nope"), q.GET_DEVICE, ()),
        ("read_active_device_key", (A, "acme-dev-1"), q.GET_ACTIVE_DEVICE_KEY, ()),
        ("read_device_key", (A, "acme-dev-1", 1), q.GET_DEVICE_KEY, ()),
        ("read_device_key", (A, "acme-dev-1", 2), q.GET_DEVICE_KEY, ()),
        ("read_active_server_key", (A, "kem-static"), q.GET_ACTIVE_SERVER_KEY, ()),
        ("read_active_server_key", (A, "biscuit"), q.GET_ACTIVE_SERVER_KEY, ()),
        ("read_session", (A, SID_A), q.GET_SESSION, ()),
        ("read_session", (A, SID_B), q.GET_SESSION, ()),
        (
            "read_server_keys",
            (A, None, None, 10),
            q.LIST_SERVER_KEYS + " ORDER BY purpose, version LIMIT $2",
            (A, 10),
        ),
        (
            "read_server_keys",
            (A, "kem-static", "active", 10),
            q.LIST_SERVER_KEYS + " AND purpose = $2 AND state = $3 ORDER BY purpose, version "
            "LIMIT $4",
            (),
        ),
        (
            "read_server_keys",
            (A, "biscuit", None, 10),
            q.LIST_SERVER_KEYS + " AND purpose = $2 ORDER BY purpose, version LIMIT $3",
            (A, "biscuit", 10),
        ),
    ]
    for function, args, statement, statement_args in cases:
        via_function = [dict(r) for r in await app.fetch(READ_CALLS[function], *args)]
        async with app.transaction():
            await scoped(app, A)
            direct = [dict(r) for r in await app.fetch(statement, *(statement_args or args))]
        assert via_function == direct, (function, args)
    assert len(await app.fetch(READ_CALLS["read_server_keys"], A, None, None, 10)) == 1


async def test_pool_never_leaks_a_tenant_to_the_next_acquisition(pg_url: str) -> None:
    # One connection, so every operation below reuses the one the previous one released.
    store = PostgresStore(without_query(pg_url), schema=schema_of(pg_url), max_size=1)
    await store.open()

    async def nothing_left_behind() -> None:
        async with store._transaction(None, write=False) as tx:
            left = await tx.fetchrow(
                "SELECT current_setting('app.tenant_id', true) AS tenant, current_user AS u, "
                "(SELECT count(*) FROM devices) AS devices, "
                "(SELECT count(*) FROM sessions) AS sessions"
            )
        assert left is not None
        # No tenant, no rows visible, and the role set when the connection was made is kept.
        assert (left["tenant"] or "", left["u"], left["devices"], left["sessions"]) == (
            "",
            "qflare_app",
            0,
            0,
        )

    try:
        for tenant in (A, B):
            await store.create_tenant(tenant, tenant, now=NOW)
            await nothing_left_behind()
            await store.create_device(tenant, f"{tenant}-1", now=NOW)
            await add_session(store, tenant, f"{tenant}-1")
            await nothing_left_behind()
        # The one-statement reads ...
        assert (await store.get_session(A, SID_A)).tenant_id == A
        await nothing_left_behind()
        assert (await store.get_device(B, "globex-1")).tenant_id == B
        await nothing_left_behind()
        # ... including one that finds nothing (the other tenant's row) ...
        with pytest.raises(NotFound):
            await store.get_session(B, SID_A)
        await nothing_left_behind()
        # ... a transaction that fails halfway and rolls back ...
        with pytest.raises(Conflict):
            await store.update_session(A, SID_A, expected_version=7, now=NOW)
        await nothing_left_behind()
        # ... and one abandoned with an exception inside it.
        with pytest.raises(RuntimeError):
            async with store._transaction(A, write=True) as tx:
                await tx.execute("UPDATE devices SET failure_count = 1")
                raise RuntimeError
        await nothing_left_behind()
        assert (await store.get_device(A, "acme-1")).failure_count == 0
    finally:
        await store.close()


async def test_hot_reads_are_one_statement_and_release_sends_nothing(store: Store) -> None:
    """get_session & co. send one statement: no BEGIN, no set_config, no COMMIT, and the pool
    sends no reset query when the connection goes back."""
    assert isinstance(store, PostgresStore)
    sent: list[str] = []
    assert store._pool is not None
    async with store._pool.connection() as conn:
        conn.add_query_logger(lambda record: sent.append(record.query))

    async def statements(call: Any) -> list[str]:
        await call
        await asyncio.sleep(0)  # the logger reports through call_soon
        got = sent[:]
        sent.clear()
        return got

    calls = {
        "read_session": store.get_session(A, SID_A),
        "read_device": store.get_device(A, "acme-dev-0"),
        "read_server_keys": store.list_server_keys(A, state=KeyState.RETIRING),
    }
    for function, call in calls.items():
        assert await statements(call) == [READ_CALLS[function]]
    with pytest.raises(NotFound):  # the device has no key: still one statement
        await store.get_device_key(A, "acme-dev-0")
    assert await statements(asyncio.sleep(0)) == [READ_CALLS["read_active_device_key"]]
    # A write still runs in its transaction, tenant first; nothing follows the COMMIT.
    got = await statements(store.record_device_failure(A, "acme-dev-0"))
    assert got == ["BEGIN;", SET_TENANT, q.ADD_FAILURE, "COMMIT;"]
    # finish_handshake is one statement. (Its first call on a connection also looks up its
    # composite result types, once, as asyncpg does.)
    await store.finish_handshake(A, **session_fields(bytes(16), "acme-dev-1"))
    await statements(asyncio.sleep(0))
    finish = store.finish_handshake(A, **session_fields(bytes(15) + b"\x01", "acme-dev-1"))
    assert await statements(finish) == [FINISH_HANDSHAKE_CALL]


# -- the connection pool (qflare.store.pgpool) --------------------------------------------------


def small_store(pg_url: str, **options: Any) -> PostgresStore:
    return PostgresStore(without_query(pg_url), schema=schema_of(pg_url), **options)


def pool_of(store: PostgresStore) -> ConnectionPool:
    assert store._pool is not None
    return store._pool


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (the pool's repair tasks and the server's backend exits
    are asynchronous)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def backend_pid(store: PostgresStore) -> int:
    return int((await store._call("SELECT pg_backend_pid() AS pid", ()))[0]["pid"])


async def live_backends(owner: asyncpg.Connection, pids: set[int]) -> set[int]:
    rows = await owner.fetch("SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)", list(pids))
    return {r["pid"] for r in rows}


async def pool_is_whole(store: PostgresStore, owner: asyncpg.Connection) -> None:
    """Every connection back and idle, none in a transaction (client and server agree), and
    each usable: as many concurrent operations as there are connections all succeed."""
    pool = pool_of(store)
    await until(lambda: pool.idle == pool.size)
    idle = list(pool._idle)
    assert not any(conn.is_in_transaction() or conn.is_closed() for conn in idle)
    states = await owner.fetch(
        "SELECT state FROM pg_stat_activity WHERE pid = ANY($1)",
        [conn.get_server_pid() for conn in idle],
    )
    assert [r["state"] for r in states] == ["idle"] * len(idle)
    pids = await asyncio.gather(*(backend_pid(store) for _ in idle))
    assert sorted(pids) == sorted(conn.get_server_pid() for conn in idle)


async def test_pool_opens_at_most_max_size_connections(
    pg_url: str, pg_owner: asyncpg.Connection
) -> None:
    store = small_store(pg_url, max_size=3)
    connects = 0
    connect = store._connect

    async def counted() -> Any:
        nonlocal connects
        connects += 1
        return await connect()

    store._connect = counted  # type: ignore[method-assign]
    await store.open()
    marker = f"qflare-pool-test-{id(store)}"
    try:
        # 9 operations at once on 3 connections: the server never runs more than 3 of them.
        ops = [
            asyncio.create_task(store._call(f"SELECT pg_sleep(0.1) /* {marker} */", ()))
            for _ in range(9)
        ]
        running: list[int] = []
        while not all(op.done() for op in ops):
            running.append(
                await pg_owner.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'qflare' "
                    "AND state = 'active' AND query LIKE $1",
                    f"%/* {marker} */%",
                )
            )
            await asyncio.sleep(0.02)
        await asyncio.gather(*ops)
        assert max(running) == 3
        assert connects == 3
        assert (pool_of(store).size, pool_of(store).idle) == (3, 3)
    finally:
        await store.close()


async def test_waiting_acquisitions_are_served_in_order(pg_url: str) -> None:
    store = small_store(pg_url, max_size=1)
    await store.open()
    pool = pool_of(store)
    try:
        served: list[int] = []

        async def op(i: int) -> None:
            await store._call("SELECT $1::int AS i", (i,))
            served.append(i)

        async with pool.connection():
            # Ten operations queue behind the only connection, in this order ...
            waiting = []
            for i in range(10):
                waiting.append(asyncio.create_task(op(i)))
                await asyncio.sleep(0)
            assert (len(pool._waiters), served) == (10, [])
        # ... and are served in it.
        await asyncio.gather(*waiting)
        assert served == list(range(10))

        # A task that takes the connection again the moment it gives it back does not starve
        # the others: a released connection goes to the first waiter, not to whoever asks next.
        stop = asyncio.Event()
        hog_calls = 0

        async def hog() -> None:
            nonlocal hog_calls
            while not stop.is_set():
                await store._call("SELECT 1", ())
                hog_calls += 1

        hogging = asyncio.create_task(hog())
        await asyncio.sleep(0.05)
        before = hog_calls
        served.clear()
        async with asyncio.timeout(5):
            await asyncio.gather(*(op(i) for i in range(5)))
        stop.set()
        await hogging
        assert served == list(range(5))
        # Each waiter had the connection after at most one more turn of the hog.
        assert hog_calls - before <= 6
    finally:
        await store.close()


@pytest.fixture
async def pooled(pg_url: str) -> AsyncIterator[PostgresStore]:
    """A store of at most two connections, with acme and its device acme-1."""
    store = small_store(pg_url, max_size=2)
    await store.open()
    try:
        await store.create_tenant(A, A, now=NOW)
        await store.create_device(A, "acme-1", now=NOW)
        yield store
    finally:
        await store.close()


async def test_a_connection_killed_by_the_server_is_replaced(
    pooled: PostgresStore, pg_owner: asyncpg.Connection
) -> None:
    store, pool = pooled, pool_of(pooled)
    # Killed while idle: the pool discards it when it next looks, and opens another.
    pid = await backend_pid(store)
    assert await pg_owner.fetchval("SELECT pg_terminate_backend($1)", pid)
    await until(lambda: all(conn.is_closed() for conn in pool._idle))
    assert (await store.get_device(A, "acme-1")).device_id == "acme-1"
    assert await backend_pid(store) != pid
    assert (pool.size, pool.idle) == (1, 1)
    # Killed in the middle of an operation: that operation fails as unavailable, the
    # connection is discarded, and the next operation runs on a new one.
    pid = await backend_pid(store)
    sleeping = asyncio.create_task(store._call("SELECT pg_sleep(5)", ()))
    await until(lambda: pool.idle == 0)
    await asyncio.sleep(0.05)
    assert await pg_owner.fetchval("SELECT pg_terminate_backend($1)", pid)
    with pytest.raises(StoreUnavailable):
        await sleeping
    assert (pool.size, pool.idle) == (0, 0)
    assert (await store.get_device(A, "acme-1")).device_id == "acme-1"
    assert await backend_pid(store) != pid
    await pool_is_whole(store, pg_owner)


async def test_cancelled_tasks_leave_the_pool_whole(
    pooled: PostgresStore, pg_owner: asyncpg.Connection
) -> None:
    store, pool = pooled, pool_of(pooled)

    async def write_then_sleep() -> None:
        async with store._transaction(A, write=True) as tx:
            await tx.execute("UPDATE devices SET failure_count = 7")
            await tx.execute("SELECT pg_sleep(5)")

    # Cancelled mid-statement: a one-statement call, and a write transaction.
    for work in (store._call("SELECT pg_sleep(5)", ()), write_then_sleep()):
        task = asyncio.create_task(work)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool_is_whole(store, pg_owner)
    # Cancelled at every point of a transaction, BEGIN included (after one loop iteration
    # the task waits for BEGIN's reply): after 0, 1, 2 ... iterations.
    for steps in range(8):
        task = asyncio.create_task(write_then_sleep())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool_is_whole(store, pg_owner)
    # Cancelled while waiting for a connection, and just after being handed one.
    async with pool.connection(), pool.connection():
        waiting = asyncio.create_task(store._call("SELECT 1", ()))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        handed = asyncio.create_task(store._call("SELECT 1", ()))
        await asyncio.sleep(0)
        assert len(pool._waiters) == 1
    handed.cancel()  # the first connection released was already handed to it
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert not pool._waiters
    await pool_is_whole(store, pg_owner)
    assert pool.size <= 2
    # Nothing the cancelled transactions wrote was kept.
    assert (await store.get_device(A, "acme-1")).failure_count == 0


async def test_close_closes_every_connection(pg_url: str, pg_owner: asyncpg.Connection) -> None:
    store = small_store(pg_url, max_size=3, close_timeout=0.3)
    await store.open()
    pool = pool_of(store)
    await asyncio.gather(*(store._call("SELECT pg_sleep(0.05)", ()) for _ in range(3)))
    pids = {conn.get_server_pid() for conn in pool._idle}
    assert len(pids) == 3 and await live_backends(pg_owner, pids) == pids
    # One connection in use when close() starts, and given back within the grace period: it
    # is closed when it comes back. Another is still in use when the period ends: terminated,
    # and its operation fails as unavailable.
    returning = asyncio.create_task(store._call("SELECT pg_sleep(0.1)", ()))
    stuck = asyncio.create_task(store._call("SELECT pg_sleep(5)", ()))
    await until(lambda: pool.idle == 1)
    await store.close()
    await returning
    with pytest.raises(StoreUnavailable):
        await stuck
    await until(lambda: pool.size == 0)

    async def none_left() -> bool:
        return not await live_backends(pg_owner, pids)

    async with asyncio.timeout(5):
        while not await none_left():
            await asyncio.sleep(0.02)
    with pytest.raises(StoreUnavailable):
        await store.get_device(A, "acme-1")
    with pytest.raises(StoreUnavailable):
        await pool.acquire()


async def test_idle_connections_beyond_min_size_are_closed(pg_url: str) -> None:
    store = small_store(pg_url, min_size=1, max_size=3, idle_timeout=0.2)
    await store.open()
    pool = pool_of(store)
    try:
        await asyncio.gather(*(store._call("SELECT pg_sleep(0.05)", ()) for _ in range(3)))
        assert pool.size == 3
        # Unused for a whole period: closed, down to min_size; the one in use stays.
        await until(lambda: pool.size == 1, timeout=2)
        assert pool.idle == 1
        await backend_pid(store)
    finally:
        await store.close()


async def test_hot_tables_leave_room_for_hot_updates(pg_owner: asyncpg.Connection) -> None:
    rows = await pg_owner.fetch(
        "SELECT relname, reloptions FROM pg_class WHERE relnamespace = "
        "current_schema()::regnamespace AND relname IN ('sessions', 'devices')"
    )
    assert {r["relname"]: r["reloptions"] for r in rows} == {
        "sessions": ["fillfactor=85"],
        "devices": ["fillfactor=90"],
    }


# -- the audit log is append-only -------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_entries SET kind = 'forged'",
        "DELETE FROM audit_entries",
        "TRUNCATE audit_entries",
    ],
)
async def test_audit_is_append_only_for_app_and_owner(
    store: Store, app: asyncpg.Connection, pg_owner: asyncpg.Connection, statement: str
) -> None:
    for i in range(3):
        await store.append_audit(ts=NOW, kind="enroll", payload=b"%d" % i, leaf_hash=bytes(32))
    # The app role may insert and read ...
    await app.execute(
        "INSERT INTO audit_entries (idx, ts, kind, payload, leaf_hash) "
        "VALUES (3, now(), 'x', '', $1)",
        bytes(32),
    )
    assert await app.fetchval("SELECT count(*) FROM audit_entries") == 4
    # ... but not change or remove, and neither may the owner (the trigger refuses).
    for conn in (app, pg_owner):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    kinds = await pg_owner.fetch("SELECT kind FROM audit_entries ORDER BY idx")
    assert [r["kind"] for r in kinds] == ["enroll", "enroll", "enroll", "x"]


# -- every lookup path uses an index ----------------------------------------------------------


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


async def explain(conn: asyncpg.Connection, statement: str, *args: object) -> list[dict[str, Any]]:
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args)
    return plan_nodes(json.loads(raw)[0]["Plan"])


def index_used(nodes: list[dict[str, Any]], table: str) -> set[str]:
    scans = [n for n in nodes if n.get("Relation Name") == table]
    assert scans, f"no scan of {table}"
    assert all(n["Node Type"] != "Seq Scan" for n in scans), scans
    # A Bitmap Index Scan names its index but not its table; our index names carry the table.
    return {n["Index Name"] for n in nodes if "Index Name" in n}


@pytest.fixture
async def bulk(store: Store, pg_owner: asyncpg.Connection) -> None:
    """Enough rows per tenant that a sequential scan would be the planner's choice if no
    index served the lookup, with times around the tests' NOW (as live data is around the real
    now: mostly unexpired), then fresh statistics."""
    # Each statement reads the tenant and the time from one row of parameters: the columns are
    # of the domain ident, so $1 is cast to text once, here.
    params = "WITH p AS (SELECT $1::text AS t, $2::timestamptz AS at) "
    rows = " FROM p, generate_series(1, 3000) g"
    statements = (
        "INSERT INTO devices (tenant_id, device_id, state, created_at) "
        "SELECT t, 'bulk-' || g, 'active', at",
        "INSERT INTO sessions (tenant_id, session_id, device_id, state, suite, epoch, "
        "encrypted_chain_state, replay_window, created_at, expires_at, updated_at) "
        "SELECT t, substring(sha256((t || g)::bytea) for 16), 'bulk-' || (g % 3000 + 1), "
        "'active', 1, 1, '\\x00', '', at, at + g * interval '1 second', at",
        "INSERT INTO enrollment_tokens (tenant_id, token_id, token_hash, created_at, expires_at) "
        "SELECT t, 't' || g, sha256((t || 't' || g)::bytea), at, at + g * interval '1 second'",
        "INSERT INTO handshake_nonces (tenant_id, device_id, nonce, device_ts, expires_at) "
        "SELECT t, 'bulk-' || (g % 3000 + 1), sha256((t || 'n' || g)::bytea), g, "
        "at + g * interval '1 second'",
        "INSERT INTO server_keys (tenant_id, key_id, purpose, algorithm, version, state, "
        "public_key, encrypted_private, created_at) "
        "SELECT t, 'old-' || g, 'kem-static', 'x', g, 'retired', '', '\\x00', at",
    )
    for tenant in (A, B):
        for statement in statements:
            await pg_owner.execute(params + statement + rows, tenant, NOW)
    await store.rotate_server_key(
        A,
        key_id="live",
        purpose=KeyPurpose.KEM_STATIC,
        algorithm="x",
        public_key=b"p",
        encrypted_private=b"s",
        now=NOW,
    )
    await pg_owner.execute("ANALYZE")


LOOKUPS = [
    ("device by id", q.GET_DEVICE, (A, "bulk-17"), "devices", "devices_pkey"),
    ("session by id", q.GET_SESSION, (A, b"acme".ljust(16, b".")), "sessions", "sessions_pkey"),
    (
        "token by hash",
        q.GET_ENROLLMENT_BY_HASH,
        (A, b"\x01" * 32),
        "enrollment_tokens",
        "enrollment_tokens_by_hash",
    ),
    (
        "token redemption",
        q.REDEEM_ENROLLMENT,
        (A, b"\x01" * 32, NOW, "dev"),
        "enrollment_tokens",
        "enrollment_tokens_by_hash",
    ),
    (
        "nonce by device and nonce",
        "SELECT device_ts FROM handshake_nonces WHERE tenant_id = $1 AND device_id = $2 "
        "AND nonce = $3",
        (A, "bulk-5", b"\x02" * 32),
        "handshake_nonces",
        "handshake_nonces_pkey",
    ),
    (
        "active server key",
        q.GET_ACTIVE_SERVER_KEY,
        (A, "kem-static"),
        "server_keys",
        "server_keys_one_active",
    ),
    (
        "sessions of a device",
        q.LIST_DEVICE_SESSIONS,
        (A, "bulk-9"),
        "sessions",
        "sessions_by_device",
    ),
    ("device key", q.GET_ACTIVE_DEVICE_KEY, (A, "bulk-9"), "device_keys", "device_keys_one_active"),
    (
        "devices by state",
        q.LIST_DEVICES + " AND state = $2 ORDER BY device_id LIMIT $3",
        (A, "quarantined", 100),
        "devices",
        "devices_by_state",
    ),
    (
        "next key version",
        q.NEXT_SERVER_KEY_VERSION,
        (A, "kem-static"),
        "server_keys",
        "server_keys_version",
    ),
    (
        "events of a device",
        q.LIST_EVENTS + " AND device_id = $2 ORDER BY id LIMIT $3",
        (A, "bulk-1", 100),
        "security_events",
        "security_events_by_device",
    ),
    ("next audit index", q.NEXT_AUDIT_IDX, (), "audit_entries", "audit_entries_pkey"),
]
# Tables the bulk fixture leaves (nearly) empty: there the test asks whether the index *can*
# serve the lookup, since a planner rightly scans a one-page table.
SMALL_TABLES = {"device_keys", "security_events", "audit_entries"}


@pytest.mark.usefixtures("bulk")
@pytest.mark.parametrize(
    ("statement", "args", "table", "index"),
    [lookup[1:] for lookup in LOOKUPS],
    ids=[lookup[0] for lookup in LOOKUPS],
)
async def test_lookup_uses_its_index(
    app: asyncpg.Connection, statement: str, args: tuple[object, ...], table: str, index: str
) -> None:
    async with app.transaction():
        await scoped(app, A)
        if table in SMALL_TABLES:
            await app.execute("SET LOCAL enable_seqscan = off")
        assert index in index_used(await explain(app, statement, *args), table)


@pytest.mark.usefixtures("bulk")
async def test_nonce_check_is_decided_by_the_primary_key(app: asyncpg.Connection) -> None:
    async with app.transaction():
        await scoped(app, A)
        raw = await app.fetchval(
            f"EXPLAIN (FORMAT JSON) {q.RECORD_NONCE}", A, "bulk-5", b"\x02" * 32, 1, NOW
        )
    plan = json.loads(raw)[0]["Plan"]
    assert plan["Conflict Resolution"] == "NOTHING"
    assert plan["Conflict Arbiter Indexes"] == ["handshake_nonces_pkey"]


@pytest.mark.usefixtures("bulk")
@pytest.mark.parametrize(
    ("function", "table", "index"),
    [
        ("delete_expired_sessions", "sessions", "sessions_expiry"),
        ("delete_expired_nonces", "handshake_nonces", "handshake_nonces_expiry"),
        ("delete_expired_tokens", "enrollment_tokens", "enrollment_tokens_expiry"),
    ],
)
async def test_cleanup_uses_the_expiry_index(
    pg_owner: asyncpg.Connection, function: str, table: str, index: str
) -> None:
    # EXPLAIN the function's own body (it runs as the owner, so explain it as the owner).
    body = await pg_owner.fetchval("SELECT prosrc FROM pg_proc WHERE proname = $1", function)
    statement = body.replace("p_now", "$1::timestamptz").replace("p_limit", "$2::integer")
    # A cutoff that expires a tenth of the rows, as a cleanup run that keeps up would see.
    nodes = await explain(pg_owner, statement, NOW + timedelta(seconds=300), 1000)
    assert index in index_used(nodes, table)


READ_BODIES = [
    ("read_device", (A, "bulk-17"), "devices", "devices_pkey"),
    ("read_session", (A, b"acme".ljust(16, b".")), "sessions", "sessions_pkey"),
    ("read_active_server_key", (A, "kem-static"), "server_keys", "server_keys_one_active"),
    ("read_active_device_key", (A, "bulk-9"), "device_keys", "device_keys_one_active"),
    ("read_device_key", (A, "bulk-9", 1), "device_keys", "device_keys_pkey"),
    ("read_device_with_key", (A, "bulk-9"), "devices", "devices_pkey"),
]


@pytest.mark.usefixtures("bulk")
@pytest.mark.parametrize(
    ("function", "args", "table", "index"), READ_BODIES, ids=[r[0] for r in READ_BODIES]
)
async def test_read_function_bodies_use_their_index_with_a_generic_plan(
    app: asyncpg.Connection,
    pg_owner: asyncpg.Connection,
    function: str,
    args: tuple[object, ...],
    table: str,
    index: str,
) -> None:
    # plpgsql keeps a generic plan (parameters unknown at planning) once it has run a query a
    # few times: EXPLAIN the function's own query planned that way, as the app role.
    row = await pg_owner.fetchrow(
        "SELECT prosrc, proargnames, "
        "array(SELECT format_type(t, NULL) FROM unnest(proargtypes) t) AS types "
        "FROM pg_proc WHERE proname = $1",
        function,
    )
    assert row is not None
    query = re.search(r"RETURN QUERY (.*?);", row["prosrc"], re.S)
    assert query is not None
    statement = query[1]
    # The input arguments (a RETURNS TABLE function's output columns follow them).
    for i, name in enumerate(row["proargnames"][: len(row["types"])], 1):
        statement = re.sub(rf"\b{name}\b", f"${i}", statement)
    # EXECUTE takes no bind parameters: the (fixed, test-made) values go in as literals.
    values = ", ".join(
        f"'\\x{a.hex()}'" if isinstance(a, bytes) else f"'{a}'" if isinstance(a, str) else str(a)
        for a in args
    )
    async with app.transaction():
        await scoped(app, A)
        await app.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        if table in SMALL_TABLES:
            await app.execute("SET LOCAL enable_seqscan = off")
        await app.execute(f"PREPARE body ({', '.join(row['types'])}) AS {statement}")
        try:
            nodes = await explain(app, f"EXECUTE body ({values})")
        finally:
            await app.execute("DEALLOCATE body")
    assert index in index_used(nodes, table)
    # Generic: the index condition compares with the parameter, not with its value.
    assert any("$1" in n.get("Index Cond", "") for n in nodes), nodes


# -- misc ---------------------------------------------------------------------------------------


async def test_connection_refused_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await open_store("postgresql://postgres@127.0.0.1:1/test?schema=nowhere")


async def test_url_options_choose_schema_and_role(pg_url: str) -> None:
    store = await open_store(with_query(without_query(pg_url), schema=schema_of(pg_url), role=""))
    try:
        # role= (empty) keeps the login role: here the test superuser, who bypasses RLS.
        async with store._transaction(None, write=False) as tx:
            assert await tx.fetchrow("SELECT current_user AS u") == {"u": "postgres"}
        assert "schema=" + schema_of(pg_url) in repr(store)
    finally:
        await store.close()
