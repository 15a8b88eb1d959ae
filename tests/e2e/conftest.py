"""A real server on a free loopback port (uvicorn in a thread), over each real store."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from qflare import crypto
from qflare.client.device import drive
from qflare.client.flow import enroll_flow
from qflare.client.keystore import DeviceIdentity
from qflare.config import Settings
from qflare.fl.aggregator import Aggregator
from qflare.protocol import ClientHandshake
from qflare.runtime import init_data_dir, issue_admin_token, open_manager
from qflare.server.app import create_app

OCTET = {"content-type": "application/octet-stream"}
HELLO, FINISH = "/v1/handshake/hello", "/v1/handshake/finish"


@dataclass
class LiveServer:
    url: str
    settings: Settings
    admin_token: str
    app: object

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30
        )

    def issue_token(self) -> str:
        with self.admin() as http:
            r = http.post("/v1/admin/tokens", json={})
            r.raise_for_status()
            return str(r.json()["token"])

    def issue_admin_token(self, *scopes: str, name: str = "tests-scoped") -> str:
        """A further admin token with only ``scopes``, written straight to the store."""
        return asyncio.run(_admin_token(self.settings, name, scopes))

    def events(self, type: str | None = None) -> list[dict[str, Any]]:
        """Stored security events (oldest first), optionally only those of ``type``."""
        with self.admin() as http:
            r = http.get("/v1/admin/events", params={"limit": 1000})
            r.raise_for_status()
            found: list[dict[str, Any]] = r.json()
        return [e for e in found if type is None or e["type"] == type]


class ManualClock:
    """A server clock the test moves by hand (``create_app(clock=...)``)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- helpers shared by the end-to-end tests -----------------------------------------------------


def refused(r: httpx.Response, status: int, code: str) -> None:
    """``r`` is the documented refusal: exact status, stable code, a message, never a 5xx."""
    assert r.status_code == status, (r.status_code, r.text)
    assert status < 500 or code == "unavailable"
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]


def enroll(live: LiveServer, http: httpx.Client, device_id: str) -> DeviceIdentity:
    flow = enroll_flow(
        server_url=live.url,
        token=live.issue_token(),
        device_id=device_id,
        algorithm="ML-DSA-44",
        rng=crypto.system_rng,
    )
    identity, _ = drive(http, flow)
    assert isinstance(identity, DeviceIdentity)
    return identity


def client_handshake(identity: DeviceIdentity, **kw: Any) -> ClientHandshake:
    return ClientHandshake(
        device_id=kw.pop("device_id", identity.device_id),
        identity=kw.pop("key", None) or identity.signing_key(),
        identity_algorithm=identity.algorithm,
        server_key=identity.server_key,
        **kw,
    )


def hello_of(identity: DeviceIdentity, *, now: float | None = None, **kw: Any) -> bytes:
    hs = client_handshake(identity, **kw)
    return hs.client_hello(now=int(time.time() if now is None else now), rng=crypto.system_rng)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _admin_token(settings: Settings, name: str, scopes: tuple[str, ...]) -> str:
    manager = await open_manager(settings)
    try:
        token, _ = await issue_admin_token(manager, name=name, scopes=scopes, now=time.time())
    finally:
        await manager.store.close()
    return token


async def _prepare(settings: Settings) -> str:
    await init_data_dir(settings)
    return await _admin_token(settings, "tests", ("read", "enroll", "devices", "keys", "sessions"))


def start(
    settings: Settings,
    aggregator: Aggregator | None = None,
    clock: Callable[[], float] | None = None,
) -> Iterator[LiveServer]:
    """Run a server for ``settings`` until the generator closes; ``clock`` replaces
    ``time.time`` as the server's clock."""
    token = asyncio.run(_prepare(settings))
    app = create_app(settings, aggregator=aggregator, clock=clock or time.time)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{settings.port}", settings, token, app)
    finally:
        server.should_exit = True
        thread.join(timeout=20)


# ``with serving(settings) as server:`` - a second server inside a test.
serving = contextlib.contextmanager(start)


@pytest.fixture
def settings(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("QFLARE_MASTER_KEY", raising=False)
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        port=free_port(),
        epoch_seconds=300,
        rate_limit_per_second=1000,
        rate_limit_burst=1000,
        max_body_bytes=64 * 1024,
        # Tests here provoke failures from 127.0.0.1 on purpose: detection rules still fire
        # (detection.triggered) but take no action. tests/e2e/test_detection.py turns it on.
        monitor_respond=False,
    )


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    yield from start(settings, Aggregator(features=4, min_updates=1))
