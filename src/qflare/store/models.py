"""The rows the store hands out: frozen, slotted, keyword-only records.

Times are timezone-aware UTC ``datetime``s with microsecond resolution, which both backends hold
exactly. Binary secrets (server private keys, session chain state) arrive already sealed by
``qflare.keys.envelope``; they and the token hashes are still kept out of ``repr`` so a log line
or a traceback never carries them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TypeAlias

JsonValue: TypeAlias = "str | int | float | bool | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = "dict[str, JsonValue]"


class DeviceState(StrEnum):
    ENROLLED = "enrolled"
    ACTIVE = "active"
    QUARANTINED = "quarantined"
    REVOKED = "revoked"


class DeviceKeyState(StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"


class KeyPurpose(StrEnum):
    KEM_STATIC = "kem-static"
    AUDIT_SIGNING = "audit-signing"
    BISCUIT = "biscuit"


class KeyState(StrEnum):
    ACTIVE = "active"
    RETIRING = "retiring"
    RETIRED = "retired"
    REVOKED = "revoked"


# Where a server key may go next. Keys only move forward, and nothing leaves REVOKED: a key
# revoked after a compromise must never be brought back by a stale command. ACTIVE is reached
# only through a rotation, which demotes the previous key in the same transaction.
KEY_TRANSITIONS: dict[KeyState, frozenset[KeyState]] = {
    KeyState.ACTIVE: frozenset({KeyState.RETIRING, KeyState.RETIRED, KeyState.REVOKED}),
    KeyState.RETIRING: frozenset({KeyState.RETIRED, KeyState.REVOKED}),
    KeyState.RETIRED: frozenset({KeyState.REVOKED}),
    KeyState.REVOKED: frozenset(),
}


class SessionStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class FinishOutcome(StrEnum):
    """What ``Store.finish_handshake`` did (see there)."""

    CREATED = "created"  # session inserted, device touched
    EXISTS = "exists"  # a session with this id was there already: nothing written
    NOT_ALLOWED = "not_allowed"  # the device is quarantined or revoked: nothing written


@dataclass(frozen=True, slots=True, kw_only=True)
class Tenant:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    tenant_id: str
    device_id: str
    state: DeviceState
    state_reason: str | None
    created_at: datetime
    last_seen: datetime | None
    failure_count: int
    # The device clock (unix seconds, as sent in ClientHello) of the newest accepted handshake.
    last_handshake_ts: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceKey:
    tenant_id: str
    device_id: str
    version: int
    algorithm: str
    public_key: bytes = field(repr=False)
    state: DeviceKeyState
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrollmentToken:
    token_id: str
    tenant_id: str
    token_hash: bytes = field(repr=False)
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_device: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerKey:
    tenant_id: str
    key_id: str
    purpose: KeyPurpose
    algorithm: str
    version: int
    state: KeyState
    public_key: bytes = field(repr=False)
    encrypted_private: bytes = field(repr=False)
    created_at: datetime
    activated_at: datetime | None
    retire_after: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotation:
    active: ServerKey
    previous: ServerKey | None  # now RETIRING; None for the first key of a purpose


@dataclass(frozen=True, slots=True, kw_only=True)
class Enrollment:
    token: EnrollmentToken
    device: Device
    key: DeviceKey


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCounters:
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    tenant_id: str
    session_id: bytes
    device_id: str
    state: SessionStatus
    suite: int
    epoch: int
    encrypted_chain_state: bytes = field(repr=False)
    replay_window: bytes = field(repr=False)
    counters: SessionCounters
    created_at: datetime
    expires_at: datetime
    updated_at: datetime
    # Bumped by every update; update_session(expected_version=...) refuses a stale writer.
    version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeFinish:
    """What ``Store.finish_handshake`` did and the rows it read or wrote."""

    outcome: FinishOutcome
    # As read in the call's transaction (after the touch for CREATED).
    device: Device
    # The inserted row (CREATED), the stored one (EXISTS), else None.
    session: SessionRecord | None
    # The device's last_seen as read in the transaction before any touch: for CREATED, None
    # means this device never completed a handshake before (so this session is no rekey).
    previous_last_seen: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    idx: int
    ts: datetime
    kind: str
    payload: bytes = field(repr=False)
    leaf_hash: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRow:
    """One entry of ``Store.append_audit_batch``: an ``AuditEntry`` before it has an index."""

    ts: datetime
    kind: str
    payload: bytes = field(repr=False)
    leaf_hash: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityEventRow:
    """One event of ``Store.append_security_events``: a ``SecurityEventRecord`` before it has
    an id (the tenant is the call's)."""

    ts: datetime
    type: str
    severity: int
    device_id: str | None = None
    source: str | None = None
    detail: JsonObject | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityEventRecord:
    id: int
    ts: datetime
    tenant_id: str
    device_id: str | None
    source: str | None
    type: str
    severity: int
    detail: JsonObject


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminToken:
    token_hash: bytes = field(repr=False)
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CleanupCounts:
    sessions: int = 0
    nonces: int = 0
    tokens: int = 0

    @property
    def total(self) -> int:
        return self.sessions + self.nonces + self.tokens
