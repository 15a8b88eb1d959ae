"""Store records as the ``qflare`` command shows them: JSON objects and rich tables.

Only public fields appear. Sealed private keys, sealed session state, replay windows and token
hashes are never read here; public keys are shown as a short fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from qflare import crypto
from qflare.cli.output import printable
from qflare.errors import QflareError
from qflare.protocol.suites import by_id
from qflare.store import (
    AdminToken,
    Device,
    DeviceKey,
    SecurityEventRecord,
    ServerKey,
    SessionRecord,
)

FINGERPRINT_HEX = 16


def fingerprint(public_key: bytes) -> str | None:
    """First 16 hex digits of SHA-256 of the public key; None for a key without one."""
    if not public_key:
        return None
    return crypto.kdf("HKDF-SHA256").hash(public_key).hex()[:FINGERPRINT_HEX]


def suite_name(suite_id: int) -> str:
    try:
        return by_id(suite_id).name
    except QflareError:  # a suite this release does not know
        return f"0x{suite_id:04x}"


def when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def cell(value: object) -> Text:
    """A table cell that is always plain text: stored strings are not rich markup."""
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, datetime):
        return Text(when(value))
    return Text(printable(str(value)))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    out = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for name in columns:
        out.add_column(name, overflow="fold")
    for row in rows:
        out.add_row(*(cell(v) for v in row))
    if not out.row_count:
        out.caption = "none"
    return out


def fields(title: str, pairs: Iterable[tuple[str, object]]) -> Table:
    """A two-column table for one record."""
    out = Table(title=title, box=box.SIMPLE, show_header=False, title_justify="left")
    out.add_column(style="bold")
    out.add_column(overflow="fold")
    for name, value in pairs:
        out.add_row(name, cell(value))
    return out


# -- devices ----------------------------------------------------------------------------------


def device(d: Device) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "state": d.state.value,
        "state_reason": d.state_reason,
        "created_at": d.created_at,
        "last_seen": d.last_seen,
        "failure_count": d.failure_count,
        "last_handshake_ts": d.last_handshake_ts,
    }


def device_table(devices: Sequence[Device]) -> Table:
    return table(
        f"Devices ({len(devices)})",
        ("device", "state", "reason", "enrolled", "last seen", "failures"),
        (
            (d.device_id, d.state.value, d.state_reason, d.created_at, d.last_seen, d.failure_count)
            for d in devices
        ),
    )


def device_fields(d: Device) -> Table:
    return fields(f"Device {d.device_id}", ((k, v) for k, v in device(d).items()))


def device_key(k: DeviceKey) -> dict[str, Any]:
    return {
        "version": k.version,
        "algorithm": k.algorithm,
        "state": k.state.value,
        "created_at": k.created_at,
        "fingerprint": fingerprint(k.public_key),
    }


def device_key_table(keys: Sequence[DeviceKey]) -> Table:
    return table(
        "Identity keys",
        ("version", "algorithm", "state", "created", "fingerprint"),
        (
            (k.version, k.algorithm, k.state.value, k.created_at, fingerprint(k.public_key))
            for k in keys
        ),
    )


# -- sessions ---------------------------------------------------------------------------------


def session(s: SessionRecord) -> dict[str, Any]:
    return {
        "session_id": s.session_id.hex(),
        "device_id": s.device_id,
        "state": s.state.value,
        "suite": suite_name(s.suite),
        "epoch": s.epoch,
        "messages_sent": s.counters.messages_sent,
        "messages_received": s.counters.messages_received,
        "bytes_sent": s.counters.bytes_sent,
        "bytes_received": s.counters.bytes_received,
        "created_at": s.created_at,
        "expires_at": s.expires_at,
        "updated_at": s.updated_at,
        "version": s.version,
    }


def session_table(sessions: Sequence[SessionRecord], title: str = "Sessions") -> Table:
    return table(
        f"{title} ({len(sessions)})",
        ("session", "state", "epoch", "msgs out/in", "created", "expires"),
        (
            (
                s.session_id.hex(),
                s.state.value,
                s.epoch,
                f"{s.counters.messages_sent}/{s.counters.messages_received}",
                s.created_at,
                s.expires_at,
            )
            for s in sessions
        ),
    )


# -- server key ring --------------------------------------------------------------------------


def server_key(k: ServerKey) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "purpose": k.purpose.value,
        "algorithm": k.algorithm,
        "version": k.version,
        "state": k.state.value,
        "created_at": k.created_at,
        "activated_at": k.activated_at,
        "retire_after": k.retire_after,
        "fingerprint": fingerprint(k.public_key),
    }


def server_key_table(keys: Sequence[ServerKey], title: str = "Server keys") -> Table:
    return table(
        f"{title} ({len(keys)})",
        ("key", "purpose", "algorithm", "version", "state", "created", "retire after"),
        (
            (
                k.key_id,
                k.purpose.value,
                k.algorithm,
                k.version,
                k.state.value,
                k.created_at,
                k.retire_after,
            )
            for k in keys
        ),
    )


# -- admin tokens and events ------------------------------------------------------------------


def admin_token(t: AdminToken) -> dict[str, Any]:
    return {
        "name": t.name,
        "scopes": list(t.scopes),
        "created_at": t.created_at,
        "revoked": t.revoked,
    }


def admin_token_table(tokens: Sequence[AdminToken]) -> Table:
    return table(
        f"Admin tokens ({len(tokens)})",
        ("name", "scopes", "created", "revoked"),
        ((t.name, " ".join(t.scopes), t.created_at, "yes" if t.revoked else "no") for t in tokens),
    )


def event(e: SecurityEventRecord) -> dict[str, Any]:
    return {
        "id": e.id,
        "ts": e.ts,
        "type": e.type,
        "severity": e.severity,
        "device_id": e.device_id,
        "source": e.source,
        "detail": e.detail,
    }


def event_table(events: Sequence[SecurityEventRecord]) -> Table:
    return table(
        f"Security events ({len(events)})",
        ("id", "time", "type", "severity", "device", "source", "detail"),
        (
            (
                e.id,
                e.ts,
                e.type,
                e.severity,
                e.device_id,
                e.source,
                # Compact, ASCII-only JSON: attacker-chosen detail cannot reach the terminal raw.
                json.dumps(e.detail, separators=(",", ":"), sort_keys=True) if e.detail else None,
            )
            for e in events
        ),
    )


def event_line(e: SecurityEventRecord) -> Text:
    """One event on one line (``qflare events tail``), every stored string escaped."""
    parts = [
        str(e.id),
        when(e.ts),
        e.type,
        f"severity={e.severity}",
        f"device={e.device_id or '-'}",
        f"source={e.source or '-'}",
    ]
    if e.detail:
        parts.append(json.dumps(e.detail, separators=(",", ":"), sort_keys=True))
    return Text(printable(" ".join(parts)))
