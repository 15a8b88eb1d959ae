"""What the security monitor costs a server: handshake throughput with the detector on vs off.

Run: ``.venv/bin/python bench/monitor.py [--quick] [--rounds N] [--iterations N] [--check]
[--postgres URL] [--redis URL | --no-redis]``

Three in-process ``Service`` objects share one ``KeyManager`` and one real store (a temporary
SQLite file, or a temporary schema on ``--postgres``) and differ only in their monitor:

* ``off``: no detector (``monitor_enabled = false``);
* ``memory``: the default rules, windows in process (a server without ``redis_url``);
* ``redis``: the default rules, windows in Redis (a replica of a fleet; skipped when Redis
  does not answer or with ``--no-redis``). Its keys carry a prefix of this run's own and are
  deleted at the end; nothing is flushed.

What is timed is the server side of complete handshakes: ``Service.hello`` and
``Service.finish`` for K devices' fresh ClientHellos and ClientFinishes, with every store write
(nonce, session, device, security events) the real routes do. The devices' own work (building
hellos, processing ServerHellos) runs between the server phases, untimed. Devices handshook
once before, so every timed handshake is a rekey: ``handshake.started``, ``handshake.completed``
and ``session.rekeyed`` are stored, and the rekey-rate rule counts each one (its threshold is
raised so it never fires: the steady state is counting, not alerting). Detection of those
INFO events runs after each request answers (``Service.event``); the bench lets it finish,
untimed, after each handshake, so it never lands in another side's timing, and reports what it
takes on its own as ``observe_us_*`` (the detector alone, per handshake's three events).

Each round runs a batch of K handshakes per side; the order of the sides rotates every round.
Reported: medians over rounds of wall-clock µs per handshake (``perf_counter_ns``: the Redis
side's cost is mostly waiting for a round trip, which CPU time would not see) and of CPU µs
(``process_time_ns``, all threads); the cost of a side is the median over rounds of its
per-round ``wall / off wall - 1``. Target: at most 10 % (``--target 0.10``) for every side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from qflare import crypto
from qflare.config import Settings
from qflare.crypto import labels
from qflare.keys import EnrollmentRequest, KeyManager
from qflare.monitor.counters import MemoryCounters, SharedCounters
from qflare.monitor.detect import Detector, rules_from
from qflare.monitor.events import EventType, SecurityEvent
from qflare.monitor.shared import SharedRedis
from qflare.protocol import ClientHandshake
from qflare.protocol.enrollment import enrollment_proof_message
from qflare.protocol.handshake import PinnedServerKey
from qflare.runtime import init_data_dir, open_manager, server_policy
from qflare.server.service import Service
from qflare.store import migrate

try:
    import _timing as T
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _timing as T

BUDGET_S = 30.0
QUICK_BUDGET_S = 4.0
TARGET = 0.10
DEVICES = 32
SOURCE = "192.0.2.10"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"


@dataclass
class Device:
    device_id: str
    key: crypto.SignaturePrivateKey
    pin: PinnedServerKey

    def client(self) -> ClientHandshake:
        return ClientHandshake(
            device_id=self.device_id,
            identity=self.key,
            identity_algorithm="ML-DSA-44",
            server_key=self.pin,
        )


async def enroll(keys: KeyManager, device_id: str) -> Device:
    issued = await keys.issue_token(now=time.time())
    key = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
    public = key.public_key().public_bytes()
    message = enrollment_proof_message(device_id, "ML-DSA-44", public, issued.token)
    enrolled = await keys.enroll(
        EnrollmentRequest(
            token=issued.token,
            device_id=device_id,
            algorithm="ML-DSA-44",
            public_key=public,
            proof=key.sign(message, labels.SIG_ENROLLMENT),
        ),
        now=time.time(),
    )
    return Device(device_id, key, enrolled.server_key)


@dataclass
class Spent:
    wall_ns: int = 0
    cpu_ns: int = 0


async def timed(spent: Spent, work: Callable[[], Awaitable[None]]) -> None:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        wall, cpu = time.perf_counter_ns(), time.process_time_ns()
        await work()
        spent.wall_ns += time.perf_counter_ns() - wall
        spent.cpu_ns += time.process_time_ns() - cpu
    finally:
        if was_enabled:
            gc.enable()


class Bench:
    def __init__(self, keys: KeyManager, services: dict[str, Service], devices: list[Device]):
        self.keys, self.services, self.devices = keys, services, devices
        self._next = 0

    def _pick(self, k: int) -> list[Device]:
        picked = [self.devices[(self._next + i) % len(self.devices)] for i in range(k)]
        self._next += k
        return picked

    async def one(self, side: str, device: Device, spent: Spent) -> None:
        """One complete handshake through ``side``'s service; only the server steps timed."""
        service = self.services[side]
        client = device.client()
        hello = client.client_hello(now=int(time.time()), rng=crypto.system_rng)
        answer = b""

        async def server_hello() -> None:
            nonlocal answer
            answer = await service.hello(hello, source=SOURCE)

        await timed(spent, server_hello)
        finish = client.receive_server_hello(answer)
        sealed = b""

        async def server_finish() -> None:
            nonlocal sealed
            sealed = await service.finish(finish, source=SOURCE)

        await timed(spent, server_finish)
        # Detection of the successful path's events runs after the request (Service.event),
        # off the handshake's path: finished here, untimed, so that it does not land in the
        # next side's timed steps. What it takes is observe_us_* (observe_cost).
        await service.observed()
        if client.session is None or not client.session.open(sealed, now=time.time()):
            raise SystemExit("bench/monitor.py: a handshake did not establish a session")

    async def round(self, sides: list[str], k: int) -> dict[str, Spent]:
        """K handshakes per side, the sides taking turns handshake by handshake (a burst of
        noise from a neighbour then hits every side alike), the order rotating each turn."""
        spent = {side: Spent() for side in sides}
        for i, device in enumerate(self._pick(k)):
            turn = i % len(sides)
            for side in sides[turn:] + sides[:turn]:
                await self.one(side, device, spent[side])
        return spent


async def observe_cost(
    detector: Detector, device_id: str, n: int, clock: Callable[[], float] = time.time
) -> float:
    """Wall ns the detector alone spends on one handshake's events (what ``Service.event``
    hands it after storing them): the part of the cost that is the monitor's own."""

    async def emit(*args: object, **kw: str) -> None:  # no rule fires (thresholds raised)
        raise SystemExit("bench/monitor.py: a detection rule fired during the run")

    kinds = (EventType.HANDSHAKE_STARTED, EventType.HANDSHAKE_COMPLETED, EventType.SESSION_REKEYED)
    spent = Spent()

    async def work() -> None:
        for _ in range(n):
            for kind in kinds:
                ev = SecurityEvent(type=kind, ts=clock(), device_id=device_id, source=SOURCE)
                await detector.observe(ev, emit)

    await timed(spent, work)
    return spent.wall_ns / n


def redis_reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2):
            return True
    except OSError:
        return False


async def run(args: argparse.Namespace, progress: T.Progress) -> int:
    with tempfile.TemporaryDirectory(prefix="qflare-bench-monitor-") as tmp:
        schema = f"qflare_bench_{uuid.uuid4().hex[:12]}"
        if args.postgres:
            sep = "&" if "?" in args.postgres else "?"
            url = f"{args.postgres}{sep}schema={schema}"
        else:
            url = f"sqlite:///{Path(tmp) / 'qflare.db'}"
        # The rekey-rate rule counts every handshake below; raised so it never fires.
        settings = Settings(
            data_dir=Path(tmp) / "data", database_url=url, detect_rekey_rate_device="100000/300"
        )
        try:
            await migrate(url)
            await init_data_dir(settings)
            keys = await open_manager(settings)
            try:
                return await measure(args, progress, settings, keys)
            finally:
                await keys.store.close()
        finally:
            if args.postgres:
                import asyncpg  # noqa: PLC0415 (only for --postgres)

                conn = await asyncpg.connect(args.postgres)
                try:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                finally:
                    await conn.close()


async def measure(
    args: argparse.Namespace, progress: T.Progress, settings: Settings, keys: KeyManager
) -> int:
    policy = server_policy(settings)
    rules = rules_from(settings)
    services = {
        "off": Service(keys, policy),
        "memory": Service(
            keys, policy, monitor=Detector(rules, keys=keys, counters=MemoryCounters())
        ),
    }
    shared: SharedRedis | None = None
    prefix = f"qflare:bench:{uuid.uuid4().hex[:12]}:"
    if args.redis and redis_reachable(args.redis):
        shared = SharedRedis(args.redis)
        services["redis"] = Service(
            keys,
            policy,
            monitor=Detector(rules, keys=keys, counters=SharedCounters(shared, prefix=prefix)),
        )
    elif args.redis:
        progress.note(f"Redis at {args.redis} does not answer: the redis side is skipped")
    sides = list(services)
    try:
        progress.note(f"enrolling {DEVICES} devices; one first handshake each")
        devices = [await enroll(keys, f"bench-{i:03d}") for i in range(DEVICES)]
        bench = Bench(keys, services, devices)
        await bench.round(["off"], DEVICES)  # from now on every handshake is a rekey
        trial = await bench.round(sides, 8)  # warm-up, and a trial to size the rounds
        per_handshake = trial["off"].wall_ns / 8
        if args.iterations is not None:
            k = args.iterations
        else:
            k = T.iterations_for(
                per_handshake * len(sides), args.budget * 1e9 / args.rounds, minimum=8
            )
        progress.note(
            f"{args.rounds} rounds of {k} handshakes per side, sides {', '.join(sides)} "
            f"(~{per_handshake * k * len(sides) * args.rounds / 1e9:.0f} s)"
        )
        wall: dict[str, list[float]] = {s: [] for s in sides}
        cpu: dict[str, list[float]] = {s: [] for s in sides}
        cost: dict[str, list[float]] = {s: [] for s in sides if s != "off"}
        for r in range(args.rounds):
            gc.collect()
            got = await bench.round(sides, k)
            for side in sides:
                wall[side].append(got[side].wall_ns / k)
                cpu[side].append(got[side].cpu_ns / k)
            for side, ratios in cost.items():
                ratios.append(got[side].wall_ns / got["off"].wall_ns - 1)
            progress.note(
                f"round {r + 1}/{args.rounds}: "
                + " ".join(f"{s} {got[s].wall_ns / k / 1e3:.0f} µs" for s in sides)
            )
        observe: dict[str, float] = {}
        for side, service in services.items():
            if service.monitor is not None:
                observe[side] = T.median(
                    [await observe_cost(service.monitor, "bench-000", 200) for _ in range(5)]
                )
        progress.done()
        fired = sum(s.monitor.fired for s in services.values() if s.monitor is not None)
    finally:
        if shared is not None:
            async for key in shared.redis.scan_iter(match=prefix + "*"):
                await shared.redis.delete(key)
            await shared.close()

    store = "postgresql" if args.postgres else "sqlite"
    rows = []
    for side in sides:
        w, c = T.median(wall[side]), T.median(cpu[side])
        rows.append(
            [
                side,
                f"{w / 1e3:.0f}",
                f"{c / 1e3:.0f}",
                f"{1e9 / w:.0f}",
                "-" if side == "off" else f"{T.median(cost[side]) * 100:+.1f} %",
            ]
        )
    print(
        f"# store {store}; {args.rounds} interleaved rounds of {k} handshakes per side; "
        "µs per server handshake are medians over rounds; cost = median of per-round "
        "wall/off - 1"
    )
    print(T.table(["monitor", "wall µs", "cpu µs", "handshakes/s", "cost"], rows))
    off_us = T.median(wall["off"]) / 1e3
    for side, ns in observe.items():
        print(
            f"# detector alone, {side}: {ns / 1e3:.1f} µs per handshake "
            f"({ns / 1e3 / off_us * 100:.2f} % of an unmonitored handshake)"
        )
    for side, ratios in cost.items():
        print(f"# per-round cost {side}: " + " ".join(f"{x * 100:+.1f}%" for x in ratios))
    if fired:
        print(f"# warning: {fired} rule(s) fired during the run; the figures include alerts")
    worst = max(T.median(v) for v in cost.values())
    status = T.verdict(worst, args.target)
    print(
        f"{status}: the monitor costs at most {worst * 100:+.1f} % of handshake time "
        f"vs target <= {args.target * 100:g} %"
    )
    values: dict[str, object] = {"monitor_cost_max": worst}
    for side, ratios in cost.items():
        values[f"monitor_cost_{side}"] = T.median(ratios)
    for side in sides:
        values[f"handshakes_per_s_{side}"] = round(1e9 / T.median(wall[side]))
    for side, ns in observe.items():
        values[f"observe_us_{side}"] = ns / 1e3
    print(
        T.result_line(
            **values,
            handshake_us_off=T.median(wall["off"]) / 1e3,
            target=args.target,
            status=status,
            handshakes=k,
            rounds=args.rounds,
            store=store,
            clock="perf_counter_ns",
        )
    )
    sys.stdout.flush()
    return 1 if args.check and status == "FAIL" else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/monitor.py",
        description="Server handshake time through the in-process Service with the security "
        "monitor off, on with in-process windows, and on with Redis windows. Prints a table "
        "and one RESULT line; the target is cost <= --target for every monitored side.",
    )
    T.add_common_arguments(
        parser,
        budget=BUDGET_S,
        quick_budget=QUICK_BUDGET_S,
        target=TARGET,
        iterations_help="handshakes per side per round (default: sized from --budget)",
    )
    parser.add_argument(
        "--postgres", metavar="URL", help="use a temporary schema on this PostgreSQL"
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=DEFAULT_REDIS,
        help=f"Redis for the redis side (default {DEFAULT_REDIS}; nothing is flushed)",
    )
    parser.add_argument(
        "--no-redis", dest="redis", action="store_const", const="", help="skip the redis side"
    )
    args = parser.parse_args(argv)
    T.resolve_common(args, budget=BUDGET_S, quick_budget=QUICK_BUDGET_S)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("monitor")
    return asyncio.run(run(args, progress))


if __name__ == "__main__":
    sys.exit(main())
