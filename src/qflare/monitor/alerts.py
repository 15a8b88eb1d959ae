"""Alerts: a log line for every detection, and an optional JSON webhook.

The webhook is POSTed from a background task with a bounded timeout, so a slow or dead
receiver never delays a request; at most ``max_in_flight`` posts wait at once (further alerts
are logged and not posted) and every failure is logged. The URL is never logged: it may carry
a credential.

Webhook body (``Content-Type: application/json``), one alert per POST::

    {"kind": "qflare.alert", "version": 1, "ts": "2025-01-01T12:00:00+00:00",
     "tenant": "default", "rule": "signature_invalid_device", "scope": "device",
     "subject": "sensor-17", "count": 5.0, "threshold": 5, "window_seconds": 60,
     "response": "quarantine", "outcome": "quarantined", "severity": "high",
     "trigger": {"type": "signature.invalid", "device_id": "sensor-17",
                 "source": "10.0.0.7", "detail": {"reason": "signature-invalid"}}}
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

log = logging.getLogger("qflare.monitor")


class Alerter:
    def __init__(
        self,
        webhook_url: str = "",
        *,
        timeout: float = 2.0,
        max_in_flight: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.webhook_url = webhook_url
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def alert(self, payload: dict[str, Any]) -> None:
        """Log ``payload`` and schedule its webhook POST; returns at once."""
        log.warning(
            "security alert rule=%s %s=%s count=%.1f threshold=%s window=%ss response=%s "
            "outcome=%s",
            payload.get("rule"),
            payload.get("scope"),
            payload.get("subject"),
            payload.get("count", 0.0),
            payload.get("threshold"),
            payload.get("window_seconds"),
            payload.get("response"),
            payload.get("outcome"),
        )
        if not self.webhook_url:
            return
        if len(self._pending) >= self.max_in_flight:
            self.dropped += 1
            log.error(
                "alert webhook backlog full (%d in flight): alert not posted", self.max_in_flight
            )
            return
        task = asyncio.get_running_loop().create_task(self._post(payload))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _post(self, payload: dict[str, Any]) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, transport=self._transport)
        try:
            response = await self._client.post(self.webhook_url, json=payload)
        except httpx.HTTPError as exc:
            self.failed += 1
            log.error("alert webhook failed: %s", type(exc).__name__)
            return
        if response.status_code >= 300:
            self.failed += 1
            log.error("alert webhook answered HTTP %d", response.status_code)
            return
        self.sent += 1

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for posts in flight (at most ``timeout``, default the webhook timeout)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout or self.timeout + 1)

    async def close(self) -> None:
        await self.drain()
        for task in list(self._pending):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
