"""Negative end-to-end tests over real HTTP, on SQLite and PostgreSQL.

Every refusal is checked for its exact status and stable error code (docs/API.md), for never
being a 5xx, for the security event it stores where one is due, and for leaving no state
behind: after each bad request the good one still works.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from qflare import crypto
from qflare.client.device import drive
from qflare.client.flow import connect_flow
from qflare.client.keystore import DeviceIdentity
from qflare.config import Settings
from qflare.crypto import labels
from qflare.protocol import ClientHandshake, Session
from qflare.protocol.codec import PROTOCOL_VERSION, Writer
from qflare.protocol.enrollment import enrollment_proof_message
from qflare.protocol.messages import ClientFinish, MessageType
from qflare.server import app as app_module
from qflare.server.app import create_app
from qflare.server.binary_routes import ROUTES as BINARY_ROUTES
from qflare.server.errors import ERRORS, HTTP_STATUS_ERRORS

from .conftest import (
    FINISH,
    HELLO,
    OCTET,
    LiveServer,
    ManualClock,
    client_handshake,
    enroll,
    free_port,
    hello_of,
    refused,
    serving,
)

DEVICE_ACTIONS = ("quarantine", "reinstate", "revoke")
SQL_ID = "dev'; DROP TABLE devices;--"


# -- helpers --------------------------------------------------------------------------------------


def reasons(live: LiveServer, type: str, **detail: str) -> list[dict[str, Any]]:
    """Stored events of ``type`` whose detail contains ``detail``."""
    return [
        e
        for e in live.events(type)
        if all(e["detail"].get(key) == value for key, value in detail.items())
    ]


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        yield client


def connect(http: httpx.Client, identity: DeviceIdentity) -> Session:
    connected, _ = drive(http, connect_flow(identity, clock=time.time, rng=crypto.system_rng))
    session: Session = connected.session
    return session


@dataclass
class Manual:
    """A handshake driven by hand: the messages, and the session once finished."""

    hs: ClientHandshake
    hello: bytes
    finish: bytes
    session: Session


def handshake(http: httpx.Client, identity: DeviceIdentity) -> Manual:
    hs = client_handshake(identity)
    hello = hs.client_hello(now=int(time.time()), rng=crypto.system_rng)
    r = http.post(HELLO, content=hello, headers=OCTET)
    assert r.status_code == 200, r.text
    finish = hs.receive_server_hello(r.content)
    r = http.post(FINISH, content=finish, headers=OCTET)
    assert r.status_code == 200, r.text
    assert hs.session is not None
    control = json.loads(hs.session.open(r.content, now=time.time()).plaintext)
    assert control["server_keys"]
    return Manual(hs, hello, finish, hs.session)


def records_path(session: Session) -> str:
    return f"/v1/sessions/{session.session_id.hex()}/records"


def ping(session: Session) -> bytes:
    return session.seal(b'{"op": "ping"}', now=time.time(), purpose="control")


def post_record(http: httpx.Client, session: Session, record: bytes) -> httpx.Response:
    return http.post(records_path(session), content=record, headers=OCTET)


def pong(session: Session, r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    assert json.loads(session.open(r.content, now=time.time()).plaintext) == {"pong": True}


def enroll_body(token: str, device_id: str, **override: str) -> dict[str, str]:
    key = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
    public = key.public_key().public_bytes()
    proof = key.sign(
        enrollment_proof_message(device_id, "ML-DSA-44", public, token), labels.SIG_ENROLLMENT
    )
    body = {
        "token": token,
        "device_id": device_id,
        "algorithm": "ML-DSA-44",
        "public_key": base64.b64encode(public).decode(),
        "proof": base64.b64encode(proof).decode(),
    }
    body.update(override)
    return body


def forged_finish() -> ClientFinish:
    """A well-formed ClientFinish no server ever sent a biscuit for."""
    return ClientFinish(session_id=os.urandom(16), biscuit=os.urandom(120), finished=os.urandom(32))


def raw_hello(device_id: bytes, *, length: int | None = None) -> bytes:
    """A ClientHello that ``ClientHello`` would refuse to build: any bytes as the device id."""
    w = Writer().u8(PROTOCOL_VERSION).u8(MessageType.CLIENT_HELLO)
    size = len(device_id) if length is None else length
    return w.getvalue() + size.to_bytes(1, "big") + device_id + b"\x00" * 64


# -- malformed bodies ---------------------------------------------------------------------------


def test_malformed_handshake_bodies(live: LiveServer, http: httpx.Client) -> None:
    identity = enroll(live, http, "dev-malformed")
    good = hello_of(identity)
    bad_hellos = [
        b"",
        b"\x01",
        os.urandom(300),
        good[:-10],  # truncated signature
        good[: len(good) // 2],
        good + b"\x00",  # trailing byte
        bytes([PROTOCOL_VERSION + 1]) + good[1:],  # unknown version
        bytes([good[0], MessageType.CLIENT_FINISH]) + good[2:],  # wrong message type
        raw_hello(b"A" * 10_000, length=255),  # a 10 kB device id
        raw_hello(SQL_ID.encode()),
        raw_hello("dév-1".encode()),
    ]
    for body in bad_hellos:
        refused(http.post(HELLO, content=body, headers=OCTET), 401, "handshake_failed")

    finish = forged_finish()
    for body in [b"", b"\x01\x03", os.urandom(200), finish.encode()[:-1], finish.encode() + b"!"]:
        refused(http.post(FINISH, content=body, headers=OCTET), 401, "handshake_failed")

    failed = reasons(live, "handshake.failed", reason="malformed-message")
    assert {e["detail"]["step"] for e in failed} == {"hello", "finish"}
    assert len(failed) == len(bad_hellos) + 5
    assert all(e["device_id"] is None for e in failed)

    # None of it burned the device's standing: the good hello still works.
    r = http.post(HELLO, content=good, headers=OCTET)
    assert r.status_code == 200, r.text
    with live.admin() as admin:
        assert admin.get("/v1/admin/devices/dev-malformed").json()["failure_count"] == 0


def test_malformed_enroll_bodies(live: LiveServer, http: httpx.Client) -> None:
    token = live.issue_token()
    json_type = {"content-type": "application/json"}
    good = enroll_body(token, "dev-enroll")
    missing = {k: v for k, v in good.items() if k != "proof"}
    for raw in [
        b"",
        b"{",
        b'{"token": "t", "device_id": ',
        b"[]",
        b"null",
        b"\xff\xfe",
        json.dumps(missing).encode(),
        json.dumps({**good, "public_key": 5}).encode(),
        json.dumps({**good, "device_id": "A" * 10_000}).encode(),  # over the field limit
    ]:
        r = http.post("/v1/enroll", content=raw, headers=json_type)
        refused(r, 400, "invalid_request")
    assert len(live.events("request.rejected")) == 9

    refused(http.post("/v1/enroll", json={**good, "public_key": "!!!"}), 400, "malformed")
    refused(http.post("/v1/enroll", json={**good, "proof": "AAA"}), 400, "malformed")
    # SQL metacharacters in the id: refused before the store, and the token survives.
    sql = enroll_body(token, SQL_ID)
    refused(http.post("/v1/enroll", json=sql), 400, "invalid_input")
    refused(http.post("/v1/enroll", json=enroll_body(token, "x" * 65)), 400, "invalid_input")
    # A proof by another key, a key of the wrong length, an unknown algorithm.
    refused(
        http.post("/v1/enroll", json={**good, "proof": enroll_body(token, "dev-enroll")["proof"]}),
        400,
        "invalid_signature",
    )
    short_key = base64.b64encode(b"k" * 10).decode()
    refused(http.post("/v1/enroll", json={**good, "public_key": short_key}), 400, "invalid_key")
    r = http.post("/v1/enroll", json={**good, "algorithm": "RSA-1024"})
    refused(r, 400, "unsupported_algorithm")
    refused(
        http.post("/v1/enroll", json=enroll_body("qft_not-a-token", "dev-enroll")),
        403,
        "token_rejected",
    )
    failed = live.events("enrollment.failed")
    assert len(failed) == 8
    assert any(e["device_id"] is None for e in failed)  # the SQL id is not stored as an id

    # Nothing above burned the token or created a device.
    with live.admin() as admin:
        assert admin.get("/v1/admin/devices").json() == []
    r = http.post("/v1/enroll", json=good)
    assert r.status_code == 200, r.text
    refused(http.post("/v1/enroll", json=enroll_body(token, "dev-enroll-2")), 403, "token_rejected")
    # A taken device id: refused, and that token is not burned either.
    second = live.issue_token()
    refused(http.post("/v1/enroll", json=enroll_body(second, "dev-enroll")), 409, "conflict")
    assert http.post("/v1/enroll", json=enroll_body(second, "dev-enroll-2")).status_code == 200


def test_malformed_records_and_session_paths(live: LiveServer, http: httpx.Client) -> None:
    identity = enroll(live, http, "dev-records")
    session = connect(http, identity)
    record = ping(session)
    for body in [b"", b"\x01", record[:20], record[: len(record) // 2]]:
        refused(post_record(http, session, body), 400, "malformed")
    # Well formed, but not sealed by this session's keys.
    tampered = bytearray(record)
    tampered[-1] ^= 0x01
    refused(post_record(http, session, bytes(tampered)), 400, "record_rejected")
    tampered = bytearray(record)
    tampered[len(record) // 2 + 20] ^= 0x80
    refused(post_record(http, session, bytes(tampered)), 400, "record_rejected")
    assert len(live.events("record.rejected")) == 6

    # No state changed: the untouched record is still accepted once, then refused as a replay.
    pong(session, post_record(http, session, record))
    refused(post_record(http, session, record), 409, "replay_detected")
    assert len(live.events("replay.detected")) == 1

    sid = session.session_id.hex()
    for bad in ["zz" * 16, sid[:-2], sid + "00", "x", "0" * 31 + "g", "%27%20OR%201%3D1"]:
        refused(
            http.post(f"/v1/sessions/{bad}/records", content=record, headers=OCTET),
            404,
            "not_found",
        )
        refused(http.get(f"/v1/sessions/{bad}"), 404, "not_found")
    unknown = os.urandom(16).hex()
    refused(
        http.post(f"/v1/sessions/{unknown}/records", content=record, headers=OCTET),
        404,
        "not_found",
    )
    refused(http.get(f"/v1/sessions/{unknown}"), 404, "not_found")
    info = http.get(f"/v1/sessions/{sid}").json()
    assert (info["messages_received"], info["messages_sent"]) == (1, 2)  # finish answer, pong
    pong(session, post_record(http, session, ping(session)))


def test_oversized_bodies(live: LiveServer, http: httpx.Client) -> None:
    limit = live.settings.max_body_bytes
    assert limit == 64 * 1024
    too_big = b"\x01" * (limit + 1)
    for path in [HELLO, FINISH, f"/v1/sessions/{'00' * 16}/records"]:
        refused(http.post(path, content=too_big, headers=OCTET), 413, "too_large")

        def chunks() -> Iterator[bytes]:
            for _ in range(5):
                yield b"\x01" * (limit // 4)

        r = http.post(path, content=chunks(), headers=OCTET)
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
        refused(r, 413, "too_large")
    big_json = json.dumps({"token": "t" * (limit + 10)}).encode()
    r = http.post("/v1/enroll", content=big_json, headers={"content-type": "application/json"})
    refused(r, 413, "too_large")

    # At the limit exactly the body is read and judged on what it is.
    refused(http.post(HELLO, content=b"\x01" * limit, headers=OCTET), 401, "handshake_failed")
    assert http.get("/healthz").status_code == 200


def test_wrong_content_type(live: LiveServer, http: httpx.Client) -> None:
    identity = enroll(live, http, "dev-ctype")
    hello = hello_of(identity)
    path = f"/v1/sessions/{'00' * 16}/records"
    for ctype in ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]:
        for route in [HELLO, FINISH, path]:
            r = http.post(route, content=hello, headers={"content-type": ctype})
            refused(r, 415, "unsupported_media_type")
    r = http.post(HELLO, content=hello)  # no content type at all
    refused(r, 415, "unsupported_media_type")
    body = json.dumps(enroll_body(live.issue_token(), "dev-ctype-2")).encode()
    for ctype in ["text/plain", "application/octet-stream", "multipart/form-data; boundary=x"]:
        r = http.post("/v1/enroll", content=body, headers={"content-type": ctype})
        refused(r, 415, "unsupported_media_type")
    # Parameters and case do not matter; the refused requests above burned nothing.
    r = http.post(HELLO, content=hello, headers={"content-type": "Application/Octet-Stream; x=1"})
    assert r.status_code == 200, r.text
    r = http.post(
        "/v1/enroll", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert r.status_code == 200, r.text


# -- handshake refusals ---------------------------------------------------------------------------


def test_unknown_device_wrong_key_and_stale_hello(live: LiveServer, http: httpx.Client) -> None:
    identity = enroll(live, http, "dev-known")
    stranger = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
    r = http.post(
        HELLO, content=hello_of(identity, device_id="ghost-1", key=stranger), headers=OCTET
    )
    refused(r, 401, "handshake_failed")
    [event] = reasons(live, "handshake.failed", reason="unknown-device")
    assert event["device_id"] == "ghost-1"

    # A known id signed with another key: the same answer, a louder event.
    r = http.post(HELLO, content=hello_of(identity, key=stranger), headers=OCTET)
    refused(r, 401, "handshake_failed")
    assert [e["device_id"] for e in live.events("signature.invalid")] == ["dev-known"]

    stale = hello_of(identity, now=time.time() - 10 * live.settings.timestamp_window)
    refused(http.post(HELLO, content=stale, headers=OCTET), 401, "handshake_failed")
    assert len(live.events("timestamp.out_of_window")) == 1

    handshake(http, identity)  # the real device is unaffected


def test_replayed_client_hello(live: LiveServer, http: httpx.Client) -> None:
    identity = enroll(live, http, "dev-hello-replay")
    hs = client_handshake(identity)
    hello = hs.client_hello(now=int(time.time()), rng=crypto.system_rng)
    first = http.post(HELLO, content=hello, headers=OCTET)
    assert first.status_code == 200
    for _ in range(2):
        refused(http.post(HELLO, content=hello, headers=OCTET), 401, "handshake_failed")
    replays = reasons(live, "replay.detected", reason="replay", step="hello")
    assert [e["device_id"] for e in replays] == ["dev-hello-replay"] * 2
    # The first exchange is untouched by the replays.
    finish = hs.receive_server_hello(first.content)
    r = http.post(FINISH, content=finish, headers=OCTET)
    assert r.status_code == 200, r.text


def test_forged_and_replayed_finish(live: LiveServer, http: httpx.Client) -> None:
    forged = forged_finish().encode()
    refused(http.post(FINISH, content=forged, headers=OCTET), 401, "handshake_failed")
    assert reasons(live, "handshake.failed", step="finish")

    identity = enroll(live, http, "dev-finish")
    manual = handshake(http, identity)
    session = manual.session
    # A biscuit from a real handshake, bound to another session id: refused.
    moved = ClientFinish.decode(manual.finish)
    other = ClientFinish(session_id=os.urandom(16), biscuit=moved.biscuit, finished=moved.finished)
    refused(http.post(FINISH, content=other.encode(), headers=OCTET), 401, "handshake_failed")
    # The right biscuit with a wrong Finished MAC: refused.
    wrong_mac = ClientFinish(
        session_id=moved.session_id, biscuit=moved.biscuit, finished=os.urandom(32)
    )
    refused(http.post(FINISH, content=wrong_mac.encode(), headers=OCTET), 401, "handshake_failed")

    old = ping(session)
    pong(session, post_record(http, session, old))
    # The retransmitted ClientFinish gets an answer in the same session ...
    r = http.post(FINISH, content=manual.finish, headers=OCTET)
    assert r.status_code == 200, r.text
    assert json.loads(session.open(r.content, now=time.time()).plaintext)["server_keys"]
    # ... but does not reset it: the old record is still a replay.
    refused(post_record(http, session, old), 409, "replay_detected")
    pong(session, post_record(http, session, ping(session)))
    info = http.get(f"/v1/sessions/{session.session_id.hex()}").json()
    # Two pings in; the finish answer, its retransmission and two pongs out.
    assert (info["messages_received"], info["messages_sent"]) == (2, 4)


def test_cross_session_replay_and_tamper(live: LiveServer, http: httpx.Client) -> None:
    a = connect(http, enroll(live, http, "dev-a"))
    b = connect(http, enroll(live, http, "dev-b"))
    from_b = ping(b)
    refused(post_record(http, a, from_b), 400, "record_rejected")
    [event] = live.events("record.rejected")
    assert event["device_id"] == "dev-a"
    # B's record is still good on B's own session, once.
    pong(b, post_record(http, b, from_b))
    refused(post_record(http, b, from_b), 409, "replay_detected")
    # Any flipped bit in A's own record is refused, and A's session does not move.
    record = ping(a)
    codes = set()
    for i in range(0, len(record), 5):
        flipped = bytearray(record)
        flipped[i] ^= 0x04
        r = post_record(http, a, bytes(flipped))
        assert r.status_code in (400, 409, 410), (i, r.text)
        codes.add(r.json()["error"])
    assert "record_rejected" in codes
    assert codes <= {"malformed", "record_rejected", "replay_detected", "epoch_expired"}
    pong(a, post_record(http, a, record))


def test_a_record_refused_after_opening_is_consumed(live: LiveServer, http: httpx.Client) -> None:
    session = connect(http, enroll(live, http, "dev-a"))
    bad_op = session.seal(b'{"op": "no-such-op"}', now=time.time(), purpose="control")
    refused(post_record(http, session, bad_op), 400, "malformed")
    stored = http.get(f"/v1/sessions/{session.session_id.hex()}").json()
    assert stored["messages_received"] == 1  # saved before the refusal left
    # Authentic, so consumed: resent, it is a replay, not a second chance at another answer.
    refused(post_record(http, session, bad_op), 409, "replay_detected")
    pong(session, post_record(http, session, ping(session)))


# -- device states ------------------------------------------------------------------------------


def test_quarantine_reinstate_revoke(live: LiveServer, http: httpx.Client) -> None:
    identity = enroll(live, http, "dev-q")
    manual = handshake(http, identity)
    pong(manual.session, post_record(http, manual.session, ping(manual.session)))
    admin = live.admin()

    r = admin.post("/v1/admin/devices/dev-q/quarantine", json={"reason": "suspicious"})
    assert r.status_code == 200 and r.json()["state"] == "quarantined", r.text
    refused(http.post(HELLO, content=hello_of(identity), headers=OCTET), 403, "device_not_allowed")
    assert reasons(live, "handshake.failed", reason="device-not-allowed")
    refused(post_record(http, manual.session, ping(manual.session)), 410, "session_closed")
    refused(http.post(FINISH, content=manual.finish, headers=OCTET), 403, "device_not_allowed")

    r = admin.post("/v1/admin/devices/dev-q/reinstate")  # the body is optional
    assert r.status_code == 200 and r.json()["state"] == "active", r.text
    refused(admin.post("/v1/admin/devices/dev-q/reinstate", json={}), 409, "conflict")
    # The quarantine ended the old session for good, retransmitted finish or not.
    refused(post_record(http, manual.session, ping(manual.session)), 410, "session_closed")
    refused(http.post(FINISH, content=manual.finish, headers=OCTET), 410, "session_closed")
    fresh = handshake(http, identity)
    pong(fresh.session, post_record(http, fresh.session, ping(fresh.session)))

    r = admin.post("/v1/admin/devices/dev-q/revoke", json={"reason": "stolen"})
    assert r.status_code == 200 and r.json()["state"] == "revoked", r.text
    refused(http.post(HELLO, content=hello_of(identity), headers=OCTET), 403, "device_not_allowed")
    refused(post_record(http, fresh.session, ping(fresh.session)), 410, "session_closed")
    refused(admin.post("/v1/admin/devices/dev-q/reinstate", json={}), 409, "conflict")
    refused(admin.post("/v1/admin/devices/dev-q/quarantine", json={}), 409, "conflict")
    refused(http.post(HELLO, content=hello_of(identity), headers=OCTET), 403, "device_not_allowed")
    types = [e["type"] for e in live.events() if e["device_id"] == "dev-q"]
    for expected in ["device.quarantined", "device.reinstated", "device.revoked"]:
        assert expected in types
    admin.close()


def test_admin_paths_with_bad_ids(live: LiveServer) -> None:
    with live.admin() as admin:
        for bad in [SQL_ID, "x" * 65, "A" * 10_000, "dév", "a b"]:
            refused(admin.get(f"/v1/admin/devices/{bad}"), 400, "invalid_input")
            refused(admin.get(f"/v1/admin/devices/{bad}/sessions"), 400, "invalid_input")
            r = admin.post(f"/v1/admin/devices/{bad}/quarantine", json={})
            refused(r, 400, "invalid_input")
        refused(admin.get("/v1/admin/devices/nobody"), 404, "not_found")
        refused(admin.post("/v1/admin/devices/nobody/revoke", json={}), 404, "not_found")
        refused(admin.post("/v1/admin/devices/nobody/explode", json={}), 404, "not_found")
        refused(admin.post(f"/v1/admin/sessions/{'ab' * 16}/revoke"), 404, "not_found")
        refused(admin.post("/v1/admin/sessions/not-hex/revoke"), 404, "not_found")
        r = admin.get("/v1/admin/events", params={"device_id": "' OR '1'='1"})
        assert r.status_code == 200 and r.json() == [], r.text
        r = admin.get("/v1/admin/devices", params={"after": "'; DROP TABLE devices;--"})
        refused(r, 400, "invalid_input")
        refused(admin.get("/v1/admin/devices", params={"state": "bogus"}), 400, "invalid_request")
        refused(admin.get("/v1/admin/devices", params={"limit": 0}), 400, "invalid_request")
        # A NUL byte PostgreSQL cannot store, in free text that reaches the store.
        with httpx.Client(base_url=live.url) as http:
            enroll(live, http, "dev-nul")
        r = admin.post("/v1/admin/devices/dev-nul/quarantine", json={"reason": "x\x00y"})
        refused(r, 400, "invalid_input")
        assert admin.get("/v1/admin/devices/dev-nul").json()["state"] == "enrolled"


def test_expired_biscuit(settings: Settings) -> None:
    clock = ManualClock()
    with serving(settings, clock=clock) as server, httpx.Client(base_url=server.url) as http:
        identity = enroll(server, http, "dev-slow")
        hs = client_handshake(identity)
        r = http.post(
            HELLO, content=hs.client_hello(now=int(clock()), rng=crypto.system_rng), headers=OCTET
        )
        assert r.status_code == 200, r.text
        finish = hs.receive_server_hello(r.content)
        clock.advance(settings.biscuit_lifetime + 1)
        refused(http.post(FINISH, content=finish, headers=OCTET), 401, "handshake_failed")
        assert reasons(server, "handshake.failed", reason="biscuit-expired", step="finish")


# -- admin authentication -----------------------------------------------------------------------


def test_admin_auth(live: LiveServer, http: httpx.Client) -> None:
    refused(http.get("/v1/admin/devices"), 401, "unauthorized")
    refused(http.post("/v1/admin/tokens", json={}), 401, "unauthorized")
    for header in [
        "Bearer qfa_wrong",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        live.admin_token,  # no scheme
        "Bearer " + "x" * 300,
    ]:
        r = http.get("/v1/admin/devices", headers={"authorization": header})
        refused(r, 401, "unauthorized")
    reader = live.issue_admin_token("read")
    as_reader = {"authorization": f"Bearer {reader}"}
    assert http.get("/v1/admin/devices", headers=as_reader).status_code == 200
    refused(http.post("/v1/admin/tokens", json={}, headers=as_reader), 403, "forbidden")
    refused(http.post("/v1/admin/keys/rotate", json={}, headers=as_reader), 403, "forbidden")
    refused(
        http.post("/v1/admin/devices/nobody/revoke", json={}, headers=as_reader), 403, "forbidden"
    )
    with live.admin() as admin:
        assert admin.post("/v1/admin/tokens").status_code == 200  # the body is optional
        refused(admin.post("/v1/admin/tokens", json={"ttl_seconds": 0}), 400, "invalid_request")
        r = admin.post(
            "/v1/admin/tokens", content=b"{", headers={"content-type": "application/json"}
        )
        refused(r, 400, "invalid_request")
        refused(admin.post("/v1/admin/keys/rotate", json={"purpose": "x"}), 400, "invalid_request")
    failed = live.events("admin.auth_failed")
    assert len(failed) == 7 + 3
    assert {e["detail"].get("scope") for e in failed} == {None, "enroll", "keys", "devices"}


def test_rate_limited(settings: Settings) -> None:
    limited = settings.model_copy(
        update={"port": free_port(), "rate_limit_burst": 5, "rate_limit_per_second": 0.001}
    )
    with serving(limited) as server, httpx.Client(base_url=server.url) as http:
        for _ in range(5):
            refused(http.post(HELLO, content=b"x", headers=OCTET), 401, "handshake_failed")
        for path in [HELLO, FINISH, "/v1/enroll", f"/v1/sessions/{'00' * 16}"]:
            r = http.get(path) if path.startswith("/v1/sessions") else http.post(path)
            refused(r, 429, "rate_limited")
            assert int(r.headers["retry-after"]) >= 1
        # Health and admin routes are not device traffic.
        assert http.get("/healthz").status_code == 200
        assert len(server.events("rate.limited")) == 4


# -- the documented surface ---------------------------------------------------------------------


def test_openapi_health_and_metrics(live: LiveServer, http: httpx.Client) -> None:
    r = http.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    routed = {
        (method, route.path)
        for route in live.app.routes  # type: ignore[attr-defined]
        if route.path.startswith("/v1/")
        for method in route.methods
    }
    # The binary device routes are served in front of the framework (binary_routes.py).
    assert not routed & {("POST", r.template) for r in BINARY_ROUTES}
    routed |= {("POST", r.template) for r in BINARY_ROUTES}
    assert len(routed) == 22
    assert routed == {(m, p) for m, p in documented if p.startswith("/v1/")}
    hello = spec["paths"][HELLO]["post"]
    assert "application/octet-stream" in hello["requestBody"]["content"]

    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}
    refused(http.get("/no/such/route"), 404, "not_found")
    r = http.get(HELLO)
    refused(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    http.post(HELLO, content=b"junk", headers=OCTET)
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "qflare_handshakes" in metrics.text
    assert 'qflare_handshakes_total{outcome="failed"} 1.0' in metrics.text
    # Requests are counted by route template and status, unmatched paths under one label.
    assert 'qflare_http_requests_total{route="/healthz",status="200"} 1.0' in metrics.text
    assert f'qflare_http_requests_total{{route="{HELLO}",status="401"}} 1.0' in metrics.text
    assert 'qflare_http_requests_total{route="unmatched",status="404"} 1.0' in metrics.text


def test_api_doc_lists_every_route_and_code(tmp_path: Path) -> None:
    """docs/API.md stays true: every route and every error code the server can answer."""
    doc = (Path(__file__).parents[2] / "docs" / "API.md").read_text()
    app = create_app(Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/x.db"))
    hidden = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    for route in app.routes:
        if not isinstance(route, APIRoute) or route.path in hidden:
            continue
        for method in route.methods:
            paths = [route.path]
            if "{action}" in route.path:
                paths = [route.path.replace("{action}", a) for a in DEVICE_ACTIONS]
            for path in paths:
                assert f"`{method} {path}`" in doc, (method, path)
    table = doc[doc.index("## The error table") : doc.index("## Limits")]
    codes = {spec.code for _, spec in ERRORS} | {s.code for s in HTTP_STATUS_ERRORS.values()}
    source = Path(app_module.__file__).read_text()
    codes |= set(re.findall(r'HttpError\(\d{3}, "(\w+)"', source)) | {"internal"}
    for code in codes:
        assert f"| `{code}` |" in table, code
