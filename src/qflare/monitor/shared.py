"""Redis as the monitor's shared memory between replicas: an accelerator, never the authority.

Counters, once-per-window latches, source blocks and the rate limiter's state live in Redis
when ``redis_url`` is set, so every replica sees the same windows. Nothing the monitor keeps in
Redis decides whether a device is who it says it is: losing it loses counts, not security.

When Redis cannot answer, the caller falls back to its in-process state for a while (the
breaker stays open for ``cooldown`` seconds, so a dead or hung Redis costs one timeout per
cooldown, not one per request) and the degradation is logged once per outage. A request never
fails because the monitor could not reach Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from qflare import crypto

log = logging.getLogger("qflare.monitor")

T = TypeVar("T")
PREFIX = "qflare:mon:"


class SharedUnavailable(Exception):
    """Redis did not answer (or the breaker is open): use the in-process fallback."""


def digest(*parts: str) -> str:
    """A fixed-length key part for attacker-chosen strings (device ids, sources): each part
    length-prefixed, so no choice of parts collides with another."""
    encoded = [part.encode() for part in parts]
    framed = b"".join(len(data).to_bytes(4, "big") + data for data in encoded)
    return crypto.kdf("HKDF-SHA256").hash(framed).hex()[:32]


class SharedRedis:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.5,
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.cooldown = cooldown
        self._clock = clock
        self._open_until = 0.0
        self.failures = 0

    @property
    def available(self) -> bool:
        return self._clock() >= self._open_until

    async def run(self, what: str, call: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """``call(redis)``; ``SharedUnavailable`` if Redis fails or failed moments ago."""
        if not self.available:
            raise SharedUnavailable(what)
        try:
            return await call(self.redis)
        except (RedisError, OSError) as exc:
            self.failures += 1
            if self.available:  # first failure of this outage: say so once
                log.warning(
                    "monitor: Redis unavailable during %s (%s); using per-replica state for %.0f s",
                    what,
                    type(exc).__name__,
                    self.cooldown,
                )
            self._open_until = self._clock() + self.cooldown
            raise SharedUnavailable(what) from exc

    async def close(self) -> None:
        await self.redis.aclose()
