"""Where a server's CPU goes, from a py-spy profile (``py-spy record --native --format raw``).

Run: ``.venv/bin/python bench/_profile.py PROFILE.txt`` (written by ``bench/http_handshake.py
--profile``).

py-spy samples every thread at a fixed rate whatever it is doing, so samples of a thread that
waits (``epoll_wait`` with nothing to do, the SQLite thread waiting for a job, the control
thread reading stdin, ``fdatasync`` waiting for the disk) are dropped first: what is left
approximates on-CPU time, and the script prints how that compares with the sampling time.
Each remaining sample then counts once towards every bucket any of its frames falls in
(inclusive), so the buckets overlap: read them as "share of CPU spent inside X".
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

# A sample whose innermost frames are one of these is a thread waiting, not working.
WAITING = (
    "epoll_wait",
    "select_epoll_poll",
    "pthread_cond_timedwait",
    "pthread_cond_wait",
    "_queue_SimpleQueue_get",
    "sem_wait",
    "sem_timedwait",
    "__futex",
    "futex_wait",
    "PyThread_acquire_lock_timed",
    "take_gil",
    "accept",
)
DISK_WAIT = ("fdatasync", "fsync")

# (bucket, regex over one frame); inclusive shares.
BUCKETS: tuple[tuple[str, str], ...] = (
    ("HTTP server: uvicorn + h11/httptools", r"uvicorn/protocols|h11/|httptools"),
    ("ASGI stack: FastAPI/Starlette/anyio middleware", r"fastapi/|starlette/|anyio/"),
    ("  the route bodies (hello/finish in create_app)", r"create_app\.<locals>\.(hello|finish) "),
    ("  BaseHTTPMiddleware (app's request counter)", r"BaseHTTPMiddleware"),
    ("Service.hello + Service.finish", r"Service\.(hello|finish) "),
    ("  security events (Service.event)", r"Service\.event "),
    ("    of which the monitor (Detector.observe)", r"Detector\.observe|qflare/monitor/detect"),
    ("  KeyManager (keys, sessions, nonces)", r"KeyManager\."),
    ("store: qflare.store (every call, both threads)", r"qflare/store/"),
    ("SQLite store thread (SQLite itself)", r"qflare/store/sqlite.py"),
    ("asyncpg", r"asyncpg/"),
    ("crypto: qflare.crypto + pyca/cryptography", r"qflare/crypto/|cryptography/"),
    ("protocol: qflare.protocol (handshake, codec, records)", r"qflare/protocol/"),
    ("logging", r"logging/__init__|logging/handlers"),
    ("json", r"json/(encoder|decoder|__init__)"),
    ("prometheus_client", r"prometheus_client/"),
    ("pydantic", r"pydantic"),
    ("asyncio event loop (outside the tasks above)", r"BaseEventLoop\._run_once "),
)


def _frames(line: str) -> tuple[list[str], int] | None:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    return stack.split(";"), int(count)


def _waiting(frames: list[str]) -> str | None:
    inner = ";".join(frames[-4:])
    if any(w in inner for w in DISK_WAIT):
        return "disk"
    if any(w in inner for w in WAITING):
        return "idle"
    if "_control (" in ";".join(frames) and re.search(r"\bread \(|readline", inner):
        return "idle"  # the control thread waiting for the bench's next command
    return None


def summarize(lines: Iterable[str], rate: float) -> tuple[list[tuple[str, float]], str]:
    busy = 0
    waits: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    patterns = [(name, re.compile(rx)) for name, rx in BUCKETS]
    for line in lines:
        parsed = _frames(line)
        if parsed is None:
            continue
        frames, n = parsed
        kind = _waiting(frames)
        if kind is not None:
            waits[kind] += n
            continue
        busy += n
        for name, rx in patterns:
            if any(rx.search(f) for f in frames):
                inclusive[name] += n
    rows = [(name, 100 * inclusive[name] / busy if busy else 0.0) for name, _ in BUCKETS]
    note = (
        f"{busy} on-CPU samples (~{busy / rate:.2f} s at {rate:g} Hz); dropped as waiting: "
        f"{waits['idle']} idle, {waits['disk']} in fdatasync/fsync (disk)"
    )
    return rows, note


def report(path: str | Path, rate: float = 250.0) -> str:
    with open(path) as f:
        rows, note = summarize(f, rate)
    width = max(len(name) for name, _ in rows)
    out = [f"# {note}", f"{'where':<{width}}  share of on-CPU samples"]
    out += [f"{name:<{width}}  {share:5.1f} %" for name, share in rows]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: bench/_profile.py PROFILE.txt [RATE_HZ]")
    print(report(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 250.0))
