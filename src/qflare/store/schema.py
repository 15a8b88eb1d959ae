"""Versioned schema migrations.

Migrations are the files ``migrations/<dialect>/NNNN_name.sql``, applied in order. Each runs in
its own transaction together with the row that records it in ``schema_migrations`` (version,
name, SHA-256 of the file, time), so a migration is applied completely or not at all. Migrators
hold an exclusive lock while they work, so two replicas starting at once apply each file once.

A shipped migration is never edited: a checksum that no longer matches the file, or an applied
version this code does not know (a database migrated by newer code), stops ``migrate`` and makes
``Store.open`` refuse the database rather than run queries against a schema it does not know.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Protocol

from qflare.store.errors import MigrationError, SchemaNotCurrent

_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> bytes:
        return hashlib.sha256(self.sql.encode()).digest()


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    version: int
    name: str
    checksum: bytes = field(repr=False)
    applied_at: datetime


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    dialect: str
    applied: tuple[AppliedMigration, ...]
    pending: tuple[Migration, ...]

    @property
    def current(self) -> bool:
        return not self.pending


@cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    folder = resources.files("qflare.store") / "migrations" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise MigrationError(f"{dialect} migrations must be numbered 0001, 0002, ... without gaps")
    return tuple(found)


def plan(dialect: str, applied: Sequence[AppliedMigration]) -> MigrationStatus:
    """Compare the database's history with the files; refuse an inconsistent history."""
    available = {m.version: m for m in load_migrations(dialect)}
    for done in applied:
        known = available.get(done.version)
        if known is None:
            raise MigrationError(
                f"database has migration {done.version:04d}_{done.name}, unknown to this version "
                "of QFLARE (was it migrated by a newer release?)"
            )
        if known.checksum != done.checksum:
            raise MigrationError(
                f"migration {done.version:04d}_{done.name} was changed after it was applied"
            )
    versions = {a.version for a in applied}
    pending = tuple(m for v, m in sorted(available.items()) if v not in versions)
    return MigrationStatus(dialect, tuple(sorted(applied, key=lambda a: a.version)), pending)


def require_current(dialect: str, applied: Sequence[AppliedMigration]) -> None:
    try:
        status = plan(dialect, applied)
    except MigrationError as exc:
        raise SchemaNotCurrent(str(exc)) from None
    if status.pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in status.pending)
        raise SchemaNotCurrent(f"database schema needs migrations {names}: run `qflare db migrate`")


class _Completeness(Protocol):
    def __call__(self, statement: str, /) -> bool: ...


def split_statements(script: str, is_complete: _Completeness) -> list[str]:
    """Split a script into statements (a trigger body's inner ``;`` does not end it)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if is_complete(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):
        raise MigrationError("migration ends with an incomplete statement")
    return statements


class MigrationTx(Protocol):
    async def applied(self) -> list[AppliedMigration]: ...

    async def run(self, migration: Migration, now: datetime) -> None:
        """Execute the migration and record it, inside the current transaction."""


class Migrator(ABC):
    """One backend's way to read its history and run a migration under an exclusive lock."""

    dialect: str

    @abstractmethod
    async def applied(self) -> list[AppliedMigration]:
        """The history; empty when the database was never migrated. Changes nothing."""

    @abstractmethod
    def exclusive(self) -> AbstractAsyncContextManager[MigrationTx]:
        """A transaction that holds the migration lock and creates ``schema_migrations``."""

    @abstractmethod
    async def close(self) -> None: ...

    async def status(self) -> MigrationStatus:
        return plan(self.dialect, await self.applied())

    async def apply_pending(self, now: datetime) -> list[Migration]:
        done: list[Migration] = []
        # One transaction per file: a failure in 0003 leaves 0001 and 0002 applied and recorded.
        for migration in load_migrations(self.dialect):
            async with self.exclusive() as tx:
                status = plan(self.dialect, await tx.applied())
                if migration in status.pending:
                    await tx.run(migration, now)
                    done.append(migration)
        return done
