"""Per-source token buckets: a burst allowance refilled at a steady rate.

In-process only; with Redis configured the monitor shares counters between replicas.
Buckets of sources that went quiet are dropped so a flood of spoofed sources cannot grow
memory without bound.
"""

from __future__ import annotations

from collections import OrderedDict

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
