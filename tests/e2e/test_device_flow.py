"""A device enrolls, handshakes and exchanges sealed records with a real server over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qflare.client import DeviceClient
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
