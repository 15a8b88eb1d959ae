"""``qflare db ...`` (schema migrations, expired-row cleanup) and ``qflare events ...`` (list
with filters, tail)."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import signal
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console

from qflare.cli import views
from qflare.cli.context import Cli
from qflare.keys.manager import utc
from qflare.monitor.events import EventType, Severity
from qflare.store import CleanupCounts, SecurityEventRecord, Store, migrate, open_store, status

db_app = typer.Typer(help="Schema migrations and maintenance.", no_args_is_help=True)
events_app = typer.Typer(help="The security event log.", no_args_is_help=True)


@db_app.command("migrate")
def migrate_db(ctx: typer.Context) -> None:
    """Apply pending schema migrations (on PostgreSQL, use the schema owner's URL)."""
    cli = Cli.of(ctx)
    url = cli.settings().store_url
    applied = asyncio.run(migrate(url))

    def human(console: Console) -> None:
        if not applied:
            console.print("The schema is current; nothing to apply.")
        for m in applied:
            console.print(f"applied {m.version:04d} {m.name}", markup=False)

    cli.out.emit({"applied": [{"version": m.version, "name": m.name} for m in applied]}, human)


@db_app.command("status")
def db_status(ctx: typer.Context) -> None:
    """Show applied and pending migrations; changes nothing."""
    cli = Cli.of(ctx)
    report = asyncio.run(status(cli.settings().store_url))

    def human(console: Console) -> None:
        console.print(
            views.table(
                f"Migrations ({report.dialect})",
                ("version", "name", "applied"),
                [(f"{m.version:04d}", m.name, m.applied_at) for m in report.applied]
                + [(f"{m.version:04d}", m.name, "pending") for m in report.pending],
            )
        )
        if report.current:
            console.print("The schema is current.")
        else:
            console.print(f"{len(report.pending)} migration(s) pending: run `qflare db migrate`.")

    cli.out.emit(
        {
            "dialect": report.dialect,
            "current": report.current,
            "applied": [
                {"version": m.version, "name": m.name, "applied_at": m.applied_at}
                for m in report.applied
            ],
            "pending": [{"version": m.version, "name": m.name} for m in report.pending],
        },
        human,
    )


@db_app.command("cleanup")
def cleanup(
    ctx: typer.Context,
    batch_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="Rows per short transaction.")
    ] = 1000,
) -> None:
    """Delete expired sessions, handshake nonces and enrollment tokens, in batches."""
    cli = Cli.of(ctx)
    now = cli.now()

    async def work(store: Store) -> CleanupCounts:
        return await store.cleanup(utc(now), batch_size)

    # The store deletes batch after batch until one comes back short: show that it is working.
    if cli.out.json:
        counts = cli.with_store(work)
    else:
        with cli.out.err.status("Deleting expired sessions, nonces and enrollment tokens..."):
            counts = cli.with_store(work)

    cli.out.emit(
        {
            "sessions": counts.sessions,
            "nonces": counts.nonces,
            "tokens": counts.tokens,
            "total": counts.total,
        },
        lambda c: c.print(
            f"Deleted {counts.sessions} session(s), {counts.nonces} nonce(s), "
            f"{counts.tokens} enrollment token(s).",
            markup=False,
        ),
    )


# -- events -----------------------------------------------------------------------------------

_AGO = re.compile(r"(\d+)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PAGE = 1000


def parse_since(text: str, now: float) -> datetime:
    """``10m``, ``2h``, ``30s``, ``1d`` ago, or an ISO 8601 time (UTC unless it says)."""
    match = _AGO.fullmatch(text.strip())
    if match is not None:
        return utc(now - int(match.group(1)) * _SECONDS[match.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither a duration (10m, 2h, 1d) nor an ISO time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_severity(text: str) -> int:
    """A severity name (info, warning, high, critical) or number: the minimum to show."""
    if text.isdigit():
        return int(text)
    try:
        return int(Severity[text.upper()])
    except KeyError:
        names = ", ".join(s.name.lower() for s in Severity)
        raise typer.BadParameter(f"{text!r}: use one of {names} or a number") from None


def _check_type(value: list[str] | None) -> list[str] | None:
    known = {t.value for t in EventType}
    for pattern in value or ():
        if not any(fnmatch.fnmatchcase(t, pattern) for t in known):
            raise typer.BadParameter(f"{pattern!r} matches no event type (see docs/MONITOR.md)")
    return value


@dataclass(frozen=True, slots=True)
class EventFilter:
    types: tuple[str, ...] = ()
    min_severity: int = 0

    def __call__(self, e: SecurityEventRecord) -> bool:
        if e.severity < self.min_severity:
            return False
        return not self.types or any(fnmatch.fnmatchcase(e.type, p) for p in self.types)


async def filtered_events(
    store: Store,
    tenant: str,
    keep: EventFilter,
    *,
    device_id: str | None,
    since: datetime | None,
    after_id: int | None,
    limit: int,
) -> list[SecurityEventRecord]:
    """Up to ``limit`` events that pass ``keep``, oldest first. The store filters by device,
    time and id; type and severity are filtered here, page after page."""
    found: list[SecurityEventRecord] = []
    while len(found) < limit:
        page = await store.list_security_events(
            tenant, device_id=device_id, since=since, after_id=after_id, limit=_PAGE
        )
        found.extend(e for e in page if keep(e))
        if len(page) < _PAGE:
            break
        after_id = page[-1].id
    return found[:limit]


TypeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--type",
        "-t",
        metavar="TYPE",
        help="Only this event type; repeat for several; globs work (handshake.*).",
        callback=_check_type,
    ),
]
SeverityOption = Annotated[
    str | None,
    typer.Option(
        "--severity",
        "-s",
        metavar="LEVEL",
        help="Minimum severity: info, warning, high, critical (or 20..50).",
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since", metavar="WHEN", help="Only events since then: 10m, 2h, 1d ago, or an ISO time."
    ),
]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", "-d", metavar="ID", help="Only events naming this device id."),
]


@events_app.command("list")
def list_events(
    ctx: typer.Context,
    *,
    device: DeviceOption = None,
    types: TypeOption = None,
    severity: SeverityOption = None,
    since: SinceOption = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    after_id: Annotated[
        int | None, typer.Option(min=0, help="Start after this event id (the last one shown).")
    ] = None,
) -> None:
    """List security events of the tenant, oldest first; page on with --after-id."""
    cli = Cli.of(ctx)
    tenant = cli.settings().tenant
    keep = EventFilter(tuple(types or ()), parse_severity(severity) if severity else 0)
    start = parse_since(since, cli.now()) if since else None

    async def work(store: Store) -> list[SecurityEventRecord]:
        return await filtered_events(
            store, tenant, keep, device_id=device, since=start, after_id=after_id, limit=limit
        )

    events = cli.with_store(work)
    cli.out.emit(
        {"events": [views.event(e) for e in events]},
        lambda c: c.print(views.event_table(events)),
    )


@events_app.command("tail")
def tail_events(
    ctx: typer.Context,
    *,
    device: DeviceOption = None,
    types: TypeOption = None,
    severity: SeverityOption = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Start with the events since then (10m, ISO time); default: now."
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option(min=0.1, max=60, help="Seconds between polls of the store.")
    ] = 1.0,
) -> None:
    """Follow new security events as they are stored, until Ctrl-C.

    With --json, one JSON object per line (not one document), flushed as each arrives.
    """
    cli = Cli.of(ctx)
    tenant = cli.settings().tenant
    keep = EventFilter(tuple(types or ()), parse_severity(severity) if severity else 0)
    start = parse_since(since, cli.now()) if since else utc(cli.now())
    url = cli.settings().store_url

    def show(e: SecurityEventRecord) -> None:
        if cli.out.json:
            typer.echo(json.dumps(views.event(e), default=_iso))
        else:
            cli.out.console.print(views.event_line(e), soft_wrap=True)
        sys.stdout.flush()

    async def follow() -> None:
        store = await open_store(url)
        try:
            after_id: int | None = None
            first = True
            while True:
                page = await store.list_security_events(
                    tenant,
                    device_id=device,
                    since=start if first else None,
                    after_id=after_id,
                    limit=_PAGE,
                )
                for e in page:
                    if keep(e):
                        show(e)
                if page:
                    after_id, first = page[-1].id, False
                if len(page) < _PAGE:
                    await asyncio.sleep(interval)
        finally:
            await store.close()

    cli.out.note("Following security events; Ctrl-C to stop.")
    # Ctrl-C must stop a follow even when started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _iso(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
