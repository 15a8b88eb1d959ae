"""The ``qflare`` operator command, run in-process (typer's CliRunner) against real stores.

Each test has its own data directory, no ``QFLARE_*`` variables and no config file, so nothing
from the machine running the tests leaks in. Setup that the command has no verb for (enrolling
a device, opening a session, recording an event) goes through ``KeyManager`` and the store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import typer

from qflare import __version__, crypto
from qflare.cli import app
from qflare.cli.context import redact_url
from qflare.config import Settings
from qflare.crypto import labels
from qflare.keys import EnrollmentRequest, KeyManager
from qflare.keys.manager import utc
from qflare.monitor.entry import decode_entry
from qflare.protocol.enrollment import enrollment_proof_message
from qflare.store import FinishOutcome
from qflare.store.schema import load_migrations

from .support import ok, qflare, runner, with_manager

SQLITE_MIGRATIONS = load_migrations("sqlite")


def fails(data_dir: Path, *args: str, code: str, input: str | None = None) -> str:
    """Run with --json, expect exit 1 with ``code``; return the stderr line."""
    result = qflare(data_dir, "--json", *args, input=input)
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert json.loads(result.stdout)["error"] == code, result.stdout
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    return errors[0]


def enroll(data_dir: Path, device_id: str) -> bytes:
    """Enroll ``device_id`` as a device would; return its public key."""

    async def work(m: KeyManager) -> bytes:
        issued = await m.issue_token(now=time.time())
        key = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
        public = key.public_key().public_bytes()
        proof = key.sign(
            enrollment_proof_message(device_id, "ML-DSA-44", public, issued.token),
            labels.SIG_ENROLLMENT,
        )
        request = EnrollmentRequest(
            token=issued.token,
            device_id=device_id,
            algorithm="ML-DSA-44",
            public_key=public,
            proof=proof,
        )
        await m.enroll(request, now=time.time())
        return public

    return with_manager(data_dir, work)


def open_session(data_dir: Path, device_id: str) -> bytes:
    """A session row for the device, written as a ClientFinish writes it (the device becomes
    active; the sealed state is never opened by the command)."""
    session_id = os.urandom(16)

    async def work(m: KeyManager) -> None:
        now = utc(time.time())
        done = await m.store.finish_handshake(
            m.tenant,
            session_id=session_id,
            device_id=device_id,
            suite=0x0101,
            epoch=7,
            encrypted_chain_state=b"sealed elsewhere",
            replay_window=b"",
            now=now,
            expires_at=now + timedelta(hours=1),
        )
        assert done.outcome is FinishOutcome.CREATED

    with_manager(data_dir, work)
    return session_id


def command_paths() -> Iterator[tuple[str, ...]]:
    def walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, (*path, name))

    yield from walk(typer.main.get_command(app), ())


# -- help and entry point ---------------------------------------------------------------------

EXPECTED_COMMANDS = {
    ("init",),
    ("serve",),
    ("demo",),
    ("token", "issue"),
    ("device", "list"),
    ("device", "show"),
    ("device", "quarantine"),
    ("device", "reinstate"),
    ("device", "revoke"),
    ("keys", "list"),
    ("keys", "rotate"),
    ("keys", "retire-due"),
    ("keys", "revoke"),
    ("session", "list"),
    ("session", "revoke"),
    ("db", "migrate"),
    ("db", "status"),
    ("db", "cleanup"),
    ("admin-token", "create"),
    ("admin-token", "list"),
    ("events", "list"),
    ("events", "tail"),
    ("source", "list"),
    ("source", "unblock"),
    ("audit", "verify"),
    ("audit", "checkpoint"),
    ("audit", "key"),
    ("bench",),
}


def test_every_command_exists_and_documents_itself() -> None:
    root = typer.main.get_command(app)
    paths = list(command_paths())
    leaves = {p for p in paths if not getattr(_lookup(root, p), "commands", None)}
    assert leaves == EXPECTED_COMMANDS
    for path in paths:
        command = _lookup(root, path)
        assert (command.help or "").strip(), f"{path} has no help text"
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output
        first_words = " ".join(command.help.split()[:3])
        assert first_words in " ".join(result.output.split()), path


def _lookup(root: Any, path: tuple[str, ...]) -> Any:
    command = root
    for name in path:
        command = command.commands[name]
    return command


def test_console_script_runs(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("qflare")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    helped = subprocess.run(
        [script, "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert helped.returncode == 0, helped.stderr
    assert "admin-token" in helped.stdout and "init" in helped.stdout
    version = subprocess.run(
        [script, "--version", "--json"], capture_output=True, text=True, env=env, check=False
    )
    assert version.returncode == 0
    assert json.loads(version.stdout) == {"version": __version__}


def test_missing_command_is_a_usage_error(data_dir: Path) -> None:
    result = qflare(data_dir, "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"] == "usage"
    assert "missing command" in result.stderr


# -- init -------------------------------------------------------------------------------------


def test_init_creates_the_data_dir_once(data_dir: Path) -> None:
    first = ok(data_dir, "init")
    key_file = data_dir / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (data_dir / "qflare.db").is_file()
    assert first["changed"] is True
    assert first["master_key"] == {"status": "created", "path": str(key_file)}
    assert first["migrations_applied"] == [f"{m.version:04d} {m.name}" for m in SQLITE_MIGRATIONS]
    created = {k["purpose"]: k for k in first["keys_created"]}
    assert set(created) == {"kem-static", "biscuit", "audit-signing"}
    assert all(k["state"] == "active" and k["version"] == 1 for k in created.values())
    master = key_file.read_text()

    second = ok(data_dir, "init")
    assert second["changed"] is False
    assert second["master_key"]["status"] == "kept"
    assert second["migrations_applied"] == [] and second["keys_created"] == []
    assert key_file.read_text() == master
    listed = ok(data_dir, "keys", "list")["keys"]
    assert sorted(k["key_id"] for k in listed) == sorted(k["key_id"] for k in created.values())

    human = qflare(data_dir, "init")
    assert human.exit_code == 0
    assert "nothing was changed" in human.stdout
    assert "(kept)" in human.stdout
    # No private material, sealed or not, anywhere in what the command prints.
    everything = json.dumps([first, second, listed]) + human.output
    assert master.strip() not in everything
    assert "private" not in everything


def test_init_with_master_key_from_environment(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QFLARE_MASTER_KEY", base64.b64encode(bytes(32)).decode())
    report = ok(data_dir, "init")
    assert report["master_key"] == {"status": "environment", "path": None}
    assert not (data_dir / "master.key").exists()


# -- errors -----------------------------------------------------------------------------------


def test_quarantine_of_unknown_device_is_a_clear_error(ready: Path) -> None:
    line = fails(ready, "device", "quarantine", "ghost-1", "--reason", "lost", code="not_found")
    assert line == "error: device 'ghost-1' not found in tenant 'default'"
    human = qflare(ready, "device", "quarantine", "ghost-1", "--reason", "lost")
    assert human.exit_code == 1
    assert human.stdout == ""
    assert human.stderr.strip() == line


def test_command_before_init_says_what_to_do(data_dir: Path) -> None:
    line = fails(data_dir, "device", "list", code="master_key_unavailable")
    assert "qflare init" in line


def test_bad_settings_are_one_line(data_dir: Path) -> None:
    line = fails(data_dir, "--database-url", "mysql://db/x", "db", "status", code="config_error")
    assert "database_url" in line


def test_invalid_identifier_is_one_line(ready: Path) -> None:
    fails(ready, "device", "show", "no spaces allowed", code="invalid_identifier")


def test_usage_errors_exit_2(ready: Path) -> None:
    assert qflare(ready, "device", "list", "--state", "sleeping").exit_code == 2
    assert qflare(ready, "session", "revoke", "not-hex").exit_code == 2
    assert qflare(ready, "session", "revoke", "abcd").exit_code == 2
    assert qflare(ready, "admin-token", "create", "--name", "x").exit_code == 2  # no --scope


# -- tokens and devices -----------------------------------------------------------------------


def test_token_issue_then_empty_device_list(ready: Path) -> None:
    issued = ok(ready, "token", "issue", "--count", "2", "--ttl", "600")
    tokens = issued["tokens"]
    assert len(tokens) == 2 and issued["shown_once"] is True
    assert all(t["token"].startswith("qft_") for t in tokens)
    assert tokens[0]["token"] != tokens[1]["token"]
    assert ok(ready, "device", "list") == {"devices": []}

    human = qflare(ready, "token", "issue")
    assert human.exit_code == 0
    assert human.stdout.startswith("qft_")
    assert "shown only this once" in human.stderr


def test_device_lifecycle(ready: Path) -> None:
    public = enroll(ready, "dev-1")
    enroll(ready, "dev-2")
    session_id = open_session(ready, "dev-1")

    listed = ok(ready, "device", "list")["devices"]
    assert [(d["device_id"], d["state"]) for d in listed] == [
        ("dev-1", "active"),  # it completed a handshake (open_session)
        ("dev-2", "enrolled"),
    ]
    assert [d["device_id"] for d in ok(ready, "device", "list", "--after", "dev-1")["devices"]] == [
        "dev-2"
    ]
    assert ok(ready, "device", "list", "--state", "quarantined") == {"devices": []}

    shown = ok(ready, "device", "show", "dev-1")
    assert shown["device"]["device_id"] == "dev-1"
    (key,) = shown["keys"]
    assert key["algorithm"] == "ML-DSA-44" and key["version"] == 1
    assert key["fingerprint"] == hashlib.sha256(public).hexdigest()[:16]
    assert [s["session_id"] for s in shown["sessions"]] == [session_id.hex()]

    quarantined = ok(ready, "device", "quarantine", "dev-1", "--reason", "lost in transit")
    assert quarantined["device"]["state"] == "quarantined"
    assert quarantined["device"]["state_reason"] == "lost in transit"
    assert ok(ready, "session", "list", "dev-1")["sessions"][0]["state"] == "revoked"
    assert ok(ready, "device", "reinstate", "dev-1")["device"]["state"] == "active"
    fails(ready, "device", "reinstate", "dev-1", code="conflict")  # not quarantined

    declined = qflare(ready, "device", "revoke", "dev-1", "--reason", "stolen", input="n\n")
    assert declined.exit_code == 1
    assert "Revoke device dev-1" in declined.stderr
    assert ok(ready, "device", "show", "dev-1")["device"]["state"] == "active"
    fails(ready, "device", "revoke", "dev-1", "--reason", "stolen", code="declined")  # no input

    revoked = ok(ready, "device", "revoke", "dev-1", "--reason", "stolen", "--yes")
    assert revoked["device"]["state"] == "revoked"
    fails(ready, "device", "quarantine", "dev-1", "--reason", "x", code="conflict")
    confirmed = qflare(ready, "device", "revoke", "dev-2", "--reason", "retired", input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert "dev-2 revoked" in confirmed.stdout


def test_human_output_never_interprets_stored_text(ready: Path) -> None:
    enroll(ready, "dev-1")
    reason = "[bold red]pwned[/] \x1b[2J"
    ok(ready, "device", "quarantine", "dev-1", "--reason", reason)
    shown = qflare(ready, "device", "show", "dev-1")
    assert shown.exit_code == 0
    assert "[bold red]pwned[/]" in shown.stdout
    assert "\x1b" not in shown.stdout and "\\x1b[2J" in shown.stdout


# -- sessions ---------------------------------------------------------------------------------


def test_session_list_and_revoke(ready: Path) -> None:
    enroll(ready, "dev-1")
    first, second = open_session(ready, "dev-1"), open_session(ready, "dev-1")
    sessions = ok(ready, "session", "list", "dev-1")["sessions"]
    assert {s["session_id"] for s in sessions} == {first.hex(), second.hex()}
    assert all(s["state"] == "active" and s["epoch"] == 7 for s in sessions)

    revoked = ok(ready, "session", "revoke", first.hex())["session"]
    assert revoked["state"] == "revoked" and revoked["device_id"] == "dev-1"
    states = {
        s["session_id"]: s["state"] for s in ok(ready, "session", "list", "dev-1")["sessions"]
    }
    assert states == {first.hex(): "revoked", second.hex(): "active"}

    line = fails(ready, "session", "revoke", "00" * 16, code="not_found")
    assert "00" * 16 in line
    fails(ready, "session", "list", "ghost", code="not_found")


# -- server key ring --------------------------------------------------------------------------


def test_keys_rotate_leaves_two_kem_keys(ready: Path) -> None:
    before = {k["purpose"]: k for k in ok(ready, "keys", "list")["keys"]}
    rotated = ok(ready, "keys", "rotate", "--overlap", "3600")
    assert rotated["active"]["purpose"] == "kem-static" and rotated["active"]["version"] == 2
    assert rotated["previous"]["key_id"] == before["kem-static"]["key_id"]

    kem = [k for k in ok(ready, "keys", "list")["keys"] if k["purpose"] == "kem-static"]
    assert len(kem) == 2
    states = {k["key_id"]: k["state"] for k in kem}
    assert states == {
        before["kem-static"]["key_id"]: "retiring",
        rotated["active"]["key_id"]: "active",
    }
    retiring = next(k for k in kem if k["state"] == "retiring")
    assert retiring["retire_after"] is not None
    assert ok(ready, "keys", "retire-due") == {"retired": []}  # overlap not over yet

    biscuit = ok(ready, "keys", "rotate", "--purpose", "biscuit")
    assert biscuit["active"]["purpose"] == "biscuit" and biscuit["active"]["fingerprint"] is None


def test_keys_retire_due_and_revoke(ready: Path) -> None:
    rotated = ok(ready, "keys", "rotate", "--overlap", "0")
    old = rotated["previous"]["key_id"]
    retired = ok(ready, "keys", "retire-due")["retired"]
    assert [(k["key_id"], k["state"]) for k in retired] == [(old, "retired")]

    declined = qflare(ready, "keys", "revoke", old, input="n\n")
    assert declined.exit_code == 1
    active = rotated["active"]["key_id"]
    asked = qflare(ready, "keys", "revoke", active, input="n\n")
    assert "ACTIVE kem-static key" in asked.stderr
    states = {k["key_id"]: k["state"] for k in ok(ready, "keys", "list")["keys"]}
    assert states[old] == "retired" and states[active] == "active"

    first = ok(ready, "keys", "revoke", old, "--yes")
    assert first["key"]["state"] == "revoked" and first["changed"] is True
    again = qflare(ready, "keys", "revoke", old)  # nothing to confirm: it is final already
    assert again.exit_code == 0 and "already revoked" in again.stdout
    fails(ready, "keys", "revoke", "kem-000000000000", "--yes", code="not_found")


# -- database ---------------------------------------------------------------------------------


def test_db_status_after_init_has_nothing_pending(ready: Path) -> None:
    report = ok(ready, "db", "status")
    assert report["dialect"] == "sqlite" and report["current"] is True
    assert report["pending"] == []
    assert [m["version"] for m in report["applied"]] == [m.version for m in SQLITE_MIGRATIONS]
    assert "schema is current" in qflare(ready, "db", "status").stdout


def test_db_migrate_and_status_on_a_fresh_database(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    before = ok(data_dir, "db", "status")
    versions = [m.version for m in SQLITE_MIGRATIONS]
    assert before["current"] is False and [m["version"] for m in before["pending"]] == versions
    assert ok(data_dir, "db", "migrate") == {
        "applied": [{"version": m.version, "name": m.name} for m in SQLITE_MIGRATIONS]
    }
    assert ok(data_dir, "db", "migrate") == {"applied": []}
    assert ok(data_dir, "db", "status")["current"] is True


def test_db_cleanup_deletes_expired_rows(ready: Path) -> None:
    async def expired_token(m: KeyManager) -> None:
        await m.issue_token(now=time.time() - 7200, ttl=60)

    with_manager(ready, expired_token)
    ok(ready, "token", "issue")  # live: must survive
    counts = ok(ready, "db", "cleanup", "--batch-size", "1")
    assert counts == {"sessions": 0, "nonces": 0, "tokens": 1, "total": 1}
    assert ok(ready, "db", "cleanup")["total"] == 0
    human = qflare(ready, "db", "cleanup")
    assert human.exit_code == 0 and "Deleted 0 session(s)" in human.stdout


# -- admin tokens and events ------------------------------------------------------------------


def test_admin_tokens(ready: Path) -> None:
    line = fails(
        ready, "admin-token", "create", "--name", "ops", "--scope", "root", code="value_error"
    )
    assert "scopes must be among" in line

    created = ok(
        ready, "admin-token", "create", "--name", "ops", "--scope", "read", "--scope", "keys"
    )
    token = created["token"]
    assert token.startswith("qfa_") and created["shown_once"] is True
    assert created["admin_token"]["scopes"] == ["keys", "read"]

    listed = qflare(ready, "--json", "admin-token", "list")
    assert json.loads(listed.stdout) == {
        "admin_tokens": [
            {
                "name": "ops",
                "scopes": ["keys", "read"],
                "created_at": created["admin_token"]["created_at"],
                "revoked": False,
            }
        ]
    }
    assert token not in listed.output
    assert token not in qflare(ready, "admin-token", "list").output


def test_events_list(ready: Path) -> None:
    async def record(m: KeyManager) -> None:
        now = utc(time.time())
        await m.store.append_security_event(
            m.tenant, ts=now, type="replay", severity=5, device_id="dev-1", detail={"n": 1}
        )
        await m.store.append_security_event(
            m.tenant,
            ts=now,
            type="bad_handshake",
            severity=3,
            device_id="evil\x1b[2J",
            source="203.0.113.9",
            detail={"note": "\x1b]0;owned\x07"},
        )

    with_manager(ready, record)
    # `qflare init` stored one key.generated per key it made (tests/monitor covers those).
    events = ok(ready, "events", "list", "--device", "dev-1")["events"]
    events += ok(ready, "events", "list", "--after-id", str(events[0]["id"]))["events"]
    assert [e["type"] for e in events] == ["replay", "bad_handshake"]
    assert events[0]["detail"] == {"n": 1}
    only = ok(ready, "events", "list", "--device", "dev-1")["events"]
    assert [e["device_id"] for e in only] == ["dev-1"]
    paged = ok(ready, "events", "list", "--after-id", str(events[0]["id"]), "--limit", "1")
    assert [e["type"] for e in paged["events"]] == ["bad_handshake"]

    human = qflare(ready, "events", "list")
    assert human.exit_code == 0
    assert "\x1b" not in human.stdout and "\x07" not in human.stdout
    assert "bad_handshake" in human.stdout


# -- the command's own changes go through the audit log (docs/AUDIT.md, "Fail closed") ---------


def logged(data_dir: Path, start: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(kind, data) of every audit entry from ``start`` on."""

    async def work(m: KeyManager) -> list[tuple[str, dict[str, Any]]]:
        entries = await m.store.list_audit(start=start, limit=10_000)
        return [(e.kind, dict(decode_entry(e.payload).data)) for e in entries]

    return with_manager(data_dir, work)


def audit_size(data_dir: Path) -> int:
    return with_manager(data_dir, lambda m: m.store.audit_size())


def operation(kind: str, intent: int, **fields: Any) -> list[tuple[str, dict[str, Any]]]:
    """The intent and ``ok`` outcome entries one audited command writes."""
    result = fields.pop("result", {})
    return [
        (kind, {**fields, "actor": "cli", "phase": "intent"}),
        (kind, {**result, "phase": "outcome", "intent": intent, "result": "ok"}),
    ]


def test_every_state_change_of_the_command_is_audited(ready: Path) -> None:
    enroll(ready, "dev-1")
    session_id = open_session(ready, "dev-1")
    at = audit_size(ready)  # the enrollment's own entries come first

    def expect(*args: str, kind: str, **fields: Any) -> dict[str, Any]:
        nonlocal at
        document = ok(ready, *args)
        assert logged(ready, at) == operation(kind, at, **fields), args
        at += 2
        return document

    issued = ok(ready, "token", "issue", "--count", "2")
    token_ids = [t["token_id"] for t in issued["tokens"]]
    assert logged(ready, at) == [
        *operation("token.issue", at, result={"token_id": token_ids[0]}),
        *operation("token.issue", at + 2, result={"token_id": token_ids[1]}),
    ]
    at += 4
    quarantine = ("device", "quarantine", "dev-1", "--reason", "lost")
    expect(*quarantine, kind="device.quarantine", device_id="dev-1")
    expect("device", "reinstate", "dev-1", kind="device.reinstate", device_id="dev-1")
    revoke = ("session", "revoke", session_id.hex())
    expect(*revoke, kind="session.revoke", session_id=session_id.hex())
    revoke = ("device", "revoke", "dev-1", "--reason", "stolen", "--yes")
    expect(*revoke, kind="device.revoke", device_id="dev-1", result={"sessions": 0})
    rotated = ok(ready, "keys", "rotate", "--overlap", "0")
    assert logged(ready, at) == operation(
        "key.rotate", at, purpose="kem-static", result={"key_id": rotated["active"]["key_id"]}
    )
    at += 2
    old = rotated["previous"]["key_id"]
    expect("keys", "retire-due", kind="key.retire", key_ids=[old], result={"retired": [old]})
    assert ok(ready, "keys", "retire-due") == {"retired": []}
    assert audit_size(ready) == at  # nothing was due: nothing logged
    expect("keys", "revoke", old, "--yes", kind="key.revoke", key_id=old, purpose="kem-static")
    ok(ready, "keys", "revoke", old)  # already revoked: no change, no entry
    create = ("admin-token", "create", "--name", "ops", "--scope", "read", "--scope", "keys")
    expect(*create, kind="admin-token.create", name="ops", scopes=["keys", "read"])

    # Refused before any change: no entry for a declined question or an unknown id, nor for
    # arguments the command checks first.
    qflare(ready, "keys", "revoke", rotated["active"]["key_id"], input="n\n")
    fails(ready, "device", "quarantine", "ghost", "--reason", "x", code="not_found")
    fails(ready, "session", "revoke", "00" * 16, code="not_found")
    fails(ready, "admin-token", "create", "--name", "x", "--scope", "root", code="value_error")
    assert audit_size(ready) == at
    # A change the key manager refuses is logged as tried, with how it ended.
    fails(ready, "device", "reinstate", "dev-1", code="conflict")
    assert logged(ready, at) == [
        ("device.reinstate", {"device_id": "dev-1", "actor": "cli", "phase": "intent"}),
        (
            "device.reinstate",
            {"error": "Conflict", "result": "refused", "phase": "outcome", "intent": at},
        ),
    ]
    # And the log is whole: every entry hashed, linked and signed over.
    ok(ready, "audit", "checkpoint")
    assert ok(ready, "audit", "verify")["ok"] is True


def deny_audit_appends(data_dir: Path) -> None:
    """Make the audit table refuse every insert, as a full disk or a lost grant would (the way
    tests/e2e/test_audit.py does, through tests/monitor/intruder.py)."""
    with sqlite3.connect(data_dir / "qflare.db") as db:
        db.execute(
            "CREATE TRIGGER deny_audit BEFORE INSERT ON audit_entries "
            "BEGIN SELECT RAISE(ABORT, 'audit denied'); END"
        )
    db.close()


def state(data_dir: Path) -> dict[str, Any]:
    """Everything the audited commands can change, read behind the command's back."""
    with sqlite3.connect(data_dir / "qflare.db") as db:
        tables = {
            table: sorted(map(repr, db.execute(f"SELECT * FROM {table}").fetchall()))
            for table in ("devices", "sessions", "server_keys", "enrollment_tokens", "admin_tokens")
        }
    db.close()
    return tables


def test_the_command_changes_nothing_it_cannot_log(ready: Path) -> None:
    enroll(ready, "dev-1")
    enroll(ready, "dev-2")
    ok(ready, "device", "quarantine", "dev-2", "--reason", "to reinstate")
    session_id = open_session(ready, "dev-1")
    rotated = ok(ready, "keys", "rotate", "--overlap", "0")  # the old key is due to retire
    old = rotated["previous"]["key_id"]
    deny_audit_appends(ready)
    before, size = state(ready), audit_size(ready)

    for args in (
        ("keys", "rotate"),
        ("keys", "rotate", "--purpose", "audit-signing"),
        ("keys", "retire-due"),
        ("keys", "revoke", old, "--yes"),
        ("admin-token", "create", "--name", "ops", "--scope", "read"),
        ("device", "quarantine", "dev-1", "--reason", "x"),
        ("device", "reinstate", "dev-2"),
        ("device", "revoke", "dev-1", "--reason", "x", "--yes"),
        ("session", "revoke", session_id.hex()),
        ("token", "issue"),
    ):
        line = fails(ready, *args, code="audit_unavailable")
        assert "not done: the audit log cannot be written" in line, (args, line)
        assert "refused" in line
        assert state(ready) == before, args
        assert audit_size(ready) == size, args

    # No secret was printed for a token that was never made.
    human = qflare(ready, "token", "issue")
    assert human.exit_code == 1 and "qft_" not in human.output
    assert "error: token.issue not done" in human.stderr
    assert "qfa_" not in qflare(ready, "admin-token", "create", "-n", "x", "-s", "read").output
    # Reading still works, and the log that was written still verifies.
    assert ok(ready, "device", "show", "dev-1")["device"]["state"] == "active"
    assert ok(ready, "audit", "verify")["ok"] is True


def test_audit_origin_setting(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFLARE_AUDIT_ORIGIN", "audit.example.org/fleet-7")
    ok(ready, "token", "issue")
    signed = ok(ready, "audit", "checkpoint")
    assert signed["origin"] == "audit.example.org/fleet-7"
    assert signed["note"].startswith("audit.example.org/fleet-7\n")
    assert "\u2014 audit.example.org/fleet-7 " in signed["note"]  # the key name too
    assert ok(ready, "audit", "key")["origin"] == "audit.example.org/fleet-7"
    assert ok(ready, "audit", "verify")["checkpoints_verified"] == 1
    # A verifier that expects the default origin does not count this log's checkpoints.
    monkeypatch.delenv("QFLARE_AUDIT_ORIGIN")
    report = qflare(ready, "--json", "audit", "verify")
    assert report.exit_code == 1
    assert json.loads(report.stdout)["checkpoints_verified"] == 0


# -- serve and demo ---------------------------------------------------------------------------


def test_serve_hands_settings_to_the_server(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []
    fake = types.ModuleType("qflare.server.app")
    fake.serve = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qflare.server.app", fake)
    result = qflare(ready, "serve", "--host", "0.0.0.0", "--port", "9999")
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert (settings.host, settings.port, settings.data_dir) == ("0.0.0.0", 9999, ready)


def test_serve_without_a_server_is_a_clear_error(
    ready: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "qflare.server.app", None)
    line = fails(ready, "serve", code="server_unavailable")
    assert "server cannot be loaded" in line


def test_serve_refuses_to_start_without_a_master_key(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("qflare.server.app")
    fake.serve = lambda settings: pytest.fail("server started")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qflare.server.app", fake)
    fails(data_dir, "serve", code="master_key_unavailable")


def test_demo_passes_its_options_and_exit_code(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def run_demo(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 3

    fake = types.ModuleType("qflare.demo")
    fake.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qflare.demo", fake)
    args = ("demo", "--devices", "4", "--rounds", "2", "--epoch-seconds", "1")
    result = qflare(data_dir, "--json", *args, "--postgres", "postgresql://db/x")
    assert result.exit_code == 3
    assert calls == [
        {
            "devices": 4,
            "rounds": 2,
            "epoch_seconds": 1,
            "postgres_url": "postgresql://db/x",
            "json_output": True,
        }
    ]
    assert qflare(data_dir, "demo").exit_code == 3
    assert calls[-1] == {
        "devices": 10,
        "rounds": 5,
        "epoch_seconds": 3,
        "postgres_url": None,
        "json_output": False,
    }


# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_init_and_status_on_postgres(postgres_url: str, data_dir: Path) -> None:
    schema = f"qflare_t_{uuid.uuid4().hex[:16]}"
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"
    try:
        before = ok(data_dir, "--database-url", url, "db", "status")
        assert before["dialect"] == "postgres" and before["pending"]
        report = ok(data_dir, "--database-url", url, "init")
        assert report["migrations_applied"] and len(report["keys_created"]) == 3
        assert not (data_dir / "qflare.db").exists()
        after = ok(data_dir, "--database-url", url, "db", "status")
        assert after["current"] is True and after["pending"] == []
        again = ok(data_dir, "--database-url", url, "init")
        assert again["changed"] is False
        assert len(ok(data_dir, "--database-url", url, "keys", "list")["keys"]) == 3
    finally:
        asyncio.run(_drop_schema(postgres_url, schema))


async def _drop_schema(base: str, schema: str) -> None:
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def test_database_passwords_are_redacted() -> None:
    assert redact_url("postgresql://qflare:s3cret@db:5432/q?schema=x") == (
        "postgresql://qflare:***@db:5432/q?schema=x"
    )
    assert redact_url("postgresql://qflare@db/q") == "postgresql://qflare@db/q"
    assert (
        redact_url("sqlite:////var/lib/qflare/qflare.db") == "sqlite:////var/lib/qflare/qflare.db"
    )
