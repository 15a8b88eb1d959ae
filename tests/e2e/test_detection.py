"""Detection rules and automatic responses against a live server, and the operator's undo.

A burst of forged ClientHellos naming one device gets it quarantined (its live session
revoked with it); enrollment-token guessing from one source gets the source blocked on every
device route; an operator lifts both over the admin API. On SQLite and PostgreSQL; the block
also through Redis (a tenant of its own, so no Redis key of another test is touched).
"""

from __future__ import annotations

import base64
import time
import uuid

import httpx
import pytest

from qflare import crypto
from qflare.config import Settings
from qflare.crypto import labels
from qflare.monitor.counters import SharedCounters
from qflare.monitor.shared import SharedRedis
from qflare.protocol.enrollment import enrollment_proof_message

from .conftest import (
    FINISH,
    HELLO,
    OCTET,
    enroll,
    free_port,
    hello_of,
    refused,
    serving,
)
from .test_negative import connect, ping, pong, post_record


@pytest.fixture
def detecting(settings: Settings) -> Settings:
    """The live-server settings with automatic responses on (the shared fixture keeps them
    off) and a tenant of this test's own."""
    return settings.model_copy(
        update={"monitor_respond": True, "tenant": f"det-{uuid.uuid4().hex[:10]}"}
    )


def test_signature_burst_quarantines_the_device_and_the_operator_undoes_it(
    detecting: Settings,
) -> None:
    with serving(detecting) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        identity = enroll(server, http, "dev-burst")
        session = connect(http, identity)
        pong(session, post_record(http, session, ping(session)))

        stranger = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
        for _ in range(detecting_threshold(detecting)):
            forged = hello_of(identity, key=stranger)
            refused(http.post(HELLO, content=forged, headers=OCTET), 401, "handshake_failed")

        # Quarantined: its live session is revoked and a real handshake is refused.
        refused(post_record(http, session, ping(session)), 410, "session_closed")
        refused(
            http.post(HELLO, content=hello_of(identity), headers=OCTET), 403, "device_not_allowed"
        )
        with server.admin() as admin:
            device = admin.get("/v1/admin/devices/dev-burst").json()
        assert device["state"] == "quarantined"
        assert device["state_reason"] == "auto: signature_invalid_device"

        assert len(server.events("signature.invalid")) == 5
        [quarantined] = server.events("device.quarantined")
        assert quarantined["device_id"] == "dev-burst"
        assert quarantined["detail"] == {"rule": "signature_invalid_device", "automatic": "true"}
        [triggered] = server.events("detection.triggered")
        assert triggered["device_id"] == "dev-burst"
        assert triggered["detail"]["outcome"] == "quarantined"
        assert triggered["detail"]["threshold"] == "5"
        assert triggered["id"] > quarantined["id"] > server.events("signature.invalid")[-1]["id"]
        # Five forgeries from one source are under the source's own threshold: not blocked.
        assert server.events("source.blocked") == []

        # The operator reinstates it: the device handshakes and sends again.
        with server.admin() as admin:
            r = admin.post("/v1/admin/devices/dev-burst/reinstate", json={"reason": "checked"})
            assert r.status_code == 200 and r.json()["state"] == "active"
        session = connect(http, identity)
        pong(session, post_record(http, session, ping(session)))
        # Its windows restarted: one more forgery is counted from zero, not the sixth.
        forged = hello_of(identity, key=stranger)
        refused(http.post(HELLO, content=forged, headers=OCTET), 401, "handshake_failed")
        pong(session, post_record(http, session, ping(session)))
        assert len(server.events("device.quarantined")) == 1


def detecting_threshold(settings: Settings) -> int:
    assert settings.detect_signature_invalid_device == "5/60"  # the documented default
    return 5


def guess_body(device_id: str) -> dict[str, str]:
    """A well-formed enrollment with a guessed token: what token guessing looks like."""
    key = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
    public = key.public_key().public_bytes()
    token = "qft_" + uuid.uuid4().hex
    proof = key.sign(
        enrollment_proof_message(device_id, "ML-DSA-44", public, token), labels.SIG_ENROLLMENT
    )
    return {
        "token": token,
        "device_id": device_id,
        "algorithm": "ML-DSA-44",
        "public_key": base64.b64encode(public).decode(),
        "proof": base64.b64encode(proof).decode(),
    }


@pytest.mark.parametrize("shared", ["memory", "redis"])
def test_token_guessing_blocks_the_source_and_the_operator_lifts_it(
    detecting: Settings, shared: str, request: pytest.FixtureRequest
) -> None:
    update: dict[str, object] = {"detect_enrollment_failures_source": "4/300"}
    if shared == "redis":
        update["redis_url"] = request.getfixturevalue("redis_url")
    config = detecting.model_copy(update=update)
    with serving(config) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        identity = enroll(server, http, "dev-ok")  # enrolled before the guessing starts
        for i in range(4):
            refused(http.post("/v1/enroll", json=guess_body(f"guess-{i}")), 403, "token_rejected")

        # Blocked on every device route, with a long Retry-After, whatever the request.
        started = time.time()
        for r in (
            http.post("/v1/enroll", json=guess_body("guess-late")),
            http.post(HELLO, content=hello_of(identity), headers=OCTET),
            http.post(FINISH, content=b"x", headers=OCTET),
        ):
            refused(r, 429, "rate_limited")
            assert 800 <= int(r.headers["retry-after"]) <= 900
        assert time.time() - started < 5
        # Admin routes are not blocked: the operator sees the block.
        with server.admin() as admin:
            [block] = admin.get("/v1/admin/sources/blocked").json()
            rules = admin.get("/v1/admin/monitor/rules").json()
        assert block["source"] == "127.0.0.1"
        assert block["rule"] == "enrollment_failures_source"
        assert rules["shared"] is (shared == "redis") and rules["respond"] is True

        assert len(server.events("enrollment.failed")) == 4  # the late guess never got in
        [blocked] = server.events("source.blocked")
        assert blocked["source"] == "127.0.0.1"
        assert blocked["detail"]["rule"] == "enrollment_failures_source"
        assert blocked["detail"]["seconds"] == "900"
        [triggered] = server.events("detection.triggered")
        assert triggered["detail"]["outcome"] == "blocked"
        # Three refusals, one rate.limited event: a flood is not a database write each.
        [limited] = server.events("rate.limited")
        assert limited["detail"] == {"reason": "blocked", "rule": "enrollment_failures_source"}

        # The operator lifts it; devices from there work again at once.
        with server.admin() as admin:
            r = admin.post("/v1/admin/sources/127.0.0.1/unblock")
            assert r.json() == {"source": "127.0.0.1", "unblocked": True}
            assert admin.get("/v1/admin/sources/blocked").json() == []
        assert http.post(HELLO, content=hello_of(identity), headers=OCTET).status_code == 200
        [unblocked] = server.events("source.unblocked")
        assert unblocked["source"] == "127.0.0.1" and unblocked["detail"]["admin"] == "tests"
        # Unblocking restarted the source's windows: one more guess is not a new burst.
        refused(http.post("/v1/enroll", json=guess_body("guess-again")), 403, "token_rejected")
        assert http.post(HELLO, content=hello_of(identity), headers=OCTET).status_code == 200


def test_redis_down_degrades_detection_not_requests(detecting: Settings) -> None:
    """Counters fall back to the process; the rate limit too; nothing answers 500. (The nonce
    cache fails closed by design, so this server has no redis for nonces: it is the monitor
    that points at a Redis nobody listens on.)"""
    down = f"redis://127.0.0.1:{free_port()}/15"
    config = detecting.model_copy(update={"detect_enrollment_failures_source": "3/300"})
    with serving(config) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        monitor = server.app.state.monitor  # type: ignore[attr-defined]
        dead = SharedRedis(down, cooldown=60)
        monitor.detector.counters = SharedCounters(dead)
        monitor.blocks.shared = dead
        server.app.state.gate.shared = dead  # type: ignore[attr-defined]
        identity = enroll(server, http, "dev-degraded")
        assert http.post(HELLO, content=hello_of(identity), headers=OCTET).status_code == 200
        for i in range(3):
            refused(http.post("/v1/enroll", json=guess_body(f"g-{i}")), 403, "token_rejected")
        # Counted and blocked in process all the same.
        refused(http.post(HELLO, content=hello_of(identity), headers=OCTET), 429, "rate_limited")
        assert len(server.events("source.blocked")) == 1
        with server.admin() as admin:
            # Listing needs the shared store: 503, not 500. A block held here lifts here.
            refused(admin.get("/v1/admin/sources/blocked"), 503, "unavailable")
            r = admin.post("/v1/admin/sources/127.0.0.1/unblock")
            assert r.json() == {"source": "127.0.0.1", "unblocked": True}
            refused(admin.post("/v1/admin/sources/192.0.2.9/unblock"), 503, "unavailable")
        assert http.post(HELLO, content=hello_of(identity), headers=OCTET).status_code == 200
        assert dead.failures >= 1
