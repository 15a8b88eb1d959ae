"""Detection rules, their windows and thresholds, and the responses they take.

Windows are tested in process and against a real Redis (``redis_url``), with the same
expectations; Redis keys get a prefix of their own per test, so nothing is flushed. The
responses run against a real store (SQLite) through the in-process ``Service``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qflare.config import Settings, parse_threshold
from qflare.monitor.alerts import Alerter
from qflare.monitor.audit import AuditUnavailable
from qflare.monitor.blocks import SourceBlocks
from qflare.monitor.counters import MemoryCounters, SharedCounters, sliding
from qflare.monitor.detect import Detector, Response, Rule, Scope, rules_from
from qflare.monitor.entry import decode_entry
from qflare.monitor.events import EventType, SecurityEvent
from qflare.monitor.shared import SharedRedis
from qflare.server.background import free_port
from qflare.server.errors import RateLimited
from qflare.server.ratelimit import RateLimiter, SourceBlocked, SourceGate
from qflare.store import DeviceState, SessionStatus, migrate

from .detect_world import SOURCE, Clock, World, world

T0 = 1_800_000_000.0  # a multiple of 60 and of 300: window buckets start here


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[SharedRedis]:
    """A Redis client whose keys (a prefix of this test's own) are deleted afterwards."""
    client = SharedRedis(redis_url)
    yield client
    async for key in client.redis.scan_iter(match="qflare:test:*"):
        await client.redis.delete(key)
    await client.close()


def prefix() -> str:
    return f"qflare:test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["memory", "redis"])
def counters(request: pytest.FixtureRequest) -> MemoryCounters | SharedCounters:
    if request.param == "memory":
        return MemoryCounters()
    return SharedCounters(request.getfixturevalue("shared"), prefix=prefix())


@pytest.fixture
async def sqlite_world(tmp_path: Path) -> AsyncIterator[World]:
    url = f"sqlite:///{tmp_path / 'qflare.db'}"
    await migrate(url)
    async with world(url, tmp_path / "data", clock=Clock(T0 + 5)) as w:
        yield w


class Emitted:
    """A stand-in for ``Service.event`` that keeps what it was given."""

    def __init__(self) -> None:
        self.events: list[tuple[EventType, dict[str, Any]]] = []

    async def __call__(
        self,
        type: EventType,
        *,
        device_id: str | None = None,
        source: str | None = None,
        **detail: str,
    ) -> None:
        self.events.append((type, {"device_id": device_id, "source": source, **detail}))

    def types(self) -> list[EventType]:
        return [t for t, _ in self.events]


def event(type: EventType, ts: float, **kw: Any) -> SecurityEvent:
    detail = kw.pop("detail", {})
    return SecurityEvent(type=type, ts=ts, detail=detail, **kw)


def rule(**kw: Any) -> Rule:
    defaults: dict[str, Any] = {
        "name": "test_rule",
        "events": frozenset({EventType.SIGNATURE_INVALID}),
        "scope": Scope.DEVICE,
        "threshold": 3,
        "window": 60,
        "response": Response.ALERT,
    }
    return Rule(**{**defaults, **kw})


# -- thresholds -----------------------------------------------------------------------------------


def test_threshold_syntax() -> None:
    assert parse_threshold("5/60") == (5, 60)
    assert parse_threshold(" 5/60s ") == (5, 60)
    assert parse_threshold("10/5m") == (10, 300)
    assert parse_threshold("1/1h") == (1, 3600)
    assert parse_threshold("OFF") is None
    for bad in ("5", "5/0", "0/60", "5/2d", "-1/60", "5/60x", "five/60", "5/86401"):
        with pytest.raises(ValueError):
            parse_threshold(bad)
    with pytest.raises(ValueError, match="COUNT/SECONDS"):
        Settings(detect_replay_device="lots")


def test_rules_follow_the_settings() -> None:
    rules = {r.name: r for r in rules_from(Settings())}
    # Every rule has its setting, and the documented defaults hold.
    assert set(rules) == {
        name.removeprefix("detect_") for name in Settings.model_fields if name.startswith("detect_")
    }
    sig = rules["signature_invalid_device"]
    assert (sig.threshold, sig.window, sig.scope, sig.response) == (
        5,
        60,
        Scope.DEVICE,
        Response.QUARANTINE,
    )
    assert rules["enrollment_failures_source"].response is Response.BLOCK_SOURCE
    tuned = {
        r.name: r
        for r in rules_from(
            Settings(detect_signature_invalid_device="2/10s", detect_replay_source="off")
        )
    }
    assert (
        tuned["signature_invalid_device"].threshold,
        tuned["signature_invalid_device"].window,
    ) == (
        2,
        10,
    )
    assert "replay_source" not in tuned


# -- windows --------------------------------------------------------------------------------------


def test_sliding_estimate() -> None:
    # Bucket [60, 120): at its start the previous bucket counts fully, at its end not at all.
    assert sliding(2, 10, 60.0, 60) == 12
    assert sliding(2, 10, 90.0, 60) == 7
    assert sliding(2, 10, 119.999, 60) == pytest.approx(2, abs=0.01)


async def test_window_counts_a_burst_exactly(counters: MemoryCounters | SharedCounters) -> None:
    counts = [await counters.hit("k", 60, T0 + 10 + i) for i in range(5)]
    assert counts == [1, 2, 3, 4, 5]
    assert await counters.hit("other", 60, T0 + 20) == 1  # keys are separate


async def test_window_slides(counters: MemoryCounters | SharedCounters) -> None:
    for _ in range(6):
        await counters.hit("k", 60, T0 + 50)
    # 30 s into the next bucket half the previous one still counts: 6 * 0.5 + this hit.
    assert await counters.hit("k", 60, T0 + 90) == pytest.approx(4.0)
    # Two windows later everything has slid out.
    assert await counters.hit("k", 60, T0 + 185) == pytest.approx(1.0, abs=0.1)
    assert await counters.hit("quiet", 60, T0 + 185) == 1


async def test_hit_many_counts_each_window(counters: MemoryCounters | SharedCounters) -> None:
    for _ in range(3):
        counts = await counters.hit_many([("a", 60), ("b", 300)], T0 + 1)
    assert counts == [3, 3]
    assert await counters.hit_many([], T0) == []


async def test_latch_fires_once_per_window(counters: MemoryCounters | SharedCounters) -> None:
    assert await counters.once("k", 2, T0)
    assert not await counters.once("k", 2, T0 + 1)
    assert await counters.once("other", 2, T0 + 1)
    await counters.clear("k", 60, T0 + 1)
    assert await counters.once("k", 2, T0 + 1)


async def test_clear_restarts_the_window(counters: MemoryCounters | SharedCounters) -> None:
    for _ in range(4):
        await counters.hit("k", 60, T0 + 61)
    await counters.clear("k", 60, T0 + 70)
    assert await counters.hit("k", 60, T0 + 71) == 1


async def test_memory_windows_are_bounded() -> None:
    counters = MemoryCounters(max_keys=100)
    for i in range(1000):
        await counters.hit(f"spoofed-{i}", 60, T0)
        await counters.once(f"spoofed-{i}", 60, T0)
    assert len(counters._windows) == 100 and len(counters._latches) == 100


async def test_redis_windows_are_shared_and_expire(shared: SharedRedis, redis_url: str) -> None:
    p = prefix()
    replica_a, replica_b = SharedCounters(shared, prefix=p), SharedCounters(shared, prefix=p)
    other = SharedRedis(redis_url)
    try:
        replica_c = SharedCounters(other, prefix=p)  # another connection, as a replica has
        assert await replica_a.hit("dev", 60, T0 + 1) == 1
        assert await replica_b.hit("dev", 60, T0 + 2) == 2
        assert await replica_c.hit("dev", 60, T0 + 3) == 3
        assert await replica_a.once("dev", 60, T0 + 3)
        assert not await replica_c.once("dev", 60, T0 + 3)  # one replica responds
    finally:
        await other.close()
    keys = [k async for k in shared.redis.scan_iter(match=p + "*")]
    assert keys
    for key in keys:
        assert 0 < await shared.redis.ttl(key) <= 121
    # Keys are digests: no device id or source in the clear.
    assert not any(b"dev" in k.removeprefix(p.encode()) for k in keys)


async def test_redis_down_falls_back_to_process_counts(caplog: pytest.LogCaptureFixture) -> None:
    down = SharedRedis(f"redis://127.0.0.1:{free_port()}/15", cooldown=60)
    counters = SharedCounters(down, prefix=prefix())
    try:
        with caplog.at_level(logging.WARNING, logger="qflare.monitor"):
            counts = [await counters.hit("k", 60, T0) for _ in range(3)]
            assert await counters.once("k", 60, T0)
            assert not await counters.once("k", 60, T0)
        assert counts == [1, 2, 3]
        # One failed attempt, then the breaker keeps Redis out of the path; logged once.
        assert down.failures == 1
        assert sum("Redis unavailable" in r.getMessage() for r in caplog.records) == 1
    finally:
        await down.close()


# -- rules: what counts ---------------------------------------------------------------------------


def test_outages_and_lifecycle_are_not_attacks() -> None:
    rules = {r.name: r for r in rules_from(Settings())}
    hs = rules["handshake_failures_source"]
    failed = EventType.HANDSHAKE_FAILED
    assert hs.matches(event(failed, T0, detail={"step": "hello", "class": "malformed"}))
    assert hs.matches(event(EventType.SIGNATURE_INVALID, T0, detail={"step": "hello"}))
    # The replay check could not answer (the store or Redis is down): the server's fault.
    assert not hs.matches(event(failed, T0, detail={"step": "hello", "class": "server"}))
    # A refused device retrying: already handled, and counting it would block its network.
    assert not hs.matches(
        event(failed, T0, detail={"step": "hello", "reason": "device-not-allowed"})
    )
    # A record replay is not a handshake failure.
    assert not hs.matches(event(EventType.REPLAY_DETECTED, T0, detail={"reason": "x"}))
    rec = rules["record_failures_device"]
    assert rec.matches(event(EventType.RECORD_REJECTED, T0, detail={"reason": "DecryptionFailed"}))
    assert not rec.matches(
        event(EventType.RECORD_REJECTED, T0, detail={"reason": "session-revoked"})
    )
    enr = rules["enrollment_failures_source"]
    assert enr.matches(event(EventType.ENROLLMENT_FAILED, T0, detail={"reason": "unknown"}))
    assert not enr.matches(
        event(EventType.ENROLLMENT_FAILED, T0, detail={"reason": "StoreUnavailable"})
    )


async def test_threshold_window_and_subjects(sqlite_world: World) -> None:
    emit = Emitted()
    detector = Detector([rule()], keys=sqlite_world.keys)
    bad = EventType.SIGNATURE_INVALID
    # Two per device, spread over two devices: under the threshold for each.
    for device in ("dev-a", "dev-b", "dev-a", "dev-b"):
        await detector.observe(event(bad, T0 + 1, device_id=device), emit)
    # Events of other types and events with no subject do not count.
    await detector.observe(event(EventType.REPLAY_DETECTED, T0 + 1, device_id="dev-a"), emit)
    await detector.observe(event(bad, T0 + 1), emit)
    assert emit.events == []
    # The third within the window fires, once; later ones in the window do not fire again.
    for _ in range(3):
        await detector.observe(event(bad, T0 + 2, device_id="dev-a"), emit)
    assert emit.types() == [EventType.DETECTION_TRIGGERED]
    _, detail = emit.events[0]
    assert detail["device_id"] == "dev-a" and detail["rule"] == "test_rule"
    assert (detail["threshold"], detail["window_seconds"], detail["count"]) == ("3", "60", "3.0")
    assert (detail["response"], detail["outcome"]) == ("alert", "alerted")
    # Three more, but spread wider than the window: never three inside one window.
    slow = Detector([rule()], keys=sqlite_world.keys)
    for i in range(3):
        await slow.observe(event(bad, T0 + 1 + 200 * i, device_id="dev-c"), emit)
    assert len(emit.events) == 1


async def test_detector_never_raises_into_the_request(
    sqlite_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(MemoryCounters):
        async def hit_many(self, hits: Any, now: float) -> list[float]:
            raise RuntimeError("boom")

    detector = Detector([rule()], keys=sqlite_world.keys, counters=Broken())
    with caplog.at_level(logging.ERROR, logger="qflare.monitor"):
        await detector.observe(event(EventType.SIGNATURE_INVALID, T0, device_id="d"), Emitted())
    assert "detection failed" in caplog.text


# -- responses ------------------------------------------------------------------------------------


async def test_quarantine_response(sqlite_world: World) -> None:
    w = sqlite_world
    device = await w.enroll("dev-q")
    session = await w.connect(device)
    emit = Emitted()
    detector = Detector([rule(response=Response.QUARANTINE)], keys=w.keys)
    for _ in range(3):
        await detector.observe(
            event(EventType.SIGNATURE_INVALID, T0 + 6, device_id="dev-q", source=SOURCE), emit
        )
    assert emit.types() == [EventType.DEVICE_QUARANTINED, EventType.DETECTION_TRIGGERED]
    assert emit.events[0][1] == {
        "device_id": "dev-q",
        "source": SOURCE,
        "rule": "test_rule",
        "automatic": "true",
    }
    assert emit.events[1][1]["outcome"] == "quarantined"
    stored = await w.keys.device("dev-q")
    assert stored.state is DeviceState.QUARANTINED
    assert stored.state_reason == "auto: test_rule"
    [row] = await w.keys.device_sessions("dev-q")
    assert row.session_id == session.session_id and row.state is SessionStatus.REVOKED

    # Fired again later (a new window): nothing more to do, and it says so.
    for _ in range(3):
        await detector.observe(
            event(EventType.SIGNATURE_INVALID, T0 + 100, device_id="dev-q"), emit
        )
    assert emit.types()[2:] == [EventType.DETECTION_TRIGGERED]
    assert emit.events[2][1]["outcome"] == "already-quarantined"
    # A device that does not exist (attacks name unknown ids), or is not even an id.
    for name in ("ghost", "not an id!"):
        for _ in range(3):
            await detector.observe(event(EventType.SIGNATURE_INVALID, T0, device_id=name), emit)
        assert emit.events[-1][1]["outcome"] == "unknown-device"


async def test_revoke_sessions_response(sqlite_world: World) -> None:
    w = sqlite_world
    device = await w.enroll("dev-r")
    await w.connect(device)
    await w.connect(device)
    emit = Emitted()
    detector = Detector(
        [rule(events=frozenset({EventType.REPLAY_DETECTED}), response=Response.REVOKE_SESSIONS)],
        keys=w.keys,
    )
    detector.audit = w.service.audit
    for _ in range(3):
        await detector.observe(event(EventType.REPLAY_DETECTED, T0 + 6, device_id="dev-r"), emit)
    assert emit.types() == [EventType.SESSION_REVOKED, EventType.DETECTION_TRIGGERED]
    assert emit.events[0][1]["sessions"] == "2"
    assert emit.events[1][1]["outcome"] == "revoked-2-sessions"
    rows = await w.keys.device_sessions("dev-r")
    assert {r.state for r in rows} == {SessionStatus.REVOKED}
    # The device itself stays allowed: it handshakes again.
    assert (await w.keys.device("dev-r")).state is DeviceState.ACTIVE
    await w.connect(device)
    entries = [decode_entry(e.payload) for e in await w.service.audit.entries(0, 1000)]
    [intent, outcome] = [e for e in entries if e.kind == "device.sessions_revoke"]
    assert intent.data == {"device_id": "dev-r", "actor": "monitor:test_rule", "phase": "intent"}
    assert (outcome.data["result"], outcome.data["sessions"]) == ("ok", 2)


async def test_responses_fail_closed_without_the_audit_log(sqlite_world: World) -> None:
    """An automatic quarantine that cannot be audited does not happen (docs/AUDIT.md)."""
    w = sqlite_world
    await w.enroll("dev-audit")

    class Refusing:
        def operation(self, op: str, /, **fields: Any) -> Any:
            raise AuditUnavailable("the audit table refuses inserts")

    emit = Emitted()
    detector = Detector([rule(response=Response.QUARANTINE)], keys=w.keys)
    detector.audit = Refusing()
    for _ in range(3):
        await detector.observe(event(EventType.SIGNATURE_INVALID, T0, device_id="dev-audit"), emit)
    assert emit.types() == [EventType.DETECTION_TRIGGERED]
    assert emit.events[0][1]["outcome"] == "failed"
    assert (await w.keys.device("dev-audit")).state is DeviceState.ENROLLED


async def test_block_response_and_trusted_sources(sqlite_world: World) -> None:
    emit = Emitted()
    blocks = SourceBlocks(sqlite_world.keys.tenant)
    detector = Detector(
        [rule(scope=Scope.SOURCE, response=Response.BLOCK_SOURCE)],
        keys=sqlite_world.keys,
        blocks=blocks,
        block_seconds=120,
        trusted_sources=["192.0.2.1"],
    )
    for source in ("203.0.113.5", "192.0.2.1"):
        for _ in range(3):
            await detector.observe(
                event(EventType.SIGNATURE_INVALID, T0, source=source, device_id="d"), emit
            )
    assert emit.types() == [
        EventType.SOURCE_BLOCKED,
        EventType.DETECTION_TRIGGERED,
        EventType.DETECTION_TRIGGERED,
    ]
    assert emit.events[0][1]["source"] == "203.0.113.5"
    assert emit.events[0][1]["seconds"] == "120"
    assert emit.events[2][1]["outcome"] == "trusted-source-not-blocked"
    found = blocks.local("203.0.113.5", T0 + 119)
    assert found is not None and found.rule == "test_rule"
    assert blocks.local("203.0.113.5", T0 + 121) is None  # blocks end by themselves
    assert blocks.local("192.0.2.1", T0) is None


async def test_respond_off_only_alerts(sqlite_world: World) -> None:
    w = sqlite_world
    await w.enroll("dev-dry")
    emit = Emitted()
    detector = Detector([rule(response=Response.QUARANTINE)], keys=w.keys, respond=False)
    for _ in range(3):
        await detector.observe(event(EventType.SIGNATURE_INVALID, T0, device_id="dev-dry"), emit)
    assert emit.types() == [EventType.DETECTION_TRIGGERED]
    assert emit.events[0][1]["outcome"].startswith("not-taken")
    assert (await w.keys.device("dev-dry")).state is DeviceState.ENROLLED


async def test_forgive_restarts_the_count(sqlite_world: World) -> None:
    emit = Emitted()
    detector = Detector([rule()], keys=sqlite_world.keys)
    for _ in range(3):
        await detector.observe(event(EventType.SIGNATURE_INVALID, T0, device_id="d"), emit)
    assert len(emit.events) == 1
    await detector.forgive(device_id="d", now=T0)
    for _ in range(2):
        await detector.observe(event(EventType.SIGNATURE_INVALID, T0, device_id="d"), emit)
    assert len(emit.events) == 1  # counted from zero: two is under the threshold
    await detector.observe(event(EventType.SIGNATURE_INVALID, T0, device_id="d"), emit)
    assert len(emit.events) == 2  # and the latch was lifted too


# -- alerts ---------------------------------------------------------------------------------------


async def test_webhook_gets_the_alert_without_delaying_the_request(sqlite_world: World) -> None:
    posted: list[dict[str, Any]] = []
    release = asyncio.Event()

    async def receiver(request: httpx.Request) -> httpx.Response:
        await release.wait()  # a slow receiver
        posted.append(json.loads(request.content))
        return httpx.Response(204)

    alerter = Alerter(
        "https://hooks.example/qflare?key=secret", transport=httpx.MockTransport(receiver)
    )
    detector = Detector([rule()], keys=sqlite_world.keys, alerter=alerter)
    emit = Emitted()
    for _ in range(3):
        await detector.observe(
            event(
                EventType.SIGNATURE_INVALID,
                T0,
                device_id="dev-w",
                source=SOURCE,
                detail={"reason": "signature-invalid"},
            ),
            emit,
        )
    # observe() returned with the POST still waiting on the receiver.
    assert emit.types() == [EventType.DETECTION_TRIGGERED] and posted == []
    release.set()
    await alerter.drain()
    [alert] = posted
    assert alert["kind"] == "qflare.alert" and alert["version"] == 1
    assert alert["rule"] == "test_rule" and alert["scope"] == "device"
    assert alert["subject"] == "dev-w" and alert["threshold"] == 3
    assert alert["trigger"] == {
        "type": "signature.invalid",
        "device_id": "dev-w",
        "source": SOURCE,
        "detail": {"reason": "signature-invalid"},
    }
    assert alerter.sent == 1
    await alerter.close()


async def test_webhook_failures_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    alerter = Alerter("https://hooks.example/secret-path", transport=httpx.MockTransport(refuse))
    server_error = Alerter(
        "https://hooks.example/x", transport=httpx.MockTransport(lambda r: httpx.Response(500))
    )
    with caplog.at_level(logging.WARNING, logger="qflare.monitor"):
        alerter.alert({"rule": "r"})
        server_error.alert({"rule": "r"})
        await alerter.drain()
        await server_error.drain()
    assert alerter.failed == 1 and server_error.failed == 1
    assert "alert webhook failed: ConnectError" in caplog.text
    assert "HTTP 500" in caplog.text
    assert "secret-path" not in caplog.text  # the URL may carry a credential
    await alerter.close()
    await server_error.close()


async def test_webhook_backlog_is_bounded() -> None:
    never = asyncio.Event()

    async def stuck(request: httpx.Request) -> httpx.Response:
        await never.wait()
        return httpx.Response(204)

    alerter = Alerter(
        "https://h.example/", timeout=0.2, max_in_flight=2, transport=httpx.MockTransport(stuck)
    )
    for _ in range(5):
        alerter.alert({"rule": "r"})
    assert alerter.dropped == 3
    await alerter.drain(timeout=0.05)
    await alerter.close()  # cancels what is still waiting


# -- the source gate ------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def gate_parts(request: pytest.FixtureRequest) -> tuple[SourceBlocks, SharedRedis | None]:
    if request.param == "memory":
        return SourceBlocks("t1"), None
    shared = request.getfixturevalue("shared")
    return SourceBlocks(f"t-{uuid.uuid4().hex[:8]}", shared, prefix=prefix()), shared


async def test_gate_limits_and_blocks(gate_parts: tuple[SourceBlocks, SharedRedis | None]) -> None:
    blocks, shared = gate_parts
    clock = Clock(T0)
    gate = SourceGate(RateLimiter(0.5, 3), blocks, shared, prefix=blocks.prefix, clock=clock)
    for _ in range(3):
        await gate.check("203.0.113.1")
    with pytest.raises(RateLimited) as limited:
        await gate.check("203.0.113.1")
    assert not isinstance(limited.value, SourceBlocked)
    assert 0 < limited.value.retry_after <= 2.0
    await gate.check("203.0.113.2")  # per source

    await blocks.block("203.0.113.3", seconds=60, rule="enrollment_failures_source", now=T0)
    with pytest.raises(SourceBlocked) as blocked:
        await gate.check("203.0.113.3")
    assert blocked.value.rule == "enrollment_failures_source"
    assert 59 <= blocked.value.retry_after <= 60
    assert [b.source for b in await blocks.list(T0)] == ["203.0.113.3"]
    assert await blocks.unblock("203.0.113.3")
    assert not await blocks.unblock("203.0.113.3")
    await gate.check("203.0.113.3")


async def test_gate_is_shared_by_replicas(shared: SharedRedis, redis_url: str) -> None:
    p, tenant = prefix(), f"t-{uuid.uuid4().hex[:8]}"
    other = SharedRedis(redis_url)
    try:
        replicas = [
            SourceGate(RateLimiter(0.5, 4), SourceBlocks(tenant, s, prefix=p), s, prefix=p)
            for s in (shared, other)
        ]
        for i in range(4):
            await replicas[i % 2].check("203.0.113.9")
        for gate in replicas:  # the burst is spent on both: one limit, not one per replica
            with pytest.raises(RateLimited):
                await gate.check("203.0.113.9")
        # A block set through one replica's blocks is seen by the other's gate.
        await replicas[0].blocks.block("203.0.113.10", seconds=30, rule="r", now=T0)
        with pytest.raises(SourceBlocked):
            await replicas[1].check("203.0.113.10")
    finally:
        await other.close()


async def test_gate_without_redis_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    down = SharedRedis(f"redis://127.0.0.1:{free_port()}/15", cooldown=60)
    blocks = SourceBlocks("t1", down, prefix=prefix())
    gate = SourceGate(RateLimiter(0.5, 2), blocks, down, prefix=blocks.prefix)
    try:
        with caplog.at_level(logging.WARNING, logger="qflare.monitor"):
            await gate.check("203.0.113.1")
            await gate.check("203.0.113.1")
            with pytest.raises(RateLimited):  # the in-process bucket still limits
                await gate.check("203.0.113.1")
            # A block set while Redis is down is held in process, and honoured.
            await blocks.block("203.0.113.2", seconds=30, rule="r", now=gate.clock())
            with pytest.raises(SourceBlocked):
                await gate.check("203.0.113.2")
        assert "Redis unavailable" in caplog.text
    finally:
        await down.close()
