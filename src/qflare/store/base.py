"""The ``Store`` contract every backend passes (``tests/store/test_contract.py``).

Rules that hold for every method:

* Arguments are checked first (``qflare.store.validate``); a bad one raises ``InvalidInput`` or
  ``InvalidIdentifier`` and nothing is written.
* Every method is one transaction: it happens completely or not at all.
* ``NotFound`` for a missing row (or a missing parent row: a device of an unknown tenant),
  ``Conflict`` for a taken unique key or a failed optimistic check, ``StoreUnavailable`` when
  the database cannot answer. Callers on a security path (the replay check) treat
  ``StoreUnavailable`` as a refusal: fail closed.
* Tenant-scoped methods take ``tenant_id`` first. On PostgreSQL it also selects the row-level
  security scope of the transaction, so a forgotten ``WHERE`` cannot leak another tenant's rows.
* The store never reads the clock: ``now`` is an argument, as in ``qflare.protocol``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Final, Self

from qflare.store.models import (
    AdminToken,
    AuditEntry,
    AuditRow,
    CleanupCounts,
    Device,
    DeviceKey,
    DeviceState,
    Enrollment,
    EnrollmentToken,
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

if TYPE_CHECKING:
    from qflare.store.schema import Migrator

# The most rows one ``append_audit_batch`` takes.
MAX_AUDIT_BATCH: Final = 1000
# The most rows one ``append_security_events`` takes.
MAX_EVENT_BATCH: Final = 1000


class Store(ABC):
    dialect: ClassVar[str]

    # -- lifecycle --------------------------------------------------------------------------

    @abstractmethod
    async def open(self, *, check_schema: bool = True) -> None:
        """Connect. With ``check_schema``, raise ``SchemaNotCurrent`` unless fully migrated."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def migrator(self) -> Migrator:
        """What ``qflare.store.migrate`` drives; on PostgreSQL it connects as the schema owner."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- tenants ----------------------------------------------------------------------------

    @abstractmethod
    async def create_tenant(self, tenant_id: str, name: str, *, now: datetime) -> Tenant:
        """``Conflict`` if the id is taken."""

    @abstractmethod
    async def get_tenant(self, tenant_id: str) -> Tenant: ...

    # -- devices ----------------------------------------------------------------------------

    @abstractmethod
    async def create_device(
        self,
        tenant_id: str,
        device_id: str,
        *,
        now: datetime,
        state: DeviceState = DeviceState.ENROLLED,
    ) -> Device:
        """``Conflict`` if the device exists, ``NotFound`` if the tenant does not."""

    @abstractmethod
    async def get_device(self, tenant_id: str, device_id: str) -> Device: ...

    @abstractmethod
    async def list_devices(
        self,
        tenant_id: str,
        *,
        state: DeviceState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Device]:
        """Devices ordered by id; pass the last id seen as ``after`` for the next page."""

    @abstractmethod
    async def set_device_state(
        self,
        tenant_id: str,
        device_id: str,
        state: DeviceState,
        *,
        reason: str | None = None,
        expected: DeviceState | None = None,
    ) -> Device:
        """Set the state. With ``expected``, only from that state, else ``Conflict``."""

    @abstractmethod
    async def get_device_with_key(self, tenant_id: str, device_id: str) -> tuple[Device, DeviceKey]:
        """The device and its active identity key, read together (one round trip on
        PostgreSQL): what a ClientHello needs. ``NotFound`` if either is missing. The state is
        read fresh on every call: nothing is cached, so a quarantine takes effect at once."""

    @abstractmethod
    async def record_device_failure(self, tenant_id: str, device_id: str) -> int:
        """Add one to ``failure_count`` atomically and return the new count."""

    @abstractmethod
    async def reset_device_failures(self, tenant_id: str, device_id: str) -> None: ...

    @abstractmethod
    async def accept_handshake(
        self,
        tenant_id: str,
        device_id: str,
        nonce: bytes,
        *,
        timestamp: int,
        expires_at: datetime,
    ) -> bool:
        """The durable replay check of a ClientHello, in one transaction: the nonce (per
        device) and the per-device timestamp floor together.

        True, with the nonce recorded and the floor raised to ``timestamp``, only if this
        device never used ``nonce`` before *and* ``timestamp`` is not below its floor (equal
        is not below: the nonce decides; the floor only ever rises). False
        otherwise, and then nothing is written: a nonce seen before stays as it was, and a
        timestamp below the floor records no nonce (none is needed: the floor never falls, so
        the same ClientHello is refused again however often it comes). Of any number of
        concurrent calls with one nonce at most one returns True. ``NotFound`` for an unknown
        device. Check and record are one transaction, so two replicas cannot both accept the
        same ClientHello; keep ``expires_at`` past the acceptance window.
        """

    # -- the handshake: one transaction at ClientFinish ------------------------------------

    @abstractmethod
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
        """Everything a ClientFinish writes, in one transaction (one round trip on
        PostgreSQL), with the device row locked first, so a concurrent state change (a
        quarantine) is ordered wholly before or wholly after the call. In order:

        1. the device; ``NotFound`` if it does not exist.
        2. not ENROLLED or ACTIVE: ``NOT_ALLOWED``, nothing written.
        3. a session ``session_id`` exists: ``EXISTS`` with the stored row unchanged, nothing
           written (a retransmitted ClientFinish; the caller must check its ``device_id``).
        4. the session inserted (ACTIVE, ``counters`` default zero: the server may insert its
           state after its first answer was sealed) and the device touched: ``last_seen`` set
           to ``now`` unless already later (it never moves backwards), and ENROLLED becomes
           ACTIVE (its ``state_reason`` cleared): ``CREATED``.

        The replay check is not here: it is ``accept_handshake``'s, at ClientHello.
        ``device`` is the device as read in the transaction (after the touch for CREATED);
        ``session`` the inserted row (CREATED), the stored one (EXISTS), else None;
        ``previous_last_seen`` the device's ``last_seen`` as read before the touch, for every
        outcome (for CREATED, None means the device never completed a handshake before: this
        session is no rekey). Of concurrent calls with one session id at most one is CREATED;
        the others (for that device) answer EXISTS. ``Conflict`` (nothing written) only if a
        session of the same id is inserted meanwhile by a call that does not hold this
        device's lock (another device's ``finish_handshake`` with the same session id); a call
        made after it answers EXISTS.
        """

    # -- device identity keys ---------------------------------------------------------------

    @abstractmethod
    async def add_device_key(
        self,
        tenant_id: str,
        device_id: str,
        *,
        algorithm: str,
        public_key: bytes,
        now: datetime,
    ) -> DeviceKey:
        """Add the next version as the active key and retire the previous one, atomically."""

    @abstractmethod
    async def get_device_key(
        self, tenant_id: str, device_id: str, version: int | None = None
    ) -> DeviceKey:
        """The given version, or the active key when ``version`` is None."""

    @abstractmethod
    async def list_device_keys(self, tenant_id: str, device_id: str) -> list[DeviceKey]:
        """Every version, oldest first."""

    # -- enrollment tokens ------------------------------------------------------------------

    @abstractmethod
    async def create_token(
        self,
        tenant_id: str,
        *,
        token_id: str,
        token_hash: bytes,
        now: datetime,
        expires_at: datetime,
    ) -> EnrollmentToken:
        """Store a token by its hash (the token itself never reaches the store)."""

    @abstractmethod
    async def redeem_token(
        self, tenant_id: str, token_hash: bytes, *, now: datetime, device_id: str
    ) -> EnrollmentToken:
        """Mark the token used by ``device_id``, atomically and at most once.

        ``TokenNotRedeemable`` if it is unknown, expired (``expires_at <= now``) or used. Of
        any number of concurrent redemptions exactly one succeeds.
        """

    @abstractmethod
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
        """Redeem the token, create the device (ENROLLED) and its key version 1 in one
        transaction. If the device id is taken (``Conflict``) the token stays unused."""

    # -- server key ring --------------------------------------------------------------------

    @abstractmethod
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
        """Insert a new ACTIVE key for ``purpose`` and move the old active one to RETIRING
        (with ``retire_after = previous_retire_after``) in one transaction.

        Concurrent rotations serialize: afterwards exactly one key of the purpose is active.
        With ``if_active`` the rotation happens only if that key is still the active one, else
        ``Conflict``: two replicas rotating on the same schedule then rotate once, not twice.
        """

    @abstractmethod
    async def get_server_key(self, tenant_id: str, key_id: str) -> ServerKey: ...

    @abstractmethod
    async def get_active_server_key(self, tenant_id: str, purpose: KeyPurpose) -> ServerKey: ...

    @abstractmethod
    async def list_server_keys(
        self,
        tenant_id: str,
        *,
        purpose: KeyPurpose | None = None,
        state: KeyState | None = None,
    ) -> list[ServerKey]:
        """Ordered by purpose, then version."""

    @abstractmethod
    async def set_server_key_state(
        self,
        tenant_id: str,
        key_id: str,
        state: KeyState,
        *,
        expected: KeyState | None = None,
    ) -> ServerKey:
        """Retire or revoke a key. A key becomes ACTIVE only through ``rotate_server_key``
        (``InvalidInput`` otherwise), and a REVOKED key never changes again (``Conflict``)."""

    # -- sessions ---------------------------------------------------------------------------

    @abstractmethod
    async def get_session(self, tenant_id: str, session_id: bytes) -> SessionRecord: ...

    @abstractmethod
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
        """Change the given fields if the row is still at ``expected_version`` (``Conflict``
        otherwise, ``NotFound`` if absent); the returned row has ``version + 1``."""

    @abstractmethod
    async def list_device_sessions(self, tenant_id: str, device_id: str) -> list[SessionRecord]:
        """Oldest first."""

    @abstractmethod
    async def revoke_device_sessions(self, tenant_id: str, device_id: str, *, now: datetime) -> int:
        """Mark every pending or active session of the device REVOKED; return how many."""

    # -- audit log (append-only) ------------------------------------------------------------

    @abstractmethod
    async def append_audit(
        self,
        *,
        ts: datetime,
        kind: str,
        payload: bytes,
        leaf_hash: bytes,
        expected_idx: int | None = None,
    ) -> AuditEntry:
        """Append at the next index (0, 1, 2, ... without gaps: the Merkle tree needs them
        dense). With ``expected_idx``, ``Conflict`` if the next index is another."""

    @abstractmethod
    async def append_audit_batch(
        self, rows: Sequence[AuditRow], *, expected_idx: int
    ) -> list[AuditEntry]:
        """Append ``rows`` at ``expected_idx``, ``expected_idx + 1``, ... in order, in one
        transaction: all of them or none.

        ``Conflict`` (nothing written) if the next index is not ``expected_idx``; a bad row
        (``InvalidInput``) or a row the database refuses writes nothing either. 1 to
        ``MAX_AUDIT_BATCH`` rows. Returns the entries in the order given. This is what lets
        ``AuditLog`` group-commit concurrent appends: one commit for the lot.
        """

    @abstractmethod
    async def list_audit(self, *, start: int = 0, limit: int = 1000) -> list[AuditEntry]: ...

    @abstractmethod
    async def audit_size(self) -> int: ...

    # -- security events --------------------------------------------------------------------

    @abstractmethod
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
        """``device_id`` need not be a known device: attacks name unknown ones."""

    @abstractmethod
    async def append_security_events(self, tenant_id: str, rows: Sequence[SecurityEventRow]) -> int:
        """Append 1 to ``MAX_EVENT_BATCH`` events of one tenant in one transaction: all of
        them or none (a bad row is ``InvalidInput`` before anything is written). Ids follow the
        order given. Returns how many were written. What the server's background writer uses
        to group-commit INFO events."""

    @abstractmethod
    async def list_security_events(
        self,
        tenant_id: str,
        *,
        device_id: str | None = None,
        since: datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[SecurityEventRecord]:
        """Oldest first; ``after_id`` pages on from the last id seen."""

    # -- admin API tokens -------------------------------------------------------------------

    @abstractmethod
    async def create_admin_token(
        self, *, token_hash: bytes, name: str, scopes: tuple[str, ...], now: datetime
    ) -> AdminToken: ...

    @abstractmethod
    async def get_admin_token(self, token_hash: bytes) -> AdminToken: ...

    @abstractmethod
    async def revoke_admin_token(self, token_hash: bytes) -> AdminToken: ...

    @abstractmethod
    async def list_admin_tokens(self) -> list[AdminToken]: ...

    # -- maintenance ------------------------------------------------------------------------

    @abstractmethod
    async def cleanup(self, now: datetime, batch_size: int = 1000) -> CleanupCounts:
        """Delete sessions, nonces and enrollment tokens with ``expires_at <= now``, across
        all tenants, ``batch_size`` rows per short transaction so live traffic never waits
        behind one long delete."""
