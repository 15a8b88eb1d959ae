"""Key management: policy over the store for device, server and session keys (docs/KEYS.md)."""

from __future__ import annotations

from qflare.keys.envelope import (
    Binding,
    Envelope,
    EnvMasterKey,
    FileMasterKey,
    MasterKeyUnavailable,
    StaticMasterKey,
)
from qflare.keys.manager import (
    Completed,
    Enrolled,
    EnrollmentRequest,
    IssuedToken,
    KeyManager,
    KeyPolicy,
    LoadedSession,
    SessionUnusable,
)
from qflare.keys.sessions import SessionStateTampered

__all__ = [
    "Binding",
    "Completed",
    "EnvMasterKey",
    "Enrolled",
    "EnrollmentRequest",
    "Envelope",
    "FileMasterKey",
    "IssuedToken",
    "KeyManager",
    "KeyPolicy",
    "LoadedSession",
    "MasterKeyUnavailable",
    "SessionStateTampered",
    "SessionUnusable",
    "StaticMasterKey",
]
