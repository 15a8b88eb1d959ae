"""Sliding-window event counters and once-per-window latches, in Redis or in process.

A window of ``w`` seconds is counted in fixed buckets of ``w`` seconds (bucket ``floor(now /
w)``); the sliding count at ``now`` is the current bucket plus the previous one weighted by the
part of it still inside the window::

    count = current + previous * (1 - (now - bucket_start) / w)

This is the sliding-window-counter estimate rate limiters use: two integers per key, exact for
a burst inside one bucket, and for traffic spread over the boundary off by at most the
previous bucket's uneven spread. In Redis each hit is one pipelined round trip (``INCR`` and
``EXPIRE`` of the current bucket, ``GET`` of the previous), shared by every replica.

A latch (``once``) is ``SET NX EX``: of all replicas that see a rule fire in the same window,
exactly one takes the response.

Redis failures fall back to the in-process counters (see ``qflare.monitor.shared``): during an
outage each replica counts alone, so a burst spread over replicas may go unseen; nothing fails.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from qflare.monitor.shared import PREFIX, SharedRedis, SharedUnavailable, digest

_MAX_KEYS = 100_000


def sliding(current: int, previous: int, now: float, window: int) -> float:
    elapsed = now - math.floor(now / window) * window
    return current + previous * max(0.0, 1.0 - elapsed / window)


@dataclass(slots=True)
class _Buckets:
    bucket: int
    current: int
    previous: int


class MemoryCounters:
    """Per-process windows. Bounded: the least recently hit keys go first, so a flood of
    spoofed device ids or sources cannot grow memory without limit."""

    def __init__(self, max_keys: int = _MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._windows: OrderedDict[str, _Buckets] = OrderedDict()
        self._latches: OrderedDict[str, float] = OrderedDict()

    async def hit(self, key: str, window: int, now: float) -> float:
        bucket = math.floor(now / window)
        state = self._windows.pop(key, None)
        if state is None or state.bucket < bucket - 1:
            state = _Buckets(bucket, 0, 0)
        elif state.bucket == bucket - 1:
            state = _Buckets(bucket, 0, state.current)
        state.current += 1
        self._windows[key] = state
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
        return sliding(state.current, state.previous, now, window)

    async def hit_many(self, hits: Sequence[tuple[str, int]], now: float) -> list[float]:
        return [await self.hit(key, window, now) for key, window in hits]

    async def once(self, key: str, ttl: int, now: float) -> bool:
        until = self._latches.pop(key, None)
        if until is not None and until > now:
            self._latches[key] = until
            return False
        self._latches[key] = now + ttl
        while len(self._latches) > self.max_keys:
            self._latches.popitem(last=False)
        return True

    async def clear(self, key: str, window: int, now: float) -> None:
        """Forget ``key``'s window and latch (an operator undid the response)."""
        self._windows.pop(key, None)
        self._latches.pop(key, None)


class SharedCounters:
    """Windows in Redis, shared by replicas, with ``MemoryCounters`` as the fallback."""

    def __init__(self, shared: SharedRedis, *, prefix: str = PREFIX) -> None:
        self.shared = shared
        self.prefix = prefix
        self.fallback = MemoryCounters()

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{digest(key)}"

    async def hit(self, key: str, window: int, now: float) -> float:
        return (await self.hit_many([(key, window)], now))[0]

    async def hit_many(self, hits: Sequence[tuple[str, int]], now: float) -> list[float]:
        """Count one event in each of several windows: one round trip for all of them."""
        if not hits:
            return []

        async def call(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for key, window in hits:
                    bucket = math.floor(now / window)
                    base = self._key("win", key)
                    pipe.incr(f"{base}:{bucket}")
                    pipe.expire(f"{base}:{bucket}", 2 * window + 1)
                    pipe.get(f"{base}:{bucket - 1}")
                answers: list[Any] = await pipe.execute()
            return answers

        try:
            answers = await self.shared.run("counting", call)
        except SharedUnavailable:
            return await self.fallback.hit_many(hits, now)
        return [
            sliding(int(answers[3 * i]), int(answers[3 * i + 2] or 0), now, window)
            for i, (_, window) in enumerate(hits)
        ]

    async def once(self, key: str, ttl: int, now: float) -> bool:
        name = self._key("once", key)

        async def call(r: aioredis.Redis) -> bool:
            return bool(await r.set(name, b"1", nx=True, ex=max(1, ttl)))

        try:
            return await self.shared.run("latching", call)
        except SharedUnavailable:
            return await self.fallback.once(key, ttl, now)

    async def clear(self, key: str, window: int, now: float) -> None:
        await self.fallback.clear(key, window, now)
        bucket = math.floor(now / window)
        base = self._key("win", key)
        names = (f"{base}:{bucket}", f"{base}:{bucket - 1}", self._key("once", key))

        async def call(r: aioredis.Redis) -> None:
            await r.delete(*names)

        # A window Redis cannot clear now ends by itself (its keys expire).
        with contextlib.suppress(SharedUnavailable):
            await self.shared.run("clearing", call)


Counters = MemoryCounters | SharedCounters

__all__ = ["Counters", "MemoryCounters", "SharedCounters", "sliding"]
