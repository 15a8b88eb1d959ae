"""EventWriter, the group commit of INFO security events, over a real SQLite store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from qflare.server.service import EventWriter
from qflare.store import SecurityEventRow, Store, open_store
from qflare.store.base import MAX_EVENT_BATCH

NOW = datetime(2026, 11, 29, tzinfo=UTC)
TENANT = "acme"


class Batches:
    """The real store's append_security_events, recording each batch's size."""

    def __init__(self, store: Store) -> None:
        self.sizes: list[int] = []
        self._append = store.append_security_events
        store.append_security_events = self  # type: ignore[method-assign]

    async def __call__(self, tenant_id: str, rows: Sequence[SecurityEventRow]) -> int:
        self.sizes.append(len(rows))
        return await self._append(tenant_id, rows)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(f"sqlite:///{tmp_path / 'qflare.db'}", migrate=True)
    await store.create_tenant(TENANT, "Acme", now=NOW)
    try:
        yield store
    finally:
        await store.close()


def row(i: int, **kw: object) -> SecurityEventRow:
    fields: dict[str, object] = {"ts": NOW, "type": "handshake.started", "severity": 20}
    fields.update(kw)
    return SecurityEventRow(detail={"n": str(i)}, **fields)  # type: ignore[arg-type]


async def stored(store: Store) -> list[str]:
    events = await store.list_security_events(TENANT, limit=1000)
    return [str((e.detail or {})["n"]) for e in events]


async def test_events_are_written_together_after_the_linger(store: Store) -> None:
    batches = Batches(store)
    writer = EventWriter(store, TENANT, linger=0.05)
    for i in range(5):
        assert writer.submit(row(i))
        await asyncio.sleep(0.002)
    assert batches.sizes == [] and writer.pending == 5  # still lingering
    await asyncio.sleep(0.15)
    assert batches.sizes == [5]
    assert await stored(store) == ["0", "1", "2", "3", "4"]


async def test_events_arriving_during_a_write_wait_for_company(store: Store) -> None:
    """A steady trickle (one event every few ms, as a server under load makes) is written in
    a few batches, not one transaction per event behind the first."""
    batches = Batches(store)
    writer = EventWriter(store, TENANT, linger=0.05)
    for i in range(60):
        writer.submit(row(i))
        await asyncio.sleep(0.003)
    await writer.flush()
    assert sum(batches.sizes) == 60
    assert len(batches.sizes) <= 8, batches.sizes  # ~180 ms of events in 50 ms lingers
    assert await stored(store) == [str(i) for i in range(60)]


async def test_flush_writes_now_and_waits(store: Store) -> None:
    writer = EventWriter(store, TENANT, linger=10.0)
    writer.submit(row(1))
    writer.submit(row(2))
    await asyncio.wait_for(writer.flush(), 2.0)  # does not sit out the 10 s linger
    assert writer.pending == 0
    assert await stored(store) == ["1", "2"]


async def test_a_full_queue_refuses_instead_of_dropping(store: Store) -> None:
    writer = EventWriter(store, TENANT, limit=3, linger=10.0)
    assert all(writer.submit(row(i)) for i in range(3))
    assert not writer.submit(row(3))  # the caller writes this one itself
    await writer.flush()
    assert await stored(store) == ["0", "1", "2"]


async def test_a_full_batch_does_not_linger(store: Store) -> None:
    batches = Batches(store)
    writer = EventWriter(store, TENANT, limit=2 * MAX_EVENT_BATCH, linger=10.0)
    for i in range(MAX_EVENT_BATCH + 1):
        writer.submit(row(i))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if batches.sizes:
            break
    assert batches.sizes == [MAX_EVENT_BATCH]  # at once; the one left over lingers
    await writer.flush()
    assert batches.sizes == [MAX_EVENT_BATCH, 1]


async def test_one_bad_row_does_not_lose_the_others(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    writer = EventWriter(store, TENANT, linger=0.0)
    writer.submit(row(1))
    writer.submit(row(2, type="x" * 10_000))  # refused by the store's validation
    writer.submit(row(3))
    with caplog.at_level(logging.ERROR, "qflare.server"):
        await writer.flush()
    assert await stored(store) == ["1", "3"]
    assert any("could not store security event" in m for m in caplog.messages)
