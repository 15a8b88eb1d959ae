"""Handshakes per second at 1, 8 and 64 concurrent devices; the record layer on 1 MiB updates.

Run: ``.venv/bin/python bench/throughput.py [--quick] [--store sqlite|postgres]
[--concurrency 1,8,64] [--seconds S] [--rounds N] [--check]``

**Handshakes per second.** One QFLARE server (``create_app`` on uvicorn, in a subprocess of its
own: bench/_http.py) over a fresh store, and devices enrolled through its API. C devices at a
time run complete handshakes back to back (the device SDK's own ``connect_flow`` driven over
one shared ``httpx.AsyncClient`` with up to C kept-alive connections, as ``AsyncDeviceClient``
drives it; devices take turns from a pool larger than C, so no device handshakes more often
than the rekey-rate rule allows). Each level runs for ``--seconds`` per round; the levels'
order rotates from round to round. Reported per level, medians over rounds: handshakes per
second (completed handshakes / wall time), the server's CPU per handshake (its own
``process_time_ns``, read through the control pipe) and how busy the server was (server CPU /
wall: 1.0 is one core), handshake latency p50/p99 (all rounds pooled), and the bench process's
CPU per handshake (the devices' side, same machine: when it nears the server's, the clients
are part of the limit). No target: these are figures of this machine.

**Record layer, 1 MiB.** ``Session.seal`` of a 1 MiB model update by one side of an
established session and ``Session.open`` by the other, against raw ``AESGCM.encrypt`` /
``decrypt`` (pyca/cryptography) of the same 1 MiB with the same key size, a fresh nonce per
call, and AAD as long as a record header. CPU time (``process_time_ns``), batches with the GC
off, interleaved rounds with the side that goes first alternating. Ratio = raw time / QFLARE
time = QFLARE throughput as a fraction of raw AES-GCM. **Target:** >= 0.9 for both seal and
open (``record_ratio_min``). Also reported: minor page faults per call on each side
(``getrusage``): a record layer that copies a large record faults its fresh buffers in page by
page on every call, which is what kept it at 0.1 x raw before it sealed in place
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import _http as H
    import _timing as T
    import handshake as HS
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _http as H
    from bench import _timing as T
    from bench import handshake as HS

TARGET = 0.9
CONCURRENCY = (1, 8, 64)
SECONDS, QUICK_SECONDS = 4.0, 1.0
ROUNDS, QUICK_ROUNDS = 3, 2
MAX_PER_DEVICE = 20  # handshakes per device per run (the rekey-rate rule alerts at 30/300 s)
RECORD_SIZE = 1 << 20
RECORD_BUDGET_S, QUICK_RECORD_BUDGET_S = 6.0, 1.5
MAX_RECORDS = 48


# --- handshakes per second -----------------------------------------------------------------------


@dataclass
class Level:
    concurrency: int
    rate: list[float] = field(default_factory=list)  # handshakes/s per round
    server_us: list[float] = field(default_factory=list)  # server CPU µs per handshake
    busy: list[float] = field(default_factory=list)  # server CPU / wall
    client_us: list[float] = field(default_factory=list)  # bench process CPU µs per handshake
    latencies_ms: list[float] = field(default_factory=list)
    handshakes: int = 0


class Pool:
    """Device identities handed out in turn, never to two workers at once."""

    def __init__(self, identities: list[Any]) -> None:
        self._free = list(identities)

    def take(self) -> Any:
        return self._free.pop(0)

    def give(self, identity: Any) -> None:
        self._free.append(identity)


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (bench-only).

    httpx.AsyncClient, measured here first, spent 6 ms (1 device) to 22 ms (64 devices) of the
    bench process's CPU per handshake, more than half the server's: on two cores the bench
    then measured its own client. This one does what a handshake needs (POST a body, read a
    Content-Length answer) and nothing else.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes, content_type: str) -> Any:
        from qflare.client.flow import Response  # noqa: PLC0415

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return Response(status, await self.reader.readexactly(length))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def handshake(conn: Connection, identity: Any) -> None:
    """One complete handshake by the device SDK's own flow (``connect_flow``)."""
    from qflare import crypto  # noqa: PLC0415
    from qflare.client.flow import connect_flow  # noqa: PLC0415

    flow = connect_flow(identity, clock=time.time, rng=crypto.system_rng)
    request = next(flow)
    while True:
        response = await conn.request(
            request.method, request.path, request.body, request.content_type
        )
        try:
            request = flow.send(response)
        except StopIteration:
            return


async def run_level(server: H.QflareServer, pool: Pool, level: Level, seconds: float) -> None:
    c = level.concurrency
    port = int(server.url.rsplit(":", 1)[1])
    conns = [Connection(port) for _ in range(c)]
    latencies: list[float] = []
    done = 0

    async def one(conn: Connection) -> float:
        identity = pool.take()
        try:
            start = time.perf_counter()
            await handshake(conn, identity)
            return time.perf_counter() - start
        finally:
            pool.give(identity)

    try:
        # One untimed handshake per connection first: connections open, code warm.
        await asyncio.gather(*(one(conn) for conn in conns))
        stop = False

        async def worker(conn: Connection) -> None:
            nonlocal done
            while not stop:
                latencies.append(await one(conn))
                done += 1

        cpu0, client0, wall0 = server.server.cpu_ns(), time.process_time_ns(), time.perf_counter()
        tasks = [asyncio.create_task(worker(conn)) for conn in conns]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)  # the handshakes in flight finish and are counted
        wall = time.perf_counter() - wall0
        cpu = server.server.cpu_ns() - cpu0
        client = time.process_time_ns() - client0
    finally:
        for conn in conns:
            await conn.close()
    level.rate.append(done / wall)
    level.server_us.append(cpu / done / 1e3)
    level.busy.append(cpu / 1e9 / wall)
    level.client_us.append(client / done / 1e3)
    level.latencies_ms.extend(x * 1e3 for x in latencies)
    level.handshakes += done


# --- the record layer ----------------------------------------------------------------------------


@dataclass
class RecordSide:
    key: str
    qflare_ns: list[float] = field(default_factory=list)
    raw_ns: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # raw / qflare (throughput fraction)
    qflare_faults: list[float] = field(default_factory=list)  # minor page faults per call
    raw_faults: list[float] = field(default_factory=list)


def timed_faults(fn: Any) -> tuple[int, int]:
    """CPU ns of one batch (``T.timed``) and the minor page faults taken during it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ns = T.timed(fn)
    return ns, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def record_bench(
    rounds: int, budget: float, iterations: int | None, progress: T.Progress
) -> dict[str, RecordSide]:
    import os  # noqa: PLC0415

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    from qflare.protocol.record import HEADER_SIZE  # noqa: PLC0415

    world = HS.make_world()
    _, pairs = HS.qflare_batch(world, 1)
    HS.check_sessions(pairs)
    client, established = pairs[0]
    sender, receiver = client.session, established.session
    assert sender is not None
    now = HS.NOW + 3
    update = os.urandom(RECORD_SIZE)
    raw = AESGCM(os.urandom(32))
    aad = os.urandom(HEADER_SIZE)
    counter = iter(range(1, 1 << 62))

    def nonce() -> bytes:
        return next(counter).to_bytes(12, "big")

    # Same work on both sides, checked once: a record opens to the update; raw round-trips.
    record = sender.seal(update, now=now, purpose="fl-update")
    if receiver.open(record, now=now).plaintext != update:
        raise SystemExit("bench/throughput.py: a sealed update did not open")
    n0 = nonce()
    if raw.decrypt(n0, raw.encrypt(n0, update, aad), aad) != update:
        raise SystemExit("bench/throughput.py: raw AES-GCM did not round-trip")
    if len(record) != HEADER_SIZE + len(update) + 16:
        raise SystemExit("bench/throughput.py: unexpected record size")

    per_call = T.per_call_ns(lambda: raw.encrypt(nonce(), update, aad), 20e6)
    # Each round holds k sealed records of each kind in memory: at most MAX_RECORDS MiB apiece.
    k = iterations or min(
        MAX_RECORDS, T.iterations_for(per_call, budget * 1e9 / (rounds * 6), minimum=4)
    )
    sides = {"seal": RecordSide("seal"), "open": RecordSide("open")}
    for r in range(rounds):
        progress.step(f"record layer round {r + 1}/{rounds}")
        # Inputs for this round's opens, made untimed: records in order (one spare, opened
        # as the warm-up), raw ciphertexts.
        records = [sender.seal(update, now=now, purpose="fl-update") for _ in range(k + 1)]
        spare = records.pop(0)
        nonces = [nonce() for _ in range(k)]
        sealed = [raw.encrypt(n, update, aad) for n in nonces]
        seal_nonces = [nonce() for _ in range(k)]
        # One untimed call of each side right before its batch, as timeit-style benches warm
        # up: the allocator has just handed out and taken back several MiB (these inputs, the
        # other side's batch), and the first 1 MiB result may land in a region it gave back to
        # the kernel, faulting it in again (~224 faults, ~5 µs a call over a batch of 48).
        # That is heap state, not a cost of either side's calls; both sides get the warm-up.
        warm = {
            "seal": {
                "qflare": lambda: sender.seal(update, now=now, purpose="fl-update"),
                "raw": lambda: raw.encrypt(nonce(), update, aad),
            },
            "open": {
                "qflare": lambda spare=spare: receiver.open(spare, now=now),
                "raw": lambda n=nonces[0], ct=sealed[0]: raw.decrypt(n, ct, aad),
            },
        }

        def q_seal() -> None:
            for _ in range(k):
                sender.seal(update, now=now, purpose="fl-update")

        def r_seal(seal_nonces: list[bytes] = seal_nonces) -> None:
            for n in seal_nonces:
                raw.encrypt(n, update, aad)

        def q_open(records: list[bytes] = records) -> None:
            for rec in records:
                receiver.open(rec, now=now)

        def r_open(nonces: list[bytes] = nonces, sealed: list[bytes] = sealed) -> None:
            for n, ct in zip(nonces, sealed, strict=True):
                raw.decrypt(n, ct, aad)

        for name, q_fn, r_fn in (("seal", q_seal, r_seal), ("open", q_open, r_open)):
            order = [("qflare", q_fn), ("raw", r_fn)]
            if r % 2:
                order.reverse()
            got = {}
            for who, fn in order:
                warm[name][who]()
                got[who] = timed_faults(fn)
            side = sides[name]
            side.qflare_ns.append(got["qflare"][0] / k)
            side.raw_ns.append(got["raw"][0] / k)
            side.qflare_faults.append(got["qflare"][1] / k)
            side.raw_faults.append(got["raw"][1] / k)
            side.ratios.append(got["raw"][0] / got["qflare"][0])
    return sides


# --- driver --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description="Handshakes per second against one QFLARE server subprocess at several "
        "concurrencies, and Session.seal/open of a 1 MiB update against raw AES-256-GCM. "
        "Prints tables and one RESULT line.",
    )
    parser.add_argument("--quick", action="store_true", help="short run (~15 s)")
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "postgres"))
    parser.add_argument("--postgres-url", default=H.DEFAULT_PG_URL)
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="comma-separated numbers of devices handshaking at once (default 1,8,64)",
    )
    parser.add_argument("--seconds", type=float, default=None, help="per level and round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 2 quick)")
    parser.add_argument("--iterations", type=int, default=None, help="record-layer calls per batch")
    parser.add_argument("--no-handshakes", action="store_true", help="record layer only")
    parser.add_argument("--target", type=float, default=TARGET, help="record ratio minimum")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args(argv)
    try:
        args.concurrency = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        parser.error("--concurrency takes comma-separated integers")
    if not args.concurrency or args.concurrency[0] < 1:
        parser.error("--concurrency must be positive")
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else ROUNDS
    if args.seconds is None:
        args.seconds = QUICK_SECONDS if args.quick else SECONDS
    return args


def handshake_levels(args: argparse.Namespace, progress: T.Progress) -> tuple[list[Level], str]:
    workdir = Path(tempfile.mkdtemp(prefix="qflare-tput-", dir=args.tmpdir))
    schemas: list[str] = []
    server: H.QflareServer | None = None
    try:
        url = ""
        if args.store == "postgres":
            schemas.append(H.new_schema_name("tput"))
            url = H.pg_schema_url(args.postgres_url, schemas[0])
        # Enough devices that none exceeds MAX_PER_DEVICE handshakes: a rough upper bound of
        # the rate (~150/s on these machines) times the time spent at all levels.
        expected = 150 * args.seconds * args.rounds * len(args.concurrency) + 2 * sum(
            args.concurrency
        )
        devices = max(2 * max(args.concurrency), int(expected // MAX_PER_DEVICE) + 1)
        progress.note(f"qflare-{args.store}: store, server subprocess, {devices} devices")
        server = H.start_qflare(
            label=f"qflare-{args.store}",
            workdir=workdir,
            database_url=url,
            devices=devices,
            progress=progress.note,
        )
        pool = Pool(server.identities)
        levels = [Level(c) for c in args.concurrency]
        for r in range(args.rounds):
            shift = r % len(levels)
            for level in levels[shift:] + levels[:shift]:
                progress.note(
                    f"round {r + 1}/{args.rounds}: {level.concurrency} concurrent devices, "
                    f"{args.seconds:g} s"
                )
                asyncio.run(run_level(server, pool, level, args.seconds))
        return levels, f"{devices} devices"
    finally:
        if server is not None:
            server.server.close()
        try:
            H.drop_schemas(args.postgres_url, schemas)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("throughput")
    result: dict[str, object] = {}
    if not args.no_handshakes:
        levels, note = handshake_levels(args, progress)
        rows = []
        for lv in levels:
            rows.append(
                [
                    str(lv.concurrency),
                    f"{T.median(lv.rate):.1f}",
                    f"{min(lv.rate):.1f}-{max(lv.rate):.1f}",
                    f"{T.median(lv.server_us):.0f}",
                    f"{T.median(lv.busy):.2f}",
                    f"{pct(lv.latencies_ms, 50):.1f}",
                    f"{pct(lv.latencies_ms, 99):.1f}",
                    f"{T.median(lv.client_us):.0f}",
                    str(lv.handshakes),
                ]
            )
            result[f"hs_per_s_c{lv.concurrency}"] = T.median(lv.rate)
            result[f"server_us_c{lv.concurrency}"] = T.median(lv.server_us)
            result[f"p99_ms_c{lv.concurrency}"] = pct(lv.latencies_ms, 99)
        print(
            f"# handshakes per second, store {args.store}, {note}, {args.rounds} rounds of "
            f"{args.seconds:g} s per level (order rotating); medians over rounds; latency over "
            "all rounds; server busy = server CPU / wall (1.00 = one core)"
        )
        print(
            T.table(
                [
                    "devices at once",
                    "handshakes/s",
                    "rounds",
                    "server CPU µs/hs",
                    "server busy",
                    "p50 ms",
                    "p99 ms",
                    "client CPU µs/hs",
                    "handshakes",
                ],
                rows,
            )
        )
    progress.note("record layer: Session.seal/open of 1 MiB vs raw AES-256-GCM")
    budget = QUICK_RECORD_BUDGET_S if args.quick else RECORD_BUDGET_S
    rounds = 3 if args.quick else 7
    sides = record_bench(rounds, budget, args.iterations, progress)
    progress.done()
    rows = []
    ratios = []
    for side in sides.values():
        q_us, r_us = T.median(side.qflare_ns) / 1e3, T.median(side.raw_ns) / 1e3
        ratio = T.median(side.ratios)
        ratios.append(ratio)
        rows.append(
            [
                f"1 MiB {side.key}",
                f"{r_us:.0f}",
                f"{q_us:.0f}",
                f"{RECORD_SIZE / r_us:.0f}",
                f"{RECORD_SIZE / q_us:.0f}",
                f"{ratio:.3f} [{min(side.ratios):.3f}-{max(side.ratios):.3f}]",
                f"{T.median(side.raw_faults):.1f}",
                f"{T.median(side.qflare_faults):.1f}",
            ]
        )
        result[f"record_{side.key}_ratio"] = ratio
        result[f"record_{side.key}_mb_s"] = RECORD_SIZE / q_us
        result[f"raw_{side.key}_mb_s"] = RECORD_SIZE / r_us
        result[f"record_{side.key}_faults"] = T.median(side.qflare_faults)
        result[f"raw_{side.key}_faults"] = T.median(side.raw_faults)
    print(
        f"# record layer: CPU (process_time_ns), {rounds} interleaved rounds; ratio = raw/qflare "
        "time = QFLARE throughput as a fraction of raw AES-256-GCM [lowest-highest round]"
    )
    headers = ["operation", "raw µs", "qflare µs", "raw MB/s", "qflare MB/s", "ratio"]
    print(T.table([*headers, "raw faults/call", "qflare faults/call"], rows))
    worst = min(ratios)
    status = "PASS" if worst >= args.target else "FAIL"
    print(f"{status}: record layer at {worst:.3f} of raw AES-GCM vs target >= {args.target:g}")
    print(
        T.result_line(
            **result,
            record_ratio_min=worst,
            target=args.target,
            status=status,
            store=args.store,
            concurrency=",".join(map(str, args.concurrency)),
            rounds=args.rounds,
            record_rounds=rounds,
        )
    )
    sys.stdout.flush()
    return 1 if args.check and status == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
