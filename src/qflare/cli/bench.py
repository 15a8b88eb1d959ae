"""``qflare bench``: run the bench scripts, write one markdown report and PNG plots.

The scripts live in the source tree's ``bench/`` folder (they are not part of the installed
package); each runs as a subprocess of its own (``python bench/NAME.py [--quick] ...``), its
progress lines (stderr) shown as they come, its output (stdout, ending in a ``RESULT`` line)
kept in ``OUT/NAME.txt``. ``OUT/report.md`` states the machine and the versions, then every
script's table and RESULT values; ``OUT/*.png`` are the plots (matplotlib, Agg backend: the
``bench`` extra).
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.console import Console

import qflare
from qflare.cli.context import Cli

DEFAULT_PG = os.environ.get("QFLARE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCRIPTS = ("crypto", "handshake", "http_handshake", "store_cpu", "throughput", "growth")


@dataclass
class Run:
    name: str
    argv: list[str]
    seconds: float = 0.0
    status: int = 0
    stdout: str = ""
    result: dict[str, str] = field(default_factory=dict)


def default_bench_dir() -> Path:
    return Path(qflare.__file__).resolve().parents[2] / "bench"


def status_of(run: Run) -> str:
    """PASS/FAIL for a script with a target, "reported" for one without (a decomposition)."""
    if run.status != 0:
        return "failed"
    if not run.result:
        return "no RESULT"
    return run.result.get("status", "reported")


def parse_result(stdout: str) -> dict[str, str]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    return {}


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2):
            return True
    except OSError:
        return False


def _postgres_version(url: str) -> str:
    try:
        import asyncpg  # noqa: PLC0415

        async def version() -> str:
            conn = await asyncpg.connect(url.partition("?")[0], timeout=5)
            try:
                return str(await conn.fetchval("SHOW server_version"))
            finally:
                await conn.close()

        return asyncio.run(version())
    except Exception as exc:  # reported, never fatal
        return f"not reachable ({type(exc).__name__})"


def machine(postgres_url: str | None) -> dict[str, str]:
    """CPU model, cores, memory, Python, OpenSSL, pyca/cryptography and PostgreSQL versions."""
    import cryptography  # noqa: PLC0415
    from cryptography.hazmat.backends.openssl.backend import backend  # noqa: PLC0415

    cpu = platform.processor() or "unknown"
    memory = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "OpenSSL (Python ssl, the TLS side)": ssl.OPENSSL_VERSION,
        "pyca/cryptography": cryptography.__version__,
        "OpenSSL in pyca/cryptography (QFLARE's crypto)": backend.openssl_version_text(),
        "PostgreSQL": _postgres_version(postgres_url) if postgres_url else "not used",
        "qflare": qflare.__version__,
    }


def run_script(bench_dir: Path, run: Run, out: Path, show: Callable[[str], None]) -> None:
    """Run one script, show its progress lines, keep its stdout."""
    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603 - this interpreter, this checkout's bench scripts
        [sys.executable, str(bench_dir / f"{run.name}.py"), *run.argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=bench_dir.parent,
    )
    err_lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            show(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    assert proc.stdout is not None
    run.stdout = proc.stdout.read()
    run.status = proc.wait()
    reader.join(10)
    run.seconds = time.monotonic() - started
    run.result = parse_result(run.stdout)
    (out / f"{run.name}.txt").write_text(run.stdout + "".join(err_lines[-40:]))


# -- plots ----------------------------------------------------------------------------------------


def _num(result: dict[str, str], key: str) -> float | None:
    try:
        return float(result[key])
    except (KeyError, ValueError):
        return None


def plots(runs: dict[str, Run], out: Path) -> list[tuple[str, str]]:
    """PNG plots of the RESULT values; returns (file name, caption) pairs."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    made: list[tuple[str, str]] = []

    def bars(name: str, caption: str, labels: list[str], values: list[float], unit: str) -> None:
        fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(labels)))
        colors = ["#3b6ea8" if "QFLARE" in x else "#999999" for x in labels]
        ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        ax.set_xlabel(unit)
        ax.set_title(caption, fontsize=10)
        for i, v in enumerate(values[::-1]):
            ax.annotate(f" {v:,.0f}", (v, i), ha="left", va="center", fontsize=8)
        ax.set_xlim(right=max(values) * 1.15)
        ax.tick_params(axis="y", labelsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, caption))

    hs = runs.get("http_handshake")
    if hs and hs.result:
        pairs = [
            ("QFLARE SQLite", "qflare_sqlite_us"),
            ("QFLARE PostgreSQL", "qflare_postgres_us"),
            ("QFLARE PG + DB backends", None),
            ("HTTP floor (uvicorn alone)", "http_floor_us"),
            ("TLS 1.3 mutual", "mtls_us"),
            ("TLS 1.3 server-auth", "tls_us"),
        ]
        labels, values = [], []
        for label, key in pairs:
            if key is None:
                a, b = (
                    _num(hs.result, "qflare_postgres_us"),
                    _num(hs.result, "qflare_postgres_db_us"),
                )
                v = a + b if a is not None and b is not None else None
            else:
                v = _num(hs.result, key)
            if v is not None:
                labels.append(label)
                values.append(v)
        bars(
            "http_handshake.png",
            "Server CPU per complete handshake (µs, lower is better)",
            labels,
            values,
            "µs of server CPU",
        )
    ih = runs.get("handshake")
    if ih and ih.result:
        found = [_num(ih.result, k) for k in ("handshake_us", "bound_us", "client_us")]
        if all(v is not None for v in found):
            bars(
                "handshake.png",
                "In-process QFLARE handshake vs its crypto lower bound (µs CPU)",
                ["QFLARE server", "crypto bound", "QFLARE client"],
                [v for v in found if v is not None],
                "µs of CPU",
            )
    tp = runs.get("throughput")
    if tp and tp.result:
        levels = sorted(
            int(k.removeprefix("hs_per_s_c")) for k in tp.result if k.startswith("hs_per_s_c")
        )
        if levels:
            fig, ax = plt.subplots(figsize=(6, 3.4))
            rates = [_num(tp.result, f"hs_per_s_c{c}") or 0.0 for c in levels]
            ax.plot(levels, rates, marker="o", color="#3b6ea8")
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_xlabel("devices handshaking at once")
            ax.set_ylabel("handshakes / s")
            ax.set_ylim(bottom=0)
            ax.set_title("QFLARE handshakes per second, one server", fontsize=10)
            fig.tight_layout()
            fig.savefig(out / "throughput.png", dpi=110)
            plt.close(fig)
            made.append(("throughput.png", "Handshakes per second vs concurrent devices"))
        rec = [
            ("raw AES-GCM seal", "raw_seal_mb_s"),
            ("QFLARE seal", "record_seal_mb_s"),
            ("raw AES-GCM open", "raw_open_mb_s"),
            ("QFLARE open", "record_open_mb_s"),
        ]
        got = [(label, _num(tp.result, key)) for label, key in rec]
        if all(v is not None for _, v in got):
            bars(
                "record_layer.png",
                "1 MiB model update through the record layer (MB/s, higher is better)",
                [label for label, _ in got],
                [v for _, v in got if v is not None],
                "MB/s",
            )
    gr = runs.get("growth")
    if gr and gr.result:
        labels, values = [], []
        for prefix, name in (("sqlite", "SQLite"), ("pg", "PostgreSQL")):
            small = _num(gr.result, f"{prefix}_hs_small_ms")
            large = _num(gr.result, f"{prefix}_hs_large_ms")
            if small is not None and large is not None:
                labels += [f"{name} small", f"{name} large"]
                values += [small * 1e3, large * 1e3]
        if values:
            sizes = gr.result.get("sizes", "").split(",")
            bars(
                "growth.png",
                f"Server handshake p50 (µs) at {' vs '.join(sizes)} enrolled devices",
                labels,
                values,
                "µs (wall)",
            )
    return made


# -- report ---------------------------------------------------------------------------------------

TITLES = {
    "crypto": "Primitives: QFLARE's crypto registry vs raw pyca/cryptography",
    "handshake": "In-process handshake: server CPU vs its crypto lower bound",
    "http_handshake": "Over HTTP: QFLARE server CPU per handshake vs Python's TLS 1.3",
    "store_cpu": "The CPU of a handshake's store calls (no target: a decomposition)",
    "throughput": "Handshakes per second; 1 MiB record layer vs raw AES-256-GCM",
    "growth": "Growth: fleet size and cleanup",
}


def report(
    runs: dict[str, Run], info: dict[str, str], made: list[tuple[str, str]], quick: bool
) -> str:
    lines = [
        "# QFLARE benchmark report",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `qflare bench"
        + (" --quick`" if quick else "`")
        + ". Every target is a ratio of two sides measured in the same run; absolute figures "
        "are this machine's. The methods are in bench/README.md and each script's docstring.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "## Summary",
        "",
        "| bench | status | seconds | command |",
        "| --- | --- | --- | --- |",
    ]
    for run in runs.values():
        status = status_of(run)
        command = " ".join([".venv/bin/python", f"bench/{run.name}.py", *run.argv])
        lines.append(f"| {run.name} | {status} | {run.seconds:.0f} | `{command}` |")
    lines.append("")
    for name, caption in made:
        lines += [f"![{caption}]({name})", ""]
    for run in runs.values():
        lines += [f"## {TITLES.get(run.name, run.name)}", ""]
        if run.status != 0 and not run.result:
            lines += [f"The script exited with status {run.status}; see {run.name}.txt.", ""]
        body = [ln for ln in run.stdout.splitlines() if not ln.startswith("RESULT ")]
        lines += ["```", *body, "```", ""]
        if run.result:
            lines += ["| RESULT | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in run.result.items()]
            lines.append("")
    return "\n".join(lines)


def bench(  # noqa: PLR0917 - typer reads the options from the signature
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for report.md, the PNG plots and raw outputs.")
    ] = Path("bench-report"),
    quick: Annotated[
        bool, typer.Option("--quick", help="Short runs of every script (a few minutes).")
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help=f"Run only these scripts (repeatable): {', '.join(SCRIPTS)}."),
    ] = None,
    postgres_url: Annotated[
        str, typer.Option("--postgres-url", help="PostgreSQL for the PostgreSQL sides.")
    ] = DEFAULT_PG,
    no_postgres: Annotated[
        bool, typer.Option("--no-postgres", help="SQLite only (no PostgreSQL sides).")
    ] = False,
    bench_dir: Annotated[
        Path | None,
        typer.Option("--bench-dir", help="The bench/ folder (default: the source tree's)."),
    ] = None,
) -> None:
    """Run the benchmarks and write a markdown report with PNG plots into --out."""
    cli = Cli.of(ctx)
    where = bench_dir or default_bench_dir()
    if not (where / "_timing.py").is_file():
        raise ValueError(
            f"no bench scripts in {where} (run from a source checkout or pass --bench-dir)"
        )
    names = list(only) if only else list(SCRIPTS)
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        raise ValueError(f"unknown bench {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    use_pg = not no_postgres and _reachable(postgres_url)
    if not no_postgres and not use_pg:
        cli.out.warn(f"PostgreSQL does not answer at {postgres_url}: SQLite only")
    out.mkdir(parents=True, exist_ok=True)
    q = ["--quick"] if quick else []
    pg = ["--postgres-url", postgres_url] if use_pg else []
    argv = {
        "crypto": q,
        "handshake": q,
        "http_handshake": [*q, *pg, "--stores", "sqlite,postgres" if use_pg else "sqlite"],
        "store_cpu": [*q, *pg, "--backends", "sqlite,postgres" if use_pg else "sqlite"],
        "throughput": [*q],
        "growth": [*q, *pg, "--backends", "sqlite,postgres" if use_pg else "sqlite"],
    }
    console = Console(stderr=True)
    runs: dict[str, Run] = {}
    for i, name in enumerate(names, 1):
        run = Run(name, argv[name])
        console.print(f"[bold][{i}/{len(names)}] bench/{name}.py {' '.join(run.argv)}[/bold]")
        run_script(
            where, run, out, lambda line: console.print(f"  {line}", markup=False, style="dim")
        )
        runs[name] = run
        console.print(f"  done in {run.seconds:.0f} s: {status_of(run)}")
    info = machine(postgres_url if use_pg else None)
    made = plots(runs, out)
    text = report(runs, info, made, quick)
    (out / "report.md").write_text(text)
    document: dict[str, Any] = {
        "report": str(out / "report.md"),
        "plots": [str(out / name) for name, _ in made],
        "machine": info,
        "results": {name: run.result for name, run in runs.items()},
        "failed": [name for name, run in runs.items() if run.status != 0 or not run.result],
    }

    def human(c: Console) -> None:
        c.print(f"Report  {out / 'report.md'}", markup=False)
        for name, _ in made:
            c.print(f"Plot    {out / name}", markup=False)
        for name, run in runs.items():
            c.print(f"{name:15s} {status_of(run)}", markup=False)

    cli.out.emit(document, human)
    if document["failed"]:
        raise typer.Exit(1)
