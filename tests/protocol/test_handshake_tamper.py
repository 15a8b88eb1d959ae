"""Tampering with any byte of any handshake message fails the handshake (PROTOCOL.md 5, 6, 10).

Coverage: every byte of every message is flipped with mask 0x01 (lowest bit); ClientHello and
ClientFinish are also swept with mask 0xFF at every byte. For ServerHello the 0xFF sweep covers
every byte outside the ephemeral ciphertext and every 16th byte inside it (each ServerHello
flip needs a fresh handshake, ~2 ms). Each sweep asserts that the bytes it flipped touched every
field of the message, named by an independent reading of the layout in section 5, so a change
of layout cannot silently shrink coverage.

Where it must fail: ClientHello at the server's ``receive_client_hello``, ``authenticate`` or
``server_hello``; ServerHello at the device, except the biscuit's contents, which are outside
the transcript and must make the server's ``receive_client_finish`` fail instead; ClientFinish
at the server.
"""

from __future__ import annotations

import collections

import pytest

from qflare.errors import HandshakeFailed

from .support import (
    NOW,
    NonceSet,
    World,
    client_finish_fields,
    client_hello_fields,
    field_at,
    flip,
    server_hello_fields,
)


def _server_rejects_hello(world: World, data: bytes, nonces: NonceSet) -> str:
    """Run the server's hello path on ``data`` and return the failure reason."""
    server = world.server()
    try:
        hello = server.receive_client_hello(data, now=NOW)
        # The server looks the device up by the id the message claims; an id nobody enrolled
        # is refused by the registry before this point, which we model by using A's key.
        device = world.devices.get(hello.device_id, world.devices["dev-a"])
        server.authenticate(device.key)
        server.server_hello(rng=world.rng, seen_before=nonces)
    except HandshakeFailed as exc:
        assert server.state == "failed"
        return exc.reason
    raise AssertionError("tampered ClientHello accepted")


@pytest.mark.parametrize("mask", [0x01, 0xFF], ids=["bit0", "all-bits"])
def test_every_byte_of_client_hello(world: World, mask: int) -> None:
    hello = world.client().client_hello(now=NOW, rng=world.rng)
    fields = client_hello_fields(hello)
    nonces = NonceSet()
    reasons: collections.Counter[str] = collections.Counter()
    touched = set()
    for i in range(len(hello)):
        reasons[_server_rejects_hello(world, flip(hello, i, mask), nonces)] += 1
        touched.add(field_at(fields, i))
    assert touched == {name for name, _, _ in fields}
    # No tampered hello got past the signature, so none burned a nonce...
    assert nonces.calls == 0
    assert reasons["signature-invalid"] > len(hello) // 2
    # ... and the untouched hello still goes through: the sweep failed for the right reason.
    world.answer(hello, seen_before=nonces)


def _biscuit_body(fields: list[tuple[str, int, int]]) -> range:
    (start, end) = next((s, e) for name, s, e in fields if name == "biscuit")
    return range(start, end)


def _sweep_server_hello(world: World, indexes: list[int], mask: int) -> set[str]:
    """Flip each index of a fresh ServerHello; return the names of the fields touched."""
    touched: set[str] = set()
    for i in indexes:
        client = world.client()
        sh = world.answer(client.client_hello(now=NOW, rng=world.rng))
        fields = server_hello_fields(sh)
        name = field_at(fields, i)
        touched.add(name)
        tampered = flip(sh, i, mask)
        if i in _biscuit_body(fields):
            # Outside the transcript: the device cannot notice, the server must.
            cf = client.receive_server_hello(tampered)
            with pytest.raises(HandshakeFailed) as info:
                world.finish(cf)
            assert info.value.reason.startswith("biscuit-"), (i, info.value.reason)
        else:
            with pytest.raises(HandshakeFailed):
                client.receive_server_hello(tampered)
            assert client.state == "failed", (i, name)
            assert client.session is None
    return touched


def test_every_byte_of_server_hello_bit0(world: World) -> None:
    client = world.client()
    sh = world.answer(client.client_hello(now=NOW, rng=world.rng))
    fields = server_hello_fields(sh)
    touched = _sweep_server_hello(world, list(range(len(sh))), 0x01)
    assert touched == {name for name, _, _ in fields}
    world.finish(client.receive_server_hello(sh))  # the untouched message works


def test_server_hello_all_bits_every_field(world: World) -> None:
    sh = world.answer(world.client().client_hello(now=NOW, rng=world.rng))
    fields = server_hello_fields(sh)
    indexes = [
        i
        for name, start, end in fields
        for i in range(start, end)
        if name != "ephemeral_ciphertext" or (i - start) % 16 == 0 or i == end - 1
    ]
    touched = _sweep_server_hello(world, indexes, 0xFF)
    assert touched == {name for name, _, _ in fields}


@pytest.mark.parametrize("mask", [0x01, 0xFF], ids=["bit0", "all-bits"])
def test_every_byte_of_client_finish(world: World, mask: int) -> None:
    run = world.run()
    cf = run.client_finish
    fields = client_finish_fields(cf)
    touched = set()
    reasons: collections.Counter[str] = collections.Counter()
    for i in range(len(cf)):
        server = world.server()
        with pytest.raises(HandshakeFailed) as info:
            server.receive_client_finish(flip(cf, i, mask), now=NOW + 1)
        assert server.state == "failed"
        reasons[info.value.reason] += 1
        touched.add(field_at(fields, i))
    assert touched == {name for name, _, _ in fields}
    assert reasons["client-finished-invalid"] >= 32  # every byte of the MAC itself
    assert world.finish(cf).session.session_id == run.device.session_id
