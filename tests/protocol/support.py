"""Helpers shared by the protocol tests: a reproducible rng, a small fleet, and a wire layout.

The wire layout below is written from docs/PROTOCOL.md section 5 with ``struct``, independently
of ``qflare.protocol.codec``: the tests use it to build malformed messages the real encoder
refuses to produce, and to name the field each byte of a real message belongs to.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qflare import crypto
from qflare.protocol import (
    BiscuitKeys,
    ClientHandshake,
    DeviceKey,
    Established,
    PinnedServerKey,
    RekeyPolicy,
    ServerHandshake,
    ServerPolicy,
    ServerStaticKey,
    Session,
    Suite,
)

EPOCH_SECONDS = 300
# 10 s into an epoch: far enough from both boundaries that "now + a few seconds" stays in the
# same epoch, and tests that cross a boundary do so on purpose.
START_EPOCH = 5_666_667
NOW = EPOCH_SECONDS * START_EPOCH + 10
STATIC_KEM = "ML-KEM-1024+X25519"
SERVER_KEY_ID = "srv-1"


class ShakeRng:
    """A reproducible ``Rng``: SHAKE-256 over a seed and a call counter.

    Every call returns fresh bytes (the counter moves), so two nonces or session ids drawn in one
    test still differ, while a rerun of the test draws exactly the same ones.
    """

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        self._counter += 1
        data = self._seed + self._counter.to_bytes(8, "big")
        return hashlib.shake_256(data).digest(n)


def never_seen(device_id: str, nonce: bytes, timestamp: int) -> bool:
    return False


class NonceSet:
    """An in-memory ``seen_before``: check and record in one step, as the store must."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, bytes]] = set()
        self.calls = 0

    def __call__(self, device_id: str, nonce: bytes, timestamp: int) -> bool:
        self.calls += 1
        key = (device_id, bytes(nonce))
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


@dataclass(frozen=True)
class Device:
    device_id: str
    algorithm: str
    identity: crypto.SignaturePrivateKey = field(repr=False)

    @property
    def key(self) -> DeviceKey:
        return DeviceKey(
            device_id=self.device_id, algorithm=self.algorithm, public=self.identity.public_key()
        )


@dataclass
class Run:
    """Everything one complete handshake produced."""

    client: ClientHandshake
    client_hello: bytes
    server_hello: bytes
    client_finish: bytes
    established: Established

    @property
    def device(self) -> Session:
        assert self.client.session is not None
        return self.client.session

    @property
    def server(self) -> Session:
        return self.established.session


@dataclass
class World:
    """A server with one static key and a registry of devices, driven with a given rng."""

    static: ServerStaticKey
    devices: dict[str, Device]
    biscuits: BiscuitKeys
    rng: Callable[[int], bytes]
    policy: ServerPolicy = field(default_factory=ServerPolicy)

    @property
    def pinned(self) -> PinnedServerKey:
        return pin(self.static)

    def client(
        self,
        device_id: str = "dev-a",
        *,
        identity: crypto.SignaturePrivateKey | None = None,
        algorithm: str | None = None,
        suites: Sequence[Suite] | None = None,
        pinned: PinnedServerKey | None = None,
        grace: int = 1,
        rekey: RekeyPolicy | None = None,
    ) -> ClientHandshake:
        registered = self.devices.get(device_id)
        if identity is None:
            assert registered is not None, f"no identity for {device_id}"
            identity = registered.identity
        if algorithm is None:
            algorithm = registered.algorithm if registered is not None else "ML-DSA-44"
        return ClientHandshake(
            device_id=device_id,
            identity=identity,
            identity_algorithm=algorithm,
            server_key=pinned or self.pinned,
            suites=suites,
            grace_epochs=grace,
            rekey=rekey,
        )

    def server(
        self,
        *,
        policy: ServerPolicy | None = None,
        static_keys: dict[str, ServerStaticKey] | None = None,
        biscuits: BiscuitKeys | None = None,
    ) -> ServerHandshake:
        return ServerHandshake(
            policy=policy or self.policy,
            static_keys=static_keys
            if static_keys is not None
            else {self.static.key_id: self.static},
            biscuits=biscuits or self.biscuits,
        )

    def answer(
        self,
        client_hello: bytes,
        *,
        now: int = NOW,
        policy: ServerPolicy | None = None,
        seen_before: Callable[[str, bytes, int], bool] = never_seen,
    ) -> bytes:
        """The hello path of the server: look the device up by the id it claims, as a server
        does, and answer with a ServerHello."""
        server = self.server(policy=policy)
        hello = server.receive_client_hello(client_hello, now=now)
        server.authenticate(self.devices[hello.device_id].key)
        return server.server_hello(rng=self.rng, seen_before=seen_before)

    def finish(
        self,
        client_finish: bytes,
        *,
        now: int = NOW + 1,
        policy: ServerPolicy | None = None,
        biscuits: BiscuitKeys | None = None,
    ) -> Established:
        """The finish path, on a fresh server object as any replica would run it."""
        server = self.server(policy=policy, biscuits=biscuits)
        return server.receive_client_finish(client_finish, now=now)

    def run(
        self,
        device_id: str = "dev-a",
        *,
        now: int = NOW,
        policy: ServerPolicy | None = None,
        suites: Sequence[Suite] | None = None,
        grace: int = 1,
        rekey: RekeyPolicy | None = None,
    ) -> Run:
        client = self.client(device_id, suites=suites, grace=grace, rekey=rekey)
        ch = client.client_hello(now=now, rng=self.rng)
        sh = self.answer(ch, now=now, policy=policy)
        cf = client.receive_server_hello(sh)
        est = self.finish(cf, now=now + 1, policy=policy)
        return Run(client, ch, sh, cf, est)

    def handshake(
        self,
        device_id: str = "dev-a",
        *,
        now: int = NOW,
        policy: ServerPolicy | None = None,
        grace: int = 1,
        rekey: RekeyPolicy | None = None,
    ) -> tuple[Session, Established]:
        """A full handshake: (the device's session, what the server established)."""
        run = self.run(device_id, now=now, policy=policy, grace=grace, rekey=rekey)
        return run.device, run.established


def pin(static: ServerStaticKey) -> PinnedServerKey:
    return PinnedServerKey(
        key_id=static.key_id,
        algorithm=static.algorithm,
        public_key=static.private.public_key().public_bytes(),
    )


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


# --- The wire format, written independently from docs/PROTOCOL.md section 5 -----------------


def u8(v: int) -> bytes:
    return struct.pack(">B", v)


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def opaque8(b: bytes) -> bytes:
    return u8(len(b)) + b


def opaque32(b: bytes) -> bytes:
    return u32(len(b)) + b


def ident(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return opaque8(raw)


def wire_client_hello(
    *,
    device_id: str | bytes = "dev-a",
    server_key_id: str | bytes = SERVER_KEY_ID,
    suites: Sequence[int] = (0x0101,),
    timestamp: int = NOW,
    nonce: bytes = bytes(32),
    static_ciphertext: bytes = b"\x01" * 8,
    key_shares: Sequence[tuple[int, bytes]] = ((0x0101, b"\x02" * 8),),
    signature: bytes = b"\x03" * 8,
    version: int = 1,
    msg_type: int = 1,
    suite_count: int | None = None,
    share_count: int | None = None,
) -> bytes:
    out = u8(version) + u8(msg_type) + ident(device_id) + ident(server_key_id)
    out += u8(len(suites) if suite_count is None else suite_count)
    out += b"".join(u16(s) for s in suites)
    out += u64(timestamp) + nonce + opaque32(static_ciphertext)
    out += u8(len(key_shares) if share_count is None else share_count)
    out += b"".join(u16(tag) + opaque32(share) for tag, share in key_shares)
    return out + opaque32(signature)


def wire_server_hello(
    *,
    session_id: bytes = b"\x11" * 16,
    suite: int = 0x0101,
    server_time: int = NOW,
    epoch_seconds: int = EPOCH_SECONDS,
    ephemeral_ciphertext: bytes = b"\x04" * 8,
    finished: bytes = b"\x05" * 64,
    biscuit: bytes = b"\x06" * 40,
    version: int = 1,
    msg_type: int = 2,
) -> bytes:
    return (
        u8(version)
        + u8(msg_type)
        + session_id
        + u16(suite)
        + u64(server_time)
        + u32(epoch_seconds)
        + opaque32(ephemeral_ciphertext)
        + opaque8(finished)
        + opaque32(biscuit)
    )


def wire_client_finish(
    *,
    session_id: bytes = b"\x11" * 16,
    biscuit: bytes = b"\x06" * 40,
    finished: bytes = b"\x05" * 64,
    version: int = 1,
    msg_type: int = 3,
) -> bytes:
    return u8(version) + u8(msg_type) + session_id + opaque32(biscuit) + opaque8(finished)


# Field maps: (name, start, end) for every byte of a well-formed message, read with struct.

Fields = list[tuple[str, int, int]]


def _take(fields: Fields, name: str, pos: int, size: int) -> int:
    fields.append((name, pos, pos + size))
    return pos + size


def client_hello_fields(data: bytes) -> Fields:
    f: Fields = []
    pos = _take(f, "version", 0, 1)
    pos = _take(f, "type", pos, 1)
    for name in ("device_id", "server_key_id"):
        pos = _take(f, f"{name}.len", pos, 1)
        pos = _take(f, name, pos, data[pos - 1])
    n = data[pos]
    pos = _take(f, "suites.count", pos, 1)
    pos = _take(f, "suites", pos, 2 * n)
    pos = _take(f, "timestamp", pos, 8)
    pos = _take(f, "nonce", pos, 32)
    pos = _take(f, "static_ciphertext.len", pos, 4)
    pos = _take(f, "static_ciphertext", pos, struct.unpack_from(">I", data, pos - 4)[0])
    m = data[pos]
    pos = _take(f, "key_shares.count", pos, 1)
    for i in range(m):
        pos = _take(f, f"key_shares[{i}].tag", pos, 2)
        pos = _take(f, f"key_shares[{i}].len", pos, 4)
        pos = _take(f, f"key_shares[{i}]", pos, struct.unpack_from(">I", data, pos - 4)[0])
    pos = _take(f, "signature.len", pos, 4)
    pos = _take(f, "signature", pos, struct.unpack_from(">I", data, pos - 4)[0])
    assert pos == len(data)
    return f


def server_hello_fields(data: bytes) -> Fields:
    f: Fields = []
    pos = _take(f, "version", 0, 1)
    pos = _take(f, "type", pos, 1)
    pos = _take(f, "session_id", pos, 16)
    pos = _take(f, "suite", pos, 2)
    pos = _take(f, "server_time", pos, 8)
    pos = _take(f, "epoch_seconds", pos, 4)
    pos = _take(f, "ephemeral_ciphertext.len", pos, 4)
    pos = _take(f, "ephemeral_ciphertext", pos, struct.unpack_from(">I", data, pos - 4)[0])
    pos = _take(f, "finished.len", pos, 1)
    pos = _take(f, "finished", pos, data[pos - 1])
    pos = _take(f, "biscuit.len", pos, 4)
    pos = _take(f, "biscuit", pos, struct.unpack_from(">I", data, pos - 4)[0])
    assert pos == len(data)
    return f


def client_finish_fields(data: bytes) -> Fields:
    f: Fields = []
    pos = _take(f, "version", 0, 1)
    pos = _take(f, "type", pos, 1)
    pos = _take(f, "session_id", pos, 16)
    pos = _take(f, "biscuit.len", pos, 4)
    pos = _take(f, "biscuit", pos, struct.unpack_from(">I", data, pos - 4)[0])
    pos = _take(f, "finished.len", pos, 1)
    pos = _take(f, "finished", pos, data[pos - 1])
    assert pos == len(data)
    return f


def field_at(fields: Fields, index: int) -> str:
    for name, start, end in fields:
        if start <= index < end:
            return name
    raise IndexError(index)
