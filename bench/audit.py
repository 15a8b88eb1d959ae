"""Cost of an audit log append, amortized per entry, on SQLite and PostgreSQL.

Run: ``.venv/bin/python bench/audit.py [--quick] [--rounds N] [--entries N] [--callers N]
[--backends sqlite,postgres] [--postgres-url URL] [--target MS] [--check]``

The seed claimed about 1 ms per audit write; the target is below 0.3 ms per entry, and
batching is allowed. Four sides per backend, each on a database of its own (a SQLite file, a
PostgreSQL schema) migrated from scratch, so that no side moves another side's head:

* ``log``: ``AuditLog.append`` of an enrollment-like intent entry, one caller, one append after
  another (canonical JSON, leaf hash, link, ``Store.append_audit_batch`` of one row with
  ``expected_idx``): what an append costs when nothing else is being logged.
* ``log_concurrent``: the same with ``--callers`` appends in flight at once, as a busy server
  has them. ``AuditLog`` group-commits whatever queued while a write was in flight: one
  ``Store.append_audit_batch`` transaction for the lot. **The target is judged on this side**:
  it is the product path, batching included.
* ``store``: ``Store.append_audit`` alone, payloads built beforehand: one transaction per entry
  (lock, next index, insert, commit), the floor of an unbatched append.
* ``store_batch``: ``Store.append_audit_batch`` alone, payloads built beforehand, ``--callers``
  rows per call: the floor ``log_concurrent`` sits on.

How it measures (as ``store.py``: the work happens in the database):

* **Clock:** ``time.perf_counter_ns``, wall time around each batch of K entries: an append is
  mostly round trips and a commit (an fsync with SQLite's ``synchronous=FULL``, a WAL flush on
  PostgreSQL), which this process's CPU time would not see. ms per entry = batch time / K.
* **Interleaving:** each round runs every side of every backend once, K entries each; the order
  of the sides alternates from round to round, so a noisy moment hits all sides alike.
* **Statistics:** the median over rounds of ms per entry, with the round range.
* The garbage collector is off during each timed batch; afterwards every side's log is checked
  to be dense with leaf hashes that hash its payloads.

RESULT line: ``RESULT log_ms_<b>=… concurrent_ms_<b>=… store_ms_<b>=… batch_ms_<b>=…
... target_ms=0.3 seed_claim_ms=1.0 status=PASS|FAIL entries=K callers=C rounds=R
clock=perf_counter_ns`` for each backend ``<b>`` (``sqlite``, ``pg``). ``status`` is PASS when
``concurrent_ms`` of every backend is at most the target.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from qflare.monitor import merkle
from qflare.monitor.audit import AuditLog
from qflare.monitor.entry import encode_entry
from qflare.store import AuditRow, migrate, open_store
from qflare.store.base import Store
from qflare.store.sqlite import to_micros

try:
    import _timing as T
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _timing as T

CLOCK = time.perf_counter_ns
CLOCK_NAME = "perf_counter_ns"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_MS = 0.3
SEED_CLAIM_MS = 1.0
ENTRIES, QUICK_ENTRIES = 512, 128
ROUNDS, QUICK_ROUNDS = 7, 3
CALLERS = 64
SIDES = ("log", "log_concurrent", "store", "store_batch")
KEYS = {"log": "log", "log_concurrent": "concurrent", "store": "store", "store_batch": "batch"}
PREPARED = ("store", "store_batch")  # the sides whose payloads are built outside the timing
PREFIX = {"sqlite": "sqlite", "postgres": "pg"}
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def intent(i: int) -> dict[str, Any]:
    """What an enrollment's intent entry holds (docs/AUDIT.md): ids and a key hash."""
    return {
        "device_id": f"dev-{i:08d}",
        "algorithm": "ML-DSA-44",
        "public_key_sha256": hashlib.sha256(b"%d" % i).hexdigest(),
        "phase": "intent",
    }


def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["schema"] = schema
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass
class Side:
    name: str
    run: Callable[[int], Awaitable[None]]  # append K entries
    ms: list[float] = field(default_factory=list)


class Backend:
    """Four fresh databases of one backend, one per side, and the sides over them."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.stores: dict[str, Store] = {}
        self.schemas: list[str] = []
        self.tmpdir: Path | None = None
        self.counts = dict.fromkeys(SIDES, 0)
        self.prepared: dict[str, list[AuditRow]] = {side: [] for side in PREPARED}
        self.prev: dict[str, bytes | None] = dict.fromkeys(PREPARED)

    async def _open(self, side: str) -> Store:
        if self.name == "sqlite":
            if self.tmpdir is None:
                self.tmpdir = Path(
                    tempfile.mkdtemp(prefix="qflare-bench-audit-", dir=self.args.tmpdir)
                )
            url = f"sqlite:///{self.tmpdir / f'{side}.db'}"
        else:
            schema = f"qflare_bench_audit_{uuid.uuid4().hex[:10]}"
            self.schemas.append(schema)
            url = with_schema(self.args.postgres_url, schema)
        await migrate(url)
        store = self.stores[side] = await open_store(url)
        return store

    async def sides(self) -> list[Side]:
        logs = {}
        for side in SIDES:
            store = await self._open(side)
            logs[side] = AuditLog(store, max_batch=self.args.callers)

        async def run_log(k: int) -> None:
            for _ in range(k):
                await logs["log"].append("device.enroll", intent(self.counts["log"]))
                self.counts["log"] += 1

        async def run_concurrent(k: int) -> None:
            log = logs["log_concurrent"]
            for start in range(0, k, self.args.callers):
                n = min(self.args.callers, k - start)
                first = self.counts["log_concurrent"]
                await asyncio.gather(
                    *(log.append("device.enroll", intent(first + i)) for i in range(n))
                )
                self.counts["log_concurrent"] += n

        async def run_store(k: int) -> None:
            store = self.stores["store"]
            assert len(self.prepared["store"]) == k
            for row in self.prepared["store"]:
                await store.append_audit(
                    ts=row.ts,
                    kind=row.kind,
                    payload=row.payload,
                    leaf_hash=row.leaf_hash,
                    expected_idx=self.counts["store"],
                )
                self.counts["store"] += 1

        async def run_batch(k: int) -> None:
            store, rows = self.stores["store_batch"], self.prepared["store_batch"]
            assert len(rows) == k
            for start in range(0, k, self.args.callers):
                batch = rows[start : start + self.args.callers]
                await store.append_audit_batch(batch, expected_idx=self.counts["store_batch"])
                self.counts["store_batch"] += len(batch)

        return [
            Side("log", run_log),
            Side("log_concurrent", run_concurrent),
            Side("store", run_store),
            Side("store_batch", run_batch),
        ]

    def prepare(self, k: int) -> None:
        """The next K rows of each store side, built outside its timing (untimed)."""
        for side in PREPARED:
            rows = self.prepared[side] = []
            prev = self.prev[side]
            for i in range(self.counts[side], self.counts[side] + k):
                payload = encode_entry(
                    idx=i, ts=to_micros(NOW), kind="device.enroll", prev=prev, data=intent(i)
                )
                prev = merkle.leaf_hash(payload)
                rows.append(AuditRow(ts=NOW, kind="device.enroll", payload=payload, leaf_hash=prev))
            self.prev[side] = prev

    async def check(self) -> None:
        for side, store in self.stores.items():
            size = await store.audit_size()
            assert size == self.counts[side], (self.name, side, size, self.counts[side])
            entries = await store.list_audit(start=max(0, size - 100), limit=100)
            assert [e.idx for e in entries] == list(range(max(0, size - 100), size)), side
            for entry in entries:
                assert entry.leaf_hash == merkle.leaf_hash(entry.payload), (self.name, side)

    async def close(self) -> None:
        for store in self.stores.values():
            await store.close()
        if self.name == "sqlite":
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            return
        conn = await asyncpg.connect(self.args.postgres_url)
        try:
            for schema in self.schemas:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def timed(side: Side, k: int) -> float:
    gc.disable()
    try:
        start = CLOCK()
        await side.run(k)
        return (CLOCK() - start) / 1e6 / k
    finally:
        gc.enable()


async def measure(args: argparse.Namespace, progress: T.Progress) -> dict[str, dict[str, Side]]:
    backends = [Backend(name, args) for name in args.backends]
    sides: dict[str, dict[str, Side]] = {}
    try:
        for b in backends:
            sides[b.name] = {s.name: s for s in await b.sides()}
            progress.note(f"{b.name}: warming up")
            b.prepare(args.callers)
            for side in sides[b.name].values():
                await side.run(args.callers)
        for r in range(args.rounds):
            order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
            for b in backends:
                b.prepare(args.entries)
                for name in order:
                    progress.step(f"round {r + 1}/{args.rounds} {b.name} {name}")
                    sides[b.name][name].ms.append(await timed(sides[b.name][name], args.entries))
            progress.note(
                f"round {r + 1}/{args.rounds}: "
                + "  ".join(
                    f"{b.name}/{n} {sides[b.name][n].ms[-1]:.3f}" for b in backends for n in SIDES
                )
            )
        for b in backends:
            await b.check()
    finally:
        for b in backends:
            await b.close()
        progress.done()
    return sides


def report(sides: dict[str, dict[str, Side]], args: argparse.Namespace) -> int:
    rows = []
    values: dict[str, object] = {}
    status_ok = True
    for backend, by_name in sides.items():
        for name in SIDES:
            ms = by_name[name].ms
            med = statistics.median(ms)
            values[f"{KEYS[name]}_ms_{PREFIX[backend]}"] = med
            judged = "target" if name == "log_concurrent" else ""
            rows.append(
                (
                    backend,
                    name,
                    f"{med:.3f}",
                    f"{min(ms):.3f}..{max(ms):.3f}",
                    f"{SEED_CLAIM_MS / med:.1f}x",
                    judged,
                )
            )
        if statistics.median(by_name["log_concurrent"].ms) > args.target:
            status_ok = False
    print(
        f"Audit append, wall ms per entry: {args.entries} entries per side and round, "
        f"{args.rounds} rounds, {args.callers} callers in flight on the concurrent sides"
    )
    print(
        T.table(("backend", "side", "median ms", "round range", "vs seed ~1 ms", ""), rows, right=2)
    )
    status = "PASS" if status_ok else "FAIL"
    print(
        f"{status}: log_concurrent is {'within' if status_ok else 'above'} the target of "
        f"{args.target} ms per entry on every backend measured"
    )
    print(
        T.result_line(
            **values,
            target_ms=args.target,
            seed_claim_ms=SEED_CLAIM_MS,
            status=status,
            entries=args.entries,
            callers=args.callers,
            rounds=args.rounds,
            clock=CLOCK_NAME,
        )
    )
    return 1 if args.check and not status_ok else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Audit append cost per entry on SQLite and PostgreSQL; prints a table, "
        "a PASS/FAIL line and a RESULT line."
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds of 128 entries per side")
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds (default {ROUNDS})")
    parser.add_argument(
        "--entries", type=int, default=None, help=f"entries per side and round (default {ENTRIES})"
    )
    parser.add_argument(
        "--callers", type=int, default=CALLERS, help="appends in flight on the concurrent sides"
    )
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated")
    parser.add_argument("--postgres-url", default=DEFAULT_PG_URL, help="a superuser's URL")
    parser.add_argument("--tmpdir", default=None, help="where the SQLite files go")
    parser.add_argument("--target", type=float, default=TARGET_MS, help="ms per entry")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    args.entries = args.entries or (QUICK_ENTRIES if args.quick else ENTRIES)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in PREFIX:
            parser.error(f"unknown backend {b!r}")
    if min(args.entries, args.rounds, args.callers) < 1:
        parser.error("--entries, --rounds and --callers are at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("audit")
    sides = asyncio.run(measure(args, progress))
    return report(sides, args)


if __name__ == "__main__":
    sys.exit(main())
