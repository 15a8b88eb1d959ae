"""Small timing helpers shared by the bench scripts (imported as a sibling module).

Clock: ``time.process_time_ns`` (CLOCK_PROCESS_CPUTIME_ID), used for every measurement. The
targets are about CPU cost, and the machines are small shared boxes: a wall clock
(``perf_counter_ns``) would also count the time this process sits descheduled while a
neighbour runs, which says nothing about QFLARE. CPU time does not remove every kind of
interference (shared caches, frequency changes), which is why every target is a ratio of two
sides measured in interleaved rounds of the same run, never an absolute figure.

Batches run with the garbage collector disabled, as ``timeit`` does, and each batch is timed
as a whole, so the clock's own cost and resolution vanish into milliseconds of work.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable, Sequence
from itertools import repeat
from time import process_time_ns

CLOCK = process_time_ns
CLOCK_NAME = "process_time_ns"


def time_batch(fn: Callable[[], object], n: int) -> int:
    """CPU nanoseconds for ``n`` calls of ``fn``, with the garbage collector off."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = CLOCK()
        for _ in repeat(None, n):
            fn()
        return CLOCK() - start
    finally:
        if was_enabled:
            gc.enable()


def timed(fn: Callable[[], object]) -> int:
    """CPU nanoseconds for one call of ``fn`` (which loops by itself), garbage collector off."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = CLOCK()
        fn()
        return CLOCK() - start
    finally:
        if was_enabled:
            gc.enable()


def per_call_ns(fn: Callable[[], object], min_batch_ns: float = 2e6) -> float:
    """A rough cost of one call: double the batch until it lasts ``min_batch_ns``."""
    fn()  # warm up: first-call costs (lazy imports, caches) are not the steady state
    n = 1
    while True:
        spent = time_batch(fn, n)
        if spent >= min_batch_ns or n >= 1 << 22:
            return spent / n
        n *= 2


def iterations_for(cost_ns: float, batch_ns: float, minimum: int = 3) -> int:
    return max(minimum, round(batch_ns / max(cost_ns, 1.0)))


def harness_overhead_ns() -> float:
    """The loop's own cost per call of a trivial C callable (counted on both sides alike)."""
    noop = (0).__index__
    samples = []
    for _ in range(5):
        n = 200_000
        samples.append(time_batch(noop, n) / n)
    return statistics.median(samples)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class Progress:
    """Progress on stderr: a rewritten line on a terminal, whole lines (fewer) otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self._dirty = False

    def step(self, message: str) -> None:
        """Fine-grained progress: shown on a terminal only."""
        if self.tty:
            sys.stderr.write(f"\r\033[K[{self.label}] {message}")
            sys.stderr.flush()
            self._dirty = True

    def note(self, message: str) -> None:
        """Coarse progress: always shown, one line."""
        if self._dirty:
            sys.stderr.write("\r\033[K")
            self._dirty = False
        sys.stderr.write(f"[{self.label}] {message}\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self._dirty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._dirty = False


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    budget: float,
    quick_budget: float,
    target: float,
    iterations_help: str,
) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run (~{quick_budget:g} s of measuring, 3 rounds) for smoke tests",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds per measurement; medians are taken over them (default 7, "
        "3 with --quick)",
    )
    parser.add_argument("--iterations", type=int, default=None, help=iterations_help)
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds of measuring to aim for when sizing batches (default {budget:g}, "
        f"{quick_budget:g} with --quick); ignored where --iterations fixes the batch size",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=target,
        help=f"ratio to judge PASS/FAIL against (default {target:g})",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 when the target is missed (default: always exit 0)",
    )


def resolve_common(args: argparse.Namespace, *, budget: float, quick_budget: float) -> None:
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.budget is None:
        args.budget = quick_budget if args.quick else budget
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.iterations is not None and args.iterations < 1:
        raise SystemExit("--iterations must be at least 1")


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "FAIL"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """A plain-text table; columns from index ``right`` on are right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i >= right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def result_line(**values: object) -> str:
    """``RESULT key=value ...``: one line, no spaces inside values, for scripts to parse."""
    parts = []
    for key, value in values.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        if " " in text or "=" in text:
            raise ValueError(f"RESULT value for {key} must not contain spaces or '='")
        parts.append(f"{key}={text}")
    return "RESULT " + " ".join(parts)
