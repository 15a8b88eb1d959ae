"""Every security-relevant path stores its typed event, on both stores (docs/MONITOR.md).

Driven through the in-process ``Service`` (``detect_world``): enrollment, the handshake's
failures with their reason class, replays, clock skew, record failures, the session
lifecycle (rekeyed, expired, revoked, closed) and the detector's own events.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import (
    DecryptionFailed,
    DeviceNotAllowed,
    HandshakeFailed,
    NotFound,
    ReplayDetected,
    TokenRejected,
)
from qflare.keys import EnrollmentRequest, SessionUnusable
from qflare.monitor.entry import decode_entry
from qflare.monitor.events import Severity, failure_class
from qflare.protocol.enrollment import enrollment_proof_message
from qflare.store import DeviceState, InvalidInput

from .detect_world import SOURCE, World, world


@pytest.fixture
async def w(database_url: str, tmp_path: Path) -> AsyncIterator[World]:
    # Detection alert-only here: these tests provoke failures on purpose.
    async with world(database_url, tmp_path / "data", monitor_respond=False) as server:
        yield server


def detail_of(events: list, type: str) -> list[dict[str, str]]:  # type: ignore[type-arg]
    return [e.detail for e in events if e.type == type]


async def test_enrollment_events(w: World) -> None:
    await w.enroll("dev-1")
    # A well-formed request with a guessed token: what token guessing looks like.
    key = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
    public, guess = key.public_key().public_bytes(), "qft_guessed-token"
    proof = key.sign(
        enrollment_proof_message("dev-2", "ML-DSA-44", public, guess), labels.SIG_ENROLLMENT
    )
    request = EnrollmentRequest(
        token=guess, device_id="dev-2", algorithm="ML-DSA-44", public_key=public, proof=proof
    )
    with pytest.raises(TokenRejected):
        await w.service.enroll(request, source="203.0.113.66")
    ok, failed = await w.events("enrollment.ok"), await w.events("enrollment.failed")
    assert [(e.device_id, e.source) for e in ok] == [("dev-1", SOURCE)]
    assert [(e.device_id, e.source, e.severity) for e in failed] == [
        ("dev-2", "203.0.113.66", Severity.WARNING)
    ]
    assert failed[0].detail == {"reason": "unknown"}


async def test_handshake_events_and_failure_classes(w: World) -> None:
    device = await w.enroll("dev-h")
    await w.new_events()
    await w.connect(device)
    assert [e.type for e in await w.new_events()] == ["handshake.started", "handshake.completed"]

    # A signature by another key: signature.invalid, class authentication.
    stranger = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
    _, forged = w.hello_bytes(device, identity=stranger)
    with pytest.raises(HandshakeFailed):
        await w.service.hello(forged, source=SOURCE)
    # Garbage: handshake.failed, class malformed, no device.
    with pytest.raises(HandshakeFailed):
        await w.service.hello(b"\x01junk", source=SOURCE)
    # An unknown device: class identity.
    _, unknown = w.hello_bytes(device, device_id="dev-nobody")
    with pytest.raises(HandshakeFailed):
        await w.service.hello(unknown, source=SOURCE)
    # A ClientHello from a clock ten minutes off: timestamp skew, naming the claimed device
    # although the server refused it before looking the device up.
    _, stale = w.hello_bytes(device, now=w.clock() - 600)
    with pytest.raises(HandshakeFailed):
        await w.service.hello(stale, source=SOURCE)
    # A replay of a ClientHello that was used: replay.detected.
    _, hello = w.hello_bytes(device)
    await w.service.hello(hello, source=SOURCE)
    with pytest.raises(HandshakeFailed):
        await w.service.hello(hello, source=SOURCE)
    # A ClientFinish that is junk: handshake.failed at step finish.
    with pytest.raises(HandshakeFailed):
        await w.service.finish(b"\x03junk", source=SOURCE)

    failures = [
        (e.type, e.device_id, e.detail["reason"], e.detail["class"], e.detail["step"])
        for e in await w.new_events()
        if e.type != "handshake.started"
    ]
    assert failures == [
        ("signature.invalid", "dev-h", "signature-invalid", "authentication", "hello"),
        ("handshake.failed", None, "malformed-message", "malformed", "hello"),
        ("handshake.failed", "dev-nobody", "unknown-device", "identity", "hello"),
        ("timestamp.out_of_window", "dev-h", "timestamp-out-of-window", "freshness", "hello"),
        ("replay.detected", "dev-h", "replay", "replay", "hello"),
        ("handshake.failed", None, "malformed-message", "malformed", "finish"),
    ]
    assert failure_class("nonce-check-unavailable") == "server"


async def test_finish_refused_when_the_device_was_quarantined_meanwhile(w: World) -> None:
    device = await w.enroll("dev-f")
    hs, hello = w.hello_bytes(device)
    finish = hs.receive_server_hello(await w.service.hello(hello, source=SOURCE))
    await w.keys.quarantine("dev-f", reason="test", now=w.clock())
    await w.new_events()
    with pytest.raises(DeviceNotAllowed):
        await w.service.finish(finish, source=SOURCE)
    [refused] = await w.new_events()
    assert (refused.type, refused.device_id) == ("handshake.failed", "dev-f")
    assert refused.detail == {"reason": "device-not-allowed", "step": "finish", "class": "identity"}


async def test_session_lifecycle_events(w: World) -> None:
    device = await w.enroll("dev-s")
    first = await w.connect(device)
    await w.new_events()
    # A second handshake of a device that had one: session.rekeyed.
    second = await w.connect(device)
    assert [e.type for e in await w.new_events()] == [
        "handshake.started",
        "handshake.completed",
        "session.rekeyed",
    ]
    assert json.loads(await w.send(first)) == {"pong": True}

    # Records that fail: record.rejected; a replayed record: replay.detected.
    record = second.seal(b'{"op": "ping"}', now=w.clock(), purpose="control")
    sid = second.session_id.hex()
    await w.service.record(sid, record, source=SOURCE)
    with pytest.raises(ReplayDetected):
        await w.service.record(sid, record, source=SOURCE)
    tampered = bytearray(second.seal(b'{"op": "ping"}', now=w.clock(), purpose="control"))
    tampered[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        await w.service.record(sid, bytes(tampered), source=SOURCE)
    with pytest.raises(NotFound):
        await w.service.record("00" * 16, record, source=SOURCE)
    events = await w.new_events()
    assert [(e.type, e.device_id) for e in events] == [
        ("replay.detected", "dev-s"),
        ("record.rejected", "dev-s"),
        ("record.rejected", None),
    ]
    assert events[2].detail == {"reason": "unknown-session"}

    # Revoked by an operator: the next record names the device and the session state.
    await w.keys.revoke_session(first.session_id, now=w.clock())
    with pytest.raises(SessionUnusable):
        await w.send(first)
    [late] = await w.new_events()
    assert (late.type, late.device_id, late.detail) == (
        "record.rejected",
        "dev-s",
        {"reason": "session-revoked"},
    )

    # Closed by the device: session.closed.
    await w.send(second, b'{"op": "close"}')
    assert [e.type for e in await w.new_events()] == ["session.closed"]

    # Past its lifetime: session.expired.
    third = await w.connect(device)
    await w.new_events()
    late_record = third.seal(b'{"op": "ping"}', now=w.clock(), purpose="control")
    w.clock.advance(w.settings.session_max_age + 1)
    with pytest.raises(SessionUnusable):
        await w.service.record(third.session_id.hex(), late_record, source=SOURCE)
    [expired] = await w.new_events()
    assert (expired.type, expired.device_id) == ("session.expired", "dev-s")


async def test_detector_events_are_stored(database_url: str, tmp_path: Path) -> None:
    """A burst of forged ClientHellos, through the real Service and store: the trigger events,
    the response event and detection.triggered, in that order."""
    async with world(database_url, tmp_path / "data", detect_signature_invalid_device="3/60") as w:
        device = await w.enroll("dev-x")
        stranger = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
        await w.new_events()
        for _ in range(3):
            _, forged = w.hello_bytes(device, identity=stranger)
            with pytest.raises(HandshakeFailed):
                await w.service.hello(forged, source=SOURCE)
        events = await w.new_events()
        assert [e.type for e in events] == [
            "signature.invalid",
            "signature.invalid",
            "signature.invalid",
            "device.quarantined",
            "detection.triggered",
        ]
        quarantined, triggered = events[3], events[4]
        assert quarantined.device_id == "dev-x" and quarantined.severity == Severity.HIGH
        assert quarantined.detail == {"rule": "signature_invalid_device", "automatic": "true"}
        assert triggered.detail["outcome"] == "quarantined"
        assert triggered.detail["trigger"] == "signature.invalid"
        assert (await w.keys.device("dev-x")).state is DeviceState.QUARANTINED
        # Logged in the audit log like an operator's quarantine, intent then outcome.
        entries = [decode_entry(e.payload) for e in await w.service.audit.entries(0, 1000)]
        automatic = [e for e in entries if e.kind == "device.quarantine"]
        assert [e.data["phase"] for e in automatic] == ["intent", "outcome"]
        assert automatic[0].data["device_id"] == "dev-x"
        assert automatic[0].data["actor"] == "monitor:signature_invalid_device"
        assert automatic[1].data["result"] == "ok"


async def test_rekeys_are_counted_after_the_request_and_alert(
    database_url: str, tmp_path: Path
) -> None:
    """The successful path's events reach detection in the background (the request does not
    wait for a shared window's round trip), and flush_events waits for that: the rekey-rate
    rule still sees every rekey and alerts at its threshold."""
    async with world(database_url, tmp_path / "data", detect_rekey_rate_device="3/300") as w:
        device = await w.enroll("dev-rekey")
        await w.connect(device)  # the first session: not a rekey
        observed: list[str] = []
        observe = w.service.monitor.observe  # type: ignore[union-attr]

        async def recording(ev: Any, emit: Any) -> None:
            await asyncio.sleep(0)  # not done by the time the request returns
            observed.append(ev.type.value)
            await observe(ev, emit)

        w.service.monitor.observe = recording  # type: ignore[method-assign,union-attr]
        await w.connect(device)
        assert "session.rekeyed" not in observed  # counted after the request, not before
        await w.service.flush_events()
        assert observed == ["session.rekeyed"]  # no rule counts started/completed: not observed
        for _ in range(2):
            await w.connect(device)
        triggered = await w.events("detection.triggered")
        assert [e.detail["rule"] for e in triggered] == ["rekey_rate_device"]
        assert triggered[0].device_id == "dev-rekey"


async def test_a_quarantine_racing_the_finish_leaves_no_live_session(w: World) -> None:
    """The finish's store work is one transaction with the device row locked, so a
    quarantine lands wholly before it (refused, no session at all) or wholly after it (the
    quarantine revokes the new session with the device's others)."""
    complete = w.keys.complete_handshake

    async def finish_around_a_quarantine(device_id: str, *, before: bool) -> None:
        device = await w.enroll(device_id)
        hs, hello = w.hello_bytes(device)
        finish = hs.receive_server_hello(await w.service.hello(hello, source=SOURCE))

        async def racing(*args: Any, **kw: Any) -> Any:
            if before:
                await w.keys.quarantine(device_id, reason="race", now=w.clock())
            done = await complete(*args, **kw)
            if not before:
                await w.keys.quarantine(device_id, reason="race", now=w.clock())
            return done

        w.keys.complete_handshake = racing  # type: ignore[method-assign]
        try:
            if before:
                with pytest.raises(DeviceNotAllowed):
                    await w.service.finish(finish, source=SOURCE)
            else:
                await w.service.finish(finish, source=SOURCE)
        finally:
            w.keys.complete_handshake = complete  # type: ignore[method-assign]

    await finish_around_a_quarantine("dev-race-before", before=True)
    assert await w.keys.device_sessions("dev-race-before") == []
    await finish_around_a_quarantine("dev-race-after", before=False)
    (session,) = await w.keys.device_sessions("dev-race-after")
    assert session.state.value == "revoked"


async def test_a_claimed_device_id_that_is_not_an_identifier_is_not_logged_raw(
    w: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qflare.server")
    junk = "dev\nFORGED log line " + "x" * 10_000
    with pytest.raises(InvalidInput, match=r"device id"):
        await w.enroll(junk)
    [event] = await w.new_events("enrollment.failed")
    assert event.device_id is None
    logged = [r.getMessage() for r in caplog.records if "enrollment.failed" in r.getMessage()]
    assert logged and all("\n" not in m and len(m) < 500 for m in logged)
