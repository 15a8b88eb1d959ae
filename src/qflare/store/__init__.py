"""QFLARE's storage layer: the only package that speaks SQL.

``Store`` (``base``) is the contract; ``SqliteStore`` (embedded default) and ``PostgresStore``
(production: pooled, row-level security per tenant) implement it with the operations written
once in ``sql``. ``open_store(url)`` picks the backend; ``migrate`` and ``status`` drive the
versioned migrations in ``migrations/<dialect>/``. See docs/STORAGE.md.
"""

from __future__ import annotations

from qflare.store.base import Store
from qflare.store.errors import (
    InvalidIdentifier,
    InvalidInput,
    MigrationError,
    SchemaNotCurrent,
    TokenNotRedeemable,
)
from qflare.store.factory import migrate, open_store, status, store_for_url
from qflare.store.models import (
    KEY_TRANSITIONS,
    AdminToken,
    AuditEntry,
    AuditRow,
    CleanupCounts,
    Device,
    DeviceKey,
    DeviceKeyState,
    DeviceState,
    Enrollment,
    EnrollmentToken,
    FinishOutcome,
    HandshakeFinish,
    KeyPurpose,
    KeyState,
    Rotation,
    SecurityEventRecord,
    SecurityEventRow,
    ServerKey,
    SessionCounters,
    SessionRecord,
    SessionStatus,
    Tenant,
)
from qflare.store.postgres import PostgresStore
from qflare.store.schema import AppliedMigration, Migration, MigrationStatus
from qflare.store.sqlite import SqliteStore

__all__ = [
    "KEY_TRANSITIONS",
    "AdminToken",
    "AppliedMigration",
    "AuditEntry",
    "AuditRow",
    "CleanupCounts",
    "Device",
    "DeviceKey",
    "DeviceKeyState",
    "DeviceState",
    "Enrollment",
    "EnrollmentToken",
    "FinishOutcome",
    "HandshakeFinish",
    "InvalidIdentifier",
    "InvalidInput",
    "KeyPurpose",
    "KeyState",
    "Migration",
    "MigrationError",
    "MigrationStatus",
    "PostgresStore",
    "Rotation",
    "SchemaNotCurrent",
    "SecurityEventRecord",
    "SecurityEventRow",
    "ServerKey",
    "SessionCounters",
    "SessionRecord",
    "SessionStatus",
    "SqliteStore",
    "Store",
    "Tenant",
    "TokenNotRedeemable",
    "migrate",
    "open_store",
    "status",
    "store_for_url",
]
