"""Detection rules over sliding windows, and the automatic responses they take.

Every security event passes through ``Detector.observe`` (one call at the end of
``Service.event``). Each rule counts the events it matches per subject (a device id, a source
address, or the whole tenant) in a sliding window (``qflare.monitor.counters``); when the count
reaches the rule's threshold the rule fires once for that window (a latch shared by replicas)
and:

1. takes its response: quarantine the device (``KeyManager.quarantine``, which also revokes
   its sessions), revoke the device's sessions, block the source for ``block_seconds``
   (``qflare.monitor.blocks``), or nothing beyond the alert;
2. stores the response as a security event of its own (``device.quarantined``,
   ``session.revoked``, ``source.blocked``, each with ``rule`` and ``automatic: "true"``) and
   ``detection.triggered`` with the count, the threshold and the outcome;
3. alerts: a log line and, when configured, a webhook POST (``qflare.monitor.alerts``).

Every response can be undone by an operator: reinstate the device, let the device handshake
again, lift the block (docs/MONITOR.md). The detector never raises into the request path: a
rule that cannot count (Redis down) counts in process, and a response that fails is logged.

Rules keyed by device count events whose device id may be unauthenticated (a ClientHello's
claimed id before its signature is checked). An attacker who knows a device id can therefore
trip that device's rules; the responses are chosen with that in mind (see docs/MONITOR.md,
"Abuse of automatic responses").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from qflare.config import Settings, parse_threshold
from qflare.errors import Conflict, NotFound
from qflare.keys import KeyManager
from qflare.keys.manager import utc
from qflare.monitor.alerts import Alerter
from qflare.monitor.blocks import SourceBlocks
from qflare.monitor.counters import Counters, MemoryCounters
from qflare.monitor.events import EventType, SecurityEvent
from qflare.store import DeviceState, InvalidInput

log = logging.getLogger("qflare.monitor")


class Scope(StrEnum):
    DEVICE = "device"
    SOURCE = "source"
    TENANT = "tenant"


class Response(StrEnum):
    ALERT = "alert"
    QUARANTINE = "quarantine"
    REVOKE_SESSIONS = "revoke-sessions"
    BLOCK_SOURCE = "block-source"


class Audited(Protocol):
    """``AuditLog.operation`` (qflare.monitor.audit): log the intent, run, log the outcome;
    raises before the body runs if the intent cannot be written (fail closed)."""

    def operation(self, op: str, /, **fields: Any) -> AbstractAsyncContextManager[Any]: ...


class Emit(Protocol):
    """``Service.event``: store, count and log a security event."""

    def __call__(
        self,
        type: EventType,
        *,
        device_id: str | None = None,
        source: str | None = None,
        **detail: str,
    ) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    name: str
    events: frozenset[EventType]
    scope: Scope
    threshold: int
    window: int  # seconds
    response: Response
    when: Callable[[SecurityEvent], bool] | None = None
    summary: str = ""

    def subject(self, ev: SecurityEvent) -> str | None:
        if self.scope is Scope.DEVICE:
            return ev.device_id
        if self.scope is Scope.SOURCE:
            return ev.source
        return ev.tenant

    def matches(self, ev: SecurityEvent) -> bool:
        return ev.type in self.events and (self.when is None or self.when(ev))


# -- which events count -------------------------------------------------------------------------

_HANDSHAKE_FAILURES = frozenset(
    {
        EventType.HANDSHAKE_FAILED,
        EventType.SIGNATURE_INVALID,
        EventType.REPLAY_DETECTED,
        EventType.TIMESTAMP_SKEW,
    }
)


def _peer_handshake_failure(ev: SecurityEvent) -> bool:
    """A handshake failure the peer caused. Not counted: the server's own (the replay check
    could not answer: an outage must not look like an attack) and a refused device's retries
    (already refused; counting them would only block its network's other devices)."""
    return (
        ev.detail.get("step") in ("hello", "finish")
        and ev.detail.get("class") != "server"
        and ev.detail.get("reason") != "device-not-allowed"
    )


def _peer_record_failure(ev: SecurityEvent) -> bool:
    """A record that failed to open, or aimed at no session; not a device's late record on a
    session that ended (``session-revoked``, ...), which it answers by handshaking again."""
    return not ev.detail.get("reason", "").startswith("session-")


def _peer_enrollment_failure(ev: SecurityEvent) -> bool:
    return ev.detail.get("reason") not in ("StoreUnavailable", "MasterKeyUnavailable")


# (name, events, scope, response, when, summary); the threshold is settings.detect_<name>.
_CATALOGUE: tuple[
    tuple[str, frozenset[EventType], Scope, Response, Callable[[SecurityEvent], bool] | None, str],
    ...,
] = (
    (
        "handshake_failures_device",
        _HANDSHAKE_FAILURES,
        Scope.DEVICE,
        Response.ALERT,
        _peer_handshake_failure,
        "handshake failures naming one device",
    ),
    (
        "handshake_failures_source",
        _HANDSHAKE_FAILURES,
        Scope.SOURCE,
        Response.BLOCK_SOURCE,
        _peer_handshake_failure,
        "handshake failures from one source",
    ),
    (
        "signature_invalid_device",
        frozenset({EventType.SIGNATURE_INVALID}),
        Scope.DEVICE,
        Response.QUARANTINE,
        None,
        "ClientHello signatures that do not verify under the device's key",
    ),
    (
        "signature_invalid_source",
        frozenset({EventType.SIGNATURE_INVALID}),
        Scope.SOURCE,
        Response.BLOCK_SOURCE,
        None,
        "invalid ClientHello signatures from one source",
    ),
    (
        "replay_device",
        frozenset({EventType.REPLAY_DETECTED}),
        Scope.DEVICE,
        Response.REVOKE_SESSIONS,
        None,
        "replayed ClientHellos or records of one device",
    ),
    (
        "replay_source",
        frozenset({EventType.REPLAY_DETECTED}),
        Scope.SOURCE,
        Response.BLOCK_SOURCE,
        None,
        "replays from one source",
    ),
    (
        "clock_skew_device",
        frozenset({EventType.TIMESTAMP_SKEW}),
        Scope.DEVICE,
        Response.ALERT,
        None,
        "ClientHellos outside the timestamp window, by claimed device",
    ),
    (
        "enrollment_failures_source",
        frozenset({EventType.ENROLLMENT_FAILED}),
        Scope.SOURCE,
        Response.BLOCK_SOURCE,
        _peer_enrollment_failure,
        "failed enrollments from one source (token guessing)",
    ),
    (
        "record_failures_device",
        frozenset({EventType.RECORD_REJECTED}),
        Scope.DEVICE,
        Response.REVOKE_SESSIONS,
        _peer_record_failure,
        "records that failed to open on one device's sessions",
    ),
    (
        "record_failures_source",
        frozenset({EventType.RECORD_REJECTED}),
        Scope.SOURCE,
        Response.BLOCK_SOURCE,
        _peer_record_failure,
        "failed records from one source",
    ),
    (
        "rekey_rate_device",
        frozenset({EventType.SESSION_REKEYED}),
        Scope.DEVICE,
        Response.ALERT,
        None,
        "new sessions of a device that had one (rekeys)",
    ),
    (
        "key_rotation_rate",
        frozenset({EventType.KEY_ROTATED, EventType.DEVICE_KEY_ROTATED}),
        Scope.TENANT,
        Response.ALERT,
        None,
        "server and device key rotations in the tenant",
    ),
)


def rules_from(settings: Settings) -> tuple[Rule, ...]:
    """The rule set with the thresholds of ``settings``; rules set to ``off`` are left out."""
    rules = []
    for name, events, scope, response, when, summary in _CATALOGUE:
        threshold = parse_threshold(getattr(settings, f"detect_{name}"))
        if threshold is None:
            continue
        rules.append(
            Rule(
                name=name,
                events=events,
                scope=scope,
                threshold=threshold[0],
                window=threshold[1],
                response=response,
                when=when,
                summary=summary,
            )
        )
    return tuple(rules)


def window_key(tenant: str, rule: Rule, subject: str) -> str:
    return f"{tenant}\x00{rule.name}\x00{subject}"


async def forgive(
    counters: Counters,
    rules: Iterable[Rule],
    tenant: str,
    *,
    device_id: str | None = None,
    source: str | None = None,
    now: float,
) -> None:
    """Restart the windows (and latches) of ``rules`` for a device or a source."""
    for rule in rules:
        subject = {Scope.DEVICE: device_id, Scope.SOURCE: source}.get(rule.scope)
        if subject:
            try:
                await counters.clear(window_key(tenant, rule, subject), rule.window, now)
            except Exception:
                log.exception("monitor: could not reset rule %s", rule.name)


# -- the detector -------------------------------------------------------------------------------


class Detector:
    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        keys: KeyManager,
        counters: Counters | None = None,
        blocks: SourceBlocks | None = None,
        alerter: Alerter | None = None,
        respond: bool = True,
        block_seconds: int = 900,
        trusted_sources: Iterable[str] = (),
    ) -> None:
        self.rules = tuple(rules)
        self.keys = keys
        self.counters: Counters = counters if counters is not None else MemoryCounters()
        self.blocks = blocks if blocks is not None else SourceBlocks(keys.tenant)
        self.alerter = alerter if alerter is not None else Alerter()
        self.respond = respond
        self.block_seconds = block_seconds
        self.trusted_sources = frozenset(trusted_sources)
        self._by_type: dict[EventType, tuple[Rule, ...]] = {}
        for rule in self.rules:
            for type in rule.events:
                self._by_type[type] = (*self._by_type.get(type, ()), rule)
        self.fired = 0
        # The audit log (set by ``Service``): automatic quarantines and session revocations
        # are logged like an operator's, and do not happen if they cannot be logged.
        self.audit: Audited | None = None

    def _audited(self, op: str, **fields: Any) -> AbstractAsyncContextManager[Any]:
        if self.audit is None:
            return nullcontext()
        return self.audit.operation(op, **fields)

    def _key(self, rule: Rule, subject: str) -> str:
        return window_key(self.keys.tenant, rule, subject)

    def watches(self, type: EventType) -> bool:
        """Whether any rule counts events of ``type`` (``observe`` does nothing otherwise)."""
        return type in self._by_type

    async def observe(self, ev: SecurityEvent, emit: Emit) -> None:
        """Count ``ev`` in every rule that matches it; fire the rules it takes over the
        threshold. Never raises: the request that produced ``ev`` must not fail for it."""
        candidates = self._by_type.get(ev.type)
        if not candidates:
            return
        try:
            hits: list[tuple[Rule, str]] = []
            for rule in candidates:
                subject = rule.subject(ev)
                if subject and rule.matches(ev):
                    hits.append((rule, subject))
            if not hits:
                return
            counts = await self.counters.hit_many(
                [(self._key(rule, subject), rule.window) for rule, subject in hits], ev.ts
            )
            for (rule, subject), count in zip(hits, counts, strict=True):
                if count >= rule.threshold and await self.counters.once(
                    self._key(rule, subject), rule.window, ev.ts
                ):
                    await self._fire(rule, subject, count, ev, emit)
        except Exception:
            log.exception("monitor: detection failed on %s; the request goes on", ev.type.value)

    async def _fire(
        self, rule: Rule, subject: str, count: float, ev: SecurityEvent, emit: Emit
    ) -> None:
        self.fired += 1
        if not self.respond and rule.response is not Response.ALERT:
            outcome = "not-taken (monitor_respond is off)"
        else:
            outcome = await self._respond(rule, subject, ev, emit)
        device_id = subject if rule.scope is Scope.DEVICE else ev.device_id
        source = subject if rule.scope is Scope.SOURCE else ev.source
        detail = {
            "rule": rule.name,
            "scope": rule.scope.value,
            "count": f"{count:.1f}",
            "threshold": str(rule.threshold),
            "window_seconds": str(rule.window),
            "response": rule.response.value,
            "outcome": outcome,
            "trigger": ev.type.value,
        }
        await emit(EventType.DETECTION_TRIGGERED, device_id=device_id, source=source, **detail)
        self.alerter.alert(
            {
                "kind": "qflare.alert",
                "version": 1,
                "ts": utc(ev.ts).isoformat(),
                "tenant": ev.tenant,
                "rule": rule.name,
                "scope": rule.scope.value,
                "subject": subject,
                "count": round(count, 1),
                "threshold": rule.threshold,
                "window_seconds": rule.window,
                "response": rule.response.value,
                "outcome": outcome,
                "severity": "high",
                "trigger": {
                    "type": ev.type.value,
                    "device_id": ev.device_id,
                    "source": ev.source,
                    "detail": dict(ev.detail),
                },
            }
        )

    async def _respond(self, rule: Rule, subject: str, ev: SecurityEvent, emit: Emit) -> str:
        """Take ``rule``'s response against ``subject``; the outcome, in a word or two."""
        try:
            if rule.response is Response.QUARANTINE:
                return await self._quarantine(rule, subject, ev, emit)
            if rule.response is Response.REVOKE_SESSIONS:
                return await self._revoke_sessions(rule, subject, ev, emit)
            if rule.response is Response.BLOCK_SOURCE:
                return await self._block(rule, subject, ev, emit)
        except Exception:
            log.exception("monitor: response %s of rule %s failed", rule.response, rule.name)
            return "failed"
        return "alerted"

    async def _quarantine(self, rule: Rule, device_id: str, ev: SecurityEvent, emit: Emit) -> str:
        try:
            device = await self.keys.device(device_id)
            if device.state not in (DeviceState.ENROLLED, DeviceState.ACTIVE):
                return f"already-{device.state.value}"
            async with self._audited(
                "device.quarantine", device_id=device.device_id, actor=f"monitor:{rule.name}"
            ):
                await self.keys.quarantine(device_id, reason=f"auto: {rule.name}", now=ev.ts)
        except (NotFound, InvalidInput):  # InvalidInput: not even a valid device id
            return "unknown-device"
        except Conflict:
            return "already-revoked"
        await emit(
            EventType.DEVICE_QUARANTINED,
            device_id=device_id,
            source=ev.source,
            rule=rule.name,
            automatic="true",
        )
        return "quarantined"

    async def _revoke_sessions(
        self, rule: Rule, device_id: str, ev: SecurityEvent, emit: Emit
    ) -> str:
        try:
            device = await self.keys.device(device_id)
        except (NotFound, InvalidInput):
            return "unknown-device"
        async with self._audited(
            "device.sessions_revoke", device_id=device.device_id, actor=f"monitor:{rule.name}"
        ) as intent:
            revoked = await self.keys.store.revoke_device_sessions(
                self.keys.tenant, device.device_id, now=utc(ev.ts)
            )
            if intent is not None:
                intent.result["sessions"] = revoked
        await emit(
            EventType.SESSION_REVOKED,
            device_id=device.device_id,
            source=ev.source,
            rule=rule.name,
            sessions=str(revoked),
            automatic="true",
        )
        return f"revoked-{revoked}-sessions"

    async def _block(self, rule: Rule, source: str, ev: SecurityEvent, emit: Emit) -> str:
        if source in self.trusted_sources:
            return "trusted-source-not-blocked"
        block = await self.blocks.block(
            source, seconds=self.block_seconds, rule=rule.name, now=ev.ts
        )
        await emit(
            EventType.SOURCE_BLOCKED,
            device_id=ev.device_id,
            source=source,
            rule=rule.name,
            seconds=str(self.block_seconds),
            until=utc(block.until).isoformat(),
            automatic="true",
        )
        return "blocked"

    async def forgive(
        self, *, device_id: str | None = None, source: str | None = None, now: float | None = None
    ) -> None:
        """An operator undid a response: restart the windows of the device's or source's
        rules, so the next burst is counted from zero and can fire again at once."""
        await forgive(
            self.counters,
            self.rules,
            self.keys.tenant,
            device_id=device_id,
            source=source,
            now=time.time() if now is None else now,
        )

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "rule": r.name,
                "scope": r.scope.value,
                "threshold": r.threshold,
                "window_seconds": r.window,
                "response": r.response.value,
                "events": sorted(t.value for t in r.events),
                "summary": r.summary,
            }
            for r in self.rules
        ]

    async def close(self) -> None:
        await self.alerter.close()


__all__ = ["Detector", "Emit", "Response", "Rule", "Scope", "forgive", "rules_from", "window_key"]
