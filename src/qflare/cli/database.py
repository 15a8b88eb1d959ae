"""``qflare db ...`` (schema migrations, expired-row cleanup) and ``qflare events ...``."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from qflare.cli import views
from qflare.cli.context import Cli
from qflare.keys.manager import utc
from qflare.store import CleanupCounts, SecurityEventRecord, Store, migrate, status

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


@events_app.command("list")
def list_events(
    ctx: typer.Context,
    device: Annotated[
        str | None, typer.Option("--device", "-d", help="Only events naming this device id.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    after_id: Annotated[
        int | None, typer.Option(min=0, help="Start after this event id (the last one shown).")
    ] = None,
) -> None:
    """List security events of the tenant, oldest first; page on with --after-id."""
    cli = Cli.of(ctx)
    tenant = cli.settings().tenant

    async def work(store: Store) -> list[SecurityEventRecord]:
        return await store.list_security_events(
            tenant, device_id=device, after_id=after_id, limit=limit
        )

    events = cli.with_store(work)
    cli.out.emit(
        {"events": [views.event(e) for e in events]},
        lambda c: c.print(views.event_table(events)),
    )
