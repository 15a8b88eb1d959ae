"""An in-process QFLARE server (``Service`` over a real store) and devices that talk to it.

Shared by the detection tests (tests/monitor/test_detect*.py): no HTTP, so a test can drive
hundreds of handshakes and failures in a second and read back exactly which security events
the server stored.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qflare import crypto
from qflare.client.flow import pinned_key_from_json
from qflare.config import Settings
from qflare.crypto import labels
from qflare.keys import EnrollmentRequest, KeyManager
from qflare.monitor.runtime import Monitor, open_monitor
from qflare.protocol import ClientHandshake, Session
from qflare.protocol.enrollment import enrollment_proof_message
from qflare.protocol.handshake import PinnedServerKey
from qflare.runtime import init_data_dir, open_manager, server_policy
from qflare.server.service import Service
from qflare.store import SecurityEventRecord

SOURCE = "198.51.100.7"


class Clock:
    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Device:
    device_id: str
    key: crypto.SignaturePrivateKey
    pin: PinnedServerKey
    session: Session | None = None

    def handshake(self, **kw: Any) -> ClientHandshake:
        return ClientHandshake(
            device_id=kw.pop("device_id", self.device_id),
            identity=kw.pop("identity", self.key),
            identity_algorithm="ML-DSA-44",
            server_key=self.pin,
            **kw,
        )


@dataclass
class World:
    settings: Settings
    keys: KeyManager
    monitor: Monitor
    service: Service
    clock: Clock
    seen: int = field(default=0)

    async def enroll(self, device_id: str, *, source: str = SOURCE) -> Device:
        issued = await self.keys.issue_token(now=self.clock())
        key = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
        public = key.public_key().public_bytes()
        proof = key.sign(
            enrollment_proof_message(device_id, "ML-DSA-44", public, issued.token),
            labels.SIG_ENROLLMENT,
        )
        doc = await self.service.enroll(
            EnrollmentRequest(
                token=issued.token,
                device_id=device_id,
                algorithm="ML-DSA-44",
                public_key=public,
                proof=proof,
            ),
            source=source,
        )
        return Device(device_id, key, pinned_key_from_json(doc["server_key"]))

    def hello_bytes(self, device: Device, **kw: Any) -> tuple[ClientHandshake, bytes]:
        now = kw.pop("now", self.clock())
        hs = device.handshake(**kw)
        return hs, hs.client_hello(now=int(now), rng=crypto.system_rng)

    async def connect(self, device: Device, *, source: str = SOURCE) -> Session:
        hs, hello = self.hello_bytes(device)
        finish = hs.receive_server_hello(await self.service.hello(hello, source=source))
        sealed = await self.service.finish(finish, source=source)
        assert hs.session is not None
        hs.session.open(sealed, now=self.clock())
        device.session = hs.session
        return hs.session

    async def send(
        self, session: Session, payload: bytes = b'{"op": "ping"}', *, source: str = SOURCE
    ) -> bytes:
        record = session.seal(payload, now=self.clock(), purpose="control")
        answer = await self.service.record(session.session_id.hex(), record, source=source)
        return session.open(answer, now=self.clock()).plaintext

    async def events(self, *types: str) -> list[SecurityEventRecord]:
        """Stored events (oldest first), only those of ``types`` if given. Queued INFO events
        are stored first (the service writes them in the background)."""
        await self.service.flush_events()
        found = await self.keys.store.list_security_events(self.keys.tenant, limit=10_000)
        return [e for e in found if not types or e.type in types]

    async def new_events(self, *types: str) -> list[SecurityEventRecord]:
        """Events stored since the last call, only those of ``types`` if given."""
        await self.service.flush_events()
        found = await self.keys.store.list_security_events(
            self.keys.tenant, after_id=self.seen or None, limit=10_000
        )
        if found:
            self.seen = found[-1].id
        return [e for e in found if not types or e.type in types]


@asynccontextmanager
async def world(
    database_url: str, data_dir: Path, *, clock: Clock | None = None, **settings: Any
) -> AsyncIterator[World]:
    """A server on ``database_url`` (already migrated) with ``settings`` on top of the
    defaults; its monitor shares state through Redis if ``redis_url`` is among them."""
    config = Settings(data_dir=data_dir, database_url=database_url, **settings)
    await init_data_dir(config)
    keys = await open_manager(config)
    monitor = open_monitor(config, keys)
    clock = clock or Clock()
    service = Service(keys, server_policy(config), clock=clock, monitor=monitor.detector)
    try:
        yield World(config, keys, monitor, service, clock)
    finally:
        await service.flush_events()
        await monitor.close()
        await keys.store.close()
