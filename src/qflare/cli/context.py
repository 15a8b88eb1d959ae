"""The state one ``qflare`` invocation carries: global options, output, and store access.

Settings are built on first use, not in the root callback, because the callback also runs for
``qflare COMMAND --help``, which must work with no configuration at all. Each command runs its
store work in one ``asyncio.run`` and the store is closed on every path out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer

from qflare.cli.output import Output
from qflare.config import Settings
from qflare.errors import QflareError
from qflare.keys import KeyManager
from qflare.monitor.audit import AuditLog, AuditUnavailable, Intent
from qflare.monitor.events import EventType
from qflare.monitor.operator import operator_event
from qflare.runtime import open_manager
from qflare.store import Store, open_store
from qflare.store.models import JsonValue

T = TypeVar("T")

# The actor of the audit entries the command writes (docs/AUDIT.md): whoever ran it on a host
# that holds the database and the master key. No user name: audit entries are public.
CLI_ACTOR: Final = "cli"

# Failures that are the operator's or the environment's, not QFLARE's: reported on one line
# (exit 1). Anything else is a bug and keeps its traceback.
HANDLED: tuple[type[BaseException], ...] = (QflareError, ValueError, OSError)


class Declined(QflareError):
    """The operator did not confirm a destructive command."""


def redact_url(url: str) -> str:
    """A database URL fit to print: the password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@dataclass(slots=True)
class Cli:
    out: Output
    data_dir: Path | None = None
    database_url: str | None = None
    _settings: Settings | None = field(default=None, repr=False)
    _audit: AuditLog | None = field(default=None, repr=False)

    @staticmethod
    def of(ctx: typer.Context) -> Cli:
        obj = ctx.find_root().obj
        if not isinstance(obj, Cli):  # a command invoked without the root callback
            obj = Cli(Output(json_mode=False))
            ctx.find_root().obj = obj
        return obj

    def settings(self, **overrides: Any) -> Settings:
        """Settings from the environment and TOML file, with the global options on top."""
        if not overrides and self._settings is not None:
            return self._settings
        given: dict[str, Any] = {"data_dir": self.data_dir, "database_url": self.database_url}
        given.update(overrides)
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
        if not overrides:
            self._settings = settings
        return settings

    @staticmethod
    def now() -> float:
        return time.time()

    def with_manager(self, work: Callable[[KeyManager], Awaitable[T]]) -> T:
        """Run ``work`` against a key manager (needs the master key and a current schema)."""
        settings = self.settings()

        async def run() -> T:
            manager = await open_manager(settings)
            try:
                return await work(manager)
            finally:
                await manager.store.close()

        return asyncio.run(run())

    async def security_event(
        self, m: KeyManager, type: EventType, device_id: str | None, **detail: str
    ) -> None:
        """Store the security event of an operator's change (docs/MONITOR.md); warn if the
        store would not take it (the change itself is done)."""
        if not await operator_event(
            m.store, m.tenant, type, now=self.now(), device_id=device_id, **detail
        ):
            self.out.warn(f"done, but the {type.value} security event could not be stored")

    def audit_log(self, m: KeyManager) -> AuditLog:
        """The audit log over ``m``'s store, with the configured origin (one per store)."""
        if self._audit is None or self._audit.store is not m.store:
            self._audit = AuditLog.for_keys(m, clock=self.now, origin=self.settings().audit_origin)
        return self._audit

    @contextlib.asynccontextmanager
    async def audited(
        self, m: KeyManager, op: str, /, **fields: JsonValue
    ) -> AsyncIterator[Intent]:
        """Fail closed, as the server does (docs/AUDIT.md, "Fail closed"): the intent entry
        (actor ``cli``) is committed before the body runs, and if it cannot be written the body
        does not run and the command ends with ``audit_unavailable`` (exit 1). The outcome
        entry follows the body, best effort."""
        entered = False
        try:
            async with self.audit_log(m).operation(op, **fields, actor=CLI_ACTOR) as intent:
                entered = True
                yield intent
        except AuditUnavailable as exc:
            if entered:
                raise
            raise AuditUnavailable(
                f"{op} not done: {exc}; an operation that cannot be recorded in the audit log "
                "is refused (docs/AUDIT.md)"
            ) from exc

    def with_store(self, work: Callable[[Store], Awaitable[T]]) -> T:
        """Run ``work`` against the store alone: no master key needed."""
        url = self.settings().store_url

        async def run() -> T:
            store = await open_store(url)
            try:
                return await work(store)
            finally:
                await store.close()

        return asyncio.run(run())

    def confirm(self, question: str, *, yes: bool) -> None:
        """Ask on stderr (stdout may be a JSON pipe); ``Declined`` unless the answer is yes."""
        if yes:
            return
        try:
            agreed = typer.confirm(question, default=False, err=True)
        except typer.Abort:  # end of input: nobody there to agree
            typer.echo(err=True)  # end the prompt's line
            agreed = False
        if not agreed:
            raise Declined("not confirmed; nothing was changed (pass --yes to skip the question)")
