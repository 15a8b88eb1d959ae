from __future__ import annotations

import pytest

from qflare.server.errors import RateLimited
from qflare.server.ratelimit import RateLimiter


def test_burst_then_refill() -> None:
    rl = RateLimiter(rate=2.0, burst=3)
    for _ in range(3):
        rl.check("a", now=0.0)
    with pytest.raises(RateLimited) as info:
        rl.check("a", now=0.0)
    assert info.value.retry_after == pytest.approx(0.5)
    rl.check("b", now=0.0)  # other sources are unaffected
    rl.check("a", now=0.5)  # one token back after 1/rate seconds
    with pytest.raises(RateLimited):
        rl.check("a", now=0.5)


def test_memory_is_bounded() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_sources=10)
    for i in range(100):
        rl.check(f"src-{i}", now=0.0)
    assert len(rl._buckets) == 10
