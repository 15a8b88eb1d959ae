"""Fixtures for the protocol tests: reproducible keys, a two-device fleet and a handshake helper.

Key generation is deterministic (ML-KEM, X25519 and ML-DSA keys come from seeds the rng
supplies), so a failure reproduces. KEM encapsulation and ML-DSA signing draw from OpenSSL and
are not reproducible byte for byte; no test depends on their exact bytes.

Long-lived keys are session-scoped (they are immutable); everything with state (rng, handshake
objects, sessions) is built per test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qflare import crypto
from qflare.protocol import BiscuitKeys, Established, ServerStaticKey, Session

from .support import SERVER_KEY_ID, STATIC_KEM, Device, ShakeRng, World


@pytest.fixture
def rng() -> ShakeRng:
    return ShakeRng(b"qflare/tests/protocol")


@pytest.fixture(scope="session")
def key_rng() -> ShakeRng:
    return ShakeRng(b"qflare/tests/protocol/keys")


@pytest.fixture(scope="session")
def static_key(key_rng: ShakeRng) -> ServerStaticKey:
    """The server's static ML-KEM-1024+X25519 key, which devices pin."""
    return ServerStaticKey(
        key_id=SERVER_KEY_ID, algorithm=STATIC_KEM, private=crypto.kem(STATIC_KEM).generate(key_rng)
    )


@pytest.fixture(scope="session")
def other_static_key(key_rng: ShakeRng) -> ServerStaticKey:
    """A second static key under the same id: what a device pinned to the wrong key holds."""
    return ServerStaticKey(
        key_id=SERVER_KEY_ID, algorithm=STATIC_KEM, private=crypto.kem(STATIC_KEM).generate(key_rng)
    )


def _device(device_id: str, rng: ShakeRng) -> Device:
    return Device(device_id, "ML-DSA-44", crypto.signature("ML-DSA-44").generate(rng))


@pytest.fixture(scope="session")
def device_a(key_rng: ShakeRng) -> Device:
    return _device("dev-a", key_rng)


@pytest.fixture(scope="session")
def device_b(key_rng: ShakeRng) -> Device:
    return _device("dev-b", key_rng)


@pytest.fixture(scope="session")
def biscuit_secret(key_rng: ShakeRng) -> bytes:
    return key_rng(32)


@pytest.fixture
def biscuits(biscuit_secret: bytes) -> BiscuitKeys:
    return BiscuitKeys({1: biscuit_secret}, 1)


@pytest.fixture
def world(
    static_key: ServerStaticKey,
    device_a: Device,
    device_b: Device,
    biscuits: BiscuitKeys,
    rng: ShakeRng,
) -> World:
    return World(
        static=static_key,
        devices={device_a.device_id: device_a, device_b.device_id: device_b},
        biscuits=biscuits,
        rng=rng,
    )


@pytest.fixture
def handshake(world: World) -> Callable[..., tuple[Session, Established]]:
    """Run a complete handshake; returns (device session, server ``Established``)."""
    return world.handshake


@pytest.fixture(scope="session")
def world_factory(
    static_key: ServerStaticKey, device_a: Device, device_b: Device, biscuit_secret: bytes
) -> Callable[[bytes], World]:
    """For hypothesis tests, which must not use function-scoped fixtures: a fresh world per
    example, seeded by the caller."""

    def make(seed: bytes) -> World:
        return World(
            static=static_key,
            devices={device_a.device_id: device_a, device_b.device_id: device_b},
            biscuits=BiscuitKeys({1: biscuit_secret}, 1),
            rng=ShakeRng(seed),
        )

    return make
