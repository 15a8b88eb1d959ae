"""The operator's side of the monitor: ``qflare events list`` filters, ``events tail``,
``source list``/``unblock``, and the security events the command stores for its own changes.

Run in process (typer's CliRunner) against SQLite, except ``events tail``, which runs as a
real process so Ctrl-C (SIGINT) is real. No ``QFLARE_*`` variable from the machine leaks in.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cli import support as cli_support
from cli.support import ok, qflare, with_manager
from qflare import crypto
from qflare.cli import database as events_cli
from qflare.crypto import labels
from qflare.keys import EnrollmentRequest, KeyManager
from qflare.keys.manager import utc
from qflare.monitor.blocks import SourceBlocks
from qflare.monitor.shared import SharedRedis
from qflare.protocol.enrollment import enrollment_proof_message

QFLARE = (sys.executable, "-m", "qflare.cli")
# The command tests' fixtures (the environment without the machine's QFLARE_* settings is
# autouse), bound here so that pytest finds them.
isolated_env, data_dir, ready = cli_support.isolated_env, cli_support.data_dir, cli_support.ready


def add_events(data_dir: Path, *events: tuple[str, int, float]) -> None:
    """Store (type, severity, unix time) events, as a server would."""

    async def work(m: KeyManager) -> None:
        for type, severity, ts in events:
            await m.store.append_security_event(
                m.tenant, ts=utc(ts), type=type, severity=severity, source="203.0.113.4"
            )

    with_manager(data_dir, work)


def types_of(document: dict[str, Any]) -> list[str]:
    return [e["type"] for e in document["events"]]


def test_events_list_filters(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    add_events(
        ready,
        ("handshake.failed", 30, now - 7200),
        ("signature.invalid", 40, now - 60),
        ("handshake.started", 20, now - 30),
        ("detection.triggered", 40, now - 20),
        ("source.blocked", 40, now - 20),
        ("handshake.failed", 30, now - 10),
    )
    # `init` stored key.generated for each key it made.
    assert types_of(ok(ready, "events", "list", "--type", "key.generated")) == ["key.generated"] * 3
    assert types_of(ok(ready, "events", "list", "-t", "handshake.*")) == [
        "handshake.failed",
        "handshake.started",
        "handshake.failed",
    ]
    assert types_of(
        ok(ready, "events", "list", "--type", "source.blocked", "--type", "detection.*")
    ) == ["detection.triggered", "source.blocked"]
    high = ["signature.invalid", "detection.triggered", "source.blocked"]
    assert types_of(ok(ready, "events", "list", "--severity", "high")) == high
    assert types_of(ok(ready, "events", "list", "--severity", "40")) == high
    assert types_of(ok(ready, "events", "list", "--severity", "warning", "-t", "handshake.*")) == [
        "handshake.failed",
        "handshake.failed",
    ]
    # --since: a duration ago, or an ISO time (naive means UTC).
    recent = ok(ready, "events", "list", "--since", "1h", "-t", "handshake.failed")
    assert len(recent["events"]) == 1
    iso = datetime.fromtimestamp(now - 45, UTC).replace(tzinfo=None).isoformat()
    assert types_of(ok(ready, "events", "list", "--since", iso, "-s", "warning")) == [
        "detection.triggered",
        "source.blocked",
        "handshake.failed",
    ]
    # Filters apply page after page: matches after many non-matching events are found, and
    # --limit counts matches.
    monkeypatch.setattr(events_cli, "_PAGE", 2)
    assert types_of(ok(ready, "events", "list", "-t", "source.blocked")) == ["source.blocked"]
    assert types_of(ok(ready, "events", "list", "-t", "handshake.*", "--limit", "2")) == [
        "handshake.failed",
        "handshake.started",
    ]

    for bad in (["--type", "no.such.*"], ["--severity", "loud"], ["--since", "yesterday"]):
        result = qflare(ready, "events", "list", *bad)
        assert result.exit_code == 2, (bad, result.output)


def test_operator_changes_store_their_events(ready: Path) -> None:

    async def enroll(m: KeyManager) -> None:
        issued = await m.issue_token(now=time.time())
        key = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
        public = key.public_key().public_bytes()
        message = enrollment_proof_message("dev-op", "ML-DSA-44", public, issued.token)
        await m.enroll(
            EnrollmentRequest(
                token=issued.token,
                device_id="dev-op",
                algorithm="ML-DSA-44",
                public_key=public,
                proof=key.sign(message, labels.SIG_ENROLLMENT),
            ),
            now=time.time(),
        )

    with_manager(ready, enroll)
    last = ok(ready, "events", "list", "--limit", "10000")["events"][-1]["id"]
    ok(ready, "device", "quarantine", "dev-op", "--reason", "lost")
    ok(ready, "device", "reinstate", "dev-op")
    ok(ready, "token", "issue")
    rotated = ok(ready, "keys", "rotate")["active"]["key_id"]
    ok(ready, "keys", "revoke", rotated, "--yes")
    ok(ready, "device", "revoke", "dev-op", "--reason", "stolen", "--yes")
    events = ok(ready, "events", "list", "--after-id", str(last))["events"]
    assert [(e["type"], e["device_id"]) for e in events] == [
        ("device.quarantined", "dev-op"),
        ("device.reinstated", "dev-op"),
        ("admin.action", None),
        ("key.rotated", None),
        ("key.revoked", None),
        ("device.revoked", "dev-op"),
    ]
    assert all(e["detail"]["admin"].startswith("cli") for e in events)
    assert events[0]["detail"]["reason"] == "lost"
    assert events[2]["detail"]["action"] == "token.issue"
    assert events[4]["detail"]["key_id"] == rotated


def test_events_tail_follows_and_stops_on_ctrl_c(ready: Path, tmp_path: Path) -> None:
    mark = time.time()
    add_events(ready, ("handshake.failed", 30, mark - 60))  # before --since: not shown
    out = tmp_path / "tail.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    env["QFLARE_CONFIG"] = str(tmp_path / "absent.toml")
    since = datetime.fromtimestamp(mark, UTC).isoformat()
    tail_options = ["--since", since, "--interval", "0.1", "--type", "replay.*"]
    with out.open("w") as stdout:
        proc = subprocess.Popen(
            [*QFLARE, "--data-dir", str(ready), "--json", "events", "tail", *tail_options],
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
        )
    try:
        add_events(ready, ("replay.detected", 40, mark + 1), ("handshake.started", 20, mark + 1))
        lines = _wait_for_lines(out, 1, proc)
        add_events(ready, ("replay.detected", 40, time.time()))
        lines = _wait_for_lines(out, 2, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0, stderr
        assert b"Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(events) == len(lines) == 2  # one JSON object per line, filtered
    assert [e["type"] for e in events] == ["replay.detected", "replay.detected"]
    assert events[0]["id"] < events[1]["id"]


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen[bytes]) -> list[str]:
    deadline = time.monotonic() + 20
    while True:
        lines = path.read_text().splitlines()
        if len(lines) >= n:
            return lines
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, f"tail printed {lines} within 20 s"
        time.sleep(0.05)


def test_source_unblock_through_redis(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    tenant = f"cli-{uuid.uuid4().hex[:10]}"  # its own Redis keys: nothing is flushed
    monkeypatch.setenv("QFLARE_TENANT", tenant)
    no_redis = qflare(data_dir, "source", "list")
    assert no_redis.exit_code == 1 and "no redis_url" in no_redis.stderr
    monkeypatch.setenv("QFLARE_REDIS_URL", redis_url)
    ok(data_dir, "init")

    async def block() -> None:
        shared = SharedRedis(redis_url)
        try:
            blocks = SourceBlocks(tenant, shared)
            await blocks.block(
                "203.0.113.77", seconds=60, rule="enrollment_failures_source", now=time.time()
            )
        finally:
            await shared.close()

    asyncio.run(block())
    [listed] = ok(data_dir, "source", "list")["blocked"]
    assert (listed["source"], listed["rule"]) == ("203.0.113.77", "enrollment_failures_source")
    assert ok(data_dir, "source", "unblock", "203.0.113.77") == {
        "source": "203.0.113.77",
        "unblocked": True,
    }
    assert ok(data_dir, "source", "list")["blocked"] == []
    assert ok(data_dir, "source", "unblock", "203.0.113.77")["unblocked"] is False
    [unblocked] = ok(data_dir, "events", "list", "-t", "source.unblocked")["events"]
    assert unblocked["source"] == "203.0.113.77"
    assert unblocked["detail"]["admin"].startswith("cli")
