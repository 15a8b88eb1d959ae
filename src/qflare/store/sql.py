"""Every store operation, written once in the SQL that SQLite and PostgreSQL share.

A backend supplies transactions (``Tx``) and the things that differ (a lock, expired-row
deletion, and optionally a one-round-trip path for the hot single-row reads: ``_read_row``);
everything else is here, so both backends behave identically by construction and the
contract tests check that they do. Statements are constants with ``$n`` placeholders (SQLite
reads them as ``?n``); values are only ever passed as parameters. Where a query grows optional
filters, only fixed fragments and placeholder numbers are joined, never a value.

The statements are module constants so that ``tests/store/test_postgres.py`` can EXPLAIN
exactly what the store runs.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from qflare.errors import Conflict, NotFound
from qflare.store import validate as v
from qflare.store.base import MAX_AUDIT_BATCH, MAX_EVENT_BATCH, Store
from qflare.store.errors import InvalidInput, TokenNotRedeemable
from qflare.store.models import (
    KEY_TRANSITIONS,
    AdminToken,
    AuditEntry,
    AuditRow,
    CleanupCounts,
    Device,
    DeviceKey,
    DeviceKeyState,
    DeviceState,
    Enrollment,
    EnrollmentToken,
    FinishOutcome,
    HandshakeFinish,
    JsonObject,
    KeyPurpose,
    KeyState,
    Rotation,
    SecurityEventRecord,
    SecurityEventRow,
    ServerKey,
    SessionCounters,
    SessionRecord,
    SessionStatus,
    Tenant,
)

Row = Mapping[str, Any]
# A batch method's row type (_batch).
R = TypeVar("R")


class Tx(Protocol):
    """One open transaction. Rows come back with times as aware UTC datetimes."""

    async def execute(self, sql: str, *args: object) -> int:
        """Run a statement; return the number of rows it changed."""

    async def fetchrow(self, sql: str, *args: object) -> Row | None: ...

    async def fetch(self, sql: str, *args: object) -> list[Row]: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """Run a statement once per row of arguments, as few round trips as the driver can."""

    async def lock(self, key: str) -> None:
        """Hold an exclusive lock on ``key`` until the transaction ends."""


# Tables whose rows expire, in the order cleanup visits them.
EXPIRING: Final = ("sessions", "handshake_nonces", "enrollment_tokens")

# -- statements ------------------------------------------------------------------------------

INSERT_TENANT: Final = "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3) RETURNING *"
GET_TENANT: Final = "SELECT * FROM tenants WHERE id = $1"

INSERT_DEVICE: Final = (
    "INSERT INTO devices (tenant_id, device_id, state, created_at) VALUES ($1, $2, $3, $4) "
    "RETURNING *"
)
GET_DEVICE: Final = "SELECT * FROM devices WHERE tenant_id = $1 AND device_id = $2"
DEVICE_EXISTS: Final = "SELECT 1 AS one FROM devices WHERE tenant_id = $1 AND device_id = $2"
LIST_DEVICES: Final = "SELECT * FROM devices WHERE tenant_id = $1"
SET_DEVICE_STATE: Final = (
    "UPDATE devices SET state = $3, state_reason = $4 WHERE tenant_id = $1 AND device_id = $2"
)
# A completed handshake (finish_handshake): last_seen never moves backwards, and ENROLLED
# becomes ACTIVE in the same statement (every CASE reads the old row).
TOUCH_AND_ACTIVATE: Final = (
    "UPDATE devices SET last_seen = CASE WHEN last_seen IS NULL OR last_seen < $3 THEN $3 "
    "ELSE last_seen END, "
    "state = CASE WHEN state = 'enrolled' THEN 'active' ELSE state END, "
    "state_reason = CASE WHEN state = 'enrolled' THEN NULL ELSE state_reason END "
    "WHERE tenant_id = $1 AND device_id = $2 RETURNING *"
)
ADD_FAILURE: Final = (
    "UPDATE devices SET failure_count = failure_count + 1 "
    "WHERE tenant_id = $1 AND device_id = $2 RETURNING failure_count"
)
RESET_FAILURES: Final = (
    "UPDATE devices SET failure_count = 0 WHERE tenant_id = $1 AND device_id = $2"
)

# The handshake's replay check (accept_handshake): the device's floor, then the nonce, then
# the floor raised, in one transaction.
GET_HANDSHAKE_FLOOR: Final = (
    "SELECT last_handshake_ts FROM devices WHERE tenant_id = $1 AND device_id = $2"
)
RAISE_FLOOR: Final = (
    "UPDATE devices SET last_handshake_ts = $3 WHERE tenant_id = $1 AND device_id = $2"
)
# A device and its active key in one read (get_device_with_key); the key's columns renamed.
GET_DEVICE_WITH_KEY: Final = (
    "SELECT d.tenant_id, d.device_id, d.state, d.state_reason, d.created_at, d.last_seen, "
    "d.failure_count, d.last_handshake_ts, k.version AS key_version, "
    "k.algorithm AS key_algorithm, k.public_key AS key_public_key, k.state AS key_state, "
    "k.created_at AS key_created_at "
    "FROM devices d JOIN device_keys k ON k.tenant_id = d.tenant_id "
    "AND k.device_id = d.device_id AND k.state = 'active' "
    "WHERE d.tenant_id = $1 AND d.device_id = $2"
)
# The states in which a device may complete a handshake (finish_handshake).
HANDSHAKE_STATES: Final = frozenset({DeviceState.ENROLLED, DeviceState.ACTIVE})

NEXT_DEVICE_KEY_VERSION: Final = (
    "SELECT COALESCE(MAX(version), 0) + 1 AS next FROM device_keys "
    "WHERE tenant_id = $1 AND device_id = $2"
)
RETIRE_DEVICE_KEYS: Final = (
    "UPDATE device_keys SET state = 'retired' "
    "WHERE tenant_id = $1 AND device_id = $2 AND state = 'active'"
)
INSERT_DEVICE_KEY: Final = (
    "INSERT INTO device_keys (tenant_id, device_id, version, algorithm, public_key, state, "
    "created_at) VALUES ($1, $2, $3, $4, $5, 'active', $6) RETURNING *"
)
GET_ACTIVE_DEVICE_KEY: Final = (
    "SELECT * FROM device_keys WHERE tenant_id = $1 AND device_id = $2 AND state = 'active'"
)
GET_DEVICE_KEY: Final = (
    "SELECT * FROM device_keys WHERE tenant_id = $1 AND device_id = $2 AND version = $3"
)
LIST_DEVICE_KEYS: Final = (
    "SELECT * FROM device_keys WHERE tenant_id = $1 AND device_id = $2 ORDER BY version"
)

INSERT_ENROLLMENT: Final = (
    "INSERT INTO enrollment_tokens (tenant_id, token_id, token_hash, created_at, expires_at) "
    "VALUES ($1, $2, $3, $4, $5) RETURNING *"
)
# One statement decides and marks: of N concurrent redemptions the database lets exactly one
# UPDATE match (the others see used_at set once they get the row), with no check-then-set gap.
REDEEM_ENROLLMENT: Final = (
    "UPDATE enrollment_tokens SET used_at = $3, used_by_device = $4 "
    "WHERE tenant_id = $1 AND token_hash = $2 AND used_at IS NULL AND expires_at > $3 "
    "RETURNING *"
)
GET_ENROLLMENT_BY_HASH: Final = (
    "SELECT * FROM enrollment_tokens WHERE tenant_id = $1 AND token_hash = $2"
)

GET_ACTIVE_SERVER_KEY: Final = (
    "SELECT * FROM server_keys WHERE tenant_id = $1 AND purpose = $2 AND state = 'active'"
)
NEXT_SERVER_KEY_VERSION: Final = (
    "SELECT COALESCE(MAX(version), 0) + 1 AS next FROM server_keys "
    "WHERE tenant_id = $1 AND purpose = $2"
)
DEMOTE_SERVER_KEY: Final = (
    "UPDATE server_keys SET state = 'retiring', retire_after = $3 "
    "WHERE tenant_id = $1 AND key_id = $2 AND state = 'active' RETURNING *"
)
INSERT_SERVER_KEY: Final = (
    "INSERT INTO server_keys (tenant_id, key_id, purpose, algorithm, version, state, "
    "public_key, encrypted_private, created_at, activated_at) "
    "VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $8) RETURNING *"
)
GET_SERVER_KEY: Final = "SELECT * FROM server_keys WHERE tenant_id = $1 AND key_id = $2"
LIST_SERVER_KEYS: Final = "SELECT * FROM server_keys WHERE tenant_id = $1"
SERVER_KEYS_LIMIT: Final = 10_000
SET_SERVER_KEY_STATE: Final = (
    "UPDATE server_keys SET state = $3 WHERE tenant_id = $1 AND key_id = $2 AND state = $4 "
    "RETURNING *"
)

# Insert-if-absent (finish_handshake): a session inserted meanwhile is never overwritten.
INSERT_SESSION: Final = (
    "INSERT INTO sessions (tenant_id, session_id, device_id, state, suite, epoch, "
    "encrypted_chain_state, replay_window, created_at, expires_at, updated_at, "
    "messages_sent, messages_received, bytes_sent, bytes_received) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $9, $11, $12, $13, $14) "
    "ON CONFLICT (tenant_id, session_id) DO NOTHING RETURNING *"
)
GET_SESSION: Final = "SELECT * FROM sessions WHERE tenant_id = $1 AND session_id = $2"
# Optimistic concurrency: the WHERE on version makes a stale writer match nothing.
UPDATE_SESSION: Final = (
    "UPDATE sessions SET state = COALESCE($4, state), epoch = COALESCE($5, epoch), "
    "encrypted_chain_state = COALESCE($6, encrypted_chain_state), "
    "replay_window = COALESCE($7, replay_window), "
    "messages_sent = COALESCE($8, messages_sent), "
    "messages_received = COALESCE($9, messages_received), "
    "bytes_sent = COALESCE($10, bytes_sent), bytes_received = COALESCE($11, bytes_received), "
    "expires_at = COALESCE($12, expires_at), updated_at = $13, version = version + 1 "
    "WHERE tenant_id = $1 AND session_id = $2 AND version = $3 "
    "RETURNING *"
)
LIST_DEVICE_SESSIONS: Final = (
    "SELECT * FROM sessions WHERE tenant_id = $1 AND device_id = $2 ORDER BY created_at, session_id"
)
REVOKE_DEVICE_SESSIONS: Final = (
    "UPDATE sessions SET state = 'revoked', updated_at = $3, version = version + 1 "
    "WHERE tenant_id = $1 AND device_id = $2 AND state IN ('pending', 'active')"
)

# Check and record in one statement (accept_handshake): the primary key decides, not a prior
# SELECT.
RECORD_NONCE: Final = (
    "INSERT INTO handshake_nonces (tenant_id, device_id, nonce, device_ts, expires_at) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, device_id, nonce) DO NOTHING "
    "RETURNING device_ts"
)

NEXT_AUDIT_IDX: Final = "SELECT COALESCE(MAX(idx) + 1, 0) AS next FROM audit_entries"
# A batch runs the same insert for each row, without RETURNING: the driver sends the rows
# together and there is nothing to read back (the entries are the rows as given).
INSERT_AUDIT_ROW: Final = (
    "INSERT INTO audit_entries (idx, ts, kind, payload, leaf_hash) VALUES ($1, $2, $3, $4, $5)"
)
INSERT_AUDIT: Final = INSERT_AUDIT_ROW + " RETURNING *"
LIST_AUDIT: Final = "SELECT * FROM audit_entries WHERE idx >= $1 ORDER BY idx LIMIT $2"

# A batch runs the same insert per row without RETURNING (append_security_events).
INSERT_EVENT_ROW: Final = (
    "INSERT INTO security_events (ts, tenant_id, device_id, source, event_type, severity, "
    "detail) VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
INSERT_EVENT: Final = INSERT_EVENT_ROW + " RETURNING *"
LIST_EVENTS: Final = "SELECT * FROM security_events WHERE tenant_id = $1"

INSERT_ADMIN: Final = (
    "INSERT INTO admin_tokens (token_hash, name, scopes, created_at, revoked) "
    "VALUES ($1, $2, $3, $4, FALSE) RETURNING *"
)
GET_ADMIN: Final = "SELECT * FROM admin_tokens WHERE token_hash = $1"
REVOKE_ADMIN: Final = "UPDATE admin_tokens SET revoked = TRUE WHERE token_hash = $1 RETURNING *"
LIST_ADMINS: Final = "SELECT * FROM admin_tokens ORDER BY created_at, name"


class _Where:
    """Optional filters joined from fixed fragments; each ``?`` becomes the next ``$n``."""

    def __init__(self, base: str, *args: object) -> None:
        self.sql, self.args = base, list(args)

    def add(self, fragment: str, value: object) -> None:
        self.args.append(value)
        self.sql += " AND " + fragment.replace("?", f"${len(self.args)}")

    def finish(self, order_by: str, limit: int) -> tuple[str, list[object]]:
        self.args.append(limit)
        return f"{self.sql} ORDER BY {order_by} LIMIT ${len(self.args)}", self.args


# -- rows to records -------------------------------------------------------------------------


def _tenant(r: Row) -> Tenant:
    return Tenant(id=r["id"], name=r["name"], created_at=r["created_at"])


def _device(r: Row) -> Device:
    return Device(
        tenant_id=r["tenant_id"],
        device_id=r["device_id"],
        state=DeviceState(r["state"]),
        state_reason=r["state_reason"],
        created_at=r["created_at"],
        last_seen=r["last_seen"],
        failure_count=r["failure_count"],
        last_handshake_ts=r["last_handshake_ts"],
    )


def _device_key(r: Row, prefix: str = "") -> DeviceKey:
    """A device key row; ``prefix`` names its columns in a join (GET_DEVICE_WITH_KEY: key_)."""
    return DeviceKey(
        tenant_id=r["tenant_id"],
        device_id=r["device_id"],
        version=r[prefix + "version"],
        algorithm=r[prefix + "algorithm"],
        public_key=bytes(r[prefix + "public_key"]),
        state=DeviceKeyState(r[prefix + "state"]),
        created_at=r[prefix + "created_at"],
    )


def _event_values(tid: str, row: SecurityEventRow) -> tuple[object, ...]:
    return (
        v.timestamp(row.ts, "ts"),
        tid,
        v.optional_text(row.device_id, "device id"),
        v.optional_text(row.source, "source"),
        v.text(row.type, "type", 128),
        v.integer(row.severity, "severity", 0, 1000),
        v.json_object(row.detail, "detail"),
    )


def nonce_args(
    tenant_id: object, device_id: object, nonce: object, timestamp: object, expires_at: object
) -> tuple[str, str, bytes, int, datetime]:
    """The checked arguments of ``accept_handshake``, in RECORD_NONCE's parameter order."""
    return (
        v.identifier(tenant_id, "tenant id"),
        v.identifier(device_id, "device id"),
        v.blob(nonce, "nonce", min_len=16, max_len=64),
        v.integer(timestamp, "timestamp"),
        v.timestamp(expires_at, "expires_at"),
    )


class SessionArgs(NamedTuple):
    """INSERT_SESSION's parameters, checked (``session_args``), in order."""

    tenant_id: str
    session_id: bytes
    device_id: str
    state: str
    suite: int
    epoch: int
    encrypted_chain_state: bytes
    replay_window: bytes
    now: datetime
    expires_at: datetime
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int


def session_args(
    tid: str,
    did: str,
    *,
    session_id: object,
    state: object,
    suite: object,
    epoch: object,
    encrypted_chain_state: object,
    replay_window: object,
    now: object,
    expires_at: object,
    counters: SessionCounters | None,
) -> SessionArgs:
    """The checked arguments of ``finish_handshake`` (``tid`` and ``did`` checked already);
    ``counters`` default to zero."""
    return SessionArgs(
        tid,
        v.blob(session_id, "session id", min_len=16, max_len=16),
        did,
        v.member(SessionStatus, state, "state").value,
        v.integer(suite, "suite", 0, 65535),
        v.integer(epoch, "epoch"),
        v.blob(encrypted_chain_state, "encrypted chain state"),
        v.blob(replay_window, "replay window", min_len=0),
        v.timestamp(now, "now"),
        v.timestamp(expires_at, "expires_at"),
        *[0 if c is None else c for c in _counters(counters)],
    )


def _batch(rows: object, kind: type[R], limit: int, what: str) -> Sequence[R]:
    """``rows`` checked as a batch method's argument: a sequence of 1 to ``limit`` ``kind``."""
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise InvalidInput(f"rows must be a sequence of {kind.__name__}")
    if not 1 <= len(rows) <= limit:
        raise InvalidInput(f"{what} is 1 to {limit} rows")
    if not all(isinstance(row, kind) for row in rows):
        raise InvalidInput(f"rows must be a sequence of {kind.__name__}")
    return rows


def _counters(counters: SessionCounters | None) -> list[int | None]:
    if counters is None:
        return [None] * 4
    if not isinstance(counters, SessionCounters):
        raise InvalidInput("counters must be SessionCounters")
    return [
        v.integer(counters.messages_sent, "messages_sent"),
        v.integer(counters.messages_received, "messages_received"),
        v.integer(counters.bytes_sent, "bytes_sent"),
        v.integer(counters.bytes_received, "bytes_received"),
    ]


class _Refused(Exception):
    """Raised inside a transaction to roll it back and answer False (accept_handshake)."""


def _token(r: Row) -> EnrollmentToken:
    return EnrollmentToken(
        token_id=r["token_id"],
        tenant_id=r["tenant_id"],
        token_hash=bytes(r["token_hash"]),
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        used_at=r["used_at"],
        used_by_device=r["used_by_device"],
    )


def _server_key(r: Row) -> ServerKey:
    return ServerKey(
        tenant_id=r["tenant_id"],
        key_id=r["key_id"],
        purpose=KeyPurpose(r["purpose"]),
        algorithm=r["algorithm"],
        version=r["version"],
        state=KeyState(r["state"]),
        public_key=bytes(r["public_key"]),
        encrypted_private=bytes(r["encrypted_private"]),
        created_at=r["created_at"],
        activated_at=r["activated_at"],
        retire_after=r["retire_after"],
    )


def _session(r: Row) -> SessionRecord:
    return SessionRecord(
        tenant_id=r["tenant_id"],
        session_id=bytes(r["session_id"]),
        device_id=r["device_id"],
        state=SessionStatus(r["state"]),
        suite=r["suite"],
        epoch=r["epoch"],
        encrypted_chain_state=bytes(r["encrypted_chain_state"]),
        replay_window=bytes(r["replay_window"]),
        counters=SessionCounters(
            messages_sent=r["messages_sent"],
            messages_received=r["messages_received"],
            bytes_sent=r["bytes_sent"],
            bytes_received=r["bytes_received"],
        ),
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        updated_at=r["updated_at"],
        version=r["version"],
    )


def _audit(r: Row) -> AuditEntry:
    return AuditEntry(
        idx=r["idx"],
        ts=r["ts"],
        kind=r["kind"],
        payload=bytes(r["payload"]),
        leaf_hash=bytes(r["leaf_hash"]),
    )


def _event(r: Row) -> SecurityEventRecord:
    return SecurityEventRecord(
        id=r["id"],
        ts=r["ts"],
        tenant_id=r["tenant_id"],
        device_id=r["device_id"],
        source=r["source"],
        type=r["event_type"],
        severity=r["severity"],
        detail=v.parse_json_object(r["detail"]),
    )


def _admin(r: Row) -> AdminToken:
    return AdminToken(
        token_hash=bytes(r["token_hash"]),
        name=r["name"],
        scopes=tuple(r["scopes"].split()),
        created_at=r["created_at"],
        revoked=bool(r["revoked"]),
    )


def _audit_values(
    ts: object, kind: object, payload: object, leaf_hash: object
) -> tuple[datetime, str, bytes, bytes]:
    return (
        v.timestamp(ts, "ts"),
        v.text(kind, "kind", 64),
        v.blob(payload, "payload", min_len=0),
        v.blob(leaf_hash, "leaf hash", min_len=16, max_len=64),
    )


async def _next_audit_idx(tx: Tx, expect: int | None) -> int:
    """Take the audit lock and return the next index; ``Conflict`` if it is not ``expect``."""
    # One appender at a time keeps the indexes dense: a sequence would leave a gap whenever a
    # transaction rolled back, and a Merkle tree cannot have holes.
    await tx.lock("audit")
    idx = int(_one(await tx.fetchrow(NEXT_AUDIT_IDX), "audit size")["next"])
    if expect is not None and expect != idx:
        raise Conflict(f"next audit index is {idx}, not {expect}")
    return idx


def finished(
    outcome: str, device: Row, session: Row | None, previous_last_seen: datetime | None
) -> HandshakeFinish:
    """``finish_handshake``'s answer from its rows (on PostgreSQL, the function's columns)."""
    return HandshakeFinish(
        outcome=FinishOutcome(outcome),
        device=_device(device),
        session=None if session is None else _session(session),
        previous_last_seen=previous_last_seen,
    )


def _one(row: Row | None, what: str) -> Row:
    if row is None:
        raise NotFound(f"{what} not found")
    return row


# -- the operations --------------------------------------------------------------------------


class SqlStore(Store):
    @abstractmethod
    def _transaction(
        self, tenant_id: str | None, *, write: bool
    ) -> AbstractAsyncContextManager[Tx]:
        """A transaction; ``tenant_id`` scopes row-level security where the backend has it."""

    @abstractmethod
    async def _delete_expired(self, table: str, now: datetime, batch_size: int) -> int:
        """Delete up to ``batch_size`` expired rows of ``table`` in one short transaction."""

    # One-statement reads of one tenant's rows. ``function`` names the PostgreSQL function
    # (migrations 0002 and 0003) that sets the tenant and returns what ``sql`` returns, taking
    # ``function_args`` (``args`` unless given; the tenant first). PostgresStore calls it to
    # make the read one round trip; here it is ``sql`` in a read-only transaction.

    async def _read_row(
        self,
        tid: str,
        sql: str,
        args: Sequence[object],
        function: str,
        function_args: Sequence[object] | None = None,
    ) -> Row | None:
        async with self._transaction(tid, write=False) as tx:
            return await tx.fetchrow(sql, *args)

    async def _read_rows(
        self,
        tid: str,
        sql: str,
        args: Sequence[object],
        function: str,
        function_args: Sequence[object] | None = None,
    ) -> list[Row]:
        async with self._transaction(tid, write=False) as tx:
            return await tx.fetch(sql, *args)

    # tenants

    async def create_tenant(self, tenant_id: str, name: str, *, now: datetime) -> Tenant:
        args = (v.identifier(tenant_id, "tenant id"), v.text(name, "tenant name"))
        created = v.timestamp(now, "now")
        async with self._transaction(args[0], write=True) as tx:
            return _tenant(_one(await tx.fetchrow(INSERT_TENANT, *args, created), "tenant"))

    async def get_tenant(self, tenant_id: str) -> Tenant:
        tid = v.identifier(tenant_id, "tenant id")
        async with self._transaction(tid, write=False) as tx:
            return _tenant(_one(await tx.fetchrow(GET_TENANT, tid), "tenant"))

    # devices

    async def create_device(
        self,
        tenant_id: str,
        device_id: str,
        *,
        now: datetime,
        state: DeviceState = DeviceState.ENROLLED,
    ) -> Device:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        st, created = v.member(DeviceState, state, "state"), v.timestamp(now, "now")
        async with self._transaction(tid, write=True) as tx:
            row = await tx.fetchrow(INSERT_DEVICE, tid, did, st.value, created)
            return _device(_one(row, "device"))

    async def get_device(self, tenant_id: str, device_id: str) -> Device:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        row = await self._read_row(tid, GET_DEVICE, (tid, did), "read_device")
        return _device(_one(row, "device"))

    async def list_devices(
        self,
        tenant_id: str,
        *,
        state: DeviceState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Device]:
        tid = v.identifier(tenant_id, "tenant id")
        query = _Where(LIST_DEVICES, tid)
        st = v.optional_member(DeviceState, state, "state")
        if st is not None:
            query.add("state = ?", st.value)
        if after is not None:
            query.add("device_id > ?", v.identifier(after, "after"))
        sql, args = query.finish("device_id", v.limit(limit))
        async with self._transaction(tid, write=False) as tx:
            return [_device(r) for r in await tx.fetch(sql, *args)]

    async def set_device_state(
        self,
        tenant_id: str,
        device_id: str,
        state: DeviceState,
        *,
        reason: str | None = None,
        expected: DeviceState | None = None,
    ) -> Device:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        st = v.member(DeviceState, state, "state")
        why = v.optional_text(reason, "reason", v.MAX_TEXT)
        exp = v.optional_member(DeviceState, expected, "expected")
        query = _Where(SET_DEVICE_STATE, tid, did, st.value, why)
        if exp is not None:
            query.add("state = ?", exp.value)
        async with self._transaction(tid, write=True) as tx:
            row = await tx.fetchrow(query.sql + " RETURNING *", *query.args)
            if row is None:
                _one(await tx.fetchrow(DEVICE_EXISTS, tid, did), "device")
                raise Conflict(f"device is not {exp}")
            return _device(row)

    async def get_device_with_key(self, tenant_id: str, device_id: str) -> tuple[Device, DeviceKey]:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        row = await self._read_row(tid, GET_DEVICE_WITH_KEY, (tid, did), "read_device_with_key")
        joined = _one(row, "device with an active key")
        return _device(joined), _device_key(joined, "key_")

    async def record_device_failure(self, tenant_id: str, device_id: str) -> int:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        async with self._transaction(tid, write=True) as tx:
            row = _one(await tx.fetchrow(ADD_FAILURE, tid, did), "device")
            return int(row["failure_count"])

    async def reset_device_failures(self, tenant_id: str, device_id: str) -> None:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        async with self._transaction(tid, write=True) as tx:
            if not await tx.execute(RESET_FAILURES, tid, did):
                raise NotFound("device not found")

    async def accept_handshake(
        self,
        tenant_id: str,
        device_id: str,
        nonce: bytes,
        *,
        timestamp: int,
        expires_at: datetime,
    ) -> bool:
        tid, did, n, ts, expires = nonce_args(tenant_id, device_id, nonce, timestamp, expires_at)
        try:
            async with self._transaction(tid, write=True) as tx:
                # One device's handshakes one at a time (SQLite: BEGIN IMMEDIATE already).
                await tx.lock(f"handshake/{tid}/{did}")
                floor = _one(await tx.fetchrow(GET_HANDSHAKE_FLOOR, tid, did), "device")
                if floor["last_handshake_ts"] is not None and ts < floor["last_handshake_ts"]:
                    return False  # below the floor: nothing written
                if await tx.fetchrow(RECORD_NONCE, tid, did, n, ts, expires) is None:
                    return False  # seen before: nothing written
                if not await tx.execute(RAISE_FLOOR, tid, did, ts):
                    raise _Refused  # the device row is gone (never deleted): roll back
                return True
        except _Refused:
            return False

    # the handshake: one transaction at ClientFinish

    async def finish_handshake(
        self,
        tenant_id: str,
        *,
        device_id: str,
        session_id: bytes,
        suite: int,
        epoch: int,
        encrypted_chain_state: bytes,
        replay_window: bytes,
        now: datetime,
        expires_at: datetime,
        counters: SessionCounters | None = None,
    ) -> HandshakeFinish:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        session = session_args(
            tid,
            did,
            session_id=session_id,
            state=SessionStatus.ACTIVE,
            suite=suite,
            epoch=epoch,
            encrypted_chain_state=encrypted_chain_state,
            replay_window=replay_window,
            now=now,
            expires_at=expires_at,
            counters=counters,
        )
        return await self._finish_handshake(session)

    async def _finish_handshake(self, session: SessionArgs) -> HandshakeFinish:
        """``finish_handshake`` with its arguments checked. PostgresStore sends it as one
        statement."""
        tid, did = session.tenant_id, session.device_id
        async with self._transaction(tid, write=True) as tx:
            # The device first: one device's handshakes one at a time, and its state as it is
            # for the whole transaction (SQLite: BEGIN IMMEDIATE already).
            await tx.lock(f"handshake/{tid}/{did}")
            device = _one(await tx.fetchrow(GET_DEVICE, tid, did), "device")
            seen = device["last_seen"]  # before the touch
            if device["state"] not in HANDSHAKE_STATES:
                return finished(FinishOutcome.NOT_ALLOWED, device, None, seen)
            existing = await tx.fetchrow(GET_SESSION, tid, session.session_id)
            if existing is not None:  # a retransmitted ClientFinish: nothing written
                return finished(FinishOutcome.EXISTS, device, existing, seen)
            row = await tx.fetchrow(INSERT_SESSION, *session)
            if row is None:  # inserted since GET_SESSION, not under this device's lock
                raise Conflict("session created concurrently")
            touched = await tx.fetchrow(TOUCH_AND_ACTIVATE, tid, did, session.now)
            return finished(FinishOutcome.CREATED, _one(touched, "device"), row, seen)

    # device keys

    @staticmethod
    async def _add_device_key(
        tx: Tx, tid: str, did: str, *, algorithm: str, public_key: bytes, now: datetime
    ) -> DeviceKey:
        # Serialize key changes per device: two concurrent additions would pick the same
        # version, and the loser would fail instead of becoming the next one.
        await tx.lock(f"device-key/{tid}/{did}")
        _one(await tx.fetchrow(DEVICE_EXISTS, tid, did), "device")
        version = _one(await tx.fetchrow(NEXT_DEVICE_KEY_VERSION, tid, did), "version")["next"]
        await tx.execute(RETIRE_DEVICE_KEYS, tid, did)
        row = await tx.fetchrow(INSERT_DEVICE_KEY, tid, did, version, algorithm, public_key, now)
        return _device_key(_one(row, "device key"))

    async def add_device_key(
        self,
        tenant_id: str,
        device_id: str,
        *,
        algorithm: str,
        public_key: bytes,
        now: datetime,
    ) -> DeviceKey:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        alg, pk = v.text(algorithm, "algorithm", 128), v.blob(public_key, "public key")
        created = v.timestamp(now, "now")
        async with self._transaction(tid, write=True) as tx:
            return await self._add_device_key(
                tx, tid, did, algorithm=alg, public_key=pk, now=created
            )

    async def get_device_key(
        self, tenant_id: str, device_id: str, version: int | None = None
    ) -> DeviceKey:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        ver = v.optional_integer(version, "version", 1)
        if ver is None:
            row = await self._read_row(
                tid, GET_ACTIVE_DEVICE_KEY, (tid, did), "read_active_device_key"
            )
        else:
            row = await self._read_row(tid, GET_DEVICE_KEY, (tid, did, ver), "read_device_key")
        return _device_key(_one(row, "device key"))

    async def list_device_keys(self, tenant_id: str, device_id: str) -> list[DeviceKey]:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        async with self._transaction(tid, write=False) as tx:
            return [_device_key(r) for r in await tx.fetch(LIST_DEVICE_KEYS, tid, did)]

    # enrollment tokens

    async def create_token(
        self,
        tenant_id: str,
        *,
        token_id: str,
        token_hash: bytes,
        now: datetime,
        expires_at: datetime,
    ) -> EnrollmentToken:
        tid, token = v.identifier(tenant_id, "tenant id"), v.identifier(token_id, "token id")
        digest = v.blob(token_hash, "token hash", min_len=16, max_len=64)
        created, expires = v.timestamp(now, "now"), v.timestamp(expires_at, "expires_at")
        if expires <= created:
            raise InvalidInput("expires_at must be after now")
        async with self._transaction(tid, write=True) as tx:
            row = await tx.fetchrow(INSERT_ENROLLMENT, tid, token, digest, created, expires)
            return _token(_one(row, "token"))

    @staticmethod
    async def _redeem(tx: Tx, tid: str, digest: bytes, now: datetime, did: str) -> EnrollmentToken:
        row = await tx.fetchrow(REDEEM_ENROLLMENT, tid, digest, now, did)
        if row is not None:
            return _token(row)
        seen = await tx.fetchrow(GET_ENROLLMENT_BY_HASH, tid, digest)
        if seen is None:
            raise TokenNotRedeemable("unknown")
        raise TokenNotRedeemable("used" if seen["used_at"] is not None else "expired")

    async def redeem_token(
        self, tenant_id: str, token_hash: bytes, *, now: datetime, device_id: str
    ) -> EnrollmentToken:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        digest = v.blob(token_hash, "token hash", min_len=16, max_len=64)
        at = v.timestamp(now, "now")
        async with self._transaction(tid, write=True) as tx:
            return await self._redeem(tx, tid, digest, at, did)

    async def enroll_device(
        self,
        tenant_id: str,
        token_hash: bytes,
        *,
        now: datetime,
        device_id: str,
        algorithm: str,
        public_key: bytes,
    ) -> Enrollment:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        digest = v.blob(token_hash, "token hash", min_len=16, max_len=64)
        alg, pk = v.text(algorithm, "algorithm", 128), v.blob(public_key, "public key")
        at = v.timestamp(now, "now")
        async with self._transaction(tid, write=True) as tx:
            token = await self._redeem(tx, tid, digest, at, did)
            row = await tx.fetchrow(INSERT_DEVICE, tid, did, DeviceState.ENROLLED.value, at)
            device = _device(_one(row, "device"))
            key = await self._add_device_key(tx, tid, did, algorithm=alg, public_key=pk, now=at)
            return Enrollment(token=token, device=device, key=key)

    # server keys

    async def rotate_server_key(
        self,
        tenant_id: str,
        *,
        key_id: str,
        purpose: KeyPurpose,
        algorithm: str,
        public_key: bytes,
        encrypted_private: bytes,
        now: datetime,
        previous_retire_after: datetime | None = None,
        if_active: str | None = None,
    ) -> Rotation:
        tid, kid = v.identifier(tenant_id, "tenant id"), v.identifier(key_id, "key id")
        use = v.member(KeyPurpose, purpose, "purpose")
        alg = v.text(algorithm, "algorithm", 128)
        # Biscuit keys are symmetric: no public half.
        pk = v.blob(public_key, "public key", min_len=0)
        sk = v.blob(encrypted_private, "encrypted private key")
        at = v.timestamp(now, "now")
        retire = v.optional_timestamp(previous_retire_after, "previous_retire_after")
        expect = v.optional_identifier(if_active, "if_active")
        async with self._transaction(tid, write=True) as tx:
            # Rotations of one purpose run one after another, so each sees the key the previous
            # one activated and demotes it: never two active keys, never a lost rotation.
            await tx.lock(f"server-key/{tid}/{use.value}")
            current = await tx.fetchrow(GET_ACTIVE_SERVER_KEY, tid, use.value)
            if expect is not None and (current is None or current["key_id"] != expect):
                raise Conflict("the active key is no longer the expected one")
            previous = None
            if current is not None:
                row = await tx.fetchrow(DEMOTE_SERVER_KEY, tid, current["key_id"], retire)
                previous = _server_key(_one(row, "server key"))
            version = _one(await tx.fetchrow(NEXT_SERVER_KEY_VERSION, tid, use.value), "v")
            row = await tx.fetchrow(
                INSERT_SERVER_KEY, tid, kid, use.value, alg, version["next"], pk, sk, at
            )
            return Rotation(active=_server_key(_one(row, "server key")), previous=previous)

    async def get_server_key(self, tenant_id: str, key_id: str) -> ServerKey:
        tid, kid = v.identifier(tenant_id, "tenant id"), v.identifier(key_id, "key id")
        async with self._transaction(tid, write=False) as tx:
            return _server_key(_one(await tx.fetchrow(GET_SERVER_KEY, tid, kid), "server key"))

    async def get_active_server_key(self, tenant_id: str, purpose: KeyPurpose) -> ServerKey:
        tid = v.identifier(tenant_id, "tenant id")
        use = v.member(KeyPurpose, purpose, "purpose")
        row = await self._read_row(
            tid, GET_ACTIVE_SERVER_KEY, (tid, use.value), "read_active_server_key"
        )
        return _server_key(_one(row, "active server key"))

    async def list_server_keys(
        self,
        tenant_id: str,
        *,
        purpose: KeyPurpose | None = None,
        state: KeyState | None = None,
    ) -> list[ServerKey]:
        tid = v.identifier(tenant_id, "tenant id")
        query = _Where(LIST_SERVER_KEYS, tid)
        use = v.optional_member(KeyPurpose, purpose, "purpose")
        st = v.optional_member(KeyState, state, "state")
        if use is not None:
            query.add("purpose = ?", use.value)
        if st is not None:
            query.add("state = ?", st.value)
        sql, args = query.finish("purpose, version", SERVER_KEYS_LIMIT)
        rows = await self._read_rows(
            tid,
            sql,
            args,
            "read_server_keys",
            (
                tid,
                None if use is None else use.value,
                None if st is None else st.value,
                SERVER_KEYS_LIMIT,
            ),
        )
        return [_server_key(r) for r in rows]

    async def set_server_key_state(
        self,
        tenant_id: str,
        key_id: str,
        state: KeyState,
        *,
        expected: KeyState | None = None,
    ) -> ServerKey:
        tid, kid = v.identifier(tenant_id, "tenant id"), v.identifier(key_id, "key id")
        target = v.member(KeyState, state, "state")
        exp = v.optional_member(KeyState, expected, "expected")
        if target is KeyState.ACTIVE:
            raise InvalidInput("a key becomes active only by rotate_server_key")
        async with self._transaction(tid, write=True) as tx:
            current = _server_key(_one(await tx.fetchrow(GET_SERVER_KEY, tid, kid), "server key"))
            if exp is not None and current.state is not exp:
                raise Conflict(f"key is {current.state}, not {exp}")
            if current.state is target:
                return current
            if target not in KEY_TRANSITIONS[current.state]:
                raise Conflict(f"a {current.state} key cannot become {target}")
            row = await tx.fetchrow(SET_SERVER_KEY_STATE, tid, kid, target.value, current.state)
            if row is None:  # changed between our read and write
                raise Conflict("key state changed concurrently")
            return _server_key(row)

    # sessions

    async def get_session(self, tenant_id: str, session_id: bytes) -> SessionRecord:
        tid = v.identifier(tenant_id, "tenant id")
        sid = v.blob(session_id, "session id", min_len=16, max_len=16)
        row = await self._read_row(tid, GET_SESSION, (tid, sid), "read_session")
        return _session(_one(row, "session"))

    async def update_session(
        self,
        tenant_id: str,
        session_id: bytes,
        *,
        expected_version: int,
        now: datetime,
        state: SessionStatus | None = None,
        epoch: int | None = None,
        encrypted_chain_state: bytes | None = None,
        replay_window: bytes | None = None,
        counters: SessionCounters | None = None,
        expires_at: datetime | None = None,
    ) -> SessionRecord:
        tid = v.identifier(tenant_id, "tenant id")
        sid = v.blob(session_id, "session id", min_len=16, max_len=16)
        counts = _counters(counters)
        st = v.optional_member(SessionStatus, state, "state")
        args = (
            tid,
            sid,
            v.integer(expected_version, "expected_version"),
            None if st is None else st.value,
            v.optional_integer(epoch, "epoch"),
            v.optional_blob(encrypted_chain_state, "encrypted chain state"),
            v.optional_blob(replay_window, "replay window", min_len=0),
            *counts,
            v.optional_timestamp(expires_at, "expires_at"),
            v.timestamp(now, "now"),
        )
        async with self._transaction(tid, write=True) as tx:
            row = await tx.fetchrow(UPDATE_SESSION, *args)
            if row is None:
                current = _one(await tx.fetchrow(GET_SESSION, tid, sid), "session")
                raise Conflict(
                    f"session is at version {current['version']}, not {expected_version}"
                )
            return _session(row)

    async def list_device_sessions(self, tenant_id: str, device_id: str) -> list[SessionRecord]:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        async with self._transaction(tid, write=False) as tx:
            return [_session(r) for r in await tx.fetch(LIST_DEVICE_SESSIONS, tid, did)]

    async def revoke_device_sessions(self, tenant_id: str, device_id: str, *, now: datetime) -> int:
        tid, did = v.identifier(tenant_id, "tenant id"), v.identifier(device_id, "device id")
        at = v.timestamp(now, "now")
        async with self._transaction(tid, write=True) as tx:
            changed = await tx.execute(REVOKE_DEVICE_SESSIONS, tid, did, at)
            if not changed:
                _one(await tx.fetchrow(DEVICE_EXISTS, tid, did), "device")
            return changed

    # audit log

    async def append_audit(
        self,
        *,
        ts: datetime,
        kind: str,
        payload: bytes,
        leaf_hash: bytes,
        expected_idx: int | None = None,
    ) -> AuditEntry:
        values = _audit_values(ts, kind, payload, leaf_hash)
        expect = v.optional_integer(expected_idx, "expected_idx")
        async with self._transaction(None, write=True) as tx:
            idx = await _next_audit_idx(tx, expect)
            return _audit(_one(await tx.fetchrow(INSERT_AUDIT, idx, *values), "audit entry"))

    async def append_audit_batch(
        self, rows: Sequence[AuditRow], *, expected_idx: int
    ) -> list[AuditEntry]:
        expect = v.integer(expected_idx, "expected_idx")
        values = [
            _audit_values(row.ts, row.kind, row.payload, row.leaf_hash)
            for row in _batch(rows, AuditRow, MAX_AUDIT_BATCH, "an audit batch")
        ]
        async with self._transaction(None, write=True) as tx:
            idx = await _next_audit_idx(tx, expect)
            # The single append's insert, once per row, in this one transaction: one lock and
            # one commit for the lot, and a row the database refuses rolls back every row.
            await tx.executemany(
                INSERT_AUDIT_ROW, [(idx + i, *row) for i, row in enumerate(values)]
            )
        return [
            AuditEntry(idx=idx + i, ts=at, kind=what, payload=body, leaf_hash=leaf)
            for i, (at, what, body, leaf) in enumerate(values)
        ]

    async def list_audit(self, *, start: int = 0, limit: int = 1000) -> list[AuditEntry]:
        first, count = v.integer(start, "start"), v.limit(limit)
        async with self._transaction(None, write=False) as tx:
            return [_audit(r) for r in await tx.fetch(LIST_AUDIT, first, count)]

    async def audit_size(self) -> int:
        async with self._transaction(None, write=False) as tx:
            return int(_one(await tx.fetchrow(NEXT_AUDIT_IDX), "audit size")["next"])

    # security events

    async def append_security_event(
        self,
        tenant_id: str,
        *,
        ts: datetime,
        type: str,
        severity: int,
        device_id: str | None = None,
        source: str | None = None,
        detail: JsonObject | None = None,
    ) -> SecurityEventRecord:
        tid = v.identifier(tenant_id, "tenant id")
        row = SecurityEventRow(
            ts=ts, type=type, severity=severity, device_id=device_id, source=source, detail=detail
        )
        async with self._transaction(tid, write=True) as tx:
            inserted = await tx.fetchrow(INSERT_EVENT, *_event_values(tid, row))
            return _event(_one(inserted, "event"))

    async def append_security_events(self, tenant_id: str, rows: Sequence[SecurityEventRow]) -> int:
        tid = v.identifier(tenant_id, "tenant id")
        values = [
            _event_values(tid, row)
            for row in _batch(rows, SecurityEventRow, MAX_EVENT_BATCH, "an event batch")
        ]
        async with self._transaction(tid, write=True) as tx:
            # One insert per row in this one transaction (one commit for the lot); a row the
            # database refuses rolls back every row.
            await tx.executemany(INSERT_EVENT_ROW, values)
        return len(values)

    async def list_security_events(
        self,
        tenant_id: str,
        *,
        device_id: str | None = None,
        since: datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[SecurityEventRecord]:
        tid = v.identifier(tenant_id, "tenant id")
        query = _Where(LIST_EVENTS, tid)
        if device_id is not None:
            query.add("device_id = ?", v.text(device_id, "device id"))
        if since is not None:
            query.add("ts >= ?", v.timestamp(since, "since"))
        if after_id is not None:
            query.add("id > ?", v.integer(after_id, "after_id"))
        sql, args = query.finish("id", v.limit(limit))
        async with self._transaction(tid, write=False) as tx:
            return [_event(r) for r in await tx.fetch(sql, *args)]

    # admin tokens

    async def create_admin_token(
        self, *, token_hash: bytes, name: str, scopes: tuple[str, ...], now: datetime
    ) -> AdminToken:
        args = (
            v.blob(token_hash, "token hash", min_len=16, max_len=64),
            v.text(name, "name"),
            " ".join(v.scopes(scopes)),
            v.timestamp(now, "now"),
        )
        async with self._transaction(None, write=True) as tx:
            return _admin(_one(await tx.fetchrow(INSERT_ADMIN, *args), "admin token"))

    async def get_admin_token(self, token_hash: bytes) -> AdminToken:
        digest = v.blob(token_hash, "token hash", min_len=16, max_len=64)
        async with self._transaction(None, write=False) as tx:
            return _admin(_one(await tx.fetchrow(GET_ADMIN, digest), "admin token"))

    async def revoke_admin_token(self, token_hash: bytes) -> AdminToken:
        digest = v.blob(token_hash, "token hash", min_len=16, max_len=64)
        async with self._transaction(None, write=True) as tx:
            return _admin(_one(await tx.fetchrow(REVOKE_ADMIN, digest), "admin token"))

    async def list_admin_tokens(self) -> list[AdminToken]:
        async with self._transaction(None, write=False) as tx:
            return [_admin(r) for r in await tx.fetch(LIST_ADMINS)]

    # maintenance

    async def cleanup(self, now: datetime, batch_size: int = 1000) -> CleanupCounts:
        at, size = v.timestamp(now, "now"), v.integer(batch_size, "batch_size", 1, 100_000)
        counts: dict[str, int] = {}
        for table in EXPIRING:
            total = 0
            while True:
                deleted = await self._delete_expired(table, at, size)
                total += deleted
                if deleted < size:
                    break
            counts[table] = total
        return CleanupCounts(
            sessions=counts["sessions"],
            nonces=counts["handshake_nonces"],
            tokens=counts["enrollment_tokens"],
        )
