"""Growth: handshake latency at a small vs a large fleet; cleanup time vs expired rows.

Run: ``.venv/bin/python bench/growth.py [--quick] [--sizes 1000,100000]
[--backends sqlite,postgres] [--cleanup-sizes 1000,10000,100000] [--check]``

**Handshake latency vs enrolled devices.** One store per size, each bulk-loaded by
``bench/store.py``'s own loaders (imported, not copied: N devices with an ML-DSA-44 key
version, a used enrollment token and a live session each; ``COPY`` + ``VACUUM ANALYZE`` on
PostgreSQL, ``executemany`` on SQLite), then given a server key ring (``KeyManager.initialize``)
and 8 real devices enrolled through ``KeyManager.enroll``. What is timed is the server side of
complete handshakes of those devices through an in-process ``Service`` (``hello`` + ``finish``,
every store read and write the routes do, no HTTP: the HTTP layer does not depend on the fleet
size); the devices' own work runs between the server steps, untimed. Wall clock
(``perf_counter_ns``: on PostgreSQL the index work happens in another process), the sizes
taking turns handshake by handshake and the first size alternating per round. Growth = median
over rounds of p50(largest) / p50(smallest). **Target:** <= 1.2.

The default sizes are 1,000 and 100,000, not the 1,000,000 of the issue: loading a million
rows per backend takes minutes on these machines (``--sizes 1000,1000000`` measures it).

**Cleanup vs expired rows.** For each E in ``--cleanup-sizes``, a fresh store loaded the same
way with E devices, whose E sessions and E used tokens (plus a few spare tokens) have all
expired at the cleanup's ``now``: ``Store.cleanup(now)`` is timed once (it deletes in batches
of 1,000 rows per transaction until none is left). Reported: ms in all and µs per deleted row;
the per-row cost at the largest E over the smallest shows whether cleanup stays linear.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from qflare.keys import Envelope, FileMasterKey, KeyManager
from qflare.runtime import key_policy, rekey_policy, server_policy
from qflare.server.service import Service

try:
    import _http as H
    import _timing as T
    import monitor as MON
    import store as ST
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _http as H
    from bench import _timing as T
    from bench import monitor as MON
    from bench import store as ST

SIZES, QUICK_SIZES = (1_000, 100_000), (1_000, 10_000)
CLEANUP_SIZES, QUICK_CLEANUP_SIZES = (1_000, 10_000, 100_000), (1_000, 10_000)
ROUNDS, QUICK_ROUNDS = 5, 3
SAMPLES, QUICK_SAMPLES = 40, 10  # handshakes per size and round
DEVICES = 8
TARGET = 1.2
SOURCE = "192.0.2.20"


@dataclass
class Fleet:
    size: int
    service: Service
    devices: list[Any]
    samples: list[list[int]] = field(default_factory=list)  # per round, ns per handshake
    next: int = 0

    async def handshake(self) -> int:
        device = self.devices[self.next % len(self.devices)]
        self.next += 1
        return await _handshake(self.service, device)


async def _handshake(service: Service, device: Any) -> int:
    from qflare import crypto  # noqa: PLC0415

    client = device.client()
    hello = client.client_hello(now=int(time.time()), rng=crypto.system_rng)
    start = time.perf_counter_ns()
    answer = await service.hello(hello, source=SOURCE)
    spent = time.perf_counter_ns() - start
    finish = client.receive_server_hello(answer)
    start = time.perf_counter_ns()
    sealed = await service.finish(finish, source=SOURCE)
    spent += time.perf_counter_ns() - start
    if client.session is None or not client.session.open(sealed, now=time.time()):
        raise SystemExit("bench/growth.py: a handshake did not establish a session")
    return spent


def _store_args(args: argparse.Namespace) -> argparse.Namespace:
    """What bench/store.py's ``Backends`` reads from its own arguments."""
    return argparse.Namespace(tmpdir=args.tmpdir, postgres_url=args.postgres_url, seed="growth")


async def _service(store: Any, workdir: Path, label: str) -> tuple[Service, list[Any]]:
    from qflare.config import Settings  # noqa: PLC0415

    settings = Settings(data_dir=workdir, **H.BENCH_SETTINGS)
    key_file = workdir / f"{label}.master.key"
    FileMasterKey.create(key_file)
    keys = KeyManager(
        store,
        Envelope(FileMasterKey(key_file)),
        tenant=ST.TENANT,
        policy=key_policy(settings),
        rekey=rekey_policy(settings),
    )
    await keys.initialize(now=time.time())
    devices = [await MON.enroll(keys, f"real-{i:02d}") for i in range(DEVICES)]
    service = Service(keys, server_policy(settings))
    for device in devices:  # one first handshake each: from now on every handshake is a rekey
        await _handshake(service, device)
    return service, devices


async def handshake_growth(
    args: argparse.Namespace, backend: str, progress: T.Progress, workdir: Path
) -> list[Fleet]:
    backends = ST.Backends(_store_args(args), progress)
    fleets: list[Fleet] = []
    try:
        for size in args.sizes:
            fx = await backends.open(backend, size, spare=DEVICES + 4)
            service, devices = await _service(fx.store, workdir, f"{backend}-{size}")
            fleets.append(Fleet(size, service, devices))
        for fleet in fleets:  # warm-up
            for _ in range(DEVICES):
                await fleet.handshake()
        for r in range(args.rounds):
            progress.note(f"{backend}: handshakes, round {r + 1}/{args.rounds}")
            got: dict[int, list[int]] = {f.size: [] for f in fleets}
            first = fleets if r % 2 == 0 else fleets[::-1]
            gc.collect()
            gc.disable()
            try:
                for k in range(args.samples):
                    for fleet in first if k % 2 == 0 else first[::-1]:
                        got[fleet.size].append(await fleet.handshake())
            finally:
                gc.enable()
            for fleet in fleets:
                fleet.samples.append(got[fleet.size])
        return fleets
    finally:
        for fleet in fleets:  # queued INFO events go to the store before it closes
            await fleet.service.flush_events()
        await backends.close()


async def cleanup_growth(
    args: argparse.Namespace, backend: str, progress: T.Progress
) -> list[tuple[int, int, float]]:
    """(expired rows, rows deleted, seconds) per cleanup size."""
    out = []
    for size in args.cleanup_sizes:
        backends = ST.Backends(_store_args(args), progress)
        try:
            fx = await backends.open(backend, size, spare=4)
            # Sessions expire at NOW + 1 day, tokens at NOW + 7 days (bench/store.py's rows).
            now = ST.NOW + timedelta(days=8)
            start = time.perf_counter()
            counts = await fx.store.cleanup(now)
            seconds = time.perf_counter() - start
            if counts.sessions != size or counts.tokens < size:
                raise SystemExit(f"bench/growth.py: cleanup deleted {counts}, expected {size}")
            out.append((size, counts.total, seconds))
            progress.note(
                f"{backend}: cleanup of {counts.total:,} expired rows: {seconds * 1e3:.0f} ms"
            )
        finally:
            await backends.close()
    return out


def p50(values: list[int]) -> float:
    return statistics.median(values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/growth.py",
        description="Server handshake latency (in-process Service over a real store) at a small "
        "and a large number of enrolled devices, and Store.cleanup time against the number of "
        "expired rows, on SQLite and PostgreSQL. Prints tables and one RESULT line.",
    )
    parser.add_argument("--quick", action="store_true", help="sizes 1000,10000, fewer samples")
    parser.add_argument("--sizes", default=None, help="enrolled devices (default 1000,100000)")
    parser.add_argument(
        "--cleanup-sizes", default=None, help="expired sessions (default 1000,10000,100000)"
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=H.DEFAULT_PG_URL)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="handshakes per size/round")
    parser.add_argument("--target", type=float, default=TARGET, help="largest/smallest p50")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args(argv)

    def ints(text: str | None, default: tuple[int, ...]) -> list[int]:
        try:
            values = sorted({int(x) for x in (text or "").split(",") if x.strip()})
        except ValueError:
            parser.error("sizes are comma-separated integers")
        return values or list(default)

    args.sizes = ints(args.sizes, QUICK_SIZES if args.quick else SIZES)
    args.cleanup_sizes = ints(
        args.cleanup_sizes, QUICK_CLEANUP_SIZES if args.quick else CLEANUP_SIZES
    )
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in ("sqlite", "postgres") for b in args.backends):
        parser.error("--backends takes sqlite and/or postgres")
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    args.samples = args.samples or (QUICK_SAMPLES if args.quick else SAMPLES)
    return args


async def run(args: argparse.Namespace, progress: T.Progress) -> dict[str, object]:
    result: dict[str, object] = {}
    hs_rows, cl_rows = [], []
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="qflare-growth-", dir=args.tmpdir) as tmp:
        for backend in args.backends:
            prefix = ST.PREFIX[backend]
            fleets = await handshake_growth(args, backend, progress, Path(tmp))
            small, large = fleets[0], fleets[-1]
            ratios = [p50(b) / p50(a) for a, b in zip(small.samples, large.samples, strict=True)]
            growth = statistics.median(ratios)
            worst = max(worst, growth)
            for fleet in fleets:
                pooled = [ns for r in fleet.samples for ns in r]
                hs_rows.append(
                    [
                        backend,
                        f"{fleet.size:,}",
                        f"{p50(pooled) / 1e6:.2f}",
                        f"{ST.pct(pooled, 99) / 1e6:.2f}",
                        str(len(pooled)),
                        "-"
                        if fleet is small
                        else f"{growth:.3f} [{min(ratios):.2f}-{max(ratios):.2f}]",
                    ]
                )
            result[f"{prefix}_hs_small_ms"] = p50([n for r in small.samples for n in r]) / 1e6
            result[f"{prefix}_hs_large_ms"] = p50([n for r in large.samples for n in r]) / 1e6
            result[f"{prefix}_hs_growth"] = growth
            cleanups = await cleanup_growth(args, backend, progress)
            base = cleanups[0][2] / cleanups[0][1]
            for size, rows, seconds in cleanups:
                per_row = seconds / rows
                cl_rows.append(
                    [
                        backend,
                        f"{size:,}",
                        f"{rows:,}",
                        f"{seconds * 1e3:.0f}",
                        f"{per_row * 1e6:.1f}",
                        f"{per_row / base:.2f}",
                    ]
                )
            result[f"{prefix}_cleanup_us_per_row"] = cleanups[-1][2] / cleanups[-1][1] * 1e6
            result[f"{prefix}_cleanup_growth"] = (cleanups[-1][2] / cleanups[-1][1]) / base
    print(
        f"# handshake: server side (Service.hello + finish, in process), wall clock, "
        f"{args.rounds} rounds x {args.samples} handshakes per size, sizes alternating; "
        "growth = median over rounds of p50(largest)/p50(smallest) [lowest-highest round]"
    )
    print(T.table(["backend", "devices", "p50 ms", "p99 ms", "samples", "growth"], hs_rows))
    print("# cleanup: Store.cleanup(now) once per size on a fresh store, wall clock")
    print(
        T.table(
            ["backend", "expired sessions", "rows deleted", "ms", "µs/row", "per-row vs smallest"],
            cl_rows,
        )
    )
    result["hs_growth_max"] = worst
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("growth")
    result = asyncio.run(run(args, progress))
    progress.done()
    worst = float(result["hs_growth_max"])  # type: ignore[arg-type]
    status = "PASS" if worst <= args.target else "FAIL"
    print(
        f"{status}: handshake p50 at {args.sizes[-1]:,} devices is {worst:.3f}x the "
        f"{args.sizes[0]:,} figure (worst backend) vs target <= {args.target:g}"
    )
    print(
        T.result_line(
            **result,
            target=args.target,
            status=status,
            sizes=",".join(map(str, args.sizes)),
            cleanup_sizes=",".join(map(str, args.cleanup_sizes)),
            backends=",".join(args.backends),
            rounds=args.rounds,
            samples=args.samples,
            clock="perf_counter_ns",
        )
    )
    sys.stdout.flush()
    return 1 if args.check and status == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
