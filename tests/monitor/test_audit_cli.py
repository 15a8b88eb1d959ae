"""``qflare audit verify`` and ``qflare audit checkpoint`` in-process, on both stores."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli import support as cli_support
from qflare import crypto
from qflare.cli import app
from qflare.config import Settings
from qflare.monitor.audit import AuditLog, default_origin
from qflare.monitor.checkpoint import NoteVerifier, verify_checkpoint
from qflare.runtime import open_manager
from qflare.store import KeyPurpose

from .intruder import Intruder

runner = CliRunner()
ORIGIN = default_origin("default")


# The environment without the machine's QFLARE_* settings (autouse), as for every command test.
isolated_env = cli_support.isolated_env


@pytest.fixture
def ready(tmp_path: Path, database_url: str) -> tuple[Path, str]:
    data = tmp_path / "data"
    assert qflare(data, database_url, "init").exit_code == 0
    return data, database_url


def qflare(data: Path, url: str, *args: str) -> Result:
    return runner.invoke(app, ["--data-dir", str(data), "--database-url", url, *args])


async def append(data: Path, url: str, n: int) -> bytes:
    """``n`` audit entries, as the server would write them; returns the audit public key."""
    manager = await open_manager(Settings(data_dir=data, database_url=url))
    try:
        log = AuditLog.for_keys(manager)
        for i in range(n):
            await log.append("test.op", {"n": i})
        key = await manager.store.get_active_server_key("default", KeyPurpose.AUDIT_SIGNING)
        return key.public_key
    finally:
        await manager.store.close()


def test_checkpoint_then_verify_then_tamper(ready: tuple[Path, str], tmp_path: Path) -> None:
    data, url = ready
    public = asyncio.run(append(data, url, 5))

    issued = qflare(data, url, "audit", "checkpoint")
    assert issued.exit_code == 0, issued.stderr
    checkpoint = verify_checkpoint(issued.stdout, [NoteVerifier(ORIGIN, public)], origin=ORIGIN)
    assert checkpoint.size == 5
    kept = tmp_path / "checkpoint.txt"
    kept.write_text(issued.stdout)

    verified = qflare(data, url, "--json", "audit", "verify")
    assert verified.exit_code == 0, verified.stderr
    doc = json.loads(verified.stdout)
    assert doc["ok"] is True and doc["size"] == 5 and doc["checkpoints_verified"] == 1
    assert doc["root"] == base64.b64encode(checkpoint.root).decode()
    human = qflare(data, url, "audit", "verify")
    assert human.exit_code == 0 and "The audit log verifies." in human.stdout

    async def tamper() -> None:
        async with Intruder(url) as intruder:
            await intruder.delete(2)

    asyncio.run(tamper())
    failed = qflare(data, url, "audit", "verify")
    assert failed.exit_code == 1
    assert "the first bad index is 2" in failed.stderr
    assert "bad entry 2: missing" in failed.stdout
    doc = json.loads(qflare(data, url, "--json", "audit", "verify").stdout)
    assert (doc["ok"], doc["first_bad_index"]) == (False, 2)

    # The failure was recorded as a security event for whoever watches them.
    events = json.loads(qflare(data, url, "--json", "events", "list").stdout)["events"]
    assert [e["type"] for e in events].count("audit.verification_failed") == 2


def test_pinned_keys_and_checkpoints_kept_elsewhere(
    ready: tuple[Path, str], tmp_path: Path
) -> None:
    data, url = ready
    public = asyncio.run(append(data, url, 3))
    note = qflare(data, url, "audit", "checkpoint").stdout
    (tmp_path / "kept.txt").write_text(note)
    shown = json.loads(qflare(data, url, "--json", "audit", "key").stdout)
    assert shown["origin"] == ORIGIN and shown["algorithm"] == "ML-DSA-87"
    (key,) = shown["keys"]
    assert key["public_key"] == base64.b64encode(public).decode()
    assert key["note_key_id"] == NoteVerifier(ORIGIN, public).key_id.hex()
    human = qflare(data, url, "audit", "key").stdout
    assert key["public_key"] in human.split()
    (tmp_path / "key.b64").write_text(key["public_key"] + "\n")

    pinned = qflare(data, url, "audit", "verify", "--trusted-key", f"@{tmp_path / 'key.b64'}")
    assert pinned.exit_code == 0, pinned.stdout + pinned.stderr
    stranger = crypto.signature("ML-DSA-87").generate(crypto.system_rng).public_key()
    other = base64.b64encode(stranger.public_bytes()).decode()
    refused = qflare(data, url, "audit", "verify", "--trusted-key", other)
    assert refused.exit_code == 1
    assert "does not verify" in refused.stdout  # the stored checkpoint is not the pinned key's
    bad = qflare(data, url, "audit", "verify", "--trusted-key", "not base64!")
    assert bad.exit_code == 1 and "not base64" in bad.stderr

    async def tamper() -> None:
        async with Intruder(url) as intruder:
            await intruder.delete(2)
            await intruder.delete(1)

    asyncio.run(tamper())
    # Even with the stored checkpoint events gone (here: verified against the copy only),
    # the copy kept outside shows that entries 1 and 2 existed.
    outside = qflare(data, url, "--json", "audit", "verify", "-c", str(tmp_path / "kept.txt"))
    assert outside.exit_code == 1
    assert json.loads(outside.stdout)["first_bad_index"] == 1


def test_verify_of_an_empty_log_warns(ready: tuple[Path, str]) -> None:
    data, url = ready
    result = qflare(data, url, "audit", "verify")
    assert result.exit_code == 0
    assert "no signed checkpoint" in result.stderr
