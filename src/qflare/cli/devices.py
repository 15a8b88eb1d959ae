"""``qflare device ...`` and ``qflare session ...``: the device registry and live sessions."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from qflare.cli import views
from qflare.cli.context import Cli
from qflare.errors import NotFound
from qflare.keys import KeyManager
from qflare.monitor.events import EventType
from qflare.protocol.messages import SESSION_ID_SIZE
from qflare.store import Device, DeviceKey, DeviceState, SessionRecord

device_app = typer.Typer(
    help="Inspect enrolled devices and move them between states.", no_args_is_help=True
)
session_app = typer.Typer(help="Inspect and revoke protocol sessions.", no_args_is_help=True)

DeviceId = Annotated[str, typer.Argument(help="The device id, as the device enrolled it.")]
Reason = Annotated[
    str, typer.Option("--reason", "-r", help="Why; stored with the device state (200 chars).")
]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


async def _device(manager: KeyManager, device_id: str) -> Device:
    """The device, or a ``NotFound`` that names it (the id was checked, so it prints safely)."""
    try:
        return await manager.device(device_id)
    except NotFound:
        raise NotFound(f"device {device_id!r} not found in tenant {manager.tenant!r}") from None


@device_app.command("list")
def list_devices(
    ctx: typer.Context,
    state: Annotated[
        DeviceState | None, typer.Option("--state", "-s", help="Only devices in this state.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    after: Annotated[
        str | None, typer.Option(help="Start after this device id (the last one shown).")
    ] = None,
) -> None:
    """List devices, ordered by id; page on with --after."""
    cli = Cli.of(ctx)
    devices = cli.with_manager(
        lambda m: m.store.list_devices(m.tenant, state=state, after=after, limit=limit)
    )
    cli.out.emit(
        {"devices": [views.device(d) for d in devices]},
        lambda console: console.print(views.device_table(devices)),
    )


@device_app.command("show")
def show_device(ctx: typer.Context, device_id: DeviceId) -> None:
    """Show a device, its identity key versions (with fingerprints) and its sessions."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> tuple[Device, list[DeviceKey], list[SessionRecord]]:
        device = await _device(m, device_id)
        keys = await m.store.list_device_keys(m.tenant, device.device_id)
        return device, keys, await m.device_sessions(device.device_id)

    device, keys, sessions = cli.with_manager(work)

    def human(console: Console) -> None:
        console.print(views.device_fields(device))
        console.print(views.device_key_table(keys))
        console.print(views.session_table(sessions))

    cli.out.emit(
        {
            "device": views.device(device),
            "keys": [views.device_key(k) for k in keys],
            "sessions": [views.session(s) for s in sessions],
        },
        human,
    )


@device_app.command("quarantine")
def quarantine(ctx: typer.Context, device_id: DeviceId, reason: Reason) -> None:
    """Refuse the device's handshakes and revoke its live sessions (undo with reinstate)."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> Device:
        checked = (await _device(m, device_id)).device_id
        async with cli.audited(m, "device.quarantine", device_id=checked):
            device = await m.quarantine(device_id, reason=reason, now=cli.now())
        await cli.security_event(m, EventType.DEVICE_QUARANTINED, device.device_id, reason=reason)
        return device

    device = cli.with_manager(work)
    cli.out.emit(
        {"device": views.device(device)},
        lambda c: c.print(f"Device {device.device_id} quarantined.", markup=False),
    )


@device_app.command("reinstate")
def reinstate(
    ctx: typer.Context,
    device_id: DeviceId,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why.")] = "reinstated",
) -> None:
    """Let a quarantined device handshake again."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> Device:
        checked = (await _device(m, device_id)).device_id
        async with cli.audited(m, "device.reinstate", device_id=checked):
            device = await m.reinstate(device_id, reason=reason)
        await cli.security_event(m, EventType.DEVICE_REINSTATED, device.device_id, reason=reason)
        return device

    device = cli.with_manager(work)
    cli.out.emit(
        {"device": views.device(device)},
        lambda c: c.print(f"Device {device.device_id} reinstated (active).", markup=False),
    )


@device_app.command("revoke")
def revoke(ctx: typer.Context, device_id: DeviceId, reason: Reason, yes: Yes = False) -> None:
    """Revoke a device for good, with every session it holds. Asks first unless --yes."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> tuple[Device, int]:
        device = await _device(m, device_id)
        cli.confirm(
            f"Revoke device {device.device_id} ({device.state.value}) permanently? "
            "It can never be reinstated.",
            yes=yes,
        )
        async with cli.audited(m, "device.revoke", device_id=device.device_id) as intent:
            revoked = await m.revoke_device(device_id, reason=reason, now=cli.now())
            intent.result["sessions"] = revoked[1]
        await cli.security_event(
            m,
            EventType.DEVICE_REVOKED,
            device.device_id,
            reason=reason,
            sessions=str(revoked[1]),
        )
        return revoked

    device, sessions = cli.with_manager(work)
    cli.out.emit(
        {"device": views.device(device), "sessions_revoked": sessions},
        lambda c: c.print(
            f"Device {device.device_id} revoked; {sessions} session(s) revoked.", markup=False
        ),
    )


@session_app.command("list")
def list_sessions(ctx: typer.Context, device_id: DeviceId) -> None:
    """List a device's sessions, oldest first (ids, state, epoch, counters, expiry)."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> list[SessionRecord]:
        device = await _device(m, device_id)
        return await m.device_sessions(device.device_id)

    sessions = cli.with_manager(work)
    cli.out.emit(
        {"device_id": device_id, "sessions": [views.session(s) for s in sessions]},
        lambda c: c.print(views.session_table(sessions, f"Sessions of {device_id}")),
    )


def _check_session_id(value: str) -> str:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise typer.BadParameter("not a hex string") from None
    if len(raw) != SESSION_ID_SIZE:
        raise typer.BadParameter(
            f"a session id is {SESSION_ID_SIZE} bytes ({2 * SESSION_ID_SIZE} hex digits)"
        )
    return value


@session_app.command("revoke")
def revoke_session(
    ctx: typer.Context,
    session_id: Annotated[
        str,
        typer.Argument(
            help="The session id in hex, as `session list` shows it.",
            callback=_check_session_id,
        ),
    ],
) -> None:
    """Revoke one session at once; the device must handshake again."""
    cli = Cli.of(ctx)
    raw = bytes.fromhex(session_id)

    async def work(m: KeyManager) -> SessionRecord:
        try:
            await m.store.get_session(m.tenant, raw)  # an unknown id is not worth an entry
        except NotFound:
            raise NotFound(f"session {raw.hex()} not found in tenant {m.tenant!r}") from None
        async with cli.audited(m, "session.revoke", session_id=raw.hex()):
            record = await m.revoke_session(raw, now=cli.now())
        await cli.security_event(
            m, EventType.SESSION_REVOKED, record.device_id, session=raw.hex()[:16]
        )
        return record

    record = cli.with_manager(work)
    cli.out.emit(
        {"session": views.session(record)},
        lambda c: c.print(
            f"Session {record.session_id.hex()} of {record.device_id} is {record.state.value}.",
            markup=False,
        ),
    )
