"""The three-message handshake, sans-I/O (docs/PROTOCOL.md sections 5, 6, 9 and 11).

Nothing here reads a clock, draws randomness on its own, or touches a socket or a database:
``now`` and ``rng`` are arguments, and the durable nonce check is a callback. The same objects
serve the HTTP server, the sync and async device clients and the tests.

Failure model: every failure of the protocol raises ``HandshakeFailed`` whose message is always
"handshake failed" (what the peer may learn) and whose ``reason`` says why (for the monitor and
logs). An exception that is not QFLARE's (a bug, or a callback's own error) propagates
unchanged. Either way the handshake object moves to FAILED and refuses any further use, and a
device handshake drops its ephemeral secrets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import (
    DecodeError,
    HandshakeFailed,
    InvalidCiphertext,
    InvalidKey,
    InvalidSignature,
    QflareError,
    UnsupportedAlgorithm,
)
from qflare.protocol import keyschedule as ks
from qflare.protocol.biscuit import BiscuitContents, BiscuitKeys
from qflare.protocol.messages import (
    SESSION_ID_SIZE,
    ClientFinish,
    ClientHello,
    ServerHello,
)
from qflare.protocol.record import Direction, RekeyPolicy, Session
from qflare.protocol.state import Event, Role, StateMachine
from qflare.protocol.suites import DEFAULT_SUITE, Suite, by_id, find, for_signature

# seen_before(device_id, nonce, timestamp) -> True if this nonce was used before. It must also
# record the nonce, atomically: check-then-insert in two steps would let two replicas both
# accept the same ClientHello.
NonceCheck = Callable[[str, bytes, int], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerPolicy:
    suites: tuple[Suite, ...] = (DEFAULT_SUITE,)  # in the server's order of preference
    timestamp_window: int = 120
    epoch_seconds: int = 300
    grace_epochs: int = 1
    biscuit_lifetime: int = 30
    rekey: RekeyPolicy = field(default_factory=RekeyPolicy)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerStaticKey:
    """The server's long-term KEM key; devices pin its id and public key."""

    key_id: str
    algorithm: str
    private: crypto.KemPrivateKey = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PinnedServerKey:
    key_id: str
    algorithm: str
    public_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceKey:
    """A device's registered identity public key, already parsed."""

    device_id: str
    algorithm: str
    public: crypto.SignaturePublicKey


@dataclass(frozen=True, slots=True)
class Established:
    device_id: str
    server_key_id: str
    session: Session


class _Failing:
    """``with _Failing(machine, reason):`` - any exception leaves the machine in FAILED.

    Errors QFLARE understands become ``HandshakeFailed`` with a classifying ``reason``;
    anything else (a bug, a callback's own error, ``KeyboardInterrupt``) propagates unchanged,
    but never leaves the machine in the state it was moving to. ``cleanup`` runs first on any
    failure, to erase what the failed step had made.
    """

    __slots__ = ("_cleanup", "_machine", "_reason")

    def __init__(
        self,
        machine: StateMachine,
        default_reason: str,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self._machine = machine
        self._reason = default_reason
        self._cleanup = cleanup

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> Literal[False]:
        if exc is None:
            return False
        self._machine.fail()
        if self._cleanup is not None:
            self._cleanup()
        reason = _reason_for(exc, self._reason)
        if reason is None:
            return False  # re-raise ``exc`` as it is
        raise HandshakeFailed(reason) from exc


def _reason_for(exc: BaseException, default_reason: str) -> str | None:
    """The ``HandshakeFailed`` reason for ``exc``; None to let it propagate unchanged."""
    if isinstance(exc, HandshakeFailed):
        return None
    if isinstance(exc, DecodeError):
        return "malformed-message"
    if isinstance(exc, InvalidSignature):
        return "signature-invalid"
    if isinstance(exc, InvalidKey | InvalidCiphertext):
        return "invalid-key-material"
    if isinstance(exc, UnsupportedAlgorithm):
        return "unsupported-suite"
    if isinstance(exc, QflareError | ValueError):
        return default_reason
    return None


def _first_per_kem(suites: Sequence[Suite]) -> list[Suite]:
    """The first offered suite of each distinct KEM: the tags of the key shares."""
    firsts: dict[str, Suite] = {}
    for suite in suites:
        firsts.setdefault(suite.kem, suite)
    return list(firsts.values())


class ClientHandshake:
    """The device side: ``client_hello()`` then ``receive_server_hello()``."""

    def __init__(
        self,
        *,
        device_id: str,
        identity: crypto.SignaturePrivateKey,
        identity_algorithm: str,
        server_key: PinnedServerKey,
        suites: Sequence[Suite] | None = None,
        grace_epochs: int = 1,
        rekey: RekeyPolicy | None = None,
        ephemeral_keys: Mapping[str, crypto.KemPrivateKey] | None = None,
    ) -> None:
        offered = list(suites) if suites is not None else for_signature(identity_algorithm)
        if not offered or any(s.signature != identity_algorithm for s in offered):
            raise ValueError(f"offer only suites that use the device's {identity_algorithm} key")
        self.device_id = device_id
        self.server_key = server_key
        self.suites = tuple(offered)
        self._identity = identity
        self._grace = grace_epochs
        self._rekey = rekey
        self._ephemeral = dict(ephemeral_keys or {})
        self._machine = StateMachine(Role.DEVICE)
        self._hello = b""
        self._static_secret = b""
        self.session: Session | None = None

    @property
    def state(self) -> str:
        return self._machine.state.value

    def client_hello(self, *, now: int, rng: crypto.Rng) -> bytes:
        self._machine.fire(Event.SEND_CLIENT_HELLO)
        with _Failing(self._machine, "client-hello", cleanup=self._erase):
            static = crypto.kem(self.server_key.algorithm).from_public_bytes(
                self.server_key.public_key
            )
            self._static_secret, static_ct = static.encapsulate()
            tagged = _first_per_kem(self.suites)
            for suite in tagged:
                if suite.kem not in self._ephemeral:
                    self._ephemeral[suite.kem] = suite.kem_impl().generate(rng)
            hello = ClientHello(
                device_id=self.device_id,
                server_key_id=self.server_key.key_id,
                suites=tuple(s.id for s in self.suites),
                timestamp=int(now),
                nonce=rng(32),
                static_ciphertext=static_ct,
                key_shares=tuple(
                    (s.id, self._ephemeral[s.kem].public_key().public_bytes()) for s in tagged
                ),
            )
            signature = self._identity.sign(hello.signed_part(), labels.SIG_CLIENT_HELLO)
            self._hello = replace(hello, signature=signature).encode()
        return self._hello

    def receive_server_hello(self, data: bytes) -> bytes:
        """Check the server's Finished MAC, install the session, return ClientFinish."""
        self._machine.expect(Event.RECV_SERVER_HELLO)
        # Forward secrecy: the ephemeral private keys and the static-KEM secret go now,
        # whether this ServerHello is good or not.
        with _Failing(self._machine, "server-hello", cleanup=self._erase):
            sh = ServerHello.decode(data)
            # The device only accepts a suite it offered; the server's Finished MAC below
            # covers the choice, so a suite swapped in flight fails there.
            if sh.suite not in {s.id for s in self.suites}:
                raise HandshakeFailed("downgrade")
            suite = by_id(sh.suite)
            kdf = suite.kdf_impl()
            eph_secret = self._ephemeral[suite.kem].decapsulate(sh.ephemeral_ciphertext)
            ctx = ks.HandshakeContext(self.device_id, self.server_key.key_id)
            hs = ks.handshake_secret(kdf, self._static_secret, eph_secret)
            th2 = ks.transcript_hash(kdf, self._hello, sh.core())
            if not kdf.verify_mac(ks.finished_key(kdf, hs, ctx, server=True), th2, sh.finished):
                # Also what a wrong static key looks like: the server proves it holds the
                # static private key only by having derived this MAC (implicit rejection).
                raise HandshakeFailed("server-finished-invalid")
            th3 = ks.transcript_hash(kdf, self._hello, sh.core(), sh.finished)
            mac = kdf.mac(ks.finished_key(kdf, hs, ctx, server=False), th3)
            secret = ks.session_secret(kdf, hs, ctx, sh.session_id, th3)
            session = Session(
                session_id=sh.session_id,
                suite=suite,
                role=Direction.DEVICE_TO_SERVER,
                schedule=ks.EpochKeySchedule.start(
                    kdf,
                    secret,
                    sh.session_id,
                    ks.epoch_of(sh.server_time, sh.epoch_seconds),
                    self._grace,
                ),
                established_at=sh.server_time,
                epoch_seconds=sh.epoch_seconds,
                policy=self._rekey,
            )
            finish = ClientFinish(session_id=sh.session_id, biscuit=sh.biscuit, finished=mac)
            encoded = finish.encode()
        # Installed only once nothing can fail any more: a FAILED handshake has no session.
        self.session = session
        self._erase()
        self._machine.fire(Event.RECV_SERVER_HELLO)
        return encoded

    def _erase(self) -> None:
        """Drop our references to the ephemeral private keys and the static-KEM secret.

        Keys handed in through ``ephemeral_keys`` are the caller's: only our copy of the
        mapping is cleared.
        """
        self._ephemeral.clear()
        self._static_secret = b""


class ServerHandshake:
    """The server side of one message exchange.

    Hello path: ``receive_client_hello`` → (look up the device) ``authenticate`` →
    ``server_hello``. Finish path, on a fresh object on any replica: ``receive_client_finish``.
    """

    def __init__(
        self,
        *,
        policy: ServerPolicy,
        static_keys: Mapping[str, ServerStaticKey],
        biscuits: BiscuitKeys,
    ) -> None:
        self.policy = policy
        self._static_keys = static_keys
        self._biscuits = biscuits
        self._machine = StateMachine(Role.SERVER)
        self._now = 0
        self.hello: ClientHello | None = None
        self._hello_bytes = b""
        self.suite: Suite | None = None
        self._share = b""  # the device's ephemeral public key for the chosen suite's KEM

    @property
    def state(self) -> str:
        return self._machine.state.value

    def receive_client_hello(self, data: bytes, *, now: int) -> ClientHello:
        """Decode and check freshness. The caller then looks up ``hello.device_id``."""
        self._machine.fire(Event.RECV_CLIENT_HELLO)
        with _Failing(self._machine, "client-hello"):
            hello = ClientHello.decode(data)
            if abs(hello.timestamp - now) > self.policy.timestamp_window:
                raise HandshakeFailed("timestamp-out-of-window")
            if hello.server_key_id not in self._static_keys:
                raise HandshakeFailed("unknown-server-key")
            self.hello, self._hello_bytes, self._now = hello, bytes(data), int(now)
        return hello

    def authenticate(self, device: DeviceKey) -> Suite:
        """Verify the device's signature over ClientHello and pick the suite."""
        self._machine.fire(Event.AUTHENTICATE_DEVICE)
        with _Failing(self._machine, "authenticate"):
            hello = self._require_hello()
            if device.device_id != hello.device_id:
                raise HandshakeFailed("device-mismatch")
            offered = set(hello.suites)
            # The device's key share for each KEM it sent one for (the first, if several).
            shares: dict[str, bytes] = {}
            for tag, key in hello.key_shares:
                kem = _kem_of(tag)
                if kem is not None:
                    shares.setdefault(kem, key)
            choice = next(
                (
                    s
                    for s in self.policy.suites
                    if s.id in offered and s.signature == device.algorithm and s.kem in shares
                ),
                None,
            )
            if choice is None:
                raise HandshakeFailed("no-common-suite")
            # The signed part is the message minus its trailing opaque32 signature field.
            signed = self._hello_bytes[: -4 - len(hello.signature)]
            device.public.verify(hello.signature, signed, labels.SIG_CLIENT_HELLO)
            self.suite, self._share = choice, shares[choice.kem]
        return choice

    def server_hello(self, *, rng: crypto.Rng, seen_before: NonceCheck) -> bytes:
        """Check the nonce, run both KEM exchanges and return the ServerHello.

        ``seen_before`` runs after the signature verified (an unauthenticated hello must not
        burn a device's nonce) and before any KEM work. If it raises a ``QflareError`` (the
        store cannot answer) the handshake fails closed with ``HandshakeFailed`` whose reason
        is ``nonce-check-unavailable`` and whose ``__cause__`` is that error; any other
        exception propagates unchanged. Either way the handshake ends in FAILED.
        """
        self._machine.fire(Event.SEND_SERVER_HELLO)
        with _Failing(self._machine, "server-hello"):
            hello, suite = self._require_hello(), self.suite
            if suite is None:  # unreachable through the state machine
                raise HandshakeFailed("no-suite")
        # Not inside _Failing: a ValueError here is the callback's own bug, not a malformed
        # message. Only a QflareError means "the store could not answer".
        try:
            replayed = seen_before(hello.device_id, hello.nonce, hello.timestamp)
        except QflareError as exc:
            self._machine.fail()
            raise HandshakeFailed("nonce-check-unavailable") from exc
        except BaseException:
            self._machine.fail()
            raise
        with _Failing(self._machine, "server-hello"):
            if replayed:
                raise HandshakeFailed("replay")
            kdf = suite.kdf_impl()
            static = self._static_keys[hello.server_key_id].private
            static_secret = static.decapsulate(hello.static_ciphertext)
            eph_secret, eph_ct = suite.kem_impl().from_public_bytes(self._share).encapsulate()
            session_id = rng(SESSION_ID_SIZE)
            core_fields: dict[str, Any] = {
                "session_id": session_id,
                "suite": suite.id,
                "server_time": self._now,
                "epoch_seconds": self.policy.epoch_seconds,
                "ephemeral_ciphertext": eph_ct,
            }
            sh = ServerHello(**core_fields)
            ctx = ks.HandshakeContext(hello.device_id, hello.server_key_id)
            hs = ks.handshake_secret(kdf, static_secret, eph_secret)
            core = sh.core()
            th2 = ks.transcript_hash(kdf, self._hello_bytes, core)
            mac = kdf.mac(ks.finished_key(kdf, hs, ctx, server=True), th2)
            th3 = ks.transcript_hash(kdf, self._hello_bytes, core, mac)
            biscuit = self._biscuits.seal(
                BiscuitContents(
                    session_id=session_id,
                    device_id=hello.device_id,
                    server_key_id=hello.server_key_id,
                    suite=suite.id,
                    server_time=self._now,
                    epoch_seconds=self.policy.epoch_seconds,
                    expires_at=self._now + self.policy.biscuit_lifetime,
                    handshake_secret=hs,
                    transcript_hash=th3,
                ),
                nonce=rng(12),
            )
            # The same core fields, now with the MAC and biscuit (cheaper than
            # dataclasses.replace, and checked again all the same).
            return ServerHello(**core_fields, finished=mac, biscuit=biscuit).encode()

    def receive_client_finish(self, data: bytes, *, now: int) -> Established:
        """Verify ClientFinish against the biscuit and return the established session.

        A retransmitted ClientFinish yields the same session id and keys: whoever installs the
        session must insert it only if absent, so a replay never resets a counter or a window.
        """
        self._machine.expect(Event.RECV_CLIENT_FINISH)
        with _Failing(self._machine, "client-finish"):
            cf = ClientFinish.decode(data)
            contents = self._biscuits.open(cf.session_id, cf.biscuit, now=int(now))
            suite = by_id(contents.suite)
            kdf = suite.kdf_impl()
            ctx = ks.HandshakeContext(contents.device_id, contents.server_key_id)
            cfk = ks.finished_key(kdf, contents.handshake_secret, ctx, server=False)
            if not kdf.verify_mac(cfk, contents.transcript_hash, cf.finished):
                raise HandshakeFailed("client-finished-invalid")
            secret = ks.session_secret(
                kdf, contents.handshake_secret, ctx, cf.session_id, contents.transcript_hash
            )
            session = Session(
                session_id=cf.session_id,
                suite=suite,
                role=Direction.SERVER_TO_DEVICE,
                schedule=ks.EpochKeySchedule.start(
                    kdf,
                    secret,
                    cf.session_id,
                    ks.epoch_of(contents.server_time, contents.epoch_seconds),
                    self.policy.grace_epochs,
                ),
                established_at=contents.server_time,
                epoch_seconds=contents.epoch_seconds,
                policy=self.policy.rekey,
            )
        self._machine.fire(Event.RECV_CLIENT_FINISH)
        return Established(contents.device_id, contents.server_key_id, session)

    def _require_hello(self) -> ClientHello:
        if self.hello is None:  # unreachable through the state machine
            raise HandshakeFailed("no-client-hello")
        return self.hello


def _kem_of(suite_id: int) -> str | None:
    """The KEM of a known suite; None for an id this server does not know."""
    suite = find(suite_id)
    return suite.kem if suite is not None else None
