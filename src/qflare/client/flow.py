"""The device's conversations with the server, written once as generators.

Each flow yields ``Request`` objects and is sent back ``Response`` objects; ``DeviceClient``
drives the flows with httpx's sync client and ``AsyncDeviceClient`` with its async client
(the httpx habit of one core, two drivers). The flows hold all the logic: handshake, enrollment
proof, key pinning, record sealing, error mapping.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import QflareError
from qflare.protocol import ClientHandshake, PinnedServerKey, Session
from qflare.protocol.enrollment import (
    enrollment_proof_message,
    key_rotation_message,
    server_key_binding,
)
from qflare.protocol.record import Record

from .keystore import DeviceIdentity

OCTET = "application/octet-stream"


class ServerRejected(QflareError):
    """The server refused a request; ``code`` is the stable error code of its error table."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(f"{status} {code}: {message}")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    body: bytes = field(repr=False, default=b"")
    content_type: str = OCTET


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = field(repr=False)


Flow = Generator[Request, Response, Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _check(resp: Response) -> Response:
    if resp.status >= 400:
        try:
            doc = json.loads(resp.body)
            code, message = str(doc["error"]), str(doc["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", resp.body[:200].decode("utf-8", "replace")
        raise ServerRejected(resp.status, code, message)
    return resp


def pinned_key_from_json(doc: dict[str, Any]) -> PinnedServerKey:
    return PinnedServerKey(
        key_id=str(doc["key_id"]),
        algorithm=str(doc["algorithm"]),
        public_key=base64.b64decode(doc["public_key"], validate=True),
    )


def enroll_flow(
    *,
    server_url: str,
    token: str,
    device_id: str,
    algorithm: str,
    rng: crypto.Rng,
) -> Generator[Request, Response, DeviceIdentity]:
    key = crypto.signature(algorithm).generate(rng)
    public = key.public_key().public_bytes()
    proof = key.sign(
        enrollment_proof_message(device_id, algorithm, public, token), labels.SIG_ENROLLMENT
    )
    body = json.dumps(
        {
            "token": token,
            "device_id": device_id,
            "algorithm": algorithm,
            "public_key": _b64(public),
            "proof": _b64(proof),
        }
    ).encode()
    resp = _check((yield Request("POST", "/v1/enroll", body, "application/json")))
    doc = json.loads(resp.body)
    pinned = pinned_key_from_json(doc["server_key"])
    binding = base64.b64decode(doc["server_key_binding"], validate=True)
    if not crypto.constant_time_equal(binding, server_key_binding(token, device_id, pinned)):
        raise ServerRejected(0, "server_key_unverified", "server key binding did not verify")
    return DeviceIdentity(
        device_id=device_id,
        algorithm=algorithm,
        seed=key.private_bytes(),
        server_url=server_url,
        server_keys=(pinned,),
    )


@dataclass(slots=True)
class Connected:
    session: Session
    server_keys: tuple[PinnedServerKey, ...]
    handshake_seconds: float


def connect_flow(
    identity: DeviceIdentity,
    *,
    clock: Callable[[], float],
    rng: crypto.Rng,
    ephemeral_keys: dict[str, crypto.KemPrivateKey] | None = None,
) -> Generator[Request, Response, Connected]:
    """Handshake over HTTP: hello, then finish; returns the session and current server keys."""
    started = clock()
    hs = ClientHandshake(
        device_id=identity.device_id,
        identity=identity.signing_key(),
        identity_algorithm=identity.algorithm,
        server_key=identity.server_key,
        ephemeral_keys=ephemeral_keys,
    )
    hello = hs.client_hello(now=int(clock()), rng=rng)
    server_hello = _check((yield Request("POST", "/v1/handshake/hello", hello))).body
    finish = hs.receive_server_hello(server_hello)
    resp = _check((yield Request("POST", "/v1/handshake/finish", finish)))
    assert hs.session is not None  # set by receive_server_hello
    # The finish answer is a control record sealed in the new session: authentic news about the
    # server's current static keys, so the device can follow a key rotation.
    control = hs.session.open(resp.body, now=clock())
    doc = json.loads(control.plaintext)
    keys = tuple(pinned_key_from_json(k) for k in doc["server_keys"])
    return Connected(hs.session, keys, clock() - started)


def record_flow(
    session: Session, payload: bytes, *, purpose: str, clock: Callable[[], float]
) -> Generator[Request, Response, Record]:
    """Send one sealed record and open the server's sealed answer."""
    record = session.seal(payload, now=clock(), purpose=purpose)
    path = f"/v1/sessions/{session.session_id.hex()}/records"
    resp = _check((yield Request("POST", path, record)))
    return session.open(resp.body, now=clock())


def identity_version_flow(
    session: Session, *, clock: Callable[[], float]
) -> Generator[Request, Response, int]:
    """Ask the server, inside the session, which version of the identity key it holds."""
    answer = yield from record_flow(
        session, b'{"op": "identity"}', purpose="control", clock=clock
    )
    return int(json.loads(answer.plaintext)["key_version"])


def rotation_request(
    identity: DeviceIdentity, version: int, algorithm: str, rng: crypto.Rng
) -> tuple[DeviceIdentity, bytes]:
    """A new identity key and the control record that asks the server to switch to it,
    signed by the current key (authorisation) and the new one (possession)."""
    new_key = crypto.signature(algorithm).generate(rng)
    public = new_key.public_key().public_bytes()
    message = key_rotation_message(identity.device_id, version, algorithm, public)
    payload = {
        "op": "rotate-identity",
        "algorithm": algorithm,
        "public_key": _b64(public),
        "current_signature": _b64(identity.signing_key().sign(message, labels.SIG_KEY_ROTATION)),
        "new_signature": _b64(new_key.sign(message, labels.SIG_KEY_ROTATION)),
    }
    rotated = replace(identity, algorithm=algorithm, seed=new_key.private_bytes())
    return rotated, json.dumps(payload).encode()
