"""``qflare demo``: the whole system on one machine, checked end to end.

A real server on loopback over a fresh store (SQLite in a temporary directory, or a throwaway
schema on PostgreSQL), N devices enrolled with one-time tokens through the HTTP API, R rounds
of federated learning whose model updates travel sealed with the devices' session keys. On the
way it crosses epoch boundaries (a short demo epoch), rotates the server's static key, and
injects one replayed and one tampered update. It prints a table and exits 0 only if every
check held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from qflare.client import DeviceClient, ServerRejected
from qflare.config import Settings
from qflare.fl.aggregator import Aggregator
from qflare.fl.model import (
    accuracy,
    decode_update,
    encode_update,
    make_federated_data,
    train_local,
)
from qflare.runtime import init_data_dir, issue_admin_token, open_manager
from qflare.server.app import create_app
from qflare.server.background import free_port, serve_in_thread

FEATURES = 20


@dataclass
class Report:
    devices: int
    rounds: int
    store: str
    epoch_seconds: int
    accuracy: list[float] = field(default_factory=list)
    handshake_ms: list[float] = field(default_factory=list)
    bytes_on_wire: int = 0
    epochs_seen: set[int] = field(default_factory=set)
    keys_rotated: int = 0
    devices_on_new_key: int = 0
    replay_rejected: bool = False
    tamper_rejected: bool = False
    device_failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def checks(self) -> dict[str, bool]:
        return {
            "model learned (final accuracy >= first + 0.15)": len(self.accuracy) > 1
            and self.accuracy[-1] >= self.accuracy[0] + 0.15,
            "no device failed": not self.device_failures,
            "crossed an epoch boundary": len(self.epochs_seen) >= 2,
            "one server key rotation, every device moved to the new key": self.keys_rotated == 1
            and self.devices_on_new_key == self.devices,
            "replayed update rejected": self.replay_rejected,
            "tampered update rejected": self.tamper_rejected,
        }

    def to_json(self) -> dict[str, Any]:
        hs = sorted(self.handshake_ms)
        return {
            "store": self.store,
            "devices": self.devices,
            "rounds": self.rounds,
            "accuracy_per_round": [round(a, 4) for a in self.accuracy],
            "handshakes": len(hs),
            "handshake_ms_median": round(statistics.median(hs), 2) if hs else None,
            "handshake_ms_max": round(hs[-1], 2) if hs else None,
            "bytes_on_wire": self.bytes_on_wire,
            "epochs_crossed": max(0, len(self.epochs_seen) - 1),
            "keys_rotated": self.keys_rotated,
            "replay_rejected": self.replay_rejected,
            "tamper_rejected": self.tamper_rejected,
            "device_failures": self.device_failures,
            "seconds": round(self.seconds, 2),
            "checks": self.checks(),
            "ok": all(self.checks().values()),
        }


async def _prepare(settings: Settings) -> str:
    await init_data_dir(settings)
    manager = await open_manager(settings)
    try:
        token, _ = await issue_admin_token(
            manager, name="demo", scopes=("read", "enroll", "keys"), now=time.time()
        )
    finally:
        await manager.store.close()
    return token


async def _drop_schema(postgres_url: str, schema: str) -> None:
    conn = await asyncpg.connect(postgres_url.partition("?")[0])
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def _raw_post(url: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(
        url + path,
        content=body,
        headers={"content-type": "application/octet-stream"},
        timeout=30,
    )


class Demo:
    def __init__(self, url: str, admin_token: str, report: Report, console: Console) -> None:
        self.url = url
        self.admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
        )
        self.report = report
        self.console = console
        self.clients: list[DeviceClient] = []

    def enroll(self, n: int, progress: Progress) -> None:
        task = progress.add_task("enrolling devices", total=n)
        for i in range(n):
            token = self.admin.post("/v1/admin/tokens", json={"ttl_seconds": 600})
            token.raise_for_status()
            client = DeviceClient.enroll(self.url, token.json()["token"], f"device-{i:03d}")
            self.clients.append(client)
            progress.advance(task)

    def _note_handshake(self, client: DeviceClient, before: int) -> None:
        if client.handshakes > before:
            self.report.handshake_ms.append(client.last_handshake_seconds * 1000)

    def _send(self, client: DeviceClient, payload: bytes, purpose: str) -> bytes:
        before = client.handshakes
        record = client.send(payload, purpose=purpose)
        self._note_handshake(client, before)
        assert client.session is not None
        self.report.epochs_seen.add(client.session.epoch(client.clock()))
        return record.plaintext

    def fetch_model(self, client: DeviceClient) -> tuple[int, np.ndarray[Any, Any]]:
        round_no, weights, _ = decode_update(self._send(client, b'{"op": "model"}', "control"))
        return round_no, weights

    def inject(self, client: DeviceClient, update: bytes) -> None:
        """Submit ``update`` by hand, then replay it, then send a tampered copy of another."""
        session = client.session
        assert session is not None
        path = f"/v1/sessions/{session.session_id.hex()}/records"
        record = client.seal(update, "fl-update")
        ok = _raw_post(self.url, path, record)
        ok.raise_for_status()
        client.open(ok.content)  # keep the device's receive window in step
        replay = _raw_post(self.url, path, record)
        self.report.replay_rejected = (
            replay.status_code == 409 and replay.json()["error"] == "replay_detected"
        )
        forged = bytearray(client.seal(b'{"op": "ping"}', "control"))
        forged[-1] ^= 0x01
        tamper = _raw_post(self.url, path, bytes(forged))
        self.report.tamper_rejected = (
            tamper.status_code == 400 and tamper.json()["error"] == "record_rejected"
        )

    def rotate_server_key(self) -> str:
        r = self.admin.post("/v1/admin/keys/rotate", json={"purpose": "kem-static"})
        r.raise_for_status()
        self.report.keys_rotated += 1
        return str(r.json()["active"]["key_id"])

    def reconnect_all(self) -> None:
        for client in self.clients:
            before = client.handshakes
            client.connect()
            self._note_handshake(client, before)

    def close(self) -> None:
        for client in self.clients:
            self.report.bytes_on_wire += client.bytes_on_wire
            client.close()
        self.admin.close()


def run_demo(
    *,
    devices: int = 10,
    rounds: int = 5,
    epoch_seconds: int = 3,
    postgres_url: str | None = None,
    json_output: bool = False,
) -> int:
    if devices < 1 or rounds < 2 or epoch_seconds < 1:
        raise ValueError("the demo needs at least 1 device, 2 rounds and 1-second epochs")
    console = Console(stderr=True)
    # The injected replay and tamper are expected; the table reports them, the log need not.
    server_log = logging.getLogger("qflare.server")
    level = server_log.level
    server_log.setLevel(logging.ERROR)
    try:
        return _demo(
            devices=devices,
            rounds=rounds,
            epoch_seconds=epoch_seconds,
            postgres_url=postgres_url,
            json_output=json_output,
            console=console,
        )
    finally:
        server_log.setLevel(level)


def _demo(
    *,
    devices: int,
    rounds: int,
    epoch_seconds: int,
    postgres_url: str | None,
    json_output: bool,
    console: Console,
) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qflare-demo-") as tmp:
        schema = f"qflare_demo_{uuid.uuid4().hex[:12]}"
        database_url = ""
        if postgres_url:
            sep = "&" if "?" in postgres_url else "?"
            database_url = f"{postgres_url}{sep}schema={schema}"
        settings = Settings(
            data_dir=Path(tmp),
            database_url=database_url,
            port=free_port(),
            epoch_seconds=epoch_seconds,
            key_overlap_seconds=3600,
            rate_limit_per_second=10_000,
            rate_limit_burst=10_000,
        )
        report = Report(devices, rounds, "PostgreSQL" if postgres_url else "SQLite", epoch_seconds)
        try:
            admin_token = asyncio.run(_prepare(settings))
            aggregator = Aggregator(features=FEATURES, min_updates=devices)
            app = create_app(settings, aggregator=aggregator)
            with serve_in_thread(app, port=settings.port) as url:
                _run(url, admin_token, report, console, aggregator)
        finally:
            if postgres_url:
                asyncio.run(_drop_schema(postgres_url, schema))
    report.seconds = time.monotonic() - started
    doc = report.to_json()
    if json_output:
        print(json.dumps(doc, indent=2))
    else:
        _print_table(report, doc, console)
    return 0 if doc["ok"] else 1


def _run(
    url: str, admin_token: str, report: Report, console: Console, aggregator: Aggregator
) -> None:
    shards, test = make_federated_data(report.devices, features=FEATURES)
    demo = Demo(url, admin_token, report, console)
    rotate_after = report.rounds // 2
    new_key = ""
    try:
        with Progress(console=console, transient=True) as progress:
            demo.enroll(report.devices, progress)
            task = progress.add_task("federated rounds", total=report.rounds * report.devices)
            for round_no in range(report.rounds):
                if round_no == rotate_after:
                    new_key = demo.rotate_server_key()
                    # Devices still pin the old key: this handshake uses it (it is in its
                    # overlap window) and brings back the new one inside the session.
                    demo.reconnect_all()
                for i, client in enumerate(demo.clients):
                    try:
                        served_round, weights = demo.fetch_model(client)
                        if i == 0:
                            report.accuracy.append(accuracy(weights, test))
                        local = train_local(weights, shards[i])
                        update = encode_update(served_round, local, len(shards[i].y))
                        if round_no == 1 and i == 0:
                            demo.inject(client, update)
                        else:
                            demo._send(client, update, "fl-update")
                    except (ServerRejected, httpx.HTTPError) as exc:
                        report.device_failures.append(f"{client.device_id}: {exc}")
                    progress.advance(task)
                # Epochs are wall-clock buckets: a fast round may sit inside one epoch.
                time.sleep(report.epoch_seconds / 2)
            final = demo.fetch_model(demo.clients[0])[1]
            report.accuracy.append(accuracy(final, test))
            demo.reconnect_all()  # a fresh handshake now pins the rotated key
            report.devices_on_new_key = sum(
                c.identity.server_key.key_id == new_key for c in demo.clients
            )
    finally:
        demo.close()
    if len(aggregator.history) != report.rounds:
        report.device_failures.append(
            f"server closed {len(aggregator.history)} rounds, expected {report.rounds}"
        )


def _print_table(report: Report, doc: dict[str, Any], console: Console) -> None:
    out = Console()
    rounds = Table(title=f"QFLARE demo: {report.devices} devices, {report.store}")
    rounds.add_column("round")
    rounds.add_column("global model accuracy", justify="right")
    for i, acc in enumerate(report.accuracy):
        rounds.add_row("final" if i == len(report.accuracy) - 1 else str(i), f"{acc:.3f}")
    out.print(rounds)
    summary = Table(show_header=False)
    summary.add_row("handshakes", str(doc["handshakes"]))
    summary.add_row(
        "handshake latency (median / max)",
        f"{doc['handshake_ms_median']} ms / {doc['handshake_ms_max']} ms",
    )
    summary.add_row("bytes on the wire (devices)", f"{doc['bytes_on_wire']:,}")
    summary.add_row("epochs crossed", str(doc["epochs_crossed"]))
    summary.add_row("server keys rotated", str(doc["keys_rotated"]))
    summary.add_row("wall time", f"{doc['seconds']} s")
    out.print(summary)
    checks = Table(title="checks")
    checks.add_column("check")
    checks.add_column("result")
    for name, ok in doc["checks"].items():
        checks.add_row(name, "[green]ok[/green]" if ok else "[red]FAILED[/red]")
    out.print(checks)
    for failure in report.device_failures:
        console.print(f"[red]{failure}[/red]")


if __name__ == "__main__":
    sys.exit(run_demo())
