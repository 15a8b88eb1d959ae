"""The handshake nonce cache shared by replicas through Redis: an accelerator, not the authority.

``SET key 1 NX EX ttl`` answers "first use?" in one round trip for every replica. Redis may
lose writes (asynchronous replication, a restart without persistence), so a "first use" answer
is always confirmed by the store's durable check (``KeyManager.first_use``); only a "seen
before" answer is final, because a nonce Redis remembers was really used.
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from qflare.errors import StoreUnavailable


class RedisNonceCache:
    def __init__(self, url: str, *, prefix: str = "qflare:nonce:") -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix

    def _key(self, tenant: str, device_id: str, nonce: bytes) -> str:
        # Each part length-prefixed: no choice of tenant and device id collides with another.
        digest = hashlib.sha256()
        for part in (tenant.encode(), device_id.encode(), nonce):
            digest.update(len(part).to_bytes(4, "big") + part)
        return self._prefix + digest.hexdigest()

    async def first_use(self, tenant: str, device_id: str, nonce: bytes, *, ttl: int) -> bool:
        try:
            created = await self._redis.set(
                self._key(tenant, device_id, nonce), b"1", nx=True, ex=ttl
            )
        except RedisError as exc:
            raise StoreUnavailable("nonce cache unavailable") from exc
        return bool(created)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        await self._redis.aclose()
