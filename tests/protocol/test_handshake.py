"""The three-message handshake (docs/PROTOCOL.md sections 3, 5, 6, 9, 10 and 11).

Mutual authentication, agreement on keys for every available suite, negotiation and downgrade
protection, freshness (timestamp window and nonce), device binding, server-key pinning, the
biscuit, and the state machine's refusal of messages out of order. Byte-by-byte tampering of
each message is in ``test_handshake_tamper.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from qflare import crypto
from qflare.errors import (
    HandshakeFailed,
    LocalProtocolError,
    QflareError,
    StoreUnavailable,
    UnsupportedAlgorithm,
)
from qflare.protocol import (
    ALL_SUITES,
    DEFAULT_SUITE,
    BiscuitKeys,
    ClientFinish,
    ClientHello,
    Direction,
    PinnedServerKey,
    ServerHello,
    ServerPolicy,
    ServerStaticKey,
    Session,
    Suite,
)
from qflare.protocol.suites import (
    HYBRID_P384_MLDSA87,
    HYBRID_X25519_MLDSA87,
    PURE_PQ_MLDSA44,
    require_suites,
)

from .support import NOW, SERVER_KEY_ID, Device, NonceSet, ShakeRng, World, never_seen, pin

PURPOSES_TO_CHECK = ("encryption", "fl-update")


def assert_keys_agree(device: Session, server: Session, now: int = NOW + 2) -> None:
    """A record sealed by either side opens on the other, for each purpose, both ways."""
    assert device.session_id == server.session_id
    assert device.suite == server.suite
    assert device.role is Direction.DEVICE_TO_SERVER
    assert server.role is Direction.SERVER_TO_DEVICE
    for purpose in PURPOSES_TO_CHECK:
        up = f"update via {purpose}".encode()
        rec = server.open(device.seal(up, now=now, purpose=purpose), now=now)
        assert (rec.plaintext, rec.purpose) == (up, purpose)
        down = f"model via {purpose}".encode()
        rec = device.open(server.seal(down, now=now, purpose=purpose), now=now)
        assert (rec.plaintext, rec.purpose) == (down, purpose)
    epoch = device.epoch(now)
    for direction in (0, 1):
        assert device.schedule.derive("fl-update", direction, epoch) == server.schedule.derive(
            "fl-update", direction, epoch
        )


@contextmanager
def fails(reason: str | None = None) -> Iterator[pytest.ExceptionInfo[HandshakeFailed]]:
    """Expect ``HandshakeFailed``, and when given, this ``reason``."""
    with pytest.raises(HandshakeFailed) as info:
        yield info
    if reason is not None:
        assert info.value.reason == reason


# --- Happy paths ----------------------------------------------------------------------------


def test_default_suite_handshake(world: World) -> None:
    run = world.run()
    assert run.client.state == "established"
    assert run.established.device_id == "dev-a"
    assert run.established.server_key_id == SERVER_KEY_ID
    assert run.device.suite == DEFAULT_SUITE
    assert ServerHello.decode(run.server_hello).suite == DEFAULT_SUITE.id
    assert ClientHello.decode(run.client_hello).suites == (DEFAULT_SUITE.id,)
    assert_keys_agree(run.device, run.server)


def test_handshake_helper_returns_both_sessions(handshake) -> None:
    device, established = handshake()
    assert established.device_id == "dev-a"
    assert_keys_agree(device, established.session)


def test_two_handshakes_give_independent_sessions(world: World) -> None:
    one, two = world.run(), world.run()
    assert one.device.session_id != two.device.session_id
    epoch = one.device.epoch(NOW)
    assert one.device.schedule.derive("encryption", 0, epoch) != two.device.schedule.derive(
        "encryption", 0, epoch
    )


def _suite_unavailable(suite: Suite) -> str | None:
    try:
        require_suites([suite])
    except UnsupportedAlgorithm as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: f"0x{s.id:04x}")
def test_every_available_suite(world: World, suite: Suite) -> None:
    missing = _suite_unavailable(suite)
    if missing:
        pytest.skip(f"{suite.name}: {missing}")
    identity = crypto.signature(suite.signature).generate(ShakeRng(suite.name.encode()))
    world.devices["dev-s"] = Device("dev-s", suite.signature, identity)
    policy = ServerPolicy(suites=(suite,))
    run = world.run("dev-s", policy=policy, suites=[suite])
    assert run.device.suite == suite
    assert run.server.suite == suite
    assert ServerHello.decode(run.server_hello).suite == suite.id
    assert_keys_agree(run.device, run.server)


def test_server_picks_its_own_preference_among_offered(world: World, key_rng: ShakeRng) -> None:
    identity = crypto.signature("ML-DSA-87").generate(key_rng)
    world.devices["dev-87"] = Device("dev-87", "ML-DSA-87", identity)
    offer = [HYBRID_X25519_MLDSA87, HYBRID_P384_MLDSA87]
    for preference, expected in [
        ((HYBRID_P384_MLDSA87, HYBRID_X25519_MLDSA87), HYBRID_P384_MLDSA87),
        ((HYBRID_X25519_MLDSA87, HYBRID_P384_MLDSA87), HYBRID_X25519_MLDSA87),
        ((DEFAULT_SUITE, HYBRID_P384_MLDSA87), HYBRID_P384_MLDSA87),
    ]:
        run = world.run("dev-87", policy=ServerPolicy(suites=preference), suites=offer)
        assert run.device.suite == expected
        assert run.server.suite == expected
        assert_keys_agree(run.device, run.server)


def test_no_common_suite(world: World) -> None:
    client = world.client()
    hello = client.client_hello(now=NOW, rng=world.rng)
    server = world.server(policy=ServerPolicy(suites=(PURE_PQ_MLDSA44,)))
    server.receive_client_hello(hello, now=NOW)
    with fails("no-common-suite"):
        server.authenticate(world.devices["dev-a"].key)
    assert server.state == "failed"


def test_client_offers_only_suites_of_its_key(world: World) -> None:
    with pytest.raises(ValueError):
        world.client(suites=[HYBRID_X25519_MLDSA87])  # an ML-DSA-87 suite for an ML-DSA-44 key


def test_client_erases_ephemeral_secrets_after_server_hello(world: World) -> None:
    # Forward secrecy (PROTOCOL.md 6): the ephemeral private keys and the static-KEM secret go
    # as soon as ServerHello is processed.
    client = world.client()
    hello = client.client_hello(now=NOW, rng=world.rng)
    assert client._ephemeral and client._static_secret
    client.receive_server_hello(world.answer(hello))
    assert client._ephemeral == {}
    assert client._static_secret == b""


def _bad_server_hellos(sh: bytes) -> dict[str, bytes]:
    msg = ServerHello.decode(sh)
    return {
        "truncated": sh[:-1],
        "finished-mac": dataclasses.replace(msg, finished=bytes(len(msg.finished))).encode(),
        "downgrade": dataclasses.replace(msg, suite=0x0102).encode(),
        "ephemeral-ciphertext-length": dataclasses.replace(
            msg, ephemeral_ciphertext=msg.ephemeral_ciphertext[:-1]
        ).encode(),
    }


@pytest.mark.parametrize(
    "bad", ["truncated", "finished-mac", "downgrade", "ephemeral-ciphertext-length"]
)
def test_failed_server_hello_erases_the_clients_ephemeral_secrets(world: World, bad: str) -> None:
    # Forward secrecy does not depend on the handshake succeeding: a forged or broken
    # ServerHello must not leave the ephemeral private keys and the static secret behind.
    client = world.client()
    sh = world.answer(client.client_hello(now=NOW, rng=world.rng))
    assert client._ephemeral and client._static_secret
    with fails():
        client.receive_server_hello(_bad_server_hellos(sh)[bad])
    assert client.state == "failed"
    assert client._ephemeral == {}
    assert client._static_secret == b""
    assert client.session is None


def test_client_installs_no_session_when_a_late_step_fails(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Everything checks out, then building the ClientFinish fails: the handshake is FAILED,
    # so it must not hand out a session either (no half state).
    def broken(**_: object) -> ClientFinish:
        raise ValueError("cannot build ClientFinish")

    client = world.client()
    sh = world.answer(client.client_hello(now=NOW, rng=world.rng))
    monkeypatch.setattr("qflare.protocol.handshake.ClientFinish", broken)
    with fails("server-hello"):
        client.receive_server_hello(sh)
    assert client.state == "failed"
    assert client.session is None
    assert client._ephemeral == {}


class _FailingRng:
    """An rng that works for the first ``calls`` calls, then breaks in the given way."""

    def __init__(self, inner: Callable[[int], bytes], calls: int, broken: str) -> None:
        self.inner, self.left, self.broken = inner, calls, broken

    def __call__(self, n: int) -> bytes:
        self.left -= 1
        if self.left >= 0:
            return self.inner(n)
        if self.broken == "raises":
            raise RuntimeError("entropy source gone")
        return self.inner(n - 1)  # one byte short


def test_failed_client_hello_erases_what_it_made(world: World) -> None:
    # ML-KEM and X25519 key generation draw twice, then the nonce draw comes up short.
    client = world.client()
    with fails():
        client.client_hello(now=NOW, rng=_FailingRng(world.rng, 2, "short"))
    assert client.state == "failed"
    assert client._ephemeral == {}
    assert client._static_secret == b""


def test_client_hello_with_an_rng_that_raises_fails_and_reraises(world: World) -> None:
    client = world.client()
    with pytest.raises(RuntimeError, match="entropy source gone"):
        client.client_hello(now=NOW, rng=_FailingRng(world.rng, 2, "raises"))
    assert client.state == "failed"  # not left waiting for a ServerHello it never asked for
    assert client._ephemeral == {}
    assert client._static_secret == b""
    with pytest.raises(LocalProtocolError):
        client.client_hello(now=NOW, rng=world.rng)


# --- Order: the state machine ----------------------------------------------------------------


def test_client_hello_twice(world: World) -> None:
    client = world.client()
    client.client_hello(now=NOW, rng=world.rng)
    with pytest.raises(LocalProtocolError):
        client.client_hello(now=NOW, rng=world.rng)
    assert client.state == "wait-server-hello"


def test_server_hello_before_client_hello(world: World) -> None:
    other = world.client()
    sh = world.answer(other.client_hello(now=NOW, rng=world.rng))
    client = world.client()
    with pytest.raises(LocalProtocolError):
        client.receive_server_hello(sh)
    assert client.state == "start"


def test_server_hello_received_twice(world: World) -> None:
    client = world.client()
    sh = world.answer(client.client_hello(now=NOW, rng=world.rng))
    client.receive_server_hello(sh)
    with pytest.raises(LocalProtocolError):
        client.receive_server_hello(sh)
    assert client.state == "established"


def test_authenticate_before_client_hello(world: World) -> None:
    server = world.server()
    with pytest.raises(LocalProtocolError):
        server.authenticate(world.devices["dev-a"].key)
    assert server.state == "start"


def test_server_hello_before_authenticate(world: World) -> None:
    server = world.server()
    server.receive_client_hello(world.client().client_hello(now=NOW, rng=world.rng), now=NOW)
    with pytest.raises(LocalProtocolError):
        server.server_hello(rng=world.rng, seen_before=NonceSet())
    assert server.state == "hello-received"


def test_server_hello_twice_and_client_hello_twice(world: World) -> None:
    hello = world.client().client_hello(now=NOW, rng=world.rng)
    server = world.server()
    server.receive_client_hello(hello, now=NOW)
    with pytest.raises(LocalProtocolError):
        server.receive_client_hello(hello, now=NOW)
    server.authenticate(world.devices["dev-a"].key)
    with pytest.raises(LocalProtocolError):
        server.authenticate(world.devices["dev-a"].key)
    seen = NonceSet()
    server.server_hello(rng=world.rng, seen_before=seen)
    with pytest.raises(LocalProtocolError):
        server.server_hello(rng=world.rng, seen_before=seen)
    assert seen.calls == 1
    assert server.state == "server-hello-sent"


def test_client_finish_on_the_hello_path_object(world: World) -> None:
    client = world.client()
    hello = client.client_hello(now=NOW, rng=world.rng)
    server = world.server()
    server.receive_client_hello(hello, now=NOW)
    server.authenticate(world.devices["dev-a"].key)
    cf = client.receive_server_hello(server.server_hello(rng=world.rng, seen_before=NonceSet()))
    with pytest.raises(LocalProtocolError):
        server.receive_client_finish(cf, now=NOW)
    # ... while a fresh object (any replica) finishes it.
    assert world.finish(cf).session.session_id == client.session.session_id  # type: ignore[union-attr]


def test_client_finish_twice_on_one_object(world: World) -> None:
    run = world.run()
    server = world.server()
    server.receive_client_finish(run.client_finish, now=NOW + 1)
    with pytest.raises(LocalProtocolError):
        server.receive_client_finish(run.client_finish, now=NOW + 1)
    with pytest.raises(LocalProtocolError):
        server.receive_client_hello(run.client_hello, now=NOW)


def test_failed_client_cannot_be_reused(world: World) -> None:
    client = world.client()
    sh = world.answer(client.client_hello(now=NOW, rng=world.rng))
    with fails():
        client.receive_server_hello(sh[:-1])
    assert client.state == "failed"
    assert client.session is None
    with pytest.raises(LocalProtocolError):
        client.receive_server_hello(sh)  # the genuine ServerHello no longer helps
    with pytest.raises(LocalProtocolError):
        client.client_hello(now=NOW, rng=world.rng)
    assert client.state == "failed"


def test_failed_server_cannot_be_reused(world: World) -> None:
    hello = world.client().client_hello(now=NOW, rng=world.rng)
    server = world.server()
    with fails("malformed-message"):
        server.receive_client_hello(hello[:-1], now=NOW)
    assert server.state == "failed"
    for call in (
        lambda: server.receive_client_hello(hello, now=NOW),
        lambda: server.authenticate(world.devices["dev-a"].key),
        lambda: server.server_hello(rng=world.rng, seen_before=NonceSet()),
        lambda: server.receive_client_finish(b"", now=NOW),
    ):
        with pytest.raises(LocalProtocolError):
            call()
        assert server.state == "failed"


# --- Downgrade -----------------------------------------------------------------------------


BOTH_44 = [DEFAULT_SUITE, PURE_PQ_MLDSA44]
SERVER_BOTH = ServerPolicy(suites=(DEFAULT_SUITE, PURE_PQ_MLDSA44))


def _strip(hello: bytes, keep: Suite) -> bytes:
    msg = ClientHello.decode(hello)
    assert keep.id in msg.suites and len(msg.suites) > 1
    return dataclasses.replace(
        msg,
        suites=(keep.id,),
        key_shares=tuple((t, k) for t, k in msg.key_shares if t == keep.id),
    ).encode()


@pytest.mark.parametrize("keep", BOTH_44, ids=lambda s: f"keep-0x{s.id:04x}")
def test_stripping_a_suite_from_the_offer_breaks_the_signature(world: World, keep: Suite):
    hello = world.client(suites=BOTH_44).client_hello(now=NOW, rng=world.rng)
    assert len(ClientHello.decode(hello).key_shares) == 2  # one share per distinct KEM
    server = world.server(policy=SERVER_BOTH)
    server.receive_client_hello(_strip(hello, keep), now=NOW)
    with fails("signature-invalid"):
        server.authenticate(world.devices["dev-a"].key)


def test_reordering_the_offer_breaks_the_signature(world: World) -> None:
    hello = ClientHello.decode(world.client(suites=BOTH_44).client_hello(now=NOW, rng=world.rng))
    reordered = dataclasses.replace(hello, suites=tuple(reversed(hello.suites))).encode()
    server = world.server(policy=SERVER_BOTH)
    server.receive_client_hello(reordered, now=NOW)
    with fails("signature-invalid"):
        server.authenticate(world.devices["dev-a"].key)


@pytest.mark.parametrize("suite_id", [0x0102, 0x0103, 0x0201, 0x0301, 0x7777, 0x0000])
def test_server_choosing_a_suite_not_offered_is_a_downgrade(world: World, suite_id: int):
    client = world.client()
    sh = ServerHello.decode(world.answer(client.client_hello(now=NOW, rng=world.rng)))
    with fails("downgrade"):
        client.receive_server_hello(dataclasses.replace(sh, suite=suite_id).encode())
    assert client.state == "failed"


@pytest.mark.parametrize(
    ("chosen", "swapped"),
    [(DEFAULT_SUITE, PURE_PQ_MLDSA44), (PURE_PQ_MLDSA44, DEFAULT_SUITE)],
    ids=["0x0101->0x0301", "0x0301->0x0101"],
)
def test_swapping_the_choice_to_another_offered_suite_fails(
    world: World, chosen: Suite, swapped: Suite
) -> None:
    client = world.client(suites=BOTH_44)
    sh = ServerHello.decode(
        world.answer(
            client.client_hello(now=NOW, rng=world.rng),
            policy=ServerPolicy(suites=(chosen,)),
        )
    )
    assert sh.suite == chosen.id
    with fails():
        client.receive_server_hello(dataclasses.replace(sh, suite=swapped.id).encode())
    assert client.session is None


# --- Freshness ----------------------------------------------------------------------------


def _hello_at(world: World, timestamp: int) -> bytes:
    return world.client().client_hello(now=timestamp, rng=world.rng)


@pytest.mark.parametrize("skew", [-121, 121, -10_000, 10_000, -NOW])
def test_timestamp_outside_the_window_rejected(world: World, skew: int) -> None:
    server = world.server()
    with fails("timestamp-out-of-window"):
        server.receive_client_hello(_hello_at(world, NOW + skew), now=NOW)
    assert server.state == "failed"


@pytest.mark.parametrize("skew", [-120, -1, 0, 1, 120])
def test_timestamp_inside_the_window_accepted(world: World, skew: int) -> None:
    client = world.client()
    hello = client.client_hello(now=NOW + skew, rng=world.rng)
    cf = client.receive_server_hello(world.answer(hello, now=NOW))
    assert_keys_agree(client.session, world.finish(cf).session)  # type: ignore[arg-type]


@pytest.mark.parametrize(("skew", "ok"), [(-10, True), (10, True), (-11, False), (11, False)])
def test_custom_timestamp_window(world: World, skew: int, ok: bool) -> None:
    server = world.server(policy=ServerPolicy(timestamp_window=10))
    hello = _hello_at(world, NOW + skew)
    if ok:
        assert server.receive_client_hello(hello, now=NOW).timestamp == NOW + skew
    else:
        with fails("timestamp-out-of-window"):
            server.receive_client_hello(hello, now=NOW)


def test_nonce_seen_before_is_a_replay(world: World) -> None:
    hello = _hello_at(world, NOW)
    calls: list[tuple[str, bytes, int]] = []

    def seen_before(device_id: str, nonce: bytes, timestamp: int) -> bool:
        calls.append((device_id, nonce, timestamp))
        return True

    server = world.server()
    server.receive_client_hello(hello, now=NOW)
    server.authenticate(world.devices["dev-a"].key)
    with fails("replay"):
        server.server_hello(rng=world.rng, seen_before=seen_before)
    assert server.state == "failed"
    parsed = ClientHello.decode(hello)
    assert calls == [(parsed.device_id, parsed.nonce, parsed.timestamp)]


def test_identical_client_hello_twice_is_refused_by_a_nonce_set(world: World) -> None:
    nonces = NonceSet()
    hello = _hello_at(world, NOW)
    world.answer(hello, seen_before=nonces)
    with fails("replay"):
        world.answer(hello, now=NOW + 5, seen_before=nonces)
    # A new hello from the same device carries a fresh nonce and goes through.
    world.answer(_hello_at(world, NOW), seen_before=nonces)
    assert nonces.calls == 3


def test_unauthenticated_hello_does_not_burn_the_nonce(world: World, device_b: Device) -> None:
    nonces = NonceSet()
    hello = _hello_at(world, NOW)
    forged = hello[:-1] + bytes([hello[-1] ^ 1])  # last signature byte
    server = world.server()
    server.receive_client_hello(forged, now=NOW)
    with fails("signature-invalid"):
        server.authenticate(world.devices["dev-a"].key)
    assert nonces.calls == 0
    world.answer(hello, seen_before=nonces)  # the genuine hello is still fresh
    assert nonces.calls == 1


def test_nonce_store_unavailable_fails_closed(world: World) -> None:
    down = StoreUnavailable("database down")

    def seen_before(device_id: str, nonce: bytes, timestamp: int) -> bool:
        raise down

    server = world.server()
    server.receive_client_hello(_hello_at(world, NOW), now=NOW)
    server.authenticate(world.devices["dev-a"].key)
    with fails("nonce-check-unavailable") as info:
        server.server_hello(rng=world.rng, seen_before=seen_before)
    assert info.value.__cause__ is down  # the caller can still tell an outage from a replay
    assert server.state == "failed"
    with pytest.raises(LocalProtocolError):
        server.server_hello(rng=world.rng, seen_before=never_seen)


class _Interrupted(BaseException):
    pass


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("bug in the store adapter"),
        ValueError("bad row"),
        KeyError("x"),
        _Interrupted(),
    ],
    ids=["RuntimeError", "ValueError", "KeyError", "BaseException"],
)
def test_nonce_check_raising_a_foreign_error_fails_the_handshake_and_reraises_it(
    world: World, error: BaseException
) -> None:
    # PROTOCOL.md 9: any failure moves the machine to FAILED. A callback's own bug is not a
    # handshake failure to classify, so it propagates unchanged, but it must not leave the
    # server claiming SERVER_HELLO_SENT for a ServerHello it never produced.
    def seen_before(device_id: str, nonce: bytes, timestamp: int) -> bool:
        raise error

    server = world.server()
    server.receive_client_hello(_hello_at(world, NOW), now=NOW)
    server.authenticate(world.devices["dev-a"].key)
    with pytest.raises(type(error)) as info:
        server.server_hello(rng=world.rng, seen_before=seen_before)
    assert info.value is error
    assert server.state == "failed"
    with pytest.raises(LocalProtocolError):
        server.server_hello(rng=world.rng, seen_before=never_seen)


def test_server_hello_with_an_rng_that_raises_fails_and_reraises(world: World) -> None:
    server = world.server()
    server.receive_client_hello(_hello_at(world, NOW), now=NOW)
    server.authenticate(world.devices["dev-a"].key)
    with pytest.raises(RuntimeError, match="entropy source gone"):
        server.server_hello(rng=_FailingRng(world.rng, 0, "raises"), seen_before=never_seen)
    assert server.state == "failed"


# --- Identities and keys --------------------------------------------------------------------


def test_another_devices_key_cannot_sign_for_a(world: World, device_b: Device) -> None:
    # B's key signs a hello that claims to be A: the server verifies with A's registered key.
    impostor = world.client("dev-a", identity=device_b.identity)
    hello = impostor.client_hello(now=NOW, rng=world.rng)
    server = world.server()
    assert server.receive_client_hello(hello, now=NOW).device_id == "dev-a"
    with fails("signature-invalid"):
        server.authenticate(world.devices["dev-a"].key)


def test_device_key_of_another_id_is_a_mismatch(world: World, device_b: Device) -> None:
    server = world.server()
    server.receive_client_hello(_hello_at(world, NOW), now=NOW)
    with fails("device-mismatch"):
        server.authenticate(device_b.key)


def test_device_key_of_another_algorithm_is_refused(world: World, key_rng: ShakeRng) -> None:
    other = Device("dev-a", "ML-DSA-65", crypto.signature("ML-DSA-65").generate(key_rng))
    server = world.server()
    server.receive_client_hello(_hello_at(world, NOW), now=NOW)
    with fails():
        server.authenticate(other.key)


def test_established_session_names_the_device(world: World) -> None:
    a, b = world.run("dev-a"), world.run("dev-b")
    assert (a.established.device_id, b.established.device_id) == ("dev-a", "dev-b")


def test_unknown_server_key_id(world: World) -> None:
    pinned = dataclasses.replace(world.pinned, key_id="srv-9")
    hello = world.client(pinned=pinned).client_hello(now=NOW, rng=world.rng)
    server = world.server()
    with fails("unknown-server-key"):
        server.receive_client_hello(hello, now=NOW)


def test_device_pinned_to_another_static_key_fails_at_server_finished(
    world: World, other_static_key: ServerStaticKey
) -> None:
    # The device encapsulates to a key the server does not hold. The server cannot tell
    # (implicit rejection); the device finds out because the server's Finished MAC is wrong.
    client = world.client(pinned=pin(other_static_key))
    sh = world.answer(client.client_hello(now=NOW, rng=world.rng))
    with fails("server-finished-invalid"):
        client.receive_server_hello(sh)
    assert client.session is None


def test_server_holding_only_another_key_under_the_pinned_id(
    world: World, other_static_key: ServerStaticKey
) -> None:
    # The reverse: a server impersonator that knows the key id but not the private key.
    client = world.client()
    hello = client.client_hello(now=NOW, rng=world.rng)
    impostor = world.server(static_keys={SERVER_KEY_ID: other_static_key})
    impostor.receive_client_hello(hello, now=NOW)
    impostor.authenticate(world.devices["dev-a"].key)
    sh = impostor.server_hello(rng=world.rng, seen_before=NonceSet())
    with fails("server-finished-invalid"):
        client.receive_server_hello(sh)


def test_pinned_key_of_wrong_length_fails_locally(world: World) -> None:
    pinned = PinnedServerKey(
        key_id=SERVER_KEY_ID, algorithm=world.static.algorithm, public_key=b"x"
    )
    client = world.client(pinned=pinned)
    with pytest.raises(QflareError):
        client.client_hello(now=NOW, rng=world.rng)
    assert client.state == "failed"


# --- The biscuit ----------------------------------------------------------------------------


def test_expired_biscuit(world: World) -> None:
    run_cf = world.run().client_finish
    lifetime = world.policy.biscuit_lifetime
    with fails("biscuit-expired"):
        world.finish(run_cf, now=NOW + lifetime + 1)
    # expires_at itself is still inside the lifetime
    assert world.finish(run_cf, now=NOW + lifetime).device_id == "dev-a"


def test_custom_biscuit_lifetime(world: World) -> None:
    policy = ServerPolicy(biscuit_lifetime=5)
    client = world.client()
    cf = client.receive_server_hello(
        world.answer(client.client_hello(now=NOW, rng=world.rng), policy=policy)
    )
    world.finish(cf, now=NOW + 5)
    with fails("biscuit-expired"):
        world.finish(cf, now=NOW + 6)


def _swap_biscuit(cf: bytes, donor: bytes) -> bytes:
    return dataclasses.replace(
        ClientFinish.decode(cf), biscuit=ClientFinish.decode(donor).biscuit
    ).encode()


def test_biscuit_of_another_session_refused(world: World) -> None:
    one, two = world.run(), world.run()
    with fails("biscuit-invalid"):
        world.finish(_swap_biscuit(one.client_finish, two.client_finish))
    # ... and the other way round: the right biscuit under another session id.
    moved = dataclasses.replace(
        ClientFinish.decode(one.client_finish), session_id=two.device.session_id
    ).encode()
    with fails("biscuit-invalid"):
        world.finish(moved)


def test_biscuit_of_another_device_refused(world: World) -> None:
    a, b = world.run("dev-a"), world.run("dev-b")
    forged = dataclasses.replace(
        ClientFinish.decode(a.client_finish),
        session_id=b.device.session_id,
        biscuit=ClientFinish.decode(b.client_finish).biscuit,
    ).encode()
    with fails("client-finished-invalid"):
        world.finish(forged)


def test_biscuit_key_no_longer_held(world: World) -> None:
    cf = world.run().client_finish
    with fails("biscuit-unknown-key"):
        world.finish(cf, biscuits=BiscuitKeys({2: world.rng(32)}, 2))


def test_biscuit_key_with_the_same_id_but_other_bytes(world: World) -> None:
    cf = world.run().client_finish
    with fails("biscuit-invalid"):
        world.finish(cf, biscuits=BiscuitKeys({1: world.rng(32)}, 1))


def test_biscuit_key_rotation_keeps_handshakes_in_flight(world: World, biscuit_secret: bytes):
    cf = world.run().client_finish  # sealed under key id 1
    rotated = BiscuitKeys({1: biscuit_secret, 2: world.rng(32)}, 2)
    assert world.finish(cf, biscuits=rotated).device_id == "dev-a"


def test_biscuit_keys_current_must_exist() -> None:
    with pytest.raises(ValueError):
        BiscuitKeys({1: bytes(32)}, 2)


@pytest.mark.parametrize("key_id", [256, -1, 2**64, True, "1"])
def test_biscuit_key_id_must_fit_the_wire(key_id: int) -> None:
    with pytest.raises(ValueError):
        BiscuitKeys({key_id: bytes(32)}, key_id)
    # ... also when it is not the current key: every id must be one a biscuit can carry.
    with pytest.raises(ValueError):
        BiscuitKeys({2: bytes(32), key_id: bytes(32)}, 2)


@pytest.mark.parametrize("key_id", [0, 255])
def test_biscuit_key_ids_at_the_edges_of_the_byte_work(world: World, key_id: int) -> None:
    world.biscuits = BiscuitKeys({key_id: bytes(range(32))}, key_id)
    run = world.run()
    assert ServerHello.decode(run.server_hello).biscuit[0] == key_id
    assert_keys_agree(run.device, run.server)


def test_retransmitted_client_finish_gives_the_same_session(world: World) -> None:
    run = world.run()
    again = world.finish(run.client_finish, now=NOW + 3)
    first, second = run.server, again.session
    assert first.session_id == second.session_id == run.device.session_id
    assert again.device_id == run.established.device_id
    # Same keys: one device record opens on both server-side sessions...
    record = run.device.seal(b"update", now=NOW + 4)
    assert first.open(record, now=NOW + 4).plaintext == b"update"
    assert second.open(record, now=NOW + 4).plaintext == b"update"
    # ... which is exactly why a store must install a session only if its id is absent: two
    # installed copies would seal different plaintexts under the same key and nonce.
    r1, r2 = first.seal(b"A" * 16, now=NOW + 5), second.seal(b"B" * 16, now=NOW + 5)
    assert r1[:35] == r2[:35]  # same header: same epoch, direction and sequence number
    keystream_1 = bytes(x ^ y for x, y in zip(r1[35:51], b"A" * 16, strict=True))
    keystream_2 = bytes(x ^ y for x, y in zip(r2[35:51], b"B" * 16, strict=True))
    assert keystream_1 == keystream_2


# --- What a peer learns ----------------------------------------------------------------------


def test_handshake_failed_message_is_the_same_for_every_reason(
    world: World, device_b: Device, other_static_key: ServerStaticKey
) -> None:
    caught: list[HandshakeFailed] = []

    def catch(call: Callable[[], object]) -> None:
        with pytest.raises(HandshakeFailed) as info:
            call()
        caught.append(info.value)

    hello = _hello_at(world, NOW)
    catch(lambda: world.server().receive_client_hello(hello[:-1], now=NOW))
    catch(lambda: world.server().receive_client_hello(hello, now=NOW + 500))
    catch(
        lambda: world.answer(
            world.client("dev-a", identity=device_b.identity).client_hello(now=NOW, rng=world.rng)
        )
    )

    def mismatch() -> None:
        server = world.server()
        server.receive_client_hello(hello, now=NOW)
        server.authenticate(device_b.key)

    catch(mismatch)
    catch(lambda: world.answer(hello, seen_before=lambda *_: True))
    pinned = dataclasses.replace(world.pinned, key_id="srv-9")
    catch(lambda: world.answer(world.client(pinned=pinned).client_hello(now=NOW, rng=world.rng)))
    client = world.client(pinned=pin(other_static_key))
    sh = world.answer(client.client_hello(now=NOW, rng=world.rng))
    catch(lambda: client.receive_server_hello(sh))
    client = world.client()
    sh = ServerHello.decode(world.answer(client.client_hello(now=NOW, rng=world.rng)))
    catch(lambda: client.receive_server_hello(dataclasses.replace(sh, suite=0x0103).encode()))
    cf = world.run().client_finish
    catch(lambda: world.finish(cf, now=NOW + 1000))
    catch(lambda: world.finish(cf, biscuits=BiscuitKeys({9: bytes(32)}, 9)))
    catch(lambda: world.finish(cf[:-1] + bytes([cf[-1] ^ 1])))

    reasons = [e.reason for e in caught]
    assert len(set(reasons)) == len(reasons) == 11, reasons
    assert {str(e) for e in caught} == {"handshake failed"}
    assert {e.args for e in caught} == {("handshake failed",)}
