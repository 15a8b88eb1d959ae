"""Blocked source addresses: set by a detection rule, lifted by time or by an operator.

A block is one Redis key per (tenant, source) with the block's length as its TTL, so every
replica refuses the source (the rate limiter's script reads the key in the same round trip as
its own counter) and a block ends by itself. Without Redis, or while Redis cannot answer,
blocks are kept in process: they then hold on the replica that set them only.

A blocked source gets 429 ``rate_limited`` with ``Retry-After`` on every device route (not
403): to the client it is a rate limit, a long one, and well-behaved clients back off; the
rule that set it is only in the security events. Admin routes are not blocked, so an operator
can always lift a block (``POST /v1/admin/sources/{source}/unblock``, ``qflare source
unblock``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from qflare.monitor.shared import PREFIX, SharedRedis, SharedUnavailable

_MAX_BLOCKS = 100_000


@dataclass(frozen=True, slots=True)
class Block:
    source: str
    until: float  # unix seconds
    rule: str

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)


def block_key(tenant: str, source: str, prefix: str = PREFIX) -> str:
    # Sources are the peer addresses the server saw (IPv4/IPv6 text), readable in the key so
    # `qflare source list` can show them.
    return f"{prefix}block:{tenant}:{source}"


class SourceBlocks:
    def __init__(self, tenant: str, shared: SharedRedis | None = None, *, prefix: str = PREFIX):
        self.tenant = tenant
        self.shared = shared
        self.prefix = prefix
        self._local: OrderedDict[str, Block] = OrderedDict()

    def key(self, source: str) -> str:
        return block_key(self.tenant, source, self.prefix)

    def local(self, source: str, now: float) -> Block | None:
        """The in-process block of ``source``, if any (a dict lookup: on every request)."""
        found = self._local.get(source)
        if found is None:
            return None
        if found.until <= now:
            del self._local[source]
            return None
        return found

    async def block(self, source: str, *, seconds: int, rule: str, now: float) -> Block:
        """Block ``source`` for ``seconds``; shared through Redis when it answers."""
        found = Block(source, now + seconds, rule)
        if self.shared is not None:
            value = json.dumps(asdict(found)).encode()

            async def call(r: aioredis.Redis) -> None:
                await r.set(self.key(source), value, ex=seconds)

            try:
                await self.shared.run("blocking", call)
                return found
            except SharedUnavailable:
                pass  # held in process instead: this replica still refuses the source
        self._local[source] = found
        self._local.move_to_end(source)
        while len(self._local) > _MAX_BLOCKS:
            self._local.popitem(last=False)
        return found

    async def unblock(self, source: str) -> bool:
        """Lift the block; True if there was one (here or in Redis). ``SharedUnavailable`` if
        Redis cannot answer and no block was held here: the caller cannot know, so it must
        not say "not blocked"."""
        removed = self._local.pop(source, None) is not None
        if self.shared is not None:

            async def call(r: aioredis.Redis) -> int:
                return int(await r.delete(self.key(source)))

            try:
                removed = bool(await self.shared.run("unblocking", call)) or removed
            except SharedUnavailable:
                if not removed:
                    raise
        return removed

    async def get(self, source: str, now: float) -> Block | None:
        found = self.local(source, now)
        if found is not None or self.shared is None:
            return found

        async def call(r: aioredis.Redis) -> bytes | str | None:
            value: bytes | str | None = await r.get(self.key(source))
            return value

        try:
            value = await self.shared.run("reading a block", call)
        except SharedUnavailable:
            return None
        return parse_block(source, value)

    async def list(self, now: float) -> list[Block]:
        """Current blocks, in process and in Redis (Redis errors propagate for the caller)."""
        found = {b.source: b for b in list(self._local.values()) if b.until > now}
        if self.shared is not None:
            prefix = self.key("")

            async def call(r: aioredis.Redis) -> list[Block]:
                blocks = []
                async for name in r.scan_iter(match=prefix + "*", count=500):
                    source = name.decode()[len(prefix) :]
                    parsed = parse_block(source, await r.get(name))
                    if parsed is not None:
                        blocks.append(parsed)
                return blocks

            for b in await self.shared.run("listing blocks", call):
                found.setdefault(b.source, b)
        return sorted(found.values(), key=lambda b: b.source)


def parse_block(source: str, value: bytes | str | None) -> Block | None:
    if value is None:
        return None
    try:
        doc = json.loads(value)
        return Block(source, float(doc["until"]), str(doc["rule"]))
    except (ValueError, KeyError, TypeError):
        return Block(source, 0.0, "unknown")


__all__ = ["Block", "SourceBlocks", "block_key", "parse_block"]
