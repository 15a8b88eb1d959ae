"""``qflare source ...``: source addresses the security monitor blocked (docs/MONITOR.md).

Blocks shared by replicas live in Redis, so these commands need ``redis_url``. Without Redis a
block lives only in the memory of the server replica that set it: lift it there with
``POST /v1/admin/sources/{source}/unblock`` (or wait: every block expires).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from qflare.cli import views
from qflare.cli.context import Cli
from qflare.config import Settings
from qflare.errors import QflareError
from qflare.keys.manager import utc
from qflare.monitor.blocks import Block, SourceBlocks
from qflare.monitor.counters import SharedCounters
from qflare.monitor.detect import forgive, rules_from
from qflare.monitor.events import EventType
from qflare.monitor.operator import operator_event
from qflare.monitor.shared import SharedRedis, SharedUnavailable
from qflare.store import open_store

source_app = typer.Typer(help="Sources blocked by the security monitor.", no_args_is_help=True)


class NoSharedBlocks(QflareError):
    """No Redis configured: blocks are in each server's memory."""


class RedisUnavailable(QflareError):
    pass


def _shared(settings: Settings) -> SharedRedis:
    if not settings.redis_url:
        raise NoSharedBlocks(
            "no redis_url configured: blocks live in each server replica's memory; lift one "
            "with POST /v1/admin/sources/{source}/unblock on that replica"
        )
    return SharedRedis(settings.redis_url, timeout=5)


def _block_json(b: Block) -> dict[str, object]:
    return {"source": b.source, "rule": b.rule, "until": utc(b.until)}


@source_app.command("list")
def list_blocked(ctx: typer.Context) -> None:
    """List blocked sources: address, the rule that blocked it, when the block ends."""
    cli = Cli.of(ctx)
    settings = cli.settings()

    async def work() -> list[Block]:
        shared = _shared(settings)
        try:
            return await SourceBlocks(settings.tenant, shared).list(cli.now())
        except SharedUnavailable:
            raise RedisUnavailable(f"Redis at {settings.redis_url} did not answer") from None
        finally:
            await shared.close()

    blocks = asyncio.run(work())
    cli.out.emit(
        {"blocked": [_block_json(b) for b in blocks]},
        lambda c: c.print(
            views.table(
                f"Blocked sources ({len(blocks)})",
                ("source", "rule", "until"),
                ((b.source, b.rule, utc(b.until)) for b in blocks),
            )
        ),
    )


@source_app.command("unblock")
def unblock(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="The address, as `source list` shows it.")],
) -> None:
    """Lift a block on every replica at once (stores a source.unblocked event)."""
    cli = Cli.of(ctx)
    settings = cli.settings()
    if not source or len(source) > 64:
        raise typer.BadParameter("a source address is 1 to 64 characters")

    async def work() -> bool:
        shared = _shared(settings)
        try:
            removed = await SourceBlocks(settings.tenant, shared).unblock(source)
            # The source's next burst is counted from zero, on every replica.
            await forgive(
                SharedCounters(shared),
                rules_from(settings),
                settings.tenant,
                source=source,
                now=cli.now(),
            )
        except SharedUnavailable:
            raise RedisUnavailable(f"Redis at {settings.redis_url} did not answer") from None
        finally:
            await shared.close()
        if removed:
            store = await open_store(settings.store_url)
            try:
                stored = await operator_event(
                    store, settings.tenant, EventType.SOURCE_UNBLOCKED, now=cli.now(), source=source
                )
            finally:
                await store.close()
            if not stored:
                cli.out.warn("unblocked, but the source.unblocked event could not be stored")
        return removed

    removed = asyncio.run(work())

    def human(console: Console) -> None:
        if removed:
            console.print(f"Source {source} unblocked.", markup=False)
        else:
            console.print(f"Source {source} was not blocked.", markup=False)

    cli.out.emit({"source": source, "unblocked": removed}, human)
