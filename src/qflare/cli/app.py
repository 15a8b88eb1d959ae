"""The root of the ``qflare`` command: global options, ``init``, ``serve``, ``demo``.

Every failure an operator can cause (``QflareError``, a bad value, an OS error) ends as one red
line on stderr and exit status 1, caught once in ``_Root.invoke`` for every command below it.
Usage errors keep typer's own message and status 2.
"""

from __future__ import annotations

import asyncio
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

import qflare
from qflare.cli import views
from qflare.cli.audit import audit_app
from qflare.cli.context import HANDLED, Cli, redact_url
from qflare.cli.database import db_app, events_app
from qflare.cli.devices import device_app, session_app
from qflare.cli.keyring import admin_token_app, keys_app, token_app
from qflare.cli.output import Output
from qflare.cli.sources import source_app
from qflare.keys import EnvMasterKey, KeyManager
from qflare.monitor.events import EventType
from qflare.runtime import InitReport, init_data_dir, master_key


class _Root(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except HANDLED as exc:
            obj = ctx.obj
            out = obj.out if isinstance(obj, Cli) else Output(json_mode=False)
            out.fail(exc)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Root,
    name="qflare",
    help="Operate a QFLARE server: data directory, devices, keys, sessions, database.",
    no_args_is_help=True,
    invoke_without_command=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.add_typer(device_app, name="device")
app.add_typer(session_app, name="session")
app.add_typer(keys_app, name="keys")
app.add_typer(token_app, name="token")
app.add_typer(admin_token_app, name="admin-token")
app.add_typer(db_app, name="db")
app.add_typer(events_app, name="events")
app.add_typer(source_app, name="source")
app.add_typer(audit_app, name="audit")
app.command("bench")(__import__("qflare.cli.bench", fromlist=["bench"]).bench)


def _version() -> str:
    try:
        return metadata.version("qflare")
    except metadata.PackageNotFoundError:  # running from a source tree
        return qflare.__version__


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Data directory (master key, SQLite database). Default: $QFLARE_DATA_DIR "
            "or ~/.qflare.",
            file_okay=False,
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="sqlite:///path or postgresql://... Default: SQLite in the data directory.",
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout, no markup.")
    ] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Operate a QFLARE server: data directory, devices, keys, sessions, database.

    Settings come from these options, then QFLARE_* environment variables, then
    $QFLARE_DATA_DIR/qflare.toml (or $QFLARE_CONFIG).
    """
    out = Output(json_mode=json_output)
    ctx.obj = Cli(out, data_dir=data_dir, database_url=database_url)
    if version:
        out.emit({"version": _version()}, lambda c: c.print(f"qflare {_version()}"))
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:  # options but no command, e.g. `qflare --json`
        out.error("usage", "missing command (see qflare --help)")
        raise typer.Exit(2)


# -- init -------------------------------------------------------------------------------------


def _init_document(report: InitReport, key_status: str, master_key_path: Path) -> dict[str, Any]:
    return {
        "data_dir": str(report.data_dir),
        "store_url": redact_url(report.store_url),
        "master_key": {
            "status": key_status,
            "path": None if key_status == "environment" else str(master_key_path),
        },
        "migrations_applied": report.migrations_applied,
        "keys_created": [views.server_key(k) for k in report.keys_created],
        "changed": bool(
            report.master_key_created or report.migrations_applied or report.keys_created
        ),
    }


@app.command()
def init(ctx: typer.Context) -> None:
    """Create the data directory, master key, database schema and server keys.

    Safe to run again: an existing master key or server key is never replaced; what exists
    is kept and reported. Private key material is never printed.
    """
    cli = Cli.of(ctx)
    settings = cli.settings()
    report = asyncio.run(init_data_dir(settings))
    if report.keys_created:

        async def generated(m: KeyManager) -> None:
            for key in report.keys_created:
                await cli.security_event(
                    m, EventType.KEY_GENERATED, None, key_id=key.key_id, purpose=key.purpose.value
                )

        cli.with_manager(generated)
    if report.master_key_created:
        key_status = "created"
    elif isinstance(master_key(settings), EnvMasterKey):
        key_status = "environment"  # QFLARE_MASTER_KEY wins over any file
    else:
        key_status = "kept"
    document = _init_document(report, key_status, settings.master_key_path)

    def human(console: Console) -> None:
        console.print(f"Data directory  {report.data_dir}", markup=False)
        console.print(f"Database        {document['store_url']}", markup=False)
        if key_status == "environment":
            console.print("Master key      from QFLARE_MASTER_KEY (nothing written)")
        else:
            console.print(
                f"Master key      {settings.master_key_path} ({key_status})", markup=False
            )
        if report.migrations_applied:
            for name in report.migrations_applied:
                console.print(f"Migration       applied {name}", markup=False)
        else:
            console.print("Migrations      schema already current")
        if report.keys_created:
            console.print(views.server_key_table(report.keys_created, "Server keys created"))
        else:
            console.print("Server keys     one of each purpose already exists; none replaced")
        if not document["changed"]:
            console.print(Text("Everything already existed: nothing was changed.", style="green"))

    cli.out.emit(document, human)


# -- serve and demo ---------------------------------------------------------------------------


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default from settings).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default from settings, 8420).")
    ] = None,
) -> None:
    """Run the QFLARE HTTP server in the foreground until interrupted.

    Writes nothing to stdout, also with --json; the server logs to stderr.
    """
    cli = Cli.of(ctx)
    settings = cli.settings(host=host, port=port)
    try:
        from qflare.server.app import serve as run_server  # noqa: PLC0415 (heavy, optional)
    except ImportError as exc:
        cli.out.error("server_unavailable", f"the QFLARE server cannot be loaded: {exc}")
        raise typer.Exit(1) from None
    # Fail here, on one line, rather than in the server's startup with a traceback.
    master_key(settings)
    cli.out.note(
        f"Serving on {settings.host}:{settings.port} with {redact_url(settings.store_url)}"
    )
    run_server(settings)


@app.command()
def demo(
    ctx: typer.Context,
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices.")] = 10,
    rounds: Annotated[int, typer.Option(min=1, help="Federated-learning rounds.")] = 5,
    epoch_seconds: Annotated[
        int, typer.Option(min=1, help="Epoch length: short, so key ratcheting is visible.")
    ] = 3,
    postgres: Annotated[
        str | None,
        typer.Option(help="Run against this PostgreSQL URL instead of a temporary SQLite."),
    ] = None,
) -> None:
    """Run a self-contained demo: server, devices, handshakes, FL rounds, key rotation."""
    cli = Cli.of(ctx)
    try:
        from qflare.demo import run_demo  # noqa: PLC0415 (heavy, optional)
    except ImportError as exc:
        cli.out.error("demo_unavailable", f"the QFLARE demo cannot be loaded: {exc}")
        raise typer.Exit(1) from None
    raise typer.Exit(
        run_demo(
            devices=devices,
            rounds=rounds,
            epoch_seconds=epoch_seconds,
            postgres_url=postgres,
            json_output=cli.out.json,
        )
    )


def main() -> None:
    """Entry point of the ``qflare`` console script."""
    app()
