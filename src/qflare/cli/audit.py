"""``qflare audit ...``: verify the Merkle audit log, issue a signed checkpoint (docs/AUDIT.md).

``verify`` exits 1 when the log is not the log that was written, and names the first bad index.
It trusts the audit keys of the database's key ring unless ``--trusted-key`` pins them: someone
who can write the database can also add a key of their own, so a verification that must hold
against that person pins the key, and passes checkpoints kept outside the database with
``--checkpoint``.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from qflare.cli.context import Cli
from qflare.errors import QflareError
from qflare.keys import KeyManager
from qflare.keys.manager import utc
from qflare.monitor.audit import AuditLog, VerifyReport, verify_log
from qflare.monitor.checkpoint import Checkpoint, NoteVerifier, key_id
from qflare.monitor.events import EventType, Severity
from qflare.store import KeyPurpose, Store

audit_app = typer.Typer(
    help="The Merkle audit log: verify it, sign a checkpoint.", no_args_is_help=True
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pinned(values: list[str], origin: str) -> list[NoteVerifier]:
    keys = []
    for value in values:
        text = Path(value[1:]).read_text().strip() if value.startswith("@") else value
        try:
            keys.append(NoteVerifier(origin, base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise ValueError(f"--trusted-key {value[:20]}... is not base64") from None
    return keys


def _report_document(report: VerifyReport) -> dict[str, object]:
    return {
        "ok": report.ok,
        "size": report.size,
        "root": _b64(report.root),
        "checkpoints_verified": report.checkpoints_verified,
        "checkpoints_skipped": report.checkpoints_skipped,
        "first_bad_index": report.first_bad_index,
        "first_bad_range": list(report.first_bad_range) if report.first_bad_range else None,
        "problems": [
            {"index": p.index, "last": p.last, "reason": p.reason} for p in report.problems
        ],
        "checkpoint_errors": list(report.checkpoint_errors),
    }


def _where(report: VerifyReport) -> str:
    if report.first_bad_range is not None:
        low, high = report.first_bad_range
        return f"the first bad index is between {low} and {high}"
    if report.first_bad_index is not None:
        return f"the first bad index is {report.first_bad_index}"
    return "a stored checkpoint does not verify"


@audit_app.command("verify")
def verify(
    ctx: typer.Context,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(
            "--checkpoint",
            "-c",
            help="A checkpoint note kept outside the database (repeatable).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    trusted_key: Annotated[
        list[str] | None,
        typer.Option(
            "--trusted-key",
            "-k",
            help="Pin an ML-DSA-87 audit public key: base64, or @FILE (repeatable). "
            "Default: the non-revoked audit keys of the database's key ring.",
        ),
    ] = None,
) -> None:
    """Recompute every leaf, link and tree head and check every signed checkpoint.

    Exits 1 if any entry was edited, deleted, inserted or moved, or a checkpoint does not
    verify, and names the first bad index.
    """
    cli = Cli.of(ctx)
    settings = cli.settings()
    origin = settings.audit_origin
    notes = [p.read_text() for p in checkpoint or []]
    pinned = _pinned(trusted_key or [], origin)

    async def work(store: Store) -> VerifyReport:
        log = AuditLog(store, tenant=settings.tenant, origin=origin)
        trusted, revoked = await log.verifiers()
        report = await verify_log(
            store,
            pinned or trusted,
            tenant=settings.tenant,
            origin=origin,
            revoked=[] if pinned else revoked,
            checkpoints=notes,
        )
        if not report.ok:
            try:
                await store.append_security_event(
                    settings.tenant,
                    ts=utc(cli.now()),
                    type=EventType.AUDIT_VERIFICATION_FAILED.value,
                    severity=int(Severity.CRITICAL),
                    detail={"index": str(report.first_bad_index), "by": "qflare audit verify"},
                )
            except QflareError:
                cli.out.warn("could not store the audit.verification_failed event")
        return report

    report = cli.with_store(work)

    def human(console: Console) -> None:
        console.print(f"Entries          {report.size}")
        console.print(f"Tree head        {_b64(report.root)}")
        console.print(
            f"Checkpoints      {report.checkpoints_verified} verified"
            + (
                f", {report.checkpoints_skipped} skipped (revoked key)"
                if report.checkpoints_skipped
                else ""
            )
        )
        if report.checkpoints_verified == 0:
            cli.out.warn("no signed checkpoint: nothing binds the log to what was written")
        for problem in report.problems:
            console.print(Text(f"bad {problem}", style="red"), markup=False)
        for error in report.checkpoint_errors:
            console.print(Text(error, style="red"), markup=False)
        if report.ok:
            console.print(Text("The audit log verifies.", style="green"))

    document = _report_document(report)
    if report.ok:
        cli.out.emit(document, human)
        return
    message = f"audit log verification failed: {_where(report)}"
    if cli.out.json:  # one JSON document on stdout, failure included
        cli.out.emit({**document, "error": "audit_verification_failed", "message": message}, human)
        cli.out.err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    else:
        cli.out.emit(document, human)
        cli.out.error("audit_verification_failed", message)
    raise typer.Exit(1)


@audit_app.command("checkpoint")
def issue_checkpoint(ctx: typer.Context) -> None:
    """Sign a checkpoint of the log as it is now (ML-DSA-87) and print the note.

    The note is also stored; keep a copy elsewhere to check the log against later
    (``qflare audit verify --checkpoint FILE``).
    """
    cli = Cli.of(ctx)

    async def work(manager: KeyManager) -> Checkpoint:
        return await cli.audit_log(manager).checkpoint()

    signed = cli.with_manager(work)
    cli.out.emit(
        {
            "origin": signed.origin,
            "size": signed.size,
            "root": _b64(signed.root),
            "note": signed.note,
        },
        lambda c: typer.echo(signed.note, nl=False),
    )


@audit_app.command("key")
def show_keys(ctx: typer.Context) -> None:
    """Print the audit public keys (base64) to pin in devices and in ``verify --trusted-key``.

    Take it while the database is trusted: from then on it is what checkpoints are checked
    against, whatever the database later says.
    """
    cli = Cli.of(ctx)
    origin = cli.settings().audit_origin

    async def work(store: Store) -> list[dict[str, object]]:
        log = AuditLog(store, tenant=cli.settings().tenant, origin=origin)
        rows = await store.list_server_keys(log.tenant, purpose=KeyPurpose.AUDIT_SIGNING)
        return [
            {
                "key_id": row.key_id,
                "state": row.state.value,
                "note_key_id": key_id(origin, row.public_key).hex(),
                "public_key": _b64(row.public_key),
            }
            for row in rows
        ]

    keys = cli.with_store(work)

    def human(console: Console) -> None:
        for key in keys:
            console.print(
                f"{key['key_id']} ({key['state']}, note key ID {key['note_key_id']})",
                markup=False,
            )
            typer.echo(str(key["public_key"]))

    cli.out.emit({"origin": origin, "algorithm": "ML-DSA-87", "keys": keys}, human)
