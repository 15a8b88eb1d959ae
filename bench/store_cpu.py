"""The CPU a handshake's store calls cost the server process, per call, on SQLite and PostgreSQL.

Run: ``.venv/bin/python bench/store_cpu.py [--quick] [--rounds N] [--iterations K]
[--devices N] [--backends sqlite,postgres] [--postgres-url URL] [--tmpdir DIR]``

A decomposition, not a goal: there is no target and no PASS/FAIL. It times, through the real
``Store`` API of a store opened with ``open_store``, exactly the store calls a handshake makes,
in the order it makes them:

1. ``read``: ``get_device_with_key(tenant, device)``, ClientHello's read of the device and its
   active key;
2. ``accept``: ``accept_handshake(tenant, device, nonce, timestamp=, expires_at=)``,
   ClientHello's durable nonce write (32-byte nonce, retention 300 s as the default policy);
3. ``finish``: ``finish_handshake(...)``, ClientFinish's one transaction: a fresh 16-byte
   session id, ``CHAIN_STATE_LEN`` (211) random bytes of sealed chain state and a 3-byte replay
   window (the sizes a real ClientFinish stores with the default suite, measured through
   ``Service.finish``), ``SessionCounters()``, lifetime 3600 s;

and, as a reference point, 4. ``commit``: ``reset_device_failures``, one single-row UPDATE in a
transaction of its own: what one bare durable commit costs through the store. On PostgreSQL it
goes the store's general transaction path (BEGIN, ``set_config`` of the tenant, the UPDATE,
COMMIT: four round trips), while ``read``, ``accept`` and ``finish`` are one call each of a
function (migrations 0002-0004) in the statement's implicit transaction: one round trip.

Each backend gets a fresh database: a SQLite file in a temporary directory, or a PostgreSQL
schema of its own (``?schema=qflare_bench_...``, connecting as ``qflare_app`` as in
production), migrated, given ``--devices`` (200) devices created through the store
(``create_device`` + ``add_device_key``, a 1,312-byte ML-DSA-44 public key) and dropped at the
end. The devices take turns (call i of a batch goes to the next device in line), so no row
stays hot in a way a fleet's would not.
Every device completes one warm-up handshake first (so the timed ones are rekeys of ACTIVE
devices, as in a running fleet). The event loop is the one the server runs on: uvloop when it
is importable (``asyncio.Runner(loop_factory=uvloop.new_event_loop)``), else asyncio's.

**Clock:** ``time.process_time_ns`` (CPU of every thread of this process: the SQLite store's
database thread counts, and so does the CPU its fsync system calls take; the time the disk
takes does not). On PostgreSQL the work done in the server's backend processes is read too:
``bench/_http.py``'s ``PgBackends`` finds the backends serving this process's connections
(its TCP sockets to the server's port, matched to ``pg_stat_activity.client_port``, refreshed
every round) and sums their ``/proc/<pid>/schedstat`` run time. PostgreSQL's background
processes (WAL writer, checkpointer, autovacuum) are not counted.

**Rounds:** each round times a batch of K (``--iterations``, default 500) calls of each of the
four operations back to back, the order of the operations rotating by one every round; the
batch is timed as a whole with the garbage collector off; arguments are built before it and
results checked after it. Reported: medians over rounds of CPU µs per call, with the lowest and
highest round, and ``handshake_store`` = the median over rounds of the per-round sum of
read + accept + finish.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from qflare.protocol import DEFAULT_SUITE
from qflare.store import migrate, open_store
from qflare.store.base import Store
from qflare.store.models import FinishOutcome, SessionCounters

try:
    import _http as H
    import _timing as T
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _http as H
    from bench import _timing as T

CLOCK = time.process_time_ns
CLOCK_NAME = "process_time_ns"

DEVICES = 200
ITERATIONS, QUICK_ITERATIONS = 500, 100
ROUNDS, QUICK_ROUNDS = 7, 3

TENANT = "bench"
ALGORITHM = DEFAULT_SUITE.signature  # ML-DSA-44
PUBLIC_KEY_LEN = 1312  # ML-DSA-44 public key
NONCE_LEN = 32  # ClientHello nonce
SESSION_ID_LEN = 16
CHAIN_STATE_LEN = 211  # session_codec.seal_state() at ClientFinish, default suite (measured)
REPLAY_LEN = 3  # the session's replay window at ClientFinish (measured)
NONCE_RETENTION = timedelta(seconds=2 * 120 + 60)  # the default policy's
SESSION_LIFETIME = timedelta(seconds=3600)

OPS = ("read", "accept", "finish", "commit")
HANDSHAKE_OPS = ("read", "accept", "finish")
OP_CALLS = {
    "read": "get_device_with_key",
    "accept": "accept_handshake",
    "finish": "finish_handshake",
    "commit": "reset_device_failures",
}
PREFIX = {"sqlite": "sqlite", "postgres": "pg"}


def device_id(i: int) -> str:
    return f"dev-{i:05d}"


# --- one backend ---------------------------------------------------------------------------------

Call = Callable[[], Awaitable[object]]


@dataclass
class Fixture:
    backend: str
    store: Store
    devices: int
    keys: dict[str, bytes]  # device id -> its public key
    pg: H.PgBackends | None
    start: datetime = field(default_factory=lambda: datetime.now(UTC))
    ticks: int = 0
    next_device: int = 0

    def device(self) -> str:
        did = device_id(self.next_device % self.devices)
        self.next_device += 1
        return did

    def now(self) -> datetime:
        """A clock that only moves forward (timestamps, floors and last_seen keep rising)."""
        self.ticks += 1
        return self.start + timedelta(milliseconds=self.ticks)

    def calls(self, op: str, k: int) -> tuple[list[Call], Callable[[list[object]], None]]:
        """K calls of ``op`` on the next K devices (arguments built here, untimed), and a
        check of their results."""
        store = self.store
        dids = [self.device() for _ in range(k)]
        calls: list[Call] = []
        if op == "read":
            for did in dids:
                calls.append(partial(store.get_device_with_key, TENANT, did))

            def check_read(results: list[Any]) -> None:
                for did, (device, key) in zip(dids, results, strict=True):
                    if device.device_id != did or key.public_key != self.keys[did]:
                        self.fail(op)

            return calls, check_read
        if op == "accept":
            for did in dids:
                now = self.now()
                calls.append(
                    partial(
                        store.accept_handshake,
                        TENANT,
                        did,
                        os.urandom(NONCE_LEN),
                        timestamp=int(now.timestamp()),
                        expires_at=now + NONCE_RETENTION,
                    )
                )

            def check_accept(results: list[object]) -> None:
                if not all(r is True for r in results):
                    self.fail(op)

            return calls, check_accept
        if op == "finish":
            sids = []
            for did in dids:
                now = self.now()
                sid = os.urandom(SESSION_ID_LEN)
                sids.append(sid)
                call = partial(
                    store.finish_handshake,
                    TENANT,
                    device_id=did,
                    session_id=sid,
                    suite=DEFAULT_SUITE.id,
                    epoch=0,
                    encrypted_chain_state=os.urandom(CHAIN_STATE_LEN),
                    replay_window=os.urandom(REPLAY_LEN),
                    now=now,
                    expires_at=now + SESSION_LIFETIME,
                    counters=SessionCounters(),
                )
                calls.append(call)

            def check_finish(results: list[Any]) -> None:
                for sid, done in zip(sids, results, strict=True):
                    if done.outcome is not FinishOutcome.CREATED or done.session.session_id != sid:
                        self.fail(op)

            return calls, check_finish
        if op == "commit":
            for did in dids:
                calls.append(partial(store.reset_device_failures, TENANT, did))

            def check_commit(results: list[object]) -> None:
                if any(r is not None for r in results):
                    self.fail(op)

            return calls, check_commit
        raise ValueError(op)

    def fail(self, op: str) -> None:
        raise SystemExit(f"bench/store_cpu.py: {self.backend}: wrong result from {OP_CALLS[op]}")


@dataclass
class Spent:
    """One batch: this process's CPU and the PostgreSQL backends' CPU, in ns, and its size."""

    process_ns: int
    backend_ns: int
    calls: int


async def batch(fx: Fixture, op: str, k: int) -> Spent:
    calls, check = fx.calls(op, k)
    results: list[object] = []
    append = results.append
    before = fx.pg.snapshot() if fx.pg else {}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = CLOCK()
        for call in calls:
            append(await call())
        spent = CLOCK() - start
    finally:
        if was_enabled:
            gc.enable()
    backend = H.PgBackends.spent(before, fx.pg.snapshot()) if fx.pg else 0
    check(results)
    return Spent(spent, backend, k)


async def open_fixture(backend: str, url: str, devices: int, progress: T.Progress) -> Fixture:
    t0 = time.monotonic()
    now = datetime.now(UTC)
    await migrate(url, now=now)
    store = await open_store(url)
    try:
        await store.create_tenant(TENANT, "bench", now=now)
        keys = {}
        for i in range(devices):
            did = device_id(i)
            keys[did] = os.urandom(PUBLIC_KEY_LEN)
            await store.create_device(TENANT, did, now=now)
            await store.add_device_key(
                TENANT, did, algorithm=ALGORITHM, public_key=keys[did], now=now
            )
            if (i + 1) % 50 == 0:
                progress.step(f"{backend}: created {i + 1}/{devices} devices")
    except BaseException:
        await store.close()
        raise
    pg = H.PgBackends(url, os.getpid()) if backend == "postgres" else None
    progress.note(f"{backend}: {devices} devices ready in {time.monotonic() - t0:.1f} s")
    return Fixture(backend, store, devices, keys, pg)


async def measure(
    fx: Fixture, args: argparse.Namespace, progress: T.Progress
) -> list[dict[str, Spent]]:
    # Warm-up, untimed: one handshake's calls per device (every device ACTIVE afterwards,
    # statements prepared, the pool's connections open), and a bare commit each.
    for op in OPS:
        await batch(fx, op, fx.devices)
    rounds: list[dict[str, Spent]] = []
    for r in range(args.rounds):
        if fx.pg:  # the pool may have replaced a connection: find its backends again
            await asyncio.to_thread(fx.pg.refresh)
            if not fx.pg.pids:
                raise SystemExit("bench/store_cpu.py: no PostgreSQL backend found for the pool")
        gc.collect()
        order = OPS[r % len(OPS) :] + OPS[: r % len(OPS)]
        progress.note(f"{fx.backend}: round {r + 1}/{args.rounds} ({', '.join(order)})")
        got = {}
        for op in order:
            got[op] = await batch(fx, op, args.iterations)
        rounds.append(got)
    return rounds


async def run_backend(
    backend: str, url: str, args: argparse.Namespace, progress: T.Progress
) -> list[dict[str, Spent]]:
    fx = await open_fixture(backend, url, args.devices, progress)
    try:
        return await measure(fx, args, progress)
    finally:
        await fx.store.close()


def new_loop() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The server's event loop: uvloop when importable (as uvicorn's ``auto`` picks it)."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def run(args: argparse.Namespace, progress: T.Progress) -> dict[str, list[dict[str, Spent]]]:
    factory, _ = new_loop()
    out: dict[str, list[dict[str, Spent]]] = {}
    for backend in args.backends:
        tmpdir: str | None = None
        schemas: list[str] = []
        try:
            if backend == "sqlite":
                tmpdir = tempfile.mkdtemp(prefix="qflare-bench-cpu-", dir=args.tmpdir)
                url = f"sqlite:///{Path(tmpdir) / 'store.db'}"
            else:
                schemas.append(H.new_schema_name("cpu"))
                url = H.pg_schema_url(args.postgres_url, schemas[0])
            with asyncio.Runner(loop_factory=factory) as runner:
                out[backend] = runner.run(run_backend(backend, url, args, progress))
        finally:
            if schemas:
                H.drop_schemas(args.postgres_url, schemas)
                progress.note(f"dropped schema {schemas[0]}")
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
    return out


# --- report --------------------------------------------------------------------------------------


def us_per_call(rounds: list[dict[str, Spent]], ops: tuple[str, ...], db: bool) -> list[float]:
    """Per round: µs per call of ``ops`` summed (process CPU, or the backends' with ``db``)."""
    return [
        sum((s.backend_ns if db else s.process_ns) / s.calls for op, s in r.items() if op in ops)
        / 1e3
        for r in rounds
    ]


def cell(values: list[float]) -> tuple[str, str]:
    return f"{T.median(values):.1f}", f"{min(values):.1f}-{max(values):.1f}"


def report(
    results: dict[str, list[dict[str, Spent]]],
) -> tuple[str, dict[str, object]]:
    rows: list[list[str]] = []
    values: dict[str, object] = {}
    lines = [*((op, (op,)) for op in OPS), ("handshake_store", HANDSHAKE_OPS)]
    for backend, rounds in results.items():
        p = PREFIX[backend]
        for name, ops in lines:
            proc = us_per_call(rounds, ops, db=False)
            label = f"{name} ({OP_CALLS[name]})" if name in OP_CALLS else f"{name} (1+2+3)"
            row = [backend, label, *cell(proc)]
            values[f"{p}_{name}_us"] = T.median(proc)
            if backend == "postgres":
                db = us_per_call(rounds, ops, db=True)
                both = [a + b for a, b in zip(proc, db, strict=True)]
                row += [*cell(db), f"{T.median(both):.1f}"]
                values[f"{p}_backend_{name}_us"] = T.median(db)
            else:
                row += ["-", "-", "-"]
            rows.append(row)
    headers = [
        "backend", "operation", "process µs", "[rounds]", "pg backend µs", "[rounds]",
        "process+backend µs",
    ]  # fmt: skip
    return T.table(headers, rows, right=2), values


# --- driver --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/store_cpu.py",
        description="CPU per call of a handshake's store calls (get_device_with_key, "
        "accept_handshake, finish_handshake) and of one bare commit (reset_device_failures), "
        "on SQLite and PostgreSQL: this process's CPU and, on PostgreSQL, its backends'. No "
        "target. Prints a table and one RESULT line.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ROUNDS} rounds of {QUICK_ITERATIONS} calls per operation",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"rounds (default {ROUNDS}, {QUICK_ROUNDS} quick)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"K, calls per operation per round (default {ITERATIONS}, {QUICK_ITERATIONS} quick)",
    )
    parser.add_argument(
        "--devices", type=int, default=DEVICES, help=f"enrolled devices (default {DEVICES})"
    )
    parser.add_argument(
        "--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    parser.add_argument(
        "--postgres-url",
        default=H.DEFAULT_PG_URL,
        help="PostgreSQL server URL, a login role that may create schemas. Default: "
        "$QFLARE_TEST_POSTGRES_URL or postgresql://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument("--tmpdir", default=None, help="where the SQLite file goes")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in PREFIX for b in args.backends):
        parser.error("--backends takes sqlite and/or postgres")
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else ROUNDS
    if args.iterations is None:
        args.iterations = QUICK_ITERATIONS if args.quick else ITERATIONS
    if args.rounds < 1 or args.iterations < 1 or args.devices < 1:
        parser.error("--rounds, --iterations and --devices must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("store_cpu")
    _, loop_name = new_loop()
    started = time.monotonic()
    results = run(args, progress)
    progress.done()
    text, values = report(results)
    print(
        f"# clock {CLOCK_NAME} (CPU of every thread of this process) per call; PostgreSQL "
        f"backends from /proc/<pid>/schedstat; loop {loop_name}; {args.devices} devices taking "
        f"turns; {args.rounds} rounds x {args.iterations} calls per operation, order rotating; "
        f"medians over rounds [lowest-highest round]; {time.monotonic() - started:.0f} s in all"
    )
    print(text)
    print("# no target: a decomposition of what the store costs one handshake")
    print(
        T.result_line(
            **values,
            loop=loop_name,
            backends=",".join(args.backends),
            devices=args.devices,
            rounds=args.rounds,
            iterations=args.iterations,
            clock=CLOCK_NAME,
        )
    )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
