"""The Redis nonce cache against a real Redis, alone and behind a live server.

Redis is an accelerator, never the authority: a replay it forgot (FLUSHDB) is still refused by
the store's durable check, and a Redis that cannot answer refuses handshakes (503, fail closed).
Only the database numbered in the test URL (default 15) is ever flushed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio as aioredis

from qflare.config import Settings
from qflare.errors import StoreUnavailable
from qflare.server.nonces import RedisNonceCache

from .conftest import HELLO, OCTET, enroll, free_port, hello_of, refused, serving

PREFIX = "qflare:nonce:"


def dedicated_db(url: str) -> int:
    """The database number in ``url``; refuse to run (and so to flush) on database 0."""
    path = urlsplit(url).path.strip("/")
    if not path.isdigit() or int(path) == 0:
        pytest.skip(f"{url} names no dedicated Redis database (e.g. redis://host:6379/15)")
    return int(path)


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[str]:
    """``redis_url``, its database flushed before and after the test."""
    dedicated_db(redis_url)
    _flush(redis_url)
    yield redis_url
    _flush(redis_url)


def _flush(url: str) -> None:
    async def flush() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            await client.flushdb()
        finally:
            await client.aclose()

    asyncio.run(flush())


def _nonce_keys(url: str) -> list[bytes]:
    async def scan() -> list[bytes]:
        client = aioredis.Redis.from_url(url)
        try:
            return [key async for key in client.scan_iter(match=PREFIX + "*")]
        finally:
            await client.aclose()

    return asyncio.run(scan())


# -- the cache alone ------------------------------------------------------------------------------


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[RedisNonceCache]:
    dedicated_db(redis_url)
    raw = aioredis.Redis.from_url(redis_url)
    await raw.flushdb()
    nonces = RedisNonceCache(redis_url)
    try:
        yield nonces
    finally:
        await nonces.close()
        await raw.flushdb()
        await raw.aclose()


async def test_first_use_then_seen(cache: RedisNonceCache) -> None:
    nonce = os.urandom(32)
    assert await cache.ping()
    assert await cache.first_use("default", "dev-1", nonce, ttl=60) is True
    assert await cache.first_use("default", "dev-1", nonce, ttl=60) is False
    assert await cache.first_use("default", "dev-1", nonce, ttl=60) is False
    assert await cache.first_use("default", "dev-1", os.urandom(32), ttl=60) is True


async def test_expiry_is_honoured(cache: RedisNonceCache, redis_url: str) -> None:
    nonce = os.urandom(32)
    assert await cache.first_use("default", "dev-1", nonce, ttl=1)
    assert not await cache.first_use("default", "dev-1", nonce, ttl=1)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        [key] = [k async for k in raw.scan_iter(match=PREFIX + "*")]
        assert 0 < await raw.pttl(key) <= 1000
        deadline = time.monotonic() + 5
        while await raw.exists(key):
            assert time.monotonic() < deadline, "Redis kept the nonce past its TTL"
            await asyncio.sleep(0.05)
    finally:
        await raw.aclose()
    assert await cache.first_use("default", "dev-1", nonce, ttl=1)


async def test_keys_are_namespaced_per_tenant_and_device(
    cache: RedisNonceCache, redis_url: str
) -> None:
    nonce = os.urandom(32)
    for tenant, device in [("default", "dev-1"), ("default", "dev-2"), ("acme", "dev-1")]:
        assert await cache.first_use(tenant, device, nonce, ttl=60), (tenant, device)
        assert not await cache.first_use(tenant, device, nonce, ttl=60), (tenant, device)
    # Separators cannot be forged into a collision: ("a", "b\0c") is not ("a\0b", "c").
    assert await cache.first_use("t", "a\0b", nonce, ttl=60)
    assert await cache.first_use("t\0a", "b", nonce, ttl=60)
    other = RedisNonceCache(redis_url, prefix="other:")
    try:
        assert await other.first_use("default", "dev-1", nonce, ttl=60)
    finally:
        await other.close()

    raw = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in raw.scan_iter(match="*")]
    finally:
        await raw.aclose()
    ours = [k for k in keys if k.startswith(PREFIX.encode())]
    assert len(ours) == 5 and len(keys) == 6
    # Keys are digests: no device id or nonce in the clear.
    assert not any(b"dev-" in k or nonce.hex().encode() in k for k in keys)


async def test_unreachable_redis_fails_closed() -> None:
    nonces = RedisNonceCache(f"redis://127.0.0.1:{free_port()}/15")
    try:
        assert not await nonces.ping()
        with pytest.raises(StoreUnavailable):
            await nonces.first_use("default", "dev-1", os.urandom(32), ttl=60)
    finally:
        await nonces.close()


# -- behind a live server -------------------------------------------------------------------------


def test_replay_refused_even_after_redis_forgets(settings: Settings, redis_db: str) -> None:
    server_settings = settings.model_copy(update={"redis_url": redis_db})
    with serving(server_settings) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/readyz").json() == {"status": "ready"}
        identity = enroll(server, http, "dev-redis")
        hello = hello_of(identity)
        assert http.post(HELLO, content=hello, headers=OCTET).status_code == 200
        assert len(_nonce_keys(redis_db)) == 1  # the server remembered it in Redis
        refused(http.post(HELLO, content=hello, headers=OCTET), 401, "handshake_failed")

        _flush(redis_db)  # Redis loses everything (a restart without persistence)
        assert _nonce_keys(redis_db) == []
        refused(http.post(HELLO, content=hello, headers=OCTET), 401, "handshake_failed")
        replays = server.events("replay.detected")
        assert [e["device_id"] for e in replays] == ["dev-redis"] * 2

        # Redis took the replay for new (SET NX) and the store refused it; fresh hellos
        # still work.
        assert len(_nonce_keys(redis_db)) == 1
        assert http.post(HELLO, content=hello_of(identity), headers=OCTET).status_code == 200
        assert len(_nonce_keys(redis_db)) == 2


def test_redis_down_fails_closed(settings: Settings) -> None:
    down = f"redis://127.0.0.1:{free_port()}/15"  # nothing listens there
    server_settings = settings.model_copy(update={"redis_url": down})
    with serving(server_settings) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/healthz").status_code == 200
        refused(http.get("/readyz"), 503, "unavailable")
        identity = enroll(server, http, "dev-no-redis")  # enrollment needs no Redis
        hello = hello_of(identity)
        for _ in range(2):
            refused(http.post(HELLO, content=hello, headers=OCTET), 503, "unavailable")
        assert server.events("handshake.started") == []
