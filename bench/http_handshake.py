"""Server CPU per complete QFLARE handshake over HTTP against Python's TLS 1.3 handshake.

Run: ``.venv/bin/python bench/http_handshake.py [--quick] [--stores sqlite,postgres]
[--rounds N] [--iterations N] [--check]``

Sides, each a server in a subprocess of its own (bench/_http.py), all running at once:

* ``qflare-sqlite``, ``qflare-postgres``: ``create_app`` on uvicorn (``serve_in_thread``) over a
  fresh store (a SQLite file; a PostgreSQL schema of its own, dropped at the end), with
  ``qflare serve``'s INFO logging. One handshake = ``POST /v1/handshake/hello`` + ``POST
  /v1/handshake/finish`` of one enrolled device (devices take turns, so every handshake is a
  rekey, as in a running fleet) on a new TCP connection, driven by the device SDK's own flow
  (``connect_flow``): the ServerHello is checked against the pinned key and the sealed finish
  answer is opened, so only complete, correct handshakes count.
* ``mtls``: Python's ``ssl`` module, TLS 1.3 with a required and verified client certificate;
  ECDSA P-256 certificates from one CA (pyca/cryptography), X25519 only, a new TCP connection
  per handshake, no resumption (no tickets issued, no session offered); "ping"/"ok" after the
  handshake so it has really completed on both ends.
* ``tls``: the same with server authentication only.
* ``http-floor``: uvicorn alone (same loop and parser) with a bare ASGI app behind it, sent
  the two POST bodies of a real handshake on a new TCP connection and answering with a real
  ServerHello's and finish answer's sizes: what HTTP costs one handshake before any QFLARE
  code runs (not judged; ``--no-floor`` skips it).

**Clock:** the server process's own CPU time (``time.process_time_ns`` inside it, every
thread, user + system), read through a control pipe before and after each batch. For
``qflare-postgres`` the CPU of the PostgreSQL backends serving it (``/proc/<pid>/schedstat``)
is reported beside it, and in ``ratio_postgres_with_db``. The bench process's work (the
clients) is outside every figure.

**Rounds:** each round runs a batch of handshakes on every side in turn, the order rotating
from round to round. Reported: medians over rounds of server CPU µs per handshake; each ratio
is the median over rounds of the per-round ratio.

**Target:** QFLARE server CPU per handshake / mTLS server CPU per handshake < 1.0 on every
store (``ratio`` is the worse of the two).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import _http as H
    import _timing as T
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _http as H
    from bench import _timing as T

BUDGET_S = 40.0
QUICK_BUDGET_S = 6.0
TARGET = 1.0
WARMUP = 5
MAX_PER_DEVICE = 20  # handshakes per device per run: stays under the rekey-rate rule (30/300 s)


@dataclass
class Side:
    name: str
    run: Callable[[], object]  # one complete handshake
    cpu: Callable[[], int]  # the server's CPU ns so far
    kind: str  # "qflare" or "tls"
    db: H.PgBackends | None = None
    n: int = 0
    per_hs_ns: list[float] = field(default_factory=list)
    db_per_hs_ns: list[float] = field(default_factory=list)
    wall_per_hs_ns: list[float] = field(default_factory=list)

    def batch(self, k: int) -> None:
        before_db: dict[int, int] = {}
        if self.db is not None:
            self.db.refresh()
            before_db = self.db.snapshot()
        start_wall = time.perf_counter_ns()
        start = self.cpu()
        for _ in range(k):
            self.run()
        spent = self.cpu() - start
        wall = time.perf_counter_ns() - start_wall
        self.per_hs_ns.append(spent / k)
        self.wall_per_hs_ns.append(wall / k)
        if self.db is not None:
            self.db_per_hs_ns.append(self.db.spent(before_db, self.db.snapshot()) / k)


def start_profilers(args: argparse.Namespace, pid: int) -> list[Any]:
    """perf and/or py-spy attached to ``pid`` (our own server subprocess)."""
    import subprocess  # noqa: PLC0415

    out = []
    if args.perf:
        out.append(
            subprocess.Popen(
                ["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", args.perf],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    if args.py_spy_out:
        out.append(
            subprocess.Popen(
                [
                    *(args.py_spy, "record", "--pid", str(pid), "--format", "raw"),
                    *("--rate", "250", "--nonblocking", "--output", args.py_spy_out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    if out:
        time.sleep(1.0)
    return out


def perf_by_library(path: str) -> str:
    """On-CPU samples of the profiled server by shared object (self time)."""
    import subprocess  # noqa: PLC0415

    command = ["perf", "report", "-i", path, "--stdio", "--no-children", "--sort", "dso"]
    text = subprocess.run(
        [*command, "-q", "-g", "none"], capture_output=True, text=True, check=False
    ).stdout
    rows = [line.split(None, 1) for line in text.splitlines() if "%" in line]
    lines = [f"{share:>7}  {dso.strip()}" for share, dso in rows[:12]]
    return "# perf: on-CPU samples of the first QFLARE server by library (self)\n" + "\n".join(
        lines
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/http_handshake.py",
        description="Server CPU per complete QFLARE handshake over HTTP (real uvicorn server in "
        "a subprocess; SQLite and PostgreSQL) against Python's TLS 1.3 mutual-auth and "
        "server-auth handshakes (ssl module, ECDSA P-256, X25519, no resumption), measured in "
        "interleaved rounds in one run. Prints a table and one RESULT line.",
    )
    T.add_common_arguments(
        parser,
        budget=BUDGET_S,
        quick_budget=QUICK_BUDGET_S,
        target=TARGET,
        iterations_help="handshakes per batch on every side (default: sized from --budget)",
    )
    parser.add_argument(
        "--stores", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    parser.add_argument(
        "--postgres-url",
        default=H.DEFAULT_PG_URL,
        help="PostgreSQL server (a role that may create schemas); default "
        "$QFLARE_TEST_POSTGRES_URL or postgresql://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument(
        "--keep-alive",
        action="store_true",
        help="QFLARE handshakes reuse one HTTP connection (default: a new TCP connection per "
        "handshake, as on the TLS sides)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("info", "warning"),
        help="QFLARE server logging: info is what qflare serve configures (default)",
    )
    parser.add_argument(
        "--loop", default="auto", choices=("auto", "asyncio", "uvloop"), help="uvicorn loop"
    )
    parser.add_argument(
        "--http", default="auto", choices=("auto", "h11", "httptools"), help="uvicorn HTTP"
    )
    parser.add_argument(
        "--speedups",
        default=None,
        metavar="PATH",
        help="also run qflare-sqlite with uvloop + httptools imported from PATH (a pip "
        "--target directory; '' = from the environment): the before/after of that change",
    )
    parser.add_argument(
        "--perf",
        default=None,
        metavar="OUT",
        help="record the first QFLARE server with Linux perf (on-CPU samples) into OUT while "
        "the rounds run, and print its CPU by library",
    )
    parser.add_argument(
        "--py-spy-out",
        default=None,
        metavar="OUT",
        help="record the first QFLARE server with py-spy (raw collapsed Python stacks; see "
        "bench/_profile.py) into OUT while the rounds run",
    )
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the http-floor side (uvicorn alone, same loop and parser, sent a "
        "handshake's two POST bodies on a new connection and answering with a ServerHello's "
        "and a finish answer's sizes: what HTTP costs a handshake before QFLARE code runs)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices enrolled per QFLARE server (default: enough that none handshakes more "
        f"than {MAX_PER_DEVICE} times, which keeps the rekey-rate rule quiet)",
    )
    parser.add_argument("--tmpdir", default=None, help="where data directories and logs go")
    args = parser.parse_args(argv)
    T.resolve_common(args, budget=BUDGET_S, quick_budget=QUICK_BUDGET_S)
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not args.stores or any(s not in ("sqlite", "postgres") for s in args.stores):
        parser.error("--stores takes sqlite and/or postgres")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("http_handshake")
    workdir = Path(tempfile.mkdtemp(prefix="qflare-httphs-", dir=args.tmpdir))
    servers: list[H.ServerProcess] = []
    schemas: list[str] = []
    profilers: list[Any] = []
    try:
        progress.note("making ECDSA P-256 certificates (CA, server, client)")
        certs = H.make_certs(workdir)
        sides: list[Side] = []
        q_side: dict[str, H.QflareServer] = {}
        # Devices: enough that none handshakes more often than the rekey-rate rule allows.
        planned = (args.iterations or 60) * args.rounds + 3 * WARMUP
        devices = args.devices or max(8, -(-planned // MAX_PER_DEVICE))
        variants: list[tuple[str, str, str, str, dict[str, str] | None]] = []
        for store in args.stores:
            variants.append((f"qflare-{store}", store, args.loop, args.http, None))
        if args.speedups is not None:
            env = H.speedups_env(args.speedups) if args.speedups else None
            variants.append(("qflare-sqlite-uvloop", "sqlite", "uvloop", "httptools", env))
        for name, store, loop, http_impl, env in variants:
            url = ""
            if store == "postgres":
                schema = H.new_schema_name("hs")
                schemas.append(schema)
                url = H.pg_schema_url(args.postgres_url, schema)
            progress.note(f"{name}: store, server subprocess, {devices} devices")
            q = H.start_qflare(
                label=name,
                workdir=workdir,
                database_url=url,
                devices=devices,
                loop=loop,
                http_impl=http_impl,
                log_level=args.log_level,
                env=env,
                progress=progress.note,
            )
            servers.append(q.server)
            q_side[name] = q
            conn = None
            if args.keep_alive:
                conn = H.http_connection(q.url)

            def run(q: H.QflareServer = q, conn: Any = conn) -> object:
                return H.qflare_handshake(q, conn)

            sides.append(Side(name, run, q.server.cpu_ns, "qflare", q.pg))
        if not args.no_floor:
            progress.note("http-floor: uvicorn alone, shaped like one handshake")
            first = next(iter(q_side.values()))
            H.qflare_handshake(first)  # records the two exchanges' body sizes
            fl = H.start_floor(
                workdir=workdir, sizes=first.sizes, loop=args.loop, http_impl=args.http
            )
            servers.append(fl.server)

            def floor(fl: H.FloorServer = fl) -> None:
                H.http_floor(fl)

            sides.append(Side("http-floor", floor, fl.server.cpu_ns, "floor"))
        for name, mutual in (("mtls", True), ("tls", False)):
            progress.note(f"{name}: ssl server subprocess")
            t = H.start_tls(label=name, workdir=workdir, certs=certs, mutual=mutual)
            servers.append(t.server)

            def run_tls(t: H.TlsServer = t) -> None:
                H.tls_handshake(t)

            sides.append(Side(name, run_tls, t.server.cpu_ns, "tls"))

        progress.note("warming up and sizing batches")
        for side in sides:
            start = time.perf_counter_ns()
            for _ in range(WARMUP):
                side.run()
            wall = (time.perf_counter_ns() - start) / WARMUP
            per_side_ns = args.budget * 1e9 / (args.rounds * len(sides))
            side.n = args.iterations or max(5, round(per_side_ns / wall))
            # QFLARE batches stay within what the enrolled devices may do (see MAX_PER_DEVICE).
            if side.kind == "qflare" and args.iterations is None:
                side.n = min(side.n, (devices * MAX_PER_DEVICE - 2 * WARMUP) // args.rounds)
        profilers = start_profilers(args, q_side[sides[0].name].server.pid)
        proc_before = {sv.label: sv.proc_stat_ns() for sv in servers}
        cpu_before = {sv.label: sv.cpu_ns() for sv in servers}
        for r in range(args.rounds):
            shift = r % len(sides)
            order = sides[shift:] + sides[:shift]
            progress.note(
                f"round {r + 1}/{args.rounds}: " + ", ".join(f"{s.name} x{s.n}" for s in order)
            )
            for side in order:
                progress.step(f"round {r + 1}/{args.rounds}: {side.name}")
                side.batch(side.n)
        cpu_total = {sv.label: sv.cpu_ns() - cpu_before[sv.label] for sv in servers}
        proc_total = {sv.label: sv.proc_stat_ns() - proc_before[sv.label] for sv in servers}
        progress.done()
        stats = {sv.label: sv.stats() for sv in servers if sv.label in ("mtls", "tls")}
    finally:
        for profiler in profilers:
            profiler.send_signal(2)  # SIGINT: perf and py-spy write their output and exit
            try:
                profiler.wait(60)
            except Exception:
                profiler.kill()
        for server in servers:
            server.close()
        try:
            H.drop_schemas(args.postgres_url, schemas)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    for label, doc in stats.items():
        if doc.get("errors"):
            raise SystemExit(f"{label}: {doc['errors']} failed handshakes: {doc['last_error']}")

    by_name = {s.name: s for s in sides}
    mtls, tls = by_name["mtls"], by_name["tls"]

    def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
        rs = [x / y for x, y in zip(a, b, strict=True)]
        return T.median(rs), min(rs), max(rs)

    rows = []
    for s in sides:
        us = T.median(s.per_hs_ns) / 1e3
        vs_m = ratio(s.per_hs_ns, mtls.per_hs_ns)
        vs_t = ratio(s.per_hs_ns, tls.per_hs_ns)
        rows.append(
            [
                s.name,
                f"{us:.0f}",
                f"{T.median(s.db_per_hs_ns) / 1e3:.0f}" if s.db_per_hs_ns else "-",
                f"{T.median(s.wall_per_hs_ns) / 1e3:.0f}",
                f"{vs_m[0]:.2f} [{vs_m[1]:.2f}-{vs_m[2]:.2f}]",
                f"{vs_t[0]:.2f}",
                str(s.n),
            ]
        )
    print(
        f"# server CPU (process_time_ns inside each server process), {args.rounds} rounds, order "
        "rotating; µs are medians over rounds per handshake; ratios = median of per-round "
        "ratios [lowest-highest round]"
    )
    print(
        "# QFLARE: hello + finish over HTTP/1.1, "
        + ("one kept-alive connection" if args.keep_alive else "a new TCP connection each")
        + f", server logging {args.log_level}; TLS: 1.3, ECDSA P-256, X25519, no resumption"
    )
    print(
        T.table(
            ["side", "server CPU µs", "db CPU µs", "wall µs", "vs mTLS", "vs TLS", "per batch"],
            rows,
        )
    )
    print(
        "# cross-check, whole run, ms: "
        + ", ".join(
            f"{label} process_time {cpu_total[label] / 1e6:.0f} vs /proc/stat "
            f"{proc_total[label] / 1e6:.0f}"
            for label in cpu_total
        )
    )

    result: dict[str, object] = {}
    judged: list[tuple[float, str]] = []
    for s in sides:
        if s.kind != "floor":
            key = s.name.replace("-", "_")
            result[f"{key}_us"] = T.median(s.per_hs_ns) / 1e3
    for store in args.stores:
        s = by_name[f"qflare-{store}"]
        r_m = ratio(s.per_hs_ns, mtls.per_hs_ns)[0]
        result[f"ratio_{store}"] = r_m
        result[f"ratio_{store}_vs_tls"] = ratio(s.per_hs_ns, tls.per_hs_ns)[0]
        judged.append((r_m, store))
        if s.db_per_hs_ns:
            result["qflare_postgres_db_us"] = T.median(s.db_per_hs_ns) / 1e3
            total = [a + b for a, b in zip(s.per_hs_ns, s.db_per_hs_ns, strict=True)]
            result["ratio_postgres_with_db"] = ratio(total, mtls.per_hs_ns)[0]
    if "http-floor" in by_name:
        result["http_floor_us"] = T.median(by_name["http-floor"].per_hs_ns) / 1e3
    if "qflare-sqlite-uvloop" in by_name:
        fast = by_name["qflare-sqlite-uvloop"]
        if "qflare-sqlite" in by_name:
            result["speedups_ratio"] = ratio(fast.per_hs_ns, by_name["qflare-sqlite"].per_hs_ns)[0]
        result["ratio_sqlite_uvloop"] = ratio(fast.per_hs_ns, mtls.per_hs_ns)[0]
    if args.perf:
        print(perf_by_library(args.perf))
    worst, worst_store = max(judged)
    status = "PASS" if worst < args.target else "FAIL"
    print(
        f"{status}: QFLARE/mTLS server CPU per handshake {worst:.2f} ({worst_store}) vs target "
        f"< {args.target:g}"
    )
    result = {"ratio": worst, **result}
    result.update(
        target=args.target,
        status=status,
        stores=",".join(args.stores),
        handshakes=",".join(str(s.n) for s in sides),
        rounds=args.rounds,
        clock="server_process_time_ns",
    )
    print(T.result_line(**result))
    sys.stdout.flush()
    return 1 if args.check and status == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
