"""``KeyManager``: the policy over the store for every key QFLARE holds (docs/KEYS.md).

No SQL here: the store keeps rows, the manager decides what may happen to them. It issues
enrollment tokens (only their hash is stored), enrolls devices with proof of possession,
rotates device identity keys, moves devices between states, runs the server key ring (static
KEM keys, biscuit keys, the audit signing key) and persists protocol sessions sealed to their
rows. Every private key and session secret passes through ``Envelope`` before it reaches the
store, and no method returns or logs one in clear.

Time is passed in (``now`` as unix seconds), as in ``qflare.protocol`` and ``qflare.store``.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import (
    Conflict,
    DeviceNotAllowed,
    KeyManagementError,
    NotFound,
    TokenRejected,
    UnsupportedAlgorithm,
)
from qflare.keys import sessions as session_codec
from qflare.keys.envelope import Binding, Envelope
from qflare.protocol.biscuit import BiscuitKeys
from qflare.protocol.enrollment import (
    enrollment_proof_message,
    key_rotation_message,
    server_key_binding,
    token_hash,
)
from qflare.protocol.handshake import DeviceKey, Established, PinnedServerKey, ServerStaticKey
from qflare.protocol.record import RekeyPolicy, Session
from qflare.store import (
    Device,
    DeviceState,
    FinishOutcome,
    KeyPurpose,
    KeyState,
    Rotation,
    ServerKey,
    SessionRecord,
    SessionStatus,
    Store,
    TokenNotRedeemable,
)
from qflare.store.validate import identifier as check_identifier

MAX_TOKEN_LENGTH = 128
_USABLE = (KeyState.ACTIVE, KeyState.RETIRING)
_ALLOWED_DEVICE_STATES = (DeviceState.ENROLLED, DeviceState.ACTIVE)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPolicy:
    static_kem_algorithm: str = "ML-KEM-1024"
    audit_algorithm: str = "ML-DSA-87"
    device_algorithms: tuple[str, ...] = ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87")
    token_ttl: int = 24 * 3600
    # A rotated static key stays usable this long, so devices pinned to it keep working.
    static_overlap: int = 7 * 86400
    # Biscuits live seconds; the previous biscuit key is kept a little longer than that.
    biscuit_overlap: int = 600
    session_lifetime: int = 3600
    # Nonces are kept past the acceptance window (±timestamp_window) so a replay inside it
    # always meets its first use.
    nonce_retention: int = 2 * 120 + 60
    # How long a replica trusts its cached view of the key ring before reading it again:
    # the bound on how late a revocation reaches a running server.
    refresh_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token_id: str
    token: str = field(repr=False)
    expires_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrollmentRequest:
    token: str = field(repr=False)
    device_id: str
    algorithm: str
    public_key: bytes = field(repr=False)
    proof: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Enrolled:
    device: Device
    server_key: PinnedServerKey
    server_key_binding: bytes


@dataclass(frozen=True, slots=True)
class LoadedSession:
    record: SessionRecord
    session: Session


@dataclass(frozen=True, slots=True)
class Completed:
    """What ``KeyManager.complete_handshake`` did.

    ``outcome`` CREATED: ``loaded`` is the new session and ``sealed`` the first answer, sealed
    in it; ``rekey`` says whether the device had completed a handshake before. EXISTS (a
    retransmitted ClientFinish): ``loaded`` is the stored session, untouched, and ``sealed``
    is None. NOT_ALLOWED: the device is quarantined or revoked; nothing was written.
    ``device`` is the device as the store transaction saw it (after the touch, if CREATED).
    """

    outcome: FinishOutcome
    device: Device
    loaded: LoadedSession | None = None
    sealed: bytes | None = None
    rekey: bool = False


@dataclass(slots=True)
class _Ring:
    static: dict[str, ServerStaticKey]
    biscuits: BiscuitKeys
    published: tuple[PinnedServerKey, ...]
    loaded_at: float


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class KeyManager:
    def __init__(
        self,
        store: Store,
        envelope: Envelope,
        *,
        tenant: str = "default",
        policy: KeyPolicy | None = None,
        rekey: RekeyPolicy | None = None,
        rng: crypto.Rng = crypto.system_rng,
    ) -> None:
        self.store = store
        self.tenant = check_identifier(tenant, "tenant")
        self.policy = policy or KeyPolicy()
        self.rekey = rekey
        self._envelope = envelope
        self._rng = rng
        self._ring: _Ring | None = None
        self._device_keys: dict[tuple[str, int], DeviceKey] = {}

    def __repr__(self) -> str:
        return f"<KeyManager tenant={self.tenant} store={type(self.store).__name__}>"

    # -- set-up -------------------------------------------------------------------------------

    async def initialize(self, *, now: float) -> list[ServerKey]:
        """Create the tenant and one key of every purpose that has none. Idempotent: an
        existing key is never replaced. Returns the keys this call created."""
        with contextlib.suppress(Conflict):
            await self.store.create_tenant(self.tenant, self.tenant, now=utc(now))
        created = []
        for purpose in KeyPurpose:
            try:
                await self.store.get_active_server_key(self.tenant, purpose)
            except NotFound:
                try:
                    rotation = await self.rotate_server_key(purpose, now=now, if_active="")
                except Conflict:  # another process initialised the same purpose first
                    continue
                created.append(rotation.active)
        return created

    # -- enrollment tokens --------------------------------------------------------------------

    async def issue_token(self, *, now: float, ttl: int | None = None) -> IssuedToken:
        ttl = self.policy.token_ttl if ttl is None else ttl
        if not 0 < ttl <= 365 * 86400:
            raise KeyManagementError("token lifetime must be between 1 second and 365 days")
        token = "qft_" + base64.urlsafe_b64encode(self._rng(32)).rstrip(b"=").decode()
        token_id = "tok-" + self._rng(6).hex()
        expires_at = utc(now + ttl)
        await self.store.create_token(
            self.tenant,
            token_id=token_id,
            token_hash=token_hash(token),
            now=utc(now),
            expires_at=expires_at,
        )
        return IssuedToken(token_id, token, expires_at)

    # -- devices ------------------------------------------------------------------------------

    def _parse_device_key(self, algorithm: str, public_key: bytes) -> crypto.SignaturePublicKey:
        if algorithm not in self.policy.device_algorithms:
            raise UnsupportedAlgorithm(algorithm, "not accepted for device identity keys")
        return crypto.signature(algorithm).from_public_bytes(public_key)

    async def enroll(self, request: EnrollmentRequest, *, now: float) -> Enrolled:
        """Redeem a token for a new device whose key signed the enrollment proof.

        Everything that can be checked without the token is checked first, so a malformed
        request never burns a token; the token, device and key rows are then written in one
        transaction (a taken device id leaves the token unused).
        """
        device_id = check_identifier(request.device_id, "device id")
        if not request.token or len(request.token) > MAX_TOKEN_LENGTH:
            raise TokenRejected("malformed")
        public = self._parse_device_key(request.algorithm, request.public_key)
        message = enrollment_proof_message(
            device_id, request.algorithm, request.public_key, request.token
        )
        public.verify(request.proof, message, labels.SIG_ENROLLMENT)
        try:
            enrollment = await self.store.enroll_device(
                self.tenant,
                token_hash(request.token),
                now=utc(now),
                device_id=device_id,
                algorithm=request.algorithm,
                public_key=request.public_key,
            )
        except TokenNotRedeemable as exc:
            raise TokenRejected(exc.reason) from None
        pinned = (await self.published_server_keys(now=now))[-1]
        return Enrolled(
            enrollment.device, pinned, server_key_binding(request.token, device_id, pinned)
        )

    async def device(self, device_id: str) -> Device:
        return await self.store.get_device(self.tenant, check_identifier(device_id, "device id"))

    async def device_key(self, device_id: str) -> tuple[Device, DeviceKey]:
        """The device and its active identity key, parsed once and cached per key version.

        The state is returned, not checked: the server verifies the signature first and only
        then refuses a quarantined device, so the refusal does not leak a state to a stranger.
        """
        # One store read for both (one round trip on PostgreSQL); the state is never cached.
        device, row = await self.store.get_device_with_key(
            self.tenant, check_identifier(device_id, "device id")
        )
        cached = self._device_keys.get((row.device_id, row.version))
        if cached is None:
            cached = DeviceKey(
                device_id=row.device_id,
                algorithm=row.algorithm,
                public=crypto.signature(row.algorithm).from_public_bytes(row.public_key),
            )
            if len(self._device_keys) > 100_000:
                self._device_keys.clear()
            self._device_keys[(row.device_id, row.version)] = cached
        return device, cached

    @staticmethod
    def require_allowed(device: Device) -> None:
        if device.state not in _ALLOWED_DEVICE_STATES:
            raise DeviceNotAllowed(f"device is {device.state.value}")

    async def rotate_device_key(
        self,
        device_id: str,
        *,
        algorithm: str,
        public_key: bytes,
        current_signature: bytes,
        new_signature: bytes,
        now: float,
    ) -> int:
        """Replace the identity key; the current key authorises it, the new key proves
        possession. Returns the new version. Existing sessions stay valid (they were
        authenticated by the old key); the next handshake needs the new one."""
        device, current = await self.device_key(device_id)
        self.require_allowed(device)
        row = await self.store.get_device_key(self.tenant, device.device_id)
        new_public = self._parse_device_key(algorithm, public_key)
        message = key_rotation_message(device.device_id, row.version, algorithm, public_key)
        current.public.verify(current_signature, message, labels.SIG_KEY_ROTATION)
        new_public.verify(new_signature, message, labels.SIG_KEY_ROTATION)
        latest = await self.store.get_device_key(self.tenant, device.device_id)
        if latest.version != row.version:
            raise Conflict("the device key changed meanwhile")
        added = await self.store.add_device_key(
            self.tenant, device.device_id, algorithm=algorithm, public_key=public_key, now=utc(now)
        )
        return added.version

    async def quarantine(self, device_id: str, *, reason: str, now: float) -> Device:
        """Refuse the device's handshakes and revoke its live sessions; reversible."""
        device = await self.device(device_id)
        if device.state is DeviceState.REVOKED:
            raise Conflict("a revoked device cannot be quarantined")
        updated = await self.store.set_device_state(
            self.tenant, device.device_id, DeviceState.QUARANTINED, reason=reason[:200]
        )
        await self.store.revoke_device_sessions(self.tenant, device.device_id, now=utc(now))
        return updated

    async def reinstate(self, device_id: str, *, reason: str = "reinstated") -> Device:
        device = await self.device(device_id)
        return await self.store.set_device_state(
            self.tenant,
            device.device_id,
            DeviceState.ACTIVE,
            reason=reason[:200],
            expected=DeviceState.QUARANTINED,
        )

    async def revoke_device(self, device_id: str, *, reason: str, now: float) -> tuple[Device, int]:
        """Permanent: the device and every session it holds. Returns the sessions revoked."""
        device = await self.device(device_id)
        updated = await self.store.set_device_state(
            self.tenant, device.device_id, DeviceState.REVOKED, reason=reason[:200]
        )
        revoked = await self.store.revoke_device_sessions(
            self.tenant, device.device_id, now=utc(now)
        )
        return updated, revoked

    # -- server key ring ----------------------------------------------------------------------

    def _generate(self, purpose: KeyPurpose) -> tuple[str, str, bytes, bytes]:
        """(key id, algorithm, public key, private bytes) of a fresh key for ``purpose``."""
        suffix = self._rng(6).hex()
        if purpose is KeyPurpose.KEM_STATIC:
            algorithm = self.policy.static_kem_algorithm
            kem_key = crypto.kem(algorithm).generate(self._rng)
            return (
                f"kem-{suffix}",
                algorithm,
                kem_key.public_key().public_bytes(),
                (kem_key.private_bytes()),
            )
        if purpose is KeyPurpose.AUDIT_SIGNING:
            algorithm = self.policy.audit_algorithm
            sig_key = crypto.signature(algorithm).generate(self._rng)
            return (
                f"audit-{suffix}",
                algorithm,
                sig_key.public_key().public_bytes(),
                (sig_key.private_bytes()),
            )
        return f"biscuit-{suffix}", "AES-256-GCM", b"", self._rng(32)

    def _overlap(self, purpose: KeyPurpose) -> int:
        if purpose is KeyPurpose.BISCUIT:
            return self.policy.biscuit_overlap
        return self.policy.static_overlap

    async def rotate_server_key(
        self,
        purpose: KeyPurpose,
        *,
        now: float,
        overlap: int | None = None,
        if_active: str | None = None,
    ) -> Rotation:
        """A new active key; the previous one keeps working for ``overlap`` seconds.

        ``if_active=""`` means "only if there is no active key" (first set-up); a key id means
        "only if that key is still active", so replicas on one schedule rotate once.
        """
        overlap = self._overlap(purpose) if overlap is None else overlap
        key_id, algorithm, public, private = self._generate(purpose)
        sealed = self._envelope.seal(private, Binding("server_keys", key_id, "private"))
        if if_active == "":
            try:
                await self.store.get_active_server_key(self.tenant, purpose)
            except NotFound:
                if_active = None
            else:
                raise Conflict(f"{purpose.value} already has an active key")
        rotation = await self.store.rotate_server_key(
            self.tenant,
            key_id=key_id,
            purpose=purpose,
            algorithm=algorithm,
            public_key=public,
            encrypted_private=sealed,
            now=utc(now),
            previous_retire_after=utc(now + overlap),
            if_active=if_active,
        )
        self._ring = None
        return rotation

    async def due_keys(self, *, now: float) -> list[ServerKey]:
        """The RETIRING keys whose overlap has passed: what ``retire_due_keys`` would retire."""
        return [
            key
            for key in await self.store.list_server_keys(self.tenant, state=KeyState.RETIRING)
            if key.retire_after is not None and key.retire_after <= utc(now)
        ]

    async def retire_due_keys(
        self, *, now: float, due: Sequence[ServerKey] | None = None
    ) -> list[ServerKey]:
        """Move RETIRING keys whose overlap has passed to RETIRED (the periodic task).

        ``due``: only these keys (``due_keys``, read before the audit entry that names them).
        """
        retired = []
        for key in await self.due_keys(now=now) if due is None else due:
            try:
                retired.append(
                    await self.store.set_server_key_state(
                        self.tenant, key.key_id, KeyState.RETIRED, expected=KeyState.RETIRING
                    )
                )
            except Conflict:  # another replica did it first
                continue
        if retired:
            self._ring = None
        return retired

    async def revoke_server_key(self, key_id: str) -> ServerKey:
        """Stop using a key at once. Revoking the active key leaves its purpose without one
        until the next rotation: rotate first, then revoke the old key."""
        key = await self.store.set_server_key_state(
            self.tenant, check_identifier(key_id, "key id"), KeyState.REVOKED
        )
        self._ring = None
        return key

    async def server_keys(self) -> list[ServerKey]:
        return await self.store.list_server_keys(self.tenant)

    def _open_private(self, key: ServerKey) -> bytes:
        return self._envelope.open(
            key.encrypted_private, Binding("server_keys", key.key_id, "private")
        )

    async def _load_ring(self, now: float) -> _Ring:
        ring = self._ring
        if ring is not None and now - ring.loaded_at < self.policy.refresh_seconds:
            return ring
        keys = await self.store.list_server_keys(self.tenant)
        usable = [k for k in keys if k.state in _USABLE]
        static: dict[str, ServerStaticKey] = {}
        previous = ring.static if ring is not None else {}
        for key in usable:
            if key.purpose is not KeyPurpose.KEM_STATIC:
                continue
            # Parsing a KEM key from its seed costs a key generation: reuse parsed ones.
            static[key.key_id] = previous.get(key.key_id) or ServerStaticKey(
                key_id=key.key_id,
                algorithm=key.algorithm,
                private=crypto.kem(key.algorithm).from_private_bytes(self._open_private(key)),
            )
        biscuit_rows = [k for k in usable if k.purpose is KeyPurpose.BISCUIT]
        if not static or not biscuit_rows:
            raise KeyManagementError("the server key ring is not initialised (run qflare init)")
        biscuit_keys = {k.version % 256: self._open_private(k) for k in biscuit_rows}
        current = next(k for k in biscuit_rows if k.state is KeyState.ACTIVE).version % 256
        published = tuple(
            PinnedServerKey(key_id=k.key_id, algorithm=k.algorithm, public_key=k.public_key)
            for k in sorted(usable, key=lambda k: (k.state is KeyState.ACTIVE, k.version))
            if k.purpose is KeyPurpose.KEM_STATIC
        )
        self._ring = _Ring(static, BiscuitKeys(biscuit_keys, current), published, now)
        return self._ring

    async def handshake_keys(self, *, now: float) -> tuple[dict[str, ServerStaticKey], BiscuitKeys]:
        ring = await self._load_ring(now)
        return ring.static, ring.biscuits

    async def published_server_keys(self, *, now: float) -> tuple[PinnedServerKey, ...]:
        """Usable static keys, oldest first and the active key last (what devices pin)."""
        return (await self._load_ring(now)).published

    async def audit_signing_key(self) -> tuple[ServerKey, crypto.SignaturePrivateKey]:
        key = await self.store.get_active_server_key(self.tenant, KeyPurpose.AUDIT_SIGNING)
        return key, crypto.signature(key.algorithm).from_private_bytes(self._open_private(key))

    # -- replay protection --------------------------------------------------------------------

    async def first_use(self, device_id: str, nonce: bytes, timestamp: int, *, now: float) -> bool:
        """The durable replay check: True only for the first use of ``nonce`` by the device
        and a timestamp not below the newest one accepted from it, checked and recorded in one
        store transaction (``Store.accept_handshake``; a refusal records nothing, see there).
        ``StoreUnavailable`` propagates: the caller refuses the handshake (fail closed)."""
        return await self.store.accept_handshake(
            self.tenant,
            device_id,
            nonce,
            timestamp=timestamp,
            expires_at=utc(now + self.policy.nonce_retention),
        )

    # -- sessions -----------------------------------------------------------------------------

    def _restore(self, record: SessionRecord) -> Session:
        state = session_codec.open_state(self._envelope, record)
        return Session.restore(state, self.rekey)

    def session_expires_at(self, established: Established) -> datetime:
        """When the session ``complete_handshake`` would insert for ``established`` expires."""
        return utc(established.session.established_at + self.policy.session_lifetime)

    async def complete_handshake(
        self,
        established: Established,
        first_answer: bytes | None,
        *,
        purpose: str = "control",
        now: float,
    ) -> Completed:
        """Install the session of a verified ClientFinish: one store transaction
        (``Store.finish_handshake``) re-checks the device's state, inserts the session if
        absent and records the handshake on the device row (``last_seen``, ENROLLED -> ACTIVE).

        ``first_answer`` is sealed in the new session *before* the insert, so the row is
        written once, already in its post-answer state. A retransmitted ClientFinish (EXISTS)
        gets the stored session back, never a reset: the answer sealed here is discarded
        unsent with the fresh copy, and the caller answers from the stored session.
        """
        session = established.session
        sealed = None
        if first_answer is not None:
            sealed = session.seal(first_answer, now=now, purpose=purpose)
        state = session.export()
        done = await self.store.finish_handshake(
            self.tenant,
            device_id=established.device_id,
            session_id=session.session_id,
            suite=session.suite.id,
            epoch=session.schedule.newest,
            encrypted_chain_state=session_codec.seal_state(self._envelope, state),
            replay_window=state.replay,
            now=utc(now),
            expires_at=self.session_expires_at(established),
            counters=session_codec.counters_of(state),
        )
        if done.outcome is FinishOutcome.CREATED and done.session is not None:
            return Completed(
                done.outcome,
                done.device,
                LoadedSession(done.session, session),
                sealed,
                rekey=done.previous_last_seen is not None,
            )
        session.close()  # and with it any answer sealed above, which never leaves
        if done.outcome is not FinishOutcome.EXISTS or done.session is None:
            return Completed(done.outcome, done.device)
        if done.session.device_id != established.device_id:
            raise Conflict("session id taken by another device")
        return Completed(
            done.outcome, done.device, LoadedSession(done.session, self._restore(done.session))
        )

    async def load_session(
        self, session_id: bytes, *, now: float, cached: LoadedSession | None = None
    ) -> LoadedSession:
        """An active, unexpired session from the store. ``cached`` (a copy this process saved)
        is reused if the row has not changed since, which saves opening the sealed state."""
        record = await self.store.get_session(self.tenant, session_id)
        if record.state is not SessionStatus.ACTIVE or record.expires_at <= utc(now):
            raise SessionUnusable(
                "expired" if record.state is SessionStatus.ACTIVE else record.state.value
            )
        if cached is not None and cached.record.version == record.version:
            return cached
        return LoadedSession(record, self._restore(record))

    async def save_session(
        self, loaded: LoadedSession, *, now: float, state: SessionStatus | None = None
    ) -> LoadedSession:
        """Write back ``loaded.session``; ``Conflict`` if another writer got there first (then
        whatever was sealed with this copy must be discarded, never sent)."""
        exported = loaded.session.export()
        record = await self.store.update_session(
            self.tenant,
            loaded.record.session_id,
            expected_version=loaded.record.version,
            now=utc(now),
            state=state,
            epoch=loaded.session.schedule.newest,
            encrypted_chain_state=session_codec.seal_state(self._envelope, exported),
            replay_window=exported.replay,
            counters=session_codec.counters_of(exported),
        )
        return LoadedSession(record, loaded.session)

    async def device_sessions(self, device_id: str) -> list[SessionRecord]:
        return await self.store.list_device_sessions(
            self.tenant, check_identifier(device_id, "device id")
        )

    async def revoke_session(self, session_id: bytes, *, now: float) -> SessionRecord:
        record = await self.store.get_session(self.tenant, session_id)
        if record.state in (SessionStatus.REVOKED, SessionStatus.EXPIRED):
            return record
        return await self.store.update_session(
            self.tenant,
            session_id,
            expected_version=record.version,
            now=utc(now),
            state=SessionStatus.REVOKED,
        )


class SessionUnusable(KeyManagementError):
    """A session that is closed, revoked or expired: the device must handshake again."""

    def __init__(self, state: str) -> None:
        self.state = state
        super().__init__(f"session is {state}")


def pinned_to_json(keys: Sequence[PinnedServerKey]) -> list[dict[str, str]]:
    return [
        {"key_id": k.key_id, "algorithm": k.algorithm, "public_key": _b64(k.public_key)}
        for k in keys
    ]


__all__ = [
    "Completed",
    "Enrolled",
    "EnrollmentRequest",
    "IssuedToken",
    "KeyManager",
    "KeyPolicy",
    "LoadedSession",
    "SessionUnusable",
    "pinned_to_json",
    "utc",
]
