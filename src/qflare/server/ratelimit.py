"""Per-source admission for the device routes: blocks set by the monitor, then a rate limit.

``RateLimiter`` is an in-process token bucket: a burst allowance refilled at a steady rate.
Buckets of sources that went quiet are dropped so a flood of spoofed sources cannot grow
memory without bound.

``SourceGate`` is what the routes call. With Redis configured it runs one Lua script per
request that (1) refuses a source the monitor blocked (``qflare.monitor.blocks``) and (2)
applies GCRA, the token bucket's equivalent that keeps one timestamp per source (the
"theoretical arrival time"), so every replica shares one limit per source. Redis's own clock
(``TIME``) is used, so replicas with skewed clocks still agree. If Redis cannot answer, the
gate falls back to the in-process bucket and blocks (``qflare.monitor.shared``): the limit is
then per replica, and a request never fails for it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from qflare.monitor.blocks import SourceBlocks, parse_block
from qflare.monitor.shared import PREFIX, SharedRedis, SharedUnavailable, digest
from qflare.server.errors import RateLimited


class RateLimiter:
    def __init__(self, rate: float, burst: int, max_sources: int = 100_000) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, source: str, now: float, cost: float = 1.0) -> None:
        tokens, last = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < cost:
            self._buckets[source] = (tokens, now)
            raise RateLimited(retry_after=(cost - tokens) / self.rate)
        self._buckets[source] = (tokens - cost, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)


class SourceBlocked(RateLimited):
    """The source is blocked by a detection rule: answered as 429 ``rate_limited``."""

    def __init__(self, retry_after: float, rule: str) -> None:
        super().__init__(retry_after)
        self.rule = rule


# KEYS[1]: the source's block key; KEYS[2]: its GCRA key.
# ARGV[1]: emission interval (µs per request); ARGV[2]: burst; ARGV[3]: cost.
# Returns {0, 0} admitted, {1, retry ms} rate limited, {2, retry ms, block} blocked.
_GATE_SCRIPT = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then ttl = 60000 end
if ttl > 0 then return {2, ttl, redis.call('GET', KEYS[1])} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[2])) or now
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allow_at = new_tat - burst * interval
if allow_at > now then return {1, math.ceil((allow_at - now) / 1000)} end
redis.call('SET', KEYS[2], string.format('%.0f', new_tat), 'PX',
           math.max(1, math.ceil((new_tat - now) / 1000)))
return {0, 0}
"""


class SourceGate:
    def __init__(
        self,
        limiter: RateLimiter,
        blocks: SourceBlocks,
        shared: SharedRedis | None = None,
        *,
        prefix: str = PREFIX,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.blocks = blocks
        self.shared = shared
        self.prefix = prefix
        self.clock = clock
        self.monotonic = monotonic
        self._interval_us = max(1, round(1_000_000 / limiter.rate))
        self._script: AsyncScript | None = None

    async def check(self, source: str, cost: float = 1.0) -> None:
        """Admit one request from ``source``: ``SourceBlocked`` or ``RateLimited`` if not."""
        block = self.blocks.local(source, self.clock())
        if block is not None:
            raise SourceBlocked(block.remaining(self.clock()), block.rule)
        if self.shared is not None:
            try:
                verdict, retry_ms, rule = await self._run_script(source, cost)
            except SharedUnavailable:
                pass  # fall through to this replica's own bucket
            else:
                if verdict == 0:
                    return
                if verdict == 2:
                    raise SourceBlocked(retry_ms / 1000, rule)
                raise RateLimited(retry_after=retry_ms / 1000)
        self.limiter.check(source, self.monotonic(), cost)

    async def _run_script(self, source: str, cost: float) -> tuple[int, int, str]:
        assert self.shared is not None
        if self._script is None:
            self._script = self.shared.redis.register_script(_GATE_SCRIPT)
        keys = [self.blocks.key(source), f"{self.prefix}rate:{digest(self.blocks.tenant, source)}"]

        async def call(r: aioredis.Redis) -> tuple[int, int, str]:
            assert self._script is not None
            answer = await self._script(
                keys=keys, args=[self._interval_us, self.limiter.burst, cost], client=r
            )
            block = parse_block(source, answer[2]) if len(answer) > 2 else None
            return int(answer[0]), int(answer[1]), block.rule if block else "unknown"

        return await self.shared.run("rate limiting", call)


class Throttle:
    """At most one "yes" per key per ``interval`` seconds: a blocked source's refusals are
    stored as one ``rate.limited`` event per interval, not one database write per request
    (which would hand the flood the write load the block is there to stop)."""

    def __init__(self, interval: float = 10.0, max_keys: int = 10_000) -> None:
        self.interval, self.max_keys = interval, max_keys
        self._last: OrderedDict[str, float] = OrderedDict()

    def due(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True


__all__ = ["RateLimiter", "SourceBlocked", "SourceGate", "Throttle"]
