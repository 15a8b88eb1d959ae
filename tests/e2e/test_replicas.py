"""Three server replicas (separate ``qflare serve`` processes) on one PostgreSQL schema and one
Redis: nothing in the server assumes it is the only replica (DESIGN.md 8).

- a device handshakes through replica 1 and sends model updates through replica 2; another
  finishes on a replica other than the one that answered its ClientHello;
- a ClientHello used on replica 1 and replayed on replica 3 is refused;
- a burst of forged ClientHellos spread over the three replicas, each under the threshold on
  its own, quarantines the device through the shared windows, and the others refuse it;
- a device revoked through replica 1's admin route has its next record refused by replica 2
  within the revocation bound (5 s; measured, and in fact immediate: every record reads the
  session row);
- enrollment-token guessing on replica 1 blocks the source on replicas 2 and 3 as well.

Every process is started here and stopped by its PID; the schema is dropped afterwards.
Redis keys are those of a tenant of this test's own; nothing is flushed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import pytest

from qflare import crypto
from qflare.client.device import drive
from qflare.client.flow import connect_flow, record_flow
from qflare.config import Settings
from qflare.fl.model import encode_update
from qflare.protocol import Session
from qflare.runtime import init_data_dir, issue_admin_token, open_manager
from qflare.store import migrate

from .conftest import (
    HELLO,
    OCTET,
    LiveServer,
    client_handshake,
    enroll,
    free_port,
    hello_of,
    refused,
)
from .test_detection import guess_body
from .test_negative import ping, pong, post_record

REVOCATION_BOUND_S = 5.0  # KeyPolicy.refresh_seconds: how late a revocation may arrive


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    live: LiveServer
    log: Path

    @property
    def url(self) -> str:
        return self.live.url

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


@pytest.fixture
def schema_url(postgres_url: str) -> Iterator[str]:
    schema = f"qflare_r_{uuid.uuid4().hex[:16]}"
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"
    try:
        yield url
    finally:

        async def drop() -> None:
            conn = await asyncpg.connect(postgres_url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


async def _prepare(settings: Settings) -> str:
    await migrate(settings.store_url)
    await init_data_dir(settings)
    manager = await open_manager(settings)
    try:
        token, _ = await issue_admin_token(
            manager,
            name="replica-tests",
            scopes=("read", "enroll", "devices", "keys", "sessions"),
            now=time.time(),
        )
    finally:
        await manager.store.close()
    return token


@pytest.fixture
def replicas(
    schema_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[Replica]]:
    for name in list(os.environ):
        if name.startswith("QFLARE_"):
            monkeypatch.delenv(name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    env.update(
        QFLARE_CONFIG=str(tmp_path / "absent.toml"),
        QFLARE_TENANT=f"rep-{uuid.uuid4().hex[:10]}",
        QFLARE_REDIS_URL=redis_url,
        QFLARE_RATE_LIMIT_PER_SECOND="1000",
        QFLARE_RATE_LIMIT_BURST="1000",
        QFLARE_FL_FEATURES="4",
        QFLARE_FL_MIN_UPDATES="1000",  # a FedAvg task on every replica; rounds never close
        QFLARE_DETECT_ENROLLMENT_FAILURES_SOURCE="3/300",
    )
    data_dir = tmp_path / "data"  # one master key file, shared like a mounted secret
    settings = Settings(
        data_dir=data_dir,
        database_url=schema_url,
        tenant=env["QFLARE_TENANT"],
        redis_url=redis_url,
    )
    admin_token = asyncio.run(_prepare(settings))
    started: list[Replica] = []
    command = [sys.executable, "-m", "qflare.cli", "--data-dir", str(data_dir)]
    command += ["--database-url", schema_url, "serve"]
    try:
        for i in (1, 2, 3):
            port = free_port()
            log = tmp_path / f"replica-{i}.log"
            with log.open("wb") as stderr:
                proc = subprocess.Popen(
                    [*command, "--port", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                )
            url = f"http://127.0.0.1:{port}"
            started.append(
                Replica(f"replica-{i}", proc, LiveServer(url, settings, admin_token, None), log)
            )
        for replica in started:
            _wait_ready(replica)
        yield started
    finally:
        for replica in started:  # by PID: only the processes this fixture started
            if replica.proc.poll() is None:
                replica.proc.terminate()
        for replica in started:
            try:
                replica.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()


def _wait_ready(replica: Replica) -> None:
    deadline = time.monotonic() + 45
    while True:
        if replica.proc.poll() is not None:
            pytest.fail(f"{replica.name} exited:\n{replica.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{replica.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{replica.name} not ready in 45 s:\n{replica.log.read_text()[-3000:]}")
        time.sleep(0.1)


def update(round_no: int = 0) -> bytes:
    return encode_update(round_no, np.ones(4), 10)


def send_update(http: httpx.Client, session: Session) -> dict[str, Any]:
    record, _ = drive(http, record_flow(session, update(), purpose="fl-update", clock=time.time))
    answer: dict[str, Any] = json.loads(record.plaintext)
    return answer


def test_three_replicas_one_store_one_redis(replicas: list[Replica]) -> None:
    r1, r2, r3 = replicas
    h1, h2, h3 = r1.http(), r2.http(), r3.http()
    try:
        _run(r1, r2, r3, h1, h2, h3)
    finally:
        for h in (h1, h2, h3):
            h.close()


def _run(
    r1: Replica,
    r2: Replica,
    r3: Replica,
    h1: httpx.Client,
    h2: httpx.Client,
    h3: httpx.Client,
) -> None:
    # -- a device handshakes through replica 1, sends updates through replica 2 -------------
    alice = enroll(r1.live, h1, "dev-alice")
    connected, _ = drive(h1, connect_flow(alice, clock=time.time, rng=crypto.system_rng))
    session: Session = connected.session
    # (Each replica runs its own FedAvg demo task: one update per device and round.)
    assert send_update(h2, session) == {"accepted": True, "round": 0}
    pong(session, post_record(h2, session, ping(session)))
    pong(session, post_record(h3, session, ping(session)))  # and any replica after that
    pong(session, post_record(h2, session, ping(session)))

    # ClientHello on replica 2, ClientFinish on replica 3: no handshake state on a replica.
    bob = enroll(r2.live, h2, "dev-bob")
    hs = client_handshake(bob)
    hello = hs.client_hello(now=int(time.time()), rng=crypto.system_rng)
    r = h2.post(HELLO, content=hello, headers=OCTET)
    assert r.status_code == 200, r.text
    r = h3.post("/v1/handshake/finish", content=hs.receive_server_hello(r.content), headers=OCTET)
    assert r.status_code == 200, r.text
    assert hs.session is not None
    bob_session = hs.session
    bob_session.open(r.content, now=time.time())
    pong(bob_session, post_record(h1, bob_session, ping(bob_session)))

    # -- a ClientHello used on replica 1 and replayed on replica 3 is refused ------------------
    used = hello_of(alice)
    assert h1.post(HELLO, content=used, headers=OCTET).status_code == 200
    refused(h3.post(HELLO, content=used, headers=OCTET), 401, "handshake_failed")
    refused(h2.post(HELLO, content=hello, headers=OCTET), 401, "handshake_failed")
    replays = r1.live.events("replay.detected")
    assert [e["device_id"] for e in replays] == ["dev-alice", "dev-bob"]

    # -- forged hellos spread over the replicas: shared windows quarantine the device -------
    carol = enroll(r3.live, h3, "dev-carol")
    carol_session = drive(h3, connect_flow(carol, clock=time.time, rng=crypto.system_rng))[
        0
    ].session
    stranger = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
    for http in (h1, h2, h3, h1, h2):  # 2 + 2 + 1: under the threshold (5) on each replica
        forged = hello_of(carol, key=stranger)
        refused(http.post(HELLO, content=forged, headers=OCTET), 401, "handshake_failed")
    [quarantined] = r2.live.events("device.quarantined")
    assert quarantined["device_id"] == "dev-carol"
    assert quarantined["detail"]["rule"] == "signature_invalid_device"
    # Refused everywhere: its live session (revoked with the quarantine) and new handshakes.
    refused(post_record(h1, carol_session, ping(carol_session)), 410, "session_closed")
    refused(h2.post(HELLO, content=hello_of(carol), headers=OCTET), 403, "device_not_allowed")
    refused(h3.post(HELLO, content=hello_of(carol), headers=OCTET), 403, "device_not_allowed")
    assert len(r3.live.events("detection.triggered")) == 1

    # -- revocation through replica 1 reaches replica 2's next record within the bound -------
    pong(session, post_record(h2, session, ping(session)))  # replica 2 has it in memory
    with r1.live.admin() as admin:
        r = admin.post("/v1/admin/devices/dev-alice/revoke", json={"reason": "stolen"})
        assert r.status_code == 200, r.text
    revoked_at = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        r = post_record(h2, session, ping(session))
        if r.status_code != 200:
            break
        assert time.monotonic() - revoked_at <= REVOCATION_BOUND_S, "revocation too late"
        time.sleep(0.05)
    latency = time.monotonic() - revoked_at
    refused(r, 410, "session_closed")
    assert latency <= REVOCATION_BOUND_S
    assert attempts == 1, f"replica 2 answered {attempts - 1} record(s) after the revocation"
    print(f"revocation reached replica 2 in {latency * 1000:.1f} ms ({attempts} attempt)")
    late = [e for e in r2.live.events("record.rejected") if e["device_id"] == "dev-alice"]
    assert late and late[-1]["detail"] == {"reason": "session-revoked"}

    # -- token guessing on replica 1 blocks the source on replicas 2 and 3 too -------------
    for i in range(3):
        refused(h1.post("/v1/enroll", json=guess_body(f"guess-{i}")), 403, "token_rejected")
    for http in (h2, h3):
        refused(http.post(HELLO, content=hello_of(bob), headers=OCTET), 429, "rate_limited")
    with r3.live.admin() as admin:
        assert [b["source"] for b in admin.get("/v1/admin/sources/blocked").json()] == ["127.0.0.1"]
        r = admin.post("/v1/admin/sources/127.0.0.1/unblock")
        assert r.json()["unblocked"] is True
    pong(bob_session, post_record(h1, bob_session, ping(bob_session)))  # lifted everywhere
    for replica in (r1, r2, r3):
        assert replica.proc.poll() is None, f"{replica.name} died"
        assert "Traceback" not in replica.log.read_text(), replica.log.read_text()[-3000:]
