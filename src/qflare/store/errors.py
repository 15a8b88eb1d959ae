"""Errors only the store raises, under ``StoreError`` of ``qflare.errors``::

    StoreError
    ├── InvalidInput           an argument of the wrong type, size or range (also a ValueError)
    │   └── InvalidIdentifier  an id that is not 1..64 characters of [A-Za-z0-9._-]
    ├── TokenNotRedeemable     an enrollment token that is unknown, expired or used
    ├── SchemaNotCurrent       the database needs ``qflare db migrate`` (or is newer than the code)
    └── MigrationError         a migration file or the migration history is inconsistent

``NotFound``, ``Conflict`` and ``StoreUnavailable`` come from ``qflare.errors`` unchanged.
Messages name the argument, never its value: a value may be 10 kB of attacker input or a secret.
"""

from __future__ import annotations

from typing import Literal

from qflare.errors import StoreError

TokenFailure = Literal["unknown", "expired", "used"]


class InvalidInput(StoreError, ValueError):
    """Rejected before any SQL ran, so nothing was written."""


class InvalidIdentifier(InvalidInput):
    pass


class TokenNotRedeemable(StoreError):
    """One message for every cause, so it cannot be used as an oracle; ``reason`` is for logs."""

    def __init__(self, reason: TokenFailure) -> None:
        self.reason: TokenFailure = reason
        super().__init__("enrollment token cannot be redeemed")


class SchemaNotCurrent(StoreError):
    pass


class MigrationError(StoreError):
    pass
