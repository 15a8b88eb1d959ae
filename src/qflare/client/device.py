"""``DeviceClient`` and ``AsyncDeviceClient``: two drivers over the flows in ``flow.py``.

Both keep the session for the caller: they connect on first use, rekey when the session nears
its limits, and reconnect once when the server says the session is gone, expired or must
rekey. Epoch changes need nothing: both sides ratchet by the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from qflare import crypto
from qflare.errors import QflareError
from qflare.protocol import DEFAULT_SUITE, Session
from qflare.protocol.record import Record

from . import keystore
from .flow import (
    Connected,
    Flow,
    Response,
    ServerRejected,
    connect_flow,
    enroll_flow,
    identity_version_flow,
    record_flow,
    rotation_request,
)
from .keystore import DeviceIdentity

T = TypeVar("T")
# Where a rotated identity waits, next to the keystore, until the server confirmed it.
PENDING = ".pending"
# Server answers after which one fresh handshake and a retry are the right move.
_RECONNECT_CODES = frozenset({"rekey_required", "epoch_expired", "not_found", "session_closed"})
_CLOSE = b'{"op": "close"}'


def drive(http: httpx.Client, flow: Flow) -> tuple[Any, int]:
    """Run a flow over a blocking client; return its result and the bytes it moved."""
    request, wire = next(flow), 0
    while True:
        r = http.request(
            request.method,
            request.path,
            content=request.body,
            headers={"content-type": request.content_type},
        )
        wire += len(request.body) + len(r.content)
        try:
            request = flow.send(Response(r.status_code, r.content))
        except StopIteration as stop:
            return stop.value, wire


async def adrive(http: httpx.AsyncClient, flow: Flow) -> tuple[Any, int]:
    """Run a flow over an async client; return its result and the bytes it moved."""
    request, wire = next(flow), 0
    while True:
        r = await http.request(
            request.method,
            request.path,
            content=request.body,
            headers={"content-type": request.content_type},
        )
        wire += len(request.body) + len(r.content)
        try:
            request = flow.send(Response(r.status_code, r.content))
        except StopIteration as stop:
            return stop.value, wire


class EphemeralPool:
    """Pre-generated ephemeral KEM keys, so a handshake never waits on key generation.

    Each key is used for exactly one handshake (taking removes it); refilling happens after a
    handshake, off its critical path.
    """

    def __init__(
        self, kem: str = DEFAULT_SUITE.kem, size: int = 2, rng: crypto.Rng = crypto.system_rng
    ) -> None:
        self.kem, self.size, self._rng = kem, size, rng
        self._keys: list[crypto.KemPrivateKey] = []

    def take(self) -> dict[str, crypto.KemPrivateKey]:
        return {self.kem: self._keys.pop()} if self._keys else {}

    def refill(self) -> None:
        impl = crypto.kem(self.kem)
        while len(self._keys) < self.size:
            self._keys.append(impl.generate(self._rng))

    def __len__(self) -> int:
        return len(self._keys)


class _DeviceBase:
    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        clock: Callable[[], float] = time.time,
        rng: crypto.Rng = crypto.system_rng,
        keystore_path: keystore.StrPath | None = None,
        passphrase: str | None = None,
        pool_size: int = 2,
    ) -> None:
        self.identity = identity
        self.clock, self.rng = clock, rng
        self._keystore = (keystore_path, passphrase)
        self.pool = EphemeralPool(size=pool_size, rng=rng)
        self.session: Session | None = None
        self.handshakes = 0
        self.last_handshake_seconds = 0.0
        self.bytes_on_wire = 0

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    def _connected(self, result: Connected) -> Session:
        self.session = result.session
        self.handshakes += 1
        self.last_handshake_seconds = result.handshake_seconds
        known = {k.key_id for k in self.identity.server_keys}
        fresh = [k for k in result.server_keys if k.key_id not in known]
        if fresh:
            # Learned inside an authenticated session record: pin the server's new key(s).
            self.identity = DeviceIdentity(
                device_id=self.identity.device_id,
                algorithm=self.identity.algorithm,
                seed=self.identity.seed,
                server_url=self.identity.server_url,
                server_keys=(*self.identity.server_keys, *fresh)[-4:],
            )
            self._save(self.identity)
        return result.session

    def _save(self, identity: DeviceIdentity, suffix: str = "") -> None:
        path, passphrase = self._keystore
        if path is not None and passphrase is not None:
            keystore.save(f"{path}{suffix}", identity, passphrase)

    def _rotated(self, identity: DeviceIdentity) -> None:
        """The server holds the new key: it replaces the keystore, then the pending copy goes."""
        self._save(identity)
        self._discard_pending()
        self.identity = identity

    def _discard_pending(self) -> None:
        path, _ = self._keystore
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{PENDING}")

    def _usable_session(self) -> Session | None:
        s = self.session
        if s is not None and s.needs_rekey(self.clock()):
            return None
        return s

    def seal(self, payload: bytes, purpose: str = "fl-update") -> bytes:
        if self.session is None:
            raise ServerRejected(0, "not_connected", "connect() first")
        return self.session.seal(payload, now=self.clock(), purpose=purpose)

    def open(self, record: bytes) -> Record:
        if self.session is None:
            raise ServerRejected(0, "not_connected", "connect() first")
        return self.session.open(record, now=self.clock())


def _enroll_args(
    server_url: str, token: str, device_id: str, algorithm: str, rng: crypto.Rng
) -> Flow:
    return enroll_flow(
        server_url=server_url, token=token, device_id=device_id, algorithm=algorithm, rng=rng
    )


class DeviceClient(_DeviceBase):
    """Blocking device client over ``httpx.Client``."""

    def __init__(
        self, identity: DeviceIdentity, *, transport: httpx.BaseTransport | None = None, **kw: Any
    ) -> None:
        super().__init__(identity, **kw)
        self._http = httpx.Client(base_url=identity.server_url, transport=transport, timeout=30)

    def _drive(self, flow: Flow) -> Any:
        result, wire = drive(self._http, flow)
        self.bytes_on_wire += wire
        return result

    @classmethod
    def enroll(
        cls,
        server_url: str,
        token: str,
        device_id: str,
        *,
        keystore_path: keystore.StrPath | None = None,
        passphrase: str | None = None,
        algorithm: str = "ML-DSA-44",
        transport: httpx.BaseTransport | None = None,
        **kw: Any,
    ) -> DeviceClient:
        rng = kw.get("rng", crypto.system_rng)
        with httpx.Client(base_url=server_url, transport=transport, timeout=30) as http:
            identity, _ = drive(http, _enroll_args(server_url, token, device_id, algorithm, rng))
        if keystore_path is not None and passphrase is not None:
            keystore.save(keystore_path, identity, passphrase)
        return cls(
            identity, transport=transport, keystore_path=keystore_path, passphrase=passphrase, **kw
        )

    @classmethod
    def from_keystore(cls, path: keystore.StrPath, passphrase: str, **kw: Any) -> DeviceClient:
        return cls(keystore.load(path, passphrase), keystore_path=path, passphrase=passphrase, **kw)

    def connect(self) -> Session:
        flow = connect_flow(
            self.identity, clock=self.clock, rng=self.rng, ephemeral_keys=self.pool.take()
        )
        session = self._connected(self._drive(flow))
        self.pool.refill()
        return session

    def send(self, payload: bytes, purpose: str = "fl-update") -> Record:
        session = self._usable_session() or self.connect()
        try:
            record: Record = self._drive(
                record_flow(session, payload, purpose=purpose, clock=self.clock)
            )
        except ServerRejected as exc:
            if exc.code not in _RECONNECT_CODES:
                raise
            record = self._drive(
                record_flow(self.connect(), payload, purpose=purpose, clock=self.clock)
            )
        return record

    def rotate_identity(self, algorithm: str | None = None) -> None:
        """Replace the identity key (docs/KEYS.md, "Device key rotation"). The new key is saved
        to ``<keystore>.pending`` before the request leaves, so a crash in between never loses
        the key the server may already hold; this session stays valid, the next handshake
        signs with the new key."""
        session = self._usable_session() or self.connect()
        version = self._drive(identity_version_flow(session, clock=self.clock))
        rotated, payload = rotation_request(
            self.identity, version, algorithm or self.identity.algorithm, self.rng
        )
        self._save(rotated, PENDING)
        try:
            self._drive(record_flow(session, payload, purpose="control", clock=self.clock))
        except ServerRejected:
            self._discard_pending()  # refused: the server still holds the current key
            raise
        self._rotated(rotated)

    def close(self) -> None:
        if self.session is not None:
            # Already gone on the server (expired, revoked): nothing left to close there.
            with contextlib.suppress(ServerRejected, QflareError):
                self._drive(record_flow(self.session, _CLOSE, purpose="control", clock=self.clock))
            self.session.close()
            self.session = None
        self._http.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDeviceClient(_DeviceBase):
    """Asyncio device client over ``httpx.AsyncClient``; same flows as ``DeviceClient``."""

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(identity, **kw)
        self._http = httpx.AsyncClient(
            base_url=identity.server_url, transport=transport, timeout=30
        )

    async def _drive(self, flow: Flow) -> Any:
        result, wire = await adrive(self._http, flow)
        self.bytes_on_wire += wire
        return result

    @classmethod
    async def enroll(
        cls,
        server_url: str,
        token: str,
        device_id: str,
        *,
        keystore_path: keystore.StrPath | None = None,
        passphrase: str | None = None,
        algorithm: str = "ML-DSA-44",
        transport: httpx.AsyncBaseTransport | None = None,
        **kw: Any,
    ) -> AsyncDeviceClient:
        rng = kw.get("rng", crypto.system_rng)
        async with httpx.AsyncClient(base_url=server_url, transport=transport, timeout=30) as http:
            flow = _enroll_args(server_url, token, device_id, algorithm, rng)
            identity, _ = await adrive(http, flow)
        if keystore_path is not None and passphrase is not None:
            await asyncio.to_thread(keystore.save, keystore_path, identity, passphrase)
        return cls(
            identity, transport=transport, keystore_path=keystore_path, passphrase=passphrase, **kw
        )

    async def connect(self) -> Session:
        flow = connect_flow(
            self.identity, clock=self.clock, rng=self.rng, ephemeral_keys=self.pool.take()
        )
        session = self._connected(await self._drive(flow))
        await asyncio.to_thread(self.pool.refill)
        return session

    async def send(self, payload: bytes, purpose: str = "fl-update") -> Record:
        session = self._usable_session() or await self.connect()
        try:
            record: Record = await self._drive(
                record_flow(session, payload, purpose=purpose, clock=self.clock)
            )
        except ServerRejected as exc:
            if exc.code not in _RECONNECT_CODES:
                raise
            session = await self.connect()
            record = await self._drive(
                record_flow(session, payload, purpose=purpose, clock=self.clock)
            )
        return record

    async def rotate_identity(self, algorithm: str | None = None) -> None:
        """As ``DeviceClient.rotate_identity``."""
        session = self._usable_session() or await self.connect()
        version = await self._drive(identity_version_flow(session, clock=self.clock))
        rotated, payload = rotation_request(
            self.identity, version, algorithm or self.identity.algorithm, self.rng
        )
        await asyncio.to_thread(self._save, rotated, PENDING)
        try:
            await self._drive(record_flow(session, payload, purpose="control", clock=self.clock))
        except ServerRejected:
            await asyncio.to_thread(self._discard_pending)
            raise
        await asyncio.to_thread(self._rotated, rotated)

    async def aclose(self) -> None:
        if self.session is not None:
            with contextlib.suppress(ServerRejected, QflareError):
                flow = record_flow(self.session, _CLOSE, purpose="control", clock=self.clock)
                await self._drive(flow)
            self.session.close()
            self.session = None
        await self._http.aclose()

    async def __aenter__(self) -> AsyncDeviceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
