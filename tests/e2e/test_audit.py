"""The audit log end to end, over HTTP on SQLite and PostgreSQL: an enrollment is logged and a
device proves it against a signed checkpoint; admin actions are logged; and when the audit log
cannot be written, the action does not happen (503, nothing changed)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator

import httpx
import pytest

from monitor.intruder import Intruder
from qflare import crypto
from qflare.client.audit import AuditCheckFailed, AuditClient
from qflare.client.device import drive
from qflare.client.flow import ServerRejected, connect_flow, enroll_flow
from qflare.config import Settings
from qflare.monitor.audit import default_origin
from qflare.monitor.checkpoint import NoteVerifier
from qflare.monitor.entry import decode_entry

from .conftest import LiveServer, enroll, refused, serving

ORIGIN = default_origin("default")


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        yield client


def pinned_audit_keys(live: LiveServer) -> list[NoteVerifier]:
    """The audit public key as an operator hands it to devices (here: the admin API)."""
    with live.admin() as admin:
        keys = admin.get("/v1/admin/keys").json()
    return [
        NoteVerifier(ORIGIN, base64.b64decode(k["public_key"]))
        for k in keys
        if k["purpose"] == "audit-signing"
    ]


def logged(http: httpx.Client) -> list[tuple[str, dict[str, object]]]:
    entries = http.get("/v1/audit/entries", params={"limit": 1000}).json()
    return [(e["kind"], decode_entry(e["payload"].encode()).data) for e in entries]


def test_a_device_proves_its_enrollment_was_logged(live: LiveServer, http: httpx.Client) -> None:
    identity = enroll(live, http, "audited-1")
    audit = AuditClient(http, pinned_audit_keys(live), origin=ORIGIN)
    checkpoint = audit.checkpoint()
    entry = audit.enrollment(checkpoint, "audited-1")
    public = identity.signing_key().public_key().public_bytes()
    assert entry.kind == "device.enroll"
    assert entry.data == {
        "device_id": "audited-1",
        "algorithm": "ML-DSA-44",
        "public_key_sha256": crypto.kdf("HKDF-SHA256").hash(public).hex(),
        "phase": "intent",
    }
    # The log shows how it ended, and nothing in it is secret: no token, no key material.
    kinds = logged(http)
    assert ("device.enroll", {"phase": "outcome", "intent": entry.index, "result": "ok"}) in kinds
    text = http.get("/v1/audit/entries").text
    assert "qft_" not in text and base64.b64encode(public).decode()[:40] not in text

    # The log grows; a later checkpoint extends the one the device kept.
    with live.admin() as admin:
        assert admin.post("/v1/admin/devices/audited-1/quarantine", json={}).status_code == 200
    time.sleep(1.1)  # the server signs at most one new checkpoint a second
    later = audit.checkpoint()
    assert later.size > checkpoint.size
    audit.consistency(checkpoint, later)
    assert (
        "device.quarantine",
        {"device_id": "audited-1", "actor": "tests", "phase": "intent"},
    ) in logged(http)
    # The same entry is proven in the later tree too.
    assert audit.inclusion(later, entry.index).payload == entry.payload


def test_a_device_refuses_what_the_pinned_key_did_not_sign(
    live: LiveServer, http: httpx.Client
) -> None:
    enroll(live, http, "audited-2")
    stranger = crypto.signature("ML-DSA-87").generate(crypto.system_rng)
    wrong = AuditClient(http, [NoteVerifier(ORIGIN, stranger.public_key().public_bytes())])
    with pytest.raises(AuditCheckFailed, match="no trusted key"):
        wrong.checkpoint()
    other_log = AuditClient(http, pinned_audit_keys(live), origin="example.com/other")
    with pytest.raises(AuditCheckFailed, match=r"example\.com/other"):
        other_log.checkpoint()
    audit = AuditClient(http, pinned_audit_keys(live), origin=ORIGIN)
    checkpoint = audit.checkpoint()
    with pytest.raises(AuditCheckFailed, match="no enrollment"):
        audit.enrollment(checkpoint, "never-enrolled")


def test_proof_routes_refuse_sizes_outside_the_log(live: LiveServer, http: httpx.Client) -> None:
    enroll(live, http, "audited-3")
    size = len(http.get("/v1/audit/entries").json())
    assert size >= 2
    ok = http.get("/v1/audit/proof/inclusion", params={"index": 0, "size": size})
    assert ok.status_code == 200 and len(ok.json()["proof"]) >= 1
    for params in ({"index": size, "size": size}, {"index": 0, "size": size + 1}):
        refused(http.get("/v1/audit/proof/inclusion", params=params), 400, "invalid_input")
    for params in ({"first": 2, "second": 1}, {"first": 1, "second": size + 1}):
        refused(http.get("/v1/audit/proof/consistency", params=params), 400, "invalid_input")
    refused(
        http.get("/v1/audit/proof/inclusion", params={"index": -1, "size": 1}),
        400,
        "invalid_request",
    )
    keys = http.get("/v1/audit/keys").json()
    assert keys["origin"] == ORIGIN and keys["algorithm"] == "ML-DSA-87"
    assert [k["state"] for k in keys["keys"]] == ["active"]
    assert http.get("/v1/audit/checkpoint").headers["content-type"].startswith("text/plain")


def test_when_the_audit_log_cannot_be_written_nothing_happens(
    live: LiveServer, http: httpx.Client
) -> None:
    identity = enroll(live, http, "audited-4")
    connected, _ = drive(http, connect_flow(identity, clock=time.time, rng=crypto.system_rng))
    session = connected.session.session_id.hex()
    token = live.issue_token()
    with live.admin() as admin:
        keys_before = admin.get("/v1/admin/keys").json()
    size_before = len(logged(http))
    issued_before = len(live.events("admin.action"))

    def enroll_audited_5() -> None:
        flow = enroll_flow(
            server_url=live.url,
            token=token,
            device_id="audited-5",
            algorithm="ML-DSA-44",
            rng=crypto.system_rng,
        )
        drive(http, flow)

    asyncio.run(intrude(live, deny=True))
    try:
        with live.admin() as admin:
            refused(admin.post("/v1/admin/tokens", json={}), 503, "unavailable")
            for action in ("quarantine", "revoke"):
                r = admin.post(f"/v1/admin/devices/audited-4/{action}", json={})
                refused(r, 503, "unavailable")
            refused(admin.post("/v1/admin/keys/rotate", json={}), 503, "unavailable")
            refused(admin.post(f"/v1/admin/sessions/{session}/revoke"), 503, "unavailable")
            # Nothing changed: the device, its session and the key ring are as they were.
            device = admin.get("/v1/admin/devices/audited-4").json()
            assert device["state"] == "active"
            assert [s["state"] for s in device["sessions"]] == ["active"]
            assert admin.get("/v1/admin/keys").json() == keys_before
        with pytest.raises(ServerRejected) as caught:
            enroll_audited_5()
        assert (caught.value.status, caught.value.code) == (503, "unavailable")
    finally:
        asyncio.run(intrude(live, deny=False))
    assert len(logged(http)) == size_before
    assert len(live.events("admin.action")) == issued_before  # no token was issued
    # The enrollment token was not used up, and the device id is still free.
    enroll_audited_5()
    with live.admin() as admin:
        assert admin.get("/v1/admin/devices/audited-5").json()["state"] == "enrolled"


async def intrude(live: LiveServer, *, deny: bool) -> None:
    async with Intruder(live.settings.store_url) as intruder:
        await (intruder.deny_appends() if deny else intruder.allow_appends())


def test_the_configured_origin_names_the_log(settings: Settings) -> None:
    origin = "audit.example.org/fleet-7"
    configured = settings.model_copy(update={"audit_origin": origin})
    with serving(configured) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        enroll(live, http, "origin-1")
        served = http.get("/v1/audit/keys").json()
        assert served["origin"] == origin
        pinned = [NoteVerifier(origin, base64.b64decode(k["public_key"])) for k in served["keys"]]
        audit = AuditClient(http, pinned, origin=origin)
        checkpoint = audit.checkpoint()
        assert checkpoint.origin == origin
        assert audit.enrollment(checkpoint, "origin-1").kind == "device.enroll"
        with pytest.raises(AuditCheckFailed):  # a device that expects the default origin
            AuditClient(http, pinned, origin=ORIGIN).checkpoint()
