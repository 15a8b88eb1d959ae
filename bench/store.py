"""Latency of the store's hot operations at 1,000 and at 1,000,000 enrolled devices.

Run: ``.venv/bin/python bench/store.py [--quick] [--sizes 1000,1000000]
[--backends sqlite,postgres] [--postgres-url URL] [--check]``

Four operations, each through the real ``Store`` API of a store opened with ``open_store``
(PostgreSQL connects as ``qflare_app``, so row-level security is on, as in production):

* ``device_lookup``: ``get_device`` of a random enrolled device;
* ``session_lookup``: ``get_session`` of a random live session;
* ``session_update``: ``update_session(expected_version=...)`` of a random session, writing what
  a session update writes (new sealed chain state, replay window, counters);
* ``enroll``: ``enroll_device`` with an unused token: redeem the token, create the device and
  its key version 1 in one transaction. This is what ``KeyManager.enroll`` ("enroll a device by
  token") calls; ``redeem_token`` alone is only its first statement.

Each backend gets one database per size, all open at once: SQLite files in a temporary
directory; PostgreSQL schemas of their own (``?schema=qflare_bench_...`` on the URL), migrated
from scratch and dropped at the end. Per size N there are N devices, each with key version 1
(ML-DSA-44, 1,312-byte public key), its used enrollment token (not yet expired: the token table
is as large as the device table, the worst case before cleanup) and one live session (247-byte
sealed chain state, 49-byte replay window: the sizes of a one-epoch session), all in one tenant;
plus the unused tokens the ``enroll`` samples consume. ``enroll`` therefore adds devices as it
runs: the small case ends with a few thousand devices instead of 1,000 (same index depth).

Loading a million rows through the API would take hours, so the rows are bulk-loaded by
``_load_*`` below (bench-only; nothing in ``src`` knows about it): ``COPY`` as the schema owner on
PostgreSQL (then ``VACUUM ANALYZE``, as autovacuum would have done in a live system), and
``executemany`` in large transactions on SQLite. The rows have exactly the columns and value
encodings the store itself writes (enroll_device, then a device's accept_handshake and
finish_handshake); the script checks that the store reads them back before timing anything.

How it measures (unlike ``crypto.py`` and ``handshake.py``, whose targets are about CPU):

* **Clock:** ``time.perf_counter_ns``, wall time around each awaited call: a latency includes
  the database server's work, which happens in another process (PostgreSQL) or another thread
  (the SQLite store's own), and which this process's CPU time would not see. Every call is
  timed on its own.
* **Interleaving:** the sizes alternate call by call (small, large, large, small, ...), and the
  size that goes first alternates from round to round, so a noisy moment on the shared machine
  hits both sizes alike. Each round measures every operation in turn.
* **Statistics:** p50/p99 over all samples of an operation and size (all rounds pooled). The
  growth ratio (large/small) is the median over rounds of the per-round p50 ratio; its round
  range shows how noisy it was.
* Samples run with the garbage collector off; arguments are built outside the timings, results
  are checked after them.

Reading it: on PostgreSQL an operation's latency is mostly client/server round trips, not
query work (``--explain`` shows how little of it the server spends executing).
``get_device`` and ``get_session`` are one round trip each: one call of a ``read_*`` function
that sets the tenant and runs the lookup (migration 0002; docs/STORAGE.md "Round trips").
``update_session`` and ``enroll_device`` are transactions: BEGIN, ``set_config`` of the tenant,
their statements, COMMIT. (Before 0002 and the pool's no-op reset, a lookup was five: BEGIN,
``set_config``, SELECT, COMMIT and asyncpg's reset query on release.) ``--explain`` shows the
lookups' shared statement, which is the query the function runs. SQLite writes include an fsync
per commit (``synchronous=FULL``).

The bulk load runs after the migrations, so the PostgreSQL tables are written with the
fillfactor 0002 sets (``sessions`` 85, ``devices`` 90), as a live system's would be.

``--explain`` adds, after measuring, the plan of each operation's main statement at every size
(on PostgreSQL ``EXPLAIN (ANALYZE, BUFFERS, WAL)`` as ``qflare_app``, rolled back) and the
tables' update counters and sizes: where to look when a large case is slower.

Targets: ``get_session`` p99 < 1 ms on PostgreSQL (at every size), and for every operation and
backend, p50 at the largest size <= 1.2x p50 at the smallest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import random
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from qflare.protocol import DEFAULT_SUITE
from qflare.store import migrate, open_store
from qflare.store import sql as S
from qflare.store.base import Store
from qflare.store.models import SessionCounters
from qflare.store.sqlite import to_micros

try:
    import _http as H
    import _timing as T
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _http as H
    from bench import _timing as T

CLOCK = time.perf_counter_ns
CLOCK_NAME = "perf_counter_ns"

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
SIZES = (1_000, 1_000_000)
QUICK_SIZES = (1_000, 100_000)
ROUNDS, QUICK_ROUNDS = 5, 3
SAMPLES, QUICK_SAMPLES = 400, 100  # per operation, size and round
WARMUP = 20  # untimed calls per operation and size before the first round
P99_TARGET_MS = 1.0
GROWTH_TARGET = 1.2

TENANT = "bench"
NOW = datetime(2030, 1, 1, tzinfo=UTC)
LOADED_FROM = NOW - timedelta(days=20)  # created_at of device i is LOADED_FROM + i seconds
ALGORITHM = DEFAULT_SUITE.signature  # ML-DSA-44
PUBLIC_KEY_LEN = 1312  # ML-DSA-44 public key
CHAIN_STATE_LEN = 247  # seal_state() of a one-epoch session through Envelope
REPLAY_LEN = 49  # EpochReplayWindows.export() with one epoch

OPS = ("device_lookup", "session_lookup", "session_update", "enroll")
OP_CALLS = {
    "device_lookup": "get_device",
    "session_lookup": "get_session",
    "session_update": "update_session",
    "enroll": "enroll_device",
}
# The seed's figures, shown beside ours. "Key storage" is a write that stores key material:
# the device key at enrollment, and the sealed chain state on every session update.
SEED_CLAIMS = {
    "device_lookup": "-",
    "session_lookup": "~1 ms",
    "session_update": "~2 ms (key storage)",
    "enroll": "~2 ms (key storage)",
}
PREFIX = {"sqlite": "sqlite", "postgres": "pg"}

# --- the bench's rows ----------------------------------------------------------------------------


def device_id(i: int) -> str:
    return f"dev-{i:08d}"


def new_device_id(j: int) -> str:
    return f"new-{j:08d}"


def session_id(i: int) -> bytes:
    """Random-looking 16 bytes (like the server's), reproducible from the device index."""
    return hashlib.blake2b(
        i.to_bytes(8, "big"), digest_size=16, person=b"qflare-bench-sid"
    ).digest()


def used_token_hash(i: int) -> bytes:
    return hashlib.sha256(b"qflare-bench-used-token/%d" % i).digest()


def spare_token_hash(j: int) -> bytes:
    return hashlib.sha256(b"qflare-bench-spare-token/%d" % j).digest()


def created_at(i: int) -> datetime:
    return LOADED_FROM + timedelta(seconds=i)


DEVICE_COLUMNS = (
    "tenant_id", "device_id", "state", "state_reason", "created_at", "last_seen",
    "failure_count", "last_handshake_ts",
)  # fmt: skip
KEY_COLUMNS = (
    "tenant_id", "device_id", "version", "algorithm", "public_key", "state", "created_at",
)  # fmt: skip
TOKEN_COLUMNS = (
    "tenant_id", "token_id", "token_hash", "created_at", "expires_at", "used_at",
    "used_by_device",
)  # fmt: skip
SESSION_COLUMNS = (
    "tenant_id", "session_id", "device_id", "state", "suite", "epoch", "encrypted_chain_state",
    "replay_window", "messages_sent", "messages_received", "bytes_sent", "bytes_received",
    "created_at", "expires_at", "updated_at", "version",
)  # fmt: skip


def device_row(i: int) -> tuple[Any, ...]:
    # As enroll_device writes it, then accept_handshake (the floor) and finish_handshake
    # (last_seen, enrolled -> active).
    seen = NOW - timedelta(hours=1)
    return (TENANT, device_id(i), "active", None, created_at(i), seen, 0,
            int(seen.timestamp()))  # fmt: skip


def key_row(i: int) -> tuple[Any, ...]:
    return (TENANT, device_id(i), 1, ALGORITHM, os.urandom(PUBLIC_KEY_LEN), "active",
            created_at(i))  # fmt: skip


def used_token_row(i: int) -> tuple[Any, ...]:
    at = created_at(i)
    return (TENANT, f"tok-{i:08d}", used_token_hash(i), at - timedelta(hours=1),
            NOW + timedelta(days=7), at, device_id(i))  # fmt: skip


def spare_token_row(j: int) -> tuple[Any, ...]:
    return (TENANT, f"spare-{j:08d}", spare_token_hash(j), NOW - timedelta(hours=1),
            NOW + timedelta(days=7), None, None)  # fmt: skip


def session_row(i: int) -> tuple[Any, ...]:
    start = NOW - timedelta(hours=1)
    return (TENANT, session_id(i), device_id(i), "active", DEFAULT_SUITE.id, 0,
            os.urandom(CHAIN_STATE_LEN), os.urandom(REPLAY_LEN), 10, 10, 4096, 4096,
            start, NOW + timedelta(days=1), start, 0)  # fmt: skip


@dataclass(frozen=True)
class TableLoad:
    table: str
    columns: tuple[str, ...]
    row: Callable[[int], tuple[Any, ...]]
    count: int


def table_loads(size: int, spare: int) -> list[TableLoad]:
    """Parents before children; each table in the order its rows would have been written."""
    return [
        TableLoad("devices", DEVICE_COLUMNS, device_row, size),
        TableLoad("device_keys", KEY_COLUMNS, key_row, size),
        TableLoad("enrollment_tokens", TOKEN_COLUMNS, used_token_row, size),
        TableLoad("enrollment_tokens", TOKEN_COLUMNS, spare_token_row, spare),
        TableLoad("sessions", SESSION_COLUMNS, session_row, size),
    ]


def chunks(load: TableLoad, chunk: int) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, load.count, chunk):
        yield [load.row(i) for i in range(start, min(load.count, start + chunk))]


# --- bench-only bulk loading (bypasses the Store API on purpose; see the module docstring) ---


LOAD_CHUNK = 20_000


async def _load_postgres(
    owner_dsn: str, schema: str, loads: list[TableLoad], progress: T.Progress, label: str
) -> None:
    """COPY the rows as the schema owner, then VACUUM ANALYZE. Bench-only."""
    conn = await asyncpg.connect(owner_dsn, server_settings={"search_path": schema})
    try:
        try:
            # Skip the per-row foreign-key triggers: the rows are consistent by construction,
            # and checking a million parents one at a time would dominate the load.
            await conn.execute("SET session_replication_role = replica")
        except asyncpg.InsufficientPrivilegeError:
            progress.note(f"{label}: not a superuser; loading with foreign-key checks (slower)")
        for load in loads:
            done = 0
            for rows in chunks(load, LOAD_CHUNK):
                await conn.copy_records_to_table(
                    load.table, records=rows, columns=list(load.columns), schema_name=schema
                )
                done += len(rows)
                progress.step(f"{label}: {load.table} {done:,}/{load.count:,}")
            if load.count >= 100_000:
                progress.note(f"{label}: loaded {load.count:,} rows into {load.table}")
        await conn.execute("RESET session_replication_role")
        progress.note(f"{label}: VACUUM ANALYZE")
        for table in ("devices", "device_keys", "enrollment_tokens", "sessions"):
            await conn.execute(f'VACUUM ANALYZE "{schema}".{table}')
    finally:
        await conn.close()


def _load_sqlite(path: Path, loads: list[TableLoad], progress: T.Progress, label: str) -> None:
    """executemany in one transaction per chunk, on a connection of its own. Bench-only.

    Times go in as the store encodes them (``to_micros``). ``synchronous=OFF`` applies to this
    loading connection only; the store's own connection keeps ``FULL``.
    """
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -1000000")  # ~1 GB: the indexes stay in memory
        for load in loads:
            cols = ", ".join(load.columns)
            marks = ", ".join("?" * len(load.columns))
            sql = f"INSERT INTO {load.table} ({cols}) VALUES ({marks})"
            done = 0
            for rows in chunks(load, LOAD_CHUNK * 5):
                db.execute("BEGIN")
                db.executemany(
                    sql,
                    (
                        tuple(to_micros(x) if isinstance(x, datetime) else x for x in row)
                        for row in rows
                    ),
                )
                db.execute("COMMIT")
                done += len(rows)
                progress.step(f"{label}: {load.table} {done:,}/{load.count:,}")
            if load.count >= 100_000:
                progress.note(f"{label}: loaded {load.count:,} rows into {load.table}")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


# --- one database per size -----------------------------------------------------------------------


@dataclass
class Fixture:
    backend: str
    size: int
    store: Store
    rng: random.Random
    where: str  # the SQLite file, or the PostgreSQL schema
    versions: dict[int, int] = field(default_factory=dict)
    next_spare: int = 0


async def _check_loaded(fx: Fixture) -> None:
    """The store must read the bulk-loaded rows back as its own (untimed)."""
    last = fx.size - 1
    device = await fx.store.get_device(TENANT, device_id(last))
    key = await fx.store.get_device_key(TENANT, device_id(last))
    session = await fx.store.get_session(TENANT, session_id(last))
    ok = (
        device.device_id == device_id(last)
        and device.created_at == created_at(last)
        and key.version == 1
        and len(key.public_key) == PUBLIC_KEY_LEN
        and session.device_id == device_id(last)
        and session.version == 0
        and session.expires_at > NOW
    )
    if not ok:
        raise SystemExit(f"bench/store.py: {fx.backend} {fx.size:,}: loaded rows read back wrong")


class Backends:
    """Creates the databases, hands out fixtures, removes everything at the end."""

    def __init__(self, args: argparse.Namespace, progress: T.Progress) -> None:
        self.args = args
        self.progress = progress
        self.stores: list[Store] = []
        self.tmpdir: Path | None = None
        self.schemas: list[str] = []
        self.run_id = uuid.uuid4().hex[:8]

    async def open(self, backend: str, size: int, spare: int) -> Fixture:
        label = f"{backend} {size:,}"
        t0 = time.monotonic()
        loads = table_loads(size, spare)
        if backend == "sqlite":
            if self.tmpdir is None:
                self.tmpdir = Path(tempfile.mkdtemp(prefix="qflare-bench-", dir=self.args.tmpdir))
            path = self.tmpdir / f"store-{size}.db"
            url = f"sqlite:///{path}"
            await migrate(url, now=NOW)
            store = await open_store(url)
            self.stores.append(store)
            await store.create_tenant(TENANT, "bench", now=LOADED_FROM)
            await asyncio.to_thread(_load_sqlite, path, loads, self.progress, label)
            where = str(path)
        else:
            schema = f"qflare_bench_{self.run_id}_{size}"
            url = H.pg_schema_url(self.args.postgres_url, schema)
            self.schemas.append(schema)
            await migrate(url, now=NOW)
            store = await open_store(url)
            self.stores.append(store)
            await store.create_tenant(TENANT, "bench", now=LOADED_FROM)
            await _load_postgres(
                H.pg_owner_dsn(self.args.postgres_url), schema, loads, self.progress, label
            )
            where = schema
        rng = random.Random(f"{self.args.seed}/{backend}/{size}")
        fx = Fixture(backend, size, store, rng, where)
        await _check_loaded(fx)
        self.progress.note(f"{label}: ready in {time.monotonic() - t0:.0f} s")
        return fx

    async def close(self) -> None:
        for store in self.stores:
            try:
                await store.close()
            except Exception as exc:  # keep cleaning up
                self.progress.note(f"closing {store!r}: {exc!r}")
        self.stores.clear()
        if self.schemas:
            conn = await asyncpg.connect(H.pg_owner_dsn(self.args.postgres_url))
            try:
                for schema in self.schemas:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                    self.progress.note(f"dropped schema {schema}")
            finally:
                await conn.close()
            self.schemas.clear()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


# --- --explain: the plans (and, on PostgreSQL, buffers and WAL) behind the numbers -------------


def explain_statements(fx: Fixture) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """Each operation's main statement (``qflare.store.sql``) with arguments for an untouched
    row; ``enroll`` is shown by its token redemption, the statement that looks up a big index."""
    i = fx.rng.randrange(fx.size)
    while i in fx.versions:
        i = fx.rng.randrange(fx.size)
    update_args = (
        TENANT, session_id(i), 0, None, None, os.urandom(CHAIN_STATE_LEN), os.urandom(REPLAY_LEN),
        11, 11, 8192, 8192, None, NOW + timedelta(seconds=1),
    )  # fmt: skip
    return {
        "device_lookup": (S.GET_DEVICE, (TENANT, device_id(i))),
        "session_lookup": (S.GET_SESSION, (TENANT, session_id(i))),
        "session_update": (S.UPDATE_SESSION, update_args),
        "enroll": (
            S.REDEEM_ENROLLMENT,
            (TENANT, spare_token_hash(fx.next_spare), NOW, new_device_id(fx.next_spare)),
        ),
    }


async def explain_postgres(owner_dsn: str, fx: Fixture) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS, WAL) as qflare_app with the tenant set, rolled back."""
    out = [f"-- postgres {fx.size:,} devices (schema {fx.where})"]
    conn = await asyncpg.connect(owner_dsn, server_settings={"search_path": fx.where})
    try:
        for op, (statement, args) in explain_statements(fx).items():
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute("SET LOCAL ROLE qflare_app")
                await conn.execute("SELECT set_config('app.tenant_id', $1, true)", TENANT)
                rows = await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF) " + statement, *args
                )
            finally:
                await tx.rollback()
            out.append(f"-- {op}: {statement}")
            out.extend("   " + r[0] for r in rows)
        stats = await conn.fetch(
            "SELECT relname, n_tup_upd, n_tup_hot_upd, "
            "pg_size_pretty(pg_total_relation_size(relid)) AS size "
            "FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = ANY($2) "
            "ORDER BY relname",
            fx.where,
            ["devices", "device_keys", "enrollment_tokens", "sessions"],
        )
        out.append("-- tables: name, updates, of which HOT, total size with indexes")
        out.extend("   " + " ".join(str(v) for v in r.values()) for r in stats)
    finally:
        await conn.close()
    return out


def explain_sqlite(fx: Fixture) -> list[str]:
    out = [f"-- sqlite {fx.size:,} devices ({fx.where})"]
    db = sqlite3.connect(fx.where)
    try:
        for op, (statement, args) in explain_statements(fx).items():
            numbered = re.sub(r"\$(\d+)", r"?\1", statement)
            params = [to_micros(a) if isinstance(a, datetime) else a for a in args]
            rows = db.execute("EXPLAIN QUERY PLAN " + numbered, params).fetchall()
            out.append(f"-- {op}: {statement}")
            out.extend("   " + str(r[-1]) for r in rows)
        size = Path(fx.where).stat().st_size
        out.append(f"-- file size {size / 2**20:.0f} MiB")
    finally:
        db.close()
    return out


# --- the operations ------------------------------------------------------------------------------

Call = Callable[[], Awaitable[object]]
Check = Callable[[object], None]


def _fail(fx: Fixture, what: str) -> None:
    raise SystemExit(f"bench/store.py: {fx.backend} {fx.size:,}: wrong result from {what}")


def prepare(op: str, fx: Fixture) -> tuple[Call, Check]:
    """The call to time (arguments built here, untimed) and a check of its result."""
    store = fx.store
    if op == "device_lookup":
        did = device_id(fx.rng.randrange(fx.size))

        def check_device(res: Any) -> None:
            if res.device_id != did:
                _fail(fx, "get_device")

        return (lambda: store.get_device(TENANT, did)), check_device
    if op == "session_lookup":
        i = fx.rng.randrange(fx.size)
        sid = session_id(i)

        def check_session(res: Any) -> None:
            if res.session_id != sid or res.device_id != device_id(i):
                _fail(fx, "get_session")

        return (lambda: store.get_session(TENANT, sid)), check_session
    if op == "session_update":
        i = fx.rng.randrange(fx.size)
        sid, version = session_id(i), fx.versions.get(i, 0)
        kwargs: dict[str, Any] = {
            "expected_version": version,
            "now": NOW + timedelta(seconds=version + 1),
            "encrypted_chain_state": os.urandom(CHAIN_STATE_LEN),
            "replay_window": os.urandom(REPLAY_LEN),
            "counters": SessionCounters(
                messages_sent=11 + version,
                messages_received=11 + version,
                bytes_sent=4096 * (2 + version),
                bytes_received=4096 * (2 + version),
            ),
        }

        def check_update(res: Any) -> None:
            if res.version != version + 1:
                _fail(fx, "update_session")
            fx.versions[i] = res.version

        return (lambda: store.update_session(TENANT, sid, **kwargs)), check_update
    if op == "enroll":
        j = fx.next_spare
        fx.next_spare += 1
        did = new_device_id(j)
        digest, public_key = spare_token_hash(j), os.urandom(PUBLIC_KEY_LEN)

        def check_enroll(res: Any) -> None:
            if res.token.used_by_device != did or res.key.version != 1:
                _fail(fx, "enroll_device")

        return (
            lambda: store.enroll_device(
                TENANT,
                digest,
                now=NOW,
                device_id=did,
                algorithm=ALGORITHM,
                public_key=public_key,
            )
        ), check_enroll
    raise ValueError(op)


async def sample(op: str, fx: Fixture) -> int:
    call, check = prepare(op, fx)
    start = CLOCK()
    result = await call()
    spent = CLOCK() - start
    check(result)
    return spent


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class Samples:
    """Nanoseconds per call: ``rounds[r][size]`` is one round's samples of one size."""

    rounds: list[dict[int, list[int]]] = field(default_factory=list)

    def pooled(self, size: int) -> list[int]:
        return [ns for r in self.rounds for ns in r[size]]


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def measure(
    fixtures: list[Fixture], args: argparse.Namespace, progress: T.Progress
) -> dict[str, Samples]:
    backend = fixtures[0].backend
    for op in OPS:
        for fx in fixtures:
            for _ in range(WARMUP):
                await sample(op, fx)
    results = {op: Samples() for op in OPS}
    for r in range(args.rounds):
        gc.collect()
        first = fixtures if r % 2 == 0 else fixtures[::-1]
        for op in OPS:
            progress.note(f"{backend}: round {r + 1}/{args.rounds}: {op}")
            got: dict[int, list[int]] = {fx.size: [] for fx in fixtures}
            gc.disable()
            try:
                for k in range(args.samples):
                    for fx in first if k % 2 == 0 else first[::-1]:
                        got[fx.size].append(await sample(op, fx))
            finally:
                gc.enable()
            results[op].rounds.append(got)
    return results


# --- report --------------------------------------------------------------------------------------


@dataclass
class Growth:
    ratio: float  # median over rounds of p50(large)/p50(small)
    low: float
    high: float


def growth(s: Samples, small: int, large: int) -> Growth:
    ratios = [pct(r[large], 50) / pct(r[small], 50) for r in s.rounds]
    return Growth(statistics.median(ratios), min(ratios), max(ratios))


def ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


@dataclass
class Verdicts:
    lines: list[str] = field(default_factory=list)
    failed: bool = False

    def judge(self, ok: bool, text: str) -> None:
        self.lines.append(f"{'PASS' if ok else 'FAIL'}: {text}")
        self.failed |= not ok


def report(
    all_results: dict[str, dict[str, Samples]], args: argparse.Namespace
) -> tuple[list[str], dict[str, object], Verdicts]:
    sizes = sorted(args.sizes)
    small, large = sizes[0], sizes[-1]
    rows: list[list[str]] = []
    per_round: list[str] = []
    values: dict[str, object] = {}
    verdicts = Verdicts()
    for backend, results in all_results.items():
        p = PREFIX[backend]
        worst: tuple[float, str] = (0.0, "-")
        for op in OPS:
            s = results[op]
            per_round.append(
                f"# {backend} {op}: "
                + "  ".join("/".join(ms(pct(r[size], 50)) for size in sizes) for r in s.rounds)
            )
            for size in sizes:
                pooled = s.pooled(size)
                if size == small:
                    grow = "-"
                else:
                    g = growth(s, small, size)
                    grow = f"{g.ratio:.3f} [{g.low:.2f}-{g.high:.2f}]"
                    if size == large:
                        worst = max(worst, (g.ratio, op))
                rows.append(
                    [
                        backend,
                        f"{op} ({OP_CALLS[op]})",
                        f"{size:,}",
                        ms(pct(pooled, 50)),
                        ms(pct(pooled, 99)),
                        ms(max(pooled)),
                        str(len(pooled)),
                        grow,
                        SEED_CLAIMS[op],
                    ]
                )
            values[f"{p}_{op}_p50_ms"] = pct(s.pooled(large), 50) / 1e6
            values[f"{p}_{op}_p99_ms"] = pct(s.pooled(large), 99) / 1e6
        if backend == "postgres":
            p99s = {size: pct(results["session_lookup"].pooled(size), 99) / 1e6 for size in sizes}
            worst_p99 = max(p99s.values())
            verdicts.judge(
                worst_p99 < args.target_p99_ms,
                "postgres session lookup p99 "
                + ", ".join(f"{v:.3f} ms at {size:,}" for size, v in p99s.items())
                + f" vs target < {args.target_p99_ms:g} ms",
            )
            values["pg_session_lookup_p99_ms"] = worst_p99
        if len(sizes) > 1:
            verdicts.judge(
                worst[0] <= args.target_growth,
                f"{backend} growth {small:,} -> {large:,} devices: worst p50 ratio {worst[0]:.3f} "
                f"({worst[1]}) vs target <= {args.target_growth:g}",
            )
            values[f"{p}_growth_ratio_max"] = worst[0]
            values[f"{p}_growth_worst_op"] = worst[1]
    headers = [
        "backend", "operation", "devices", "p50 ms", "p99 ms", "max ms", "samples",
        f"p50 vs {small:,} [rounds]", "seed claim",
    ]  # fmt: skip
    legend = "/".join(f"{size:,}" for size in sizes)
    per_round.insert(0, f"# p50 ms per round ({legend} devices), in the order measured:")
    return [T.table(headers, rows, right=2), "\n".join(per_round)], values, verdicts


# --- driver --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/store.py",
        description="p50/p99 latency of get_device, get_session, update_session and "
        "enroll_device through the Store API, on SQLite and PostgreSQL, at a small and a large "
        "number of enrolled devices (bulk-loaded). Prints a table, PASS/FAIL lines and one "
        "RESULT line.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes {','.join(map(str, QUICK_SIZES))}, {QUICK_ROUNDS} rounds of "
        f"{QUICK_SAMPLES} samples (~30 s)",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated numbers of enrolled devices (default "
        f"{','.join(map(str, SIZES))}); growth is judged largest vs smallest",
    )
    parser.add_argument(
        "--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("QFLARE_TEST_POSTGRES_URL", DEFAULT_PG_URL),
        help="PostgreSQL server URL; a login role that may create schemas (and, for the fast "
        "load, a superuser). Default: $QFLARE_TEST_POSTGRES_URL or " + DEFAULT_PG_URL,
    )
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds (default {ROUNDS})")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"timed calls per operation, size and round (default {SAMPLES})",
    )
    parser.add_argument(
        "--target-p99-ms", type=float, default=P99_TARGET_MS, help="PostgreSQL get_session p99"
    )
    parser.add_argument(
        "--target-growth", type=float, default=GROWTH_TARGET, help="largest/smallest p50 ratio"
    )
    parser.add_argument("--tmpdir", default=None, help="where the SQLite files go")
    parser.add_argument("--seed", default="qflare", help="seed for the random row choices")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="after measuring, print each operation's query plan at every size (PostgreSQL: "
        "EXPLAIN ANALYZE with buffers and WAL, rolled back; HOT-update counts and table sizes)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 when a target is missed (default: always exit 0)",
    )
    args = parser.parse_args(argv)
    try:
        raw = args.sizes or ",".join(map(str, QUICK_SIZES if args.quick else SIZES))
        args.sizes = sorted({int(x) for x in raw.split(",") if x.strip()})
    except ValueError:
        parser.error("--sizes must be comma-separated integers")
    if not args.sizes or args.sizes[0] < 1:
        parser.error("--sizes must be positive")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in PREFIX for b in args.backends):
        parser.error("--backends takes sqlite and/or postgres")
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else ROUNDS
    if args.samples is None:
        args.samples = QUICK_SAMPLES if args.quick else SAMPLES
    if args.rounds < 1 or args.samples < 1:
        parser.error("--rounds and --samples must be at least 1")
    return args


async def run(
    args: argparse.Namespace, progress: T.Progress, plans: list[str]
) -> dict[str, dict[str, Samples]]:
    spare = args.rounds * args.samples + WARMUP + 10
    all_results: dict[str, dict[str, Samples]] = {}
    for backend in args.backends:
        backends = Backends(args, progress)
        try:
            fixtures = [await backends.open(backend, size, spare) for size in args.sizes]
            all_results[backend] = await measure(fixtures, args, progress)
            if args.explain:
                progress.note(f"{backend}: EXPLAIN")
                for fx in fixtures:
                    await fx.store.close()  # its connections flush their table statistics
                    if backend == "postgres":
                        owner = H.pg_owner_dsn(args.postgres_url)
                        plans.extend(await explain_postgres(owner, fx))
                    else:
                        plans.extend(explain_sqlite(fx))
        finally:
            await backends.close()
    return all_results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("store")
    started = time.monotonic()
    plans: list[str] = []
    all_results = asyncio.run(run(args, progress, plans))
    progress.done()
    tables, values, verdicts = report(all_results, args)
    print(
        f"# clock {CLOCK_NAME} (wall, per call); {args.rounds} rounds x {args.samples} samples "
        "per operation and size, sizes interleaved call by call; p50/p99/max over all rounds; "
        "growth = median over rounds of the per-round p50 ratio [lowest-highest round]; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    for text in tables:
        print(text)
    if plans:
        print()
        print("\n".join(plans))
    print()
    for line in verdicts.lines:
        print(line)
    status = "FAIL" if verdicts.failed else "PASS"
    print(
        T.result_line(
            **values,
            target_p99_ms=args.target_p99_ms,
            target_growth=args.target_growth,
            status=status,
            sizes=",".join(map(str, args.sizes)),
            backends=",".join(args.backends),
            rounds=args.rounds,
            samples=args.samples,
            clock=CLOCK_NAME,
        )
    )
    sys.stdout.flush()
    return 1 if args.check and verdicts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
