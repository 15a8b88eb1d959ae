"""What the HTTP routes do, without HTTP: enrollment, the handshake, sealed records.

The routes in ``app`` parse requests and map errors; everything that touches keys, sessions and
security events happens here, so the same logic can be driven by tests without a socket.

Sessions are persisted after every record, before the answer leaves: a server that crashes
loses no session and, after a restart, accepts no replayed record. Each replica keeps parsed
sessions in memory keyed by the row version; a row changed by another replica is reloaded,
and a write that lost the race is retried from the fresh state. An answer sealed with a state
that failed to save is dropped unsent: its sequence number (and so its nonce) is used again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qflare import crypto
from qflare.errors import (
    Conflict,
    DecodeError,
    DecryptionFailed,
    DeviceNotAllowed,
    HandshakeFailed,
    InvalidSignature,
    NotFound,
    QflareError,
    RekeyRequired,
    RemoteProtocolError,
    ReplayDetected,
    UnsupportedAlgorithm,
)
from qflare.fl.aggregator import Aggregator
from qflare.keys import EnrollmentRequest, KeyManager, LoadedSession, SessionUnusable
from qflare.keys.manager import pinned_to_json, utc
from qflare.monitor.audit import AuditLog
from qflare.monitor.detect import Detector
from qflare.monitor.events import (
    EventType,
    SecurityEvent,
    Severity,
    failure_class,
    handshake_failure_type,
)
from qflare.protocol import ServerHandshake, ServerPolicy
from qflare.protocol.handshake import PinnedServerKey
from qflare.protocol.messages import SESSION_ID_SIZE, ClientHello
from qflare.server.metrics import Metrics
from qflare.server.nonces import RedisNonceCache
from qflare.store import FinishOutcome, InvalidInput, SecurityEventRow, SessionStatus, Store
from qflare.store.base import MAX_EVENT_BATCH
from qflare.store.models import JsonValue
from qflare.store.validate import identifier as check_identifier

log = logging.getLogger("qflare.server")

_MAX_CACHED_SESSIONS = 10_000
# INFO events waiting for the background writer; past this, Service.event writes synchronously.
EVENT_QUEUE_LIMIT = 10_000
# How long the writer lets INFO events gather before it writes them in one transaction.
EVENT_LINGER_SECONDS = 0.05
# INFO events whose detection may run after their request answered; past this, it runs inline.
OBSERVE_LIMIT = 1_000


class EventWriter:
    """Group commit for INFO security events (docs/MONITOR.md, "Durability").

    ``submit`` queues a row and returns at once; a background task waits ``linger`` seconds
    for more, then writes everything queued in one ``Store.append_security_events``
    transaction (up to ``MAX_EVENT_BATCH`` rows a time) until the queue is empty. Nothing is
    dropped silently: ``submit`` returns False when ``limit`` rows already wait (the caller
    then writes the event synchronously), a batch the store refuses as invalid is retried row
    by row, and a row that cannot be stored is logged with its type, as a synchronous write
    that fails is. ``flush`` writes whatever is queued and returns when it is stored (the app's
    shutdown, and readers that want to see their own events); ``pending`` says how many wait.
    """

    def __init__(
        self,
        store: Store,
        tenant: str,
        *,
        limit: int = EVENT_QUEUE_LIMIT,
        linger: float = EVENT_LINGER_SECONDS,
    ) -> None:
        self.store, self.tenant = store, tenant
        self.limit, self.linger = limit, linger
        self._queue: deque[SecurityEventRow] = deque()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, row: SecurityEventRow) -> bool:
        if len(self._queue) >= self.limit:
            return False
        self._queue.append(row)
        self._start()
        return True

    def _start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._drain(self._wake))
        return self._task

    async def _drain(self, wake: asyncio.Event) -> None:
        while True:
            # Linger before every batch, not only the first: events that arrive while a
            # batch is being written wait for company too, instead of going one or two per
            # transaction behind it. A full batch, or a flush (wake), does not wait.
            if self.linger > 0 and len(self._queue) < MAX_EVENT_BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.linger)
            if not self._queue:
                return
            count = min(len(self._queue), MAX_EVENT_BATCH)
            batch = [self._queue.popleft() for _ in range(count)]
            try:
                await self._write(batch)
            except Exception:  # a bug must not stop the writer: say what was lost
                log.exception("could not store %d security events", len(batch))

    async def _write(self, batch: list[SecurityEventRow]) -> None:
        try:
            await self.store.append_security_events(self.tenant, batch)
            return
        except InvalidInput:
            if len(batch) == 1:
                log.exception("could not store security event %s", batch[0].type)
                return
        except (QflareError, OSError):
            log.exception(
                "could not store %d security events (%s)",
                len(batch),
                ", ".join(sorted({r.type for r in batch})),
            )
            return
        for row in batch:  # one bad row must not lose the others
            await self._write([row])

    async def flush(self) -> None:
        """Write everything queued now (no linger) and wait until it is stored."""
        while self._queue or (self._task is not None and not self._task.done()):
            task = self._start()
            if self._wake is not None:
                self._wake.set()  # a drain still lingering writes now
            await asyncio.shield(task)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    state: str
    epoch: int
    expires_at: str
    messages_received: int
    messages_sent: int


class Service:
    def __init__(
        self,
        keys: KeyManager,
        policy: ServerPolicy,
        *,
        metrics: Metrics | None = None,
        nonce_cache: RedisNonceCache | None = None,
        aggregator: Aggregator | None = None,
        clock: Callable[[], float] = time.time,
        rng: crypto.Rng = crypto.system_rng,
        monitor: Detector | None = None,
        audit: AuditLog | None = None,
        event_linger: float = EVENT_LINGER_SECONDS,
    ) -> None:
        self.keys = keys
        # Fail closed (docs/AUDIT.md): security-relevant operations log their intent first.
        self.audit = audit or AuditLog.for_keys(keys, clock=clock)
        if monitor is not None:  # automatic responses are audited too (docs/MONITOR.md)
            monitor.audit = self.audit
        self.monitor = monitor
        self.policy = policy
        self.metrics = metrics or Metrics()
        self.nonce_cache = nonce_cache
        self.aggregator = aggregator
        self.clock = clock
        self.rng = rng
        self._sessions: OrderedDict[bytes, LoadedSession] = OrderedDict()
        self._locks: dict[bytes, asyncio.Lock] = {}
        # INFO events are group-committed in the background; WARNING and above are written
        # before Service.event returns (docs/MONITOR.md, "Durability").
        self.event_writer = EventWriter(keys.store, keys.tenant, linger=event_linger)
        self._observing: set[asyncio.Task[None]] = set()  # detection of INFO events, running

    # -- security events ------------------------------------------------------------------------

    async def event(
        self,
        type: EventType,
        *,
        device_id: str | None = None,
        source: str | None = None,
        **detail: str,
    ) -> None:
        """Record a security event: stored, counted and logged. Details are plain strings
        (reasons, ids), never key material.

        WARNING and above are stored before this returns. INFO events (the successful path:
        handshake.started, handshake.completed, session.rekeyed, ...) go to the background
        group-commit writer, or are written here if its queue is full. Either way the metric
        and the log line are immediate, and so is detection, which sees every event."""
        ev = SecurityEvent(
            type=type,
            ts=self.clock(),
            tenant=self.keys.tenant,
            device_id=device_id,
            source=source,
            detail=detail,
        )
        self.metrics.security_events.labels(type.value, ev.level.name.lower()).inc()
        # A claimed id that is not a valid identifier (attacker text: 10 kB, newlines) is
        # neither stored nor logged as it came; the log shows it escaped and cut short.
        known_id = _identifier_or_none(device_id)
        log.log(
            ev.level if ev.level < 40 else logging.WARNING,
            "security event %s device=%s source=%s %s",
            type.value,
            known_id if known_id is not None or device_id is None else repr(device_id[:64]),
            source,
            detail,
        )
        row = SecurityEventRow(
            ts=utc(ev.ts),
            type=type.value,
            severity=int(ev.level),
            device_id=known_id,
            source=source,
            detail=dict(detail),
        )
        if ev.level > Severity.INFO or not self.event_writer.submit(row):
            try:
                await self.keys.store.append_security_event(
                    self.keys.tenant,
                    ts=row.ts,
                    type=row.type,
                    severity=row.severity,
                    device_id=row.device_id,
                    source=row.source,
                    detail=row.detail,
                )
            except QflareError:
                log.exception("could not store security event %s", type.value)
        if self.monitor is not None and self.monitor.watches(type):  # never raises
            if ev.level > Severity.INFO or len(self._observing) >= OBSERVE_LIMIT:
                await self.monitor.observe(ev, self.event)
            else:
                # Detection rules (docs/MONITOR.md). The successful path's events are counted
                # right after the request, not before it answers: with shared windows that is
                # a Redis round trip, and the rules that watch INFO events only alert.
                task = asyncio.get_running_loop().create_task(
                    self.monitor.observe(ev, self.event)
                )
                self._observing.add(task)
                task.add_done_callback(self._observing.discard)

    async def observed(self) -> None:
        """Return once detection has seen every event recorded so far."""
        while self._observing:
            await asyncio.gather(*self._observing)

    async def flush_events(self) -> None:
        """Finish detecting every INFO event and store every queued one now (shutdown;
        readers of the event table and of the detection windows)."""
        await self.observed()
        await self.event_writer.flush()

    # -- enrollment ---------------------------------------------------------------------------

    async def enroll(self, request: EnrollmentRequest, *, source: str | None) -> dict[str, Any]:
        try:
            async with self.audit.operation("device.enroll", **self._enroll_audit(request)):
                enrolled = await self.keys.enroll(request, now=self.clock())
        except QflareError as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            await self.enrollment_failed(request.device_id, source, str(reason))
            raise
        self.metrics.enrollments.labels("ok").inc()
        await self.event(
            EventType.ENROLLMENT_OK, device_id=enrolled.device.device_id, source=source
        )
        return {
            "device_id": enrolled.device.device_id,
            "server_key": pinned_to_json([enrolled.server_key])[0],
            "server_key_binding": _b64(enrolled.server_key_binding),
        }

    def _enroll_audit(self, request: EnrollmentRequest) -> dict[str, JsonValue]:
        """What the audit log records of an enrollment: public data only. The id and algorithm
        are checked here as ``KeyManager.enroll`` checks them (same errors), so that no junk
        a stranger sends reaches the append-only log."""
        device_id = check_identifier(request.device_id, "device id")
        if request.algorithm not in self.keys.policy.device_algorithms:
            raise UnsupportedAlgorithm(request.algorithm, "not accepted for device identity keys")
        return {
            "device_id": device_id,
            "algorithm": request.algorithm,
            "public_key_sha256": crypto.kdf("HKDF-SHA256").hash(request.public_key).hex(),
        }

    async def enrollment_failed(self, device_id: str, source: str | None, reason: str) -> None:
        self.metrics.enrollments.labels("rejected").inc()
        await self.event(
            EventType.ENROLLMENT_FAILED, device_id=device_id[:64], source=source, reason=reason
        )

    # -- handshake ------------------------------------------------------------------------------

    async def _handshake(self) -> ServerHandshake:
        static, biscuits = await self.keys.handshake_keys(now=self.clock())
        return ServerHandshake(policy=self.policy, static_keys=static, biscuits=biscuits)

    async def _first_use(self, device_id: str, nonce: bytes, timestamp: int, now: float) -> bool:
        if self.nonce_cache is not None and not await self.nonce_cache.first_use(
            self.keys.tenant, device_id, nonce, ttl=self.keys.policy.nonce_retention
        ):
            return False  # Redis only remembers real uses: "seen" is final
        return await self.keys.first_use(device_id, nonce, timestamp, now=now)

    async def hello(self, data: bytes, *, source: str | None) -> bytes:
        started = time.perf_counter()
        now = self.clock()
        hs = await self._handshake()
        device_id: str | None = None
        try:
            hello = hs.receive_client_hello(data, now=int(now))
            device_id = hello.device_id
            try:
                device, key = await self.keys.device_key(hello.device_id)
            except NotFound:
                raise HandshakeFailed("unknown-device") from None
            hs.authenticate(key)
            # Only after the signature: a stranger learns nothing about a device's state.
            self.keys.require_allowed(device)
            fresh = await self._first_use(device.device_id, hello.nonce, hello.timestamp, now)
            answer = hs.server_hello(rng=self.rng, seen_before=lambda *_: not fresh)
        except HandshakeFailed as exc:
            self.metrics.handshakes.labels("failed").inc()
            await self.event(
                handshake_failure_type(exc.reason),
                # Failed before the device was looked up (a stale timestamp): the id it claims.
                device_id=device_id if device_id is not None else _claimed_device(data),
                source=source,
                reason=exc.reason,
                step="hello",
                **{"class": failure_class(exc.reason)},
            )
            if device_id is not None and exc.reason not in ("unknown-device", "malformed-message"):
                await self._count_failure(device_id)
            raise
        except DeviceNotAllowed:
            self.metrics.handshakes.labels("refused").inc()
            await self.event(
                EventType.HANDSHAKE_FAILED,
                device_id=device_id,
                source=source,
                reason="device-not-allowed",
                step="hello",
                **{"class": "identity"},
            )
            raise
        self.metrics.handshake_seconds.labels("hello").observe(time.perf_counter() - started)
        await self.event(EventType.HANDSHAKE_STARTED, device_id=device_id, source=source)
        return answer

    async def _count_failure(self, device_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.keys.store.record_device_failure(self.keys.tenant, device_id)

    async def finish(self, data: bytes, *, source: str | None) -> bytes:
        started = time.perf_counter()
        now = self.clock()
        hs = await self._handshake()
        try:
            established = hs.receive_client_finish(data, now=int(now))
        except HandshakeFailed as exc:
            self.metrics.handshakes.labels("failed").inc()
            await self.event(
                handshake_failure_type(exc.reason),
                source=source,
                reason=exc.reason,
                step="finish",
                **{"class": failure_class(exc.reason)},
            )
            raise
        published = await self.keys.published_server_keys(now=now)
        # One store transaction (docs/STORAGE.md, "The handshake"): the device's state read
        # fresh (quarantined or revoked since its ClientHello: refused, nothing written), the
        # session inserted in its post-answer state (the first answer is sealed before, and
        # leaves only if the row was written) and last_seen, ENROLLED -> ACTIVE, recorded.
        reply = self._finish_reply(published, self.keys.session_expires_at(established))
        done = await self.keys.complete_handshake(established, reply, purpose="control", now=now)
        device_id = done.device.device_id
        if done.outcome is FinishOutcome.NOT_ALLOWED or done.loaded is None:
            self.metrics.handshakes.labels("refused").inc()
            await self._finish_refused(device_id, source, "device-not-allowed")
            raise DeviceNotAllowed(f"device is {done.device.state.value}")
        loaded, created = done.loaded, done.outcome is FinishOutcome.CREATED
        if done.sealed is not None:  # created, with the first answer sealed in it
            sealed = done.sealed
            self._remember(loaded)
        else:
            if loaded.record.state is not SessionStatus.ACTIVE or (
                loaded.record.expires_at <= utc(now)
            ):
                # A retransmitted ClientFinish of a session that has ended (revoked, closed,
                # expired) must not be answered from it.
                loaded.session.close()
                await self._finish_refused(device_id, source, "session-ended")
                raise SessionUnusable(loaded.record.state.value)
            # Answered from the stored session (its counters and windows go on from there).
            reply = self._finish_reply(published, loaded.record.expires_at)
            sealed = await self._answer(loaded.record.session_id, reply, "control", loaded)
        self.metrics.handshakes.labels("completed" if created else "retransmitted").inc()
        self.metrics.handshake_seconds.labels("finish").observe(time.perf_counter() - started)
        await self.event(
            EventType.HANDSHAKE_COMPLETED,
            device_id=device_id,
            source=source,
            session=loaded.record.session_id.hex()[:16],
            retransmitted=str(not created).lower(),
        )
        if created and done.rekey:
            # The device finished a handshake before: this session replaces an older one.
            await self.event(
                EventType.SESSION_REKEYED,
                device_id=device_id,
                source=source,
                session=loaded.record.session_id.hex()[:16],
            )
        return sealed

    def _finish_reply(self, published: tuple[PinnedServerKey, ...], expires_at: datetime) -> bytes:
        return json.dumps(
            {
                "server_keys": pinned_to_json(published),
                "session_expires_at": expires_at.isoformat(),
                "epoch_seconds": self.policy.epoch_seconds,
            }
        ).encode()

    async def _finish_refused(self, device_id: str, source: str | None, reason: str) -> None:
        await self.event(
            EventType.HANDSHAKE_FAILED,
            device_id=device_id,
            source=source,
            reason=reason,
            step="finish",
            **{"class": failure_class(reason)},
        )

    # -- records --------------------------------------------------------------------------------

    def _lock(self, session_id: bytes) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            if len(self._locks) > _MAX_CACHED_SESSIONS:
                for sid in [s for s, lk in self._locks.items() if not lk.locked()]:
                    del self._locks[sid]
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    async def _load(self, session_id: bytes, now: float) -> LoadedSession:
        cached = self._sessions.get(session_id)
        loaded = await self.keys.load_session(session_id, now=now, cached=cached)
        self._remember(loaded)
        return loaded

    def _remember(self, loaded: LoadedSession) -> None:
        sid = loaded.record.session_id
        self._sessions[sid] = loaded
        self._sessions.move_to_end(sid)
        while len(self._sessions) > _MAX_CACHED_SESSIONS:
            self._sessions.popitem(last=False)
        self.metrics.active_sessions.set(len(self._sessions))

    def _forget(self, session_id: bytes) -> None:
        self._sessions.pop(session_id, None)
        self.metrics.active_sessions.set(len(self._sessions))

    async def _answer(
        self,
        session_id: bytes,
        reply: bytes,
        purpose: str,
        loaded: LoadedSession,
        state: SessionStatus | None = None,
    ) -> bytes:
        """Seal ``reply`` and persist the session; the sealed answer only leaves if it saved."""
        now = self.clock()
        sealed = loaded.session.seal(reply, now=now, purpose=purpose)
        try:
            saved = await self.keys.save_session(loaded, now=now, state=state)
        except Conflict:
            self._forget(session_id)
            raise
        if state is None:
            self._remember(saved)
        else:
            self._forget(session_id)
            saved.session.close()
        return sealed

    async def record(self, session_hex: str, data: bytes, *, source: str | None) -> bytes:
        try:
            session_id = parse_session_id(session_hex)
            async with self._lock(session_id):
                for attempt in range(3):
                    try:
                        return await self._record_once(session_id, data, source)
                    except Conflict:
                        if attempt == 2:
                            raise
                raise AssertionError("unreachable")
        except NotFound:
            await self.event(EventType.RECORD_REJECTED, source=source, reason="unknown-session")
            raise

    async def _load_or_report(
        self, session_id: bytes, now: float, source: str | None
    ) -> LoadedSession:
        try:
            return await self._load(session_id, now)
        except SessionUnusable as exc:
            # Name the device: a revoked device's next record shows up in its own events.
            with contextlib.suppress(QflareError):
                row = await self.keys.store.get_session(self.keys.tenant, session_id)
                if exc.state == "expired":
                    await self.event(
                        EventType.SESSION_EXPIRED, device_id=row.device_id, source=source
                    )
                else:
                    await self.event(
                        EventType.RECORD_REJECTED,
                        device_id=row.device_id,
                        source=source,
                        reason=f"session-{exc.state}",
                    )
            raise

    async def _record_once(self, session_id: bytes, data: bytes, source: str | None) -> bytes:
        now = self.clock()
        loaded = await self._load_or_report(session_id, now, source)
        device_id = loaded.record.device_id
        try:
            record = loaded.session.open(data, now=now)
        except (RemoteProtocolError, DecryptionFailed, DecodeError) as exc:
            self._forget(session_id)  # the next record starts from the stored state
            replayed = isinstance(exc, ReplayDetected)
            kind = EventType.REPLAY_DETECTED if replayed else EventType.RECORD_REJECTED
            self.metrics.records.labels("unknown", "rejected").inc()
            mismatch = type(exc) is RemoteProtocolError
            reason = str(exc) if mismatch else type(exc).__name__
            if isinstance(exc, RekeyRequired):  # past its age or limits: not the peer's fault
                kind, reason = EventType.SESSION_EXPIRED, "rekey-required"
            await self.event(kind, device_id=device_id, source=source, reason=reason)
            if mismatch:
                # A header that does not fit this session (another session's id, the wrong
                # direction, a future epoch): to the sender, like any record that fails to open.
                raise DecryptionFailed() from exc
            raise
        self.metrics.records.labels(record.purpose, "accepted").inc()
        self.metrics.record_bytes.inc(len(record.plaintext))
        try:
            reply, purpose, state = await self._dispatch(
                device_id, record.purpose, record.plaintext
            )
        except QflareError:
            # The record was authentic and is consumed: save that, so every replica refuses
            # it as a replay from now on, then report the refusal.
            self._remember(await self.keys.save_session(loaded, now=now))
            raise
        sealed = await self._answer(session_id, reply, purpose, loaded, state)
        if state is not None:
            await self.event(EventType.SESSION_CLOSED, device_id=device_id, source=source)
        return sealed

    async def _dispatch(
        self, device_id: str, purpose: str, plaintext: bytes
    ) -> tuple[bytes, str, SessionStatus | None]:
        if purpose == "fl-update":
            if self.aggregator is None:
                raise UnsupportedAlgorithm("fl-update", "no federated-learning task is running")
            result = self.aggregator.submit(device_id, plaintext)
            doc: dict[str, Any] = {"accepted": True, "round": self.aggregator.round_no}
            if result is not None:
                doc["closed_round"] = result.round_no
            return json.dumps(doc).encode(), "fl-update", None
        if purpose == "control":
            return await self._control(device_id, plaintext)
        return json.dumps({"received": len(plaintext)}).encode(), purpose, None

    async def _control(
        self, device_id: str, plaintext: bytes
    ) -> tuple[bytes, str, SessionStatus | None]:
        try:
            doc = json.loads(plaintext)
            op = doc["op"]
        except (ValueError, KeyError, TypeError):
            raise DecodeError("a control record is a JSON object with an 'op'") from None
        if op == "identity":
            key = await self.keys.store.get_device_key(self.keys.tenant, device_id)
            answer = {"device_id": device_id, "key_version": key.version}
            return json.dumps({**answer, "algorithm": key.algorithm}).encode(), "control", None
        if op == "rotate-identity":
            return await self._rotate_identity(device_id, doc), "control", None
        if op == "close":
            return b'{"closed": true}', "control", SessionStatus.EXPIRED
        if op == "model":
            if self.aggregator is None:
                raise UnsupportedAlgorithm("fl-model", "no federated-learning task is running")
            return self.aggregator.model(), "fl-update", None
        if op == "ping":
            return b'{"pong": true}', "control", None
        raise DecodeError("unknown control op")

    async def _rotate_identity(self, device_id: str, doc: Any) -> bytes:
        """Replace the device's identity key (docs/KEYS.md, "Device key rotation"). It comes
        inside an authenticated session and is signed by the current and the new key."""
        try:
            algorithm = str(doc["algorithm"])
            public_key = _unb64(doc["public_key"])
            current_signature = _unb64(doc["current_signature"])
            new_signature = _unb64(doc["new_signature"])
        except (KeyError, TypeError, ValueError):
            raise DecodeError(
                "rotate-identity needs algorithm, public_key and two signatures"
            ) from None
        now = self.clock()
        fields: dict[str, JsonValue] = {
            "device_id": device_id,
            "algorithm": algorithm[:64],
            "public_key_sha256": crypto.kdf("HKDF-SHA256").hash(public_key).hex(),
        }
        try:
            async with self.audit.operation("device.key_rotate", **fields) as intent:
                version = await self.keys.rotate_device_key(
                    device_id,
                    algorithm=algorithm,
                    public_key=public_key,
                    current_signature=current_signature,
                    new_signature=new_signature,
                    now=now,
                )
                intent.result = {"key_version": version}
        except InvalidSignature:
            await self.event(
                EventType.SIGNATURE_INVALID, device_id=device_id, step="rotate-identity"
            )
            raise
        await self.event(
            EventType.DEVICE_KEY_ROTATED,
            device_id=device_id,
            key_version=str(version),
            algorithm=algorithm,
        )
        return json.dumps({"key_version": version, "algorithm": algorithm}).encode()

    async def session_info(self, session_hex: str) -> SessionInfo:
        record = await self.keys.store.get_session(self.keys.tenant, parse_session_id(session_hex))
        return SessionInfo(
            session_id=record.session_id.hex(),
            state=record.state.value,
            epoch=record.epoch,
            expires_at=record.expires_at.isoformat(),
            messages_received=record.counters.messages_received,
            messages_sent=record.counters.messages_sent,
        )


def _identifier_or_none(value: str | None) -> str | None:
    try:
        return None if value is None else check_identifier(value, "device id")
    except InvalidInput:
        return None


def _unb64(value: object) -> bytes:
    if not isinstance(value, str) or len(value) > 16384:
        raise ValueError("not a base64 string")
    return base64.b64decode(value, validate=True)


def parse_session_id(text: str) -> bytes:
    if len(text) != 2 * SESSION_ID_SIZE:
        raise NotFound("no such session")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise NotFound("no such session") from None


def _claimed_device(data: bytes) -> str | None:
    """The device id a ClientHello names, if it decodes (unauthenticated: for the events)."""
    try:
        return ClientHello.decode(data).device_id[:64]
    except (QflareError, ValueError):
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


__all__ = ["Service", "SessionInfo", "SessionUnusable", "parse_session_id"]
