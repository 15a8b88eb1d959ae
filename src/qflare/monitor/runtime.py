"""The monitor's parts wired from ``Settings``, for the server (``create_app``) and the CLI.

With ``redis_url`` set, counters, latches and source blocks are shared through Redis by every
replica; without it they live in this process. ``monitor_enabled = false`` turns the rules off
(no detector); source blocks an operator or an earlier run set are still honoured.
"""

from __future__ import annotations

from dataclasses import dataclass

from qflare.config import Settings
from qflare.keys import KeyManager
from qflare.monitor.alerts import Alerter
from qflare.monitor.blocks import SourceBlocks
from qflare.monitor.counters import MemoryCounters, SharedCounters
from qflare.monitor.detect import Detector, rules_from
from qflare.monitor.shared import SharedRedis


@dataclass(slots=True)
class Monitor:
    shared: SharedRedis | None
    blocks: SourceBlocks
    detector: Detector | None

    async def close(self) -> None:
        if self.detector is not None:
            await self.detector.close()
        if self.shared is not None:
            await self.shared.close()


def shared_redis(settings: Settings) -> SharedRedis | None:
    return SharedRedis(settings.redis_url) if settings.redis_url else None


def open_monitor(settings: Settings, keys: KeyManager) -> Monitor:
    shared = shared_redis(settings)
    blocks = SourceBlocks(keys.tenant, shared)
    detector = None
    if settings.monitor_enabled:
        detector = Detector(
            rules_from(settings),
            keys=keys,
            counters=SharedCounters(shared) if shared is not None else MemoryCounters(),
            blocks=blocks,
            alerter=Alerter(settings.monitor_webhook_url, timeout=settings.monitor_webhook_timeout),
            respond=settings.monitor_respond,
            block_seconds=settings.monitor_block_seconds,
            trusted_sources=settings.monitor_trusted_sources,
        )
    return Monitor(shared, blocks, detector)


__all__ = ["Monitor", "open_monitor", "shared_redis"]
