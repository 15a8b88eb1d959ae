"""A device enrolls, handshakes and exchanges sealed records with a real server over HTTP."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qflare import crypto
from qflare.client import AsyncDeviceClient, DeviceClient, ServerRejected, keystore
from qflare.client.flow import rotation_request
from qflare.fl.model import decode_update, encode_update

from .conftest import LiveServer


def test_enroll_connect_send_and_close(live: LiveServer, tmp_path: Path) -> None:
    client = DeviceClient.enroll(live.url, live.issue_token(), "dev-1")
    with client:
        session = client.connect()
        assert session.session_id
        answer = client.send(b'{"op": "ping"}', purpose="control")
        assert json.loads(answer.plaintext) == {"pong": True}
        model = client.send(b'{"op": "model"}', purpose="control")
        round_no, weights, _ = decode_update(model.plaintext)
        assert (round_no, len(weights)) == (0, 4)
        ack = client.send(encode_update(0, np.ones(4), 10), purpose="fl-update")
        assert json.loads(ack.plaintext)["closed_round"] == 0


def test_identity_rotation(live: LiveServer, tmp_path: Path) -> None:
    path = tmp_path / "dev.key"
    client = DeviceClient.enroll(
        live.url, live.issue_token(), "dev-1", keystore_path=path, passphrase="pw"
    )
    old = client.identity
    with client:
        client.connect()
        with pytest.raises(ServerRejected) as refused:  # no configured suite signs with it
            client.rotate_identity("ML-DSA-65")
        assert refused.value.code == "unsupported_algorithm"
        assert client.identity == old
        assert not Path(f"{path}.pending").exists()
        client.rotate_identity()
        assert client.identity.algorithm == "ML-DSA-44"
        assert client.identity.seed != old.seed
        # The session of the old key goes on; the next handshake signs with the new key.
        assert json.loads(client.send(b'{"op": "ping"}', purpose="control").plaintext)
        client.connect()
        answer = client.send(b'{"op": "identity"}', purpose="control")
        assert json.loads(answer.plaintext)["key_version"] == 2
    # The keystore holds the new key and no pending copy is left.
    assert keystore.load(path, "pw") == client.identity
    assert not Path(f"{path}.pending").exists()
    [event] = live.events("device.key_rotated")
    assert event["device_id"] == "dev-1" and event["detail"]["key_version"] == "2"
    # The old key can no longer open a session.
    with DeviceClient(old) as stale, pytest.raises(ServerRejected) as refused:
        stale.connect()
    assert (refused.value.status, refused.value.code) == (401, "handshake_failed")


def test_a_rotation_signed_by_another_key_is_refused(live: LiveServer) -> None:
    client = DeviceClient.enroll(live.url, live.issue_token(), "dev-1")
    other = DeviceClient.enroll(live.url, live.issue_token(), "dev-2")
    with client, other:
        client.connect()
        # dev-2's key signs a rotation of dev-1's identity: the server refuses it.
        forged, payload = rotation_request(
            replace(other.identity, device_id="dev-1"), 1, "ML-DSA-44", crypto.system_rng
        )
        with pytest.raises(ServerRejected) as refused:
            client.send(payload, purpose="control")
        assert refused.value.code == "invalid_signature"
        answer = client.send(b'{"op": "identity"}', purpose="control")
        assert json.loads(answer.plaintext)["key_version"] == 1
    assert forged.seed != client.identity.seed
    assert live.events("signature.invalid")


async def test_identity_rotation_with_the_async_client(live: LiveServer, tmp_path: Path) -> None:
    token = await asyncio.to_thread(live.issue_token)
    client = await AsyncDeviceClient.enroll(
        live.url, token, "dev-a", keystore_path=tmp_path / "a.key", passphrase="pw"
    )
    async with client:
        await client.rotate_identity()
        await client.connect()
        answer = await client.send(b'{"op": "identity"}', purpose="control")
        assert json.loads(answer.plaintext)["key_version"] == 2
    assert keystore.load(tmp_path / "a.key", "pw") == client.identity
