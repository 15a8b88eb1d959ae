"""Wiring from ``Settings`` to running parts, shared by the server and the ``qflare`` command.

``init_data_dir`` is what ``qflare init`` does; ``open_manager`` is how every other command and
the server reach the key manager. Nothing here holds policy of its own.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from qflare import crypto
from qflare.config import Settings
from qflare.keys import (
    Envelope,
    EnvMasterKey,
    FileMasterKey,
    KeyManager,
    KeyPolicy,
)
from qflare.keys.envelope import MasterKeyProvider
from qflare.keys.manager import utc
from qflare.monitor.audit import AuditLog
from qflare.protocol.handshake import ServerPolicy
from qflare.protocol.record import RekeyPolicy
from qflare.protocol.suites import by_name
from qflare.store import AdminToken, ServerKey, migrate, open_store
from qflare.store.models import JsonValue

# What an admin token may do. "read" sees everything; the others change things.
ADMIN_SCOPES: Final = ("read", "enroll", "devices", "keys", "sessions")


def master_key(settings: Settings) -> MasterKeyProvider:
    """``QFLARE_MASTER_KEY`` when set (containers), else the 0600 file in the data directory."""
    if os.environ.get("QFLARE_MASTER_KEY"):
        return EnvMasterKey()
    return FileMasterKey(settings.master_key_path)


def rekey_policy(settings: Settings) -> RekeyPolicy:
    return RekeyPolicy(max_age_seconds=settings.session_max_age)


def key_policy(settings: Settings) -> KeyPolicy:
    # A device may only enroll (or rotate to) a key some configured suite can authenticate.
    signatures = tuple(dict.fromkeys(by_name(name).signature for name in settings.suites))
    return KeyPolicy(
        device_algorithms=signatures,
        static_overlap=settings.key_overlap_seconds,
        session_lifetime=settings.session_max_age,
        nonce_retention=2 * settings.timestamp_window + 60,
    )


def server_policy(settings: Settings) -> ServerPolicy:
    return ServerPolicy(
        suites=tuple(by_name(name) for name in settings.suites),
        timestamp_window=settings.timestamp_window,
        epoch_seconds=settings.epoch_seconds,
        grace_epochs=settings.grace_epochs,
        biscuit_lifetime=settings.biscuit_lifetime,
        rekey=rekey_policy(settings),
    )


async def open_manager(settings: Settings, *, migrate_schema: bool = False) -> KeyManager:
    """A key manager over the configured store; close it with ``await manager.store.close()``."""
    provider = master_key(settings)  # first: a missing master key is the likelier mistake
    store = await open_store(settings.store_url, migrate=migrate_schema)
    return KeyManager(
        store,
        Envelope(provider),
        tenant=settings.tenant,
        policy=key_policy(settings),
        rekey=rekey_policy(settings),
    )


@dataclass(slots=True)
class InitReport:
    data_dir: Path
    store_url: str
    master_key_created: bool
    migrations_applied: list[str] = field(default_factory=list)
    keys_created: list[ServerKey] = field(default_factory=list)


async def init_data_dir(settings: Settings, *, now: float | None = None) -> InitReport:
    """Create what a server needs; safe to run again: it never replaces an existing key."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = settings.master_key_path
    created = False
    if not os.environ.get("QFLARE_MASTER_KEY") and not path.exists():
        FileMasterKey.create(path)
        created = True
    applied = await migrate(settings.store_url)
    manager = await open_manager(settings)
    try:
        keys = await manager.initialize(now=time.time() if now is None else now)
    finally:
        await manager.store.close()
    return InitReport(
        settings.data_dir,
        settings.store_url,
        created,
        [f"{m.version:04d} {m.name}" for m in applied],
        keys,
    )


def admin_token_hash(token: str) -> bytes:
    return crypto.kdf("HKDF-SHA256").hash(token.encode())


def check_admin_scopes(scopes: tuple[str, ...]) -> None:
    """``ValueError`` unless ``scopes`` is a non-empty set of ``ADMIN_SCOPES``."""
    unknown = sorted(set(scopes) - set(ADMIN_SCOPES))
    if unknown or not scopes:
        allowed = ", ".join(ADMIN_SCOPES)
        raise ValueError(f"scopes must be among {allowed} (got {unknown or 'none'})")


async def retire_due_keys(
    manager: KeyManager, audit: AuditLog, *, now: float, actor: str
) -> list[ServerKey]:
    """Retire the keys whose overlap has passed, fail closed (docs/AUDIT.md): a ``key.retire``
    intent naming them first, and no retirement if it cannot be written. Nothing is logged
    when no key is due (the server checks every ``cleanup_interval``)."""
    due = await manager.due_keys(now=now)
    if not due:
        return []
    key_ids: list[JsonValue] = [key.key_id for key in due]
    async with audit.operation("key.retire", key_ids=key_ids, actor=actor) as intent:
        retired = await manager.retire_due_keys(now=now, due=due)
        intent.result["retired"] = [key.key_id for key in retired]
    return retired


async def issue_admin_token(
    manager: KeyManager, *, name: str, scopes: tuple[str, ...], now: float
) -> tuple[str, AdminToken]:
    """A new admin API token; only its hash is stored, so this is the one time it is seen."""
    check_admin_scopes(scopes)
    token = "qfa_" + base64.urlsafe_b64encode(crypto.system_rng(32)).rstrip(b"=").decode()
    record = await manager.store.create_admin_token(
        token_hash=admin_token_hash(token), name=name, scopes=tuple(sorted(scopes)), now=utc(now)
    )
    return token, record
