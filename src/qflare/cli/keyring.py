"""``qflare keys ...``, ``qflare token ...`` and ``qflare admin-token ...``.

The two commands that print a secret are ``token issue`` and ``admin-token create``: each
prints a token it has just made, once. Only its hash is stored, so it cannot be shown again.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from qflare.cli import views
from qflare.cli.context import Cli
from qflare.errors import NotFound
from qflare.keys import IssuedToken, KeyManager
from qflare.monitor.events import EventType
from qflare.runtime import ADMIN_SCOPES, check_admin_scopes, issue_admin_token
from qflare.store import AdminToken, KeyPurpose, KeyState, Rotation, ServerKey, Store
from qflare.store import validate as v
from qflare.store.models import JsonValue

keys_app = typer.Typer(
    help="The server key ring: list, rotate, retire, revoke.", no_args_is_help=True
)
token_app = typer.Typer(help="Enrollment tokens for new devices.", no_args_is_help=True)
admin_token_app = typer.Typer(help="Tokens for the admin HTTP API.", no_args_is_help=True)

_SHOWN_ONCE = "the token is shown only this once: only its hash is stored"


# -- keys -------------------------------------------------------------------------------------


@keys_app.command("list")
def list_keys(ctx: typer.Context) -> None:
    """List the server key ring: id, purpose, algorithm, version, state, created, retire_after."""
    cli = Cli.of(ctx)
    keys = cli.with_manager(lambda m: m.server_keys())
    cli.out.emit(
        {"keys": [views.server_key(k) for k in keys]},
        lambda c: c.print(views.server_key_table(keys)),
    )


@keys_app.command("rotate")
def rotate(
    ctx: typer.Context,
    purpose: Annotated[
        KeyPurpose, typer.Option("--purpose", "-p", help="Which key to rotate.")
    ] = KeyPurpose.KEM_STATIC,
    overlap: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Seconds the previous key stays usable (default: the configured overlap).",
        ),
    ] = None,
) -> None:
    """Make a new active key; the previous one keeps working for the overlap, then retires."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> Rotation:
        async with cli.audited(m, "key.rotate", purpose=purpose.value) as intent:
            rotation = await m.rotate_server_key(purpose, now=cli.now(), overlap=overlap)
            intent.result["key_id"] = rotation.active.key_id
        await cli.security_event(
            m,
            EventType.KEY_ROTATED,
            None,
            key_id=rotation.active.key_id,
            purpose=purpose.value,
        )
        return rotation

    rotation: Rotation = cli.with_manager(work)
    previous = rotation.previous

    def human(console: Console) -> None:
        new = rotation.active
        console.print(
            f"New active {new.purpose.value} key {new.key_id} ({new.algorithm}, v{new.version}).",
            markup=False,
        )
        if previous is not None:
            console.print(
                f"Previous key {previous.key_id} is {previous.state.value} "
                f"until {views.when(previous.retire_after)}.",
                markup=False,
            )

    cli.out.emit(
        {
            "active": views.server_key(rotation.active),
            "previous": None if previous is None else views.server_key(previous),
        },
        human,
    )


@keys_app.command("retire-due")
def retire_due(ctx: typer.Context) -> None:
    """Retire every retiring key whose overlap has passed (what the server does periodically)."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> list[ServerKey]:
        now = cli.now()
        due = await m.due_keys(now=now)
        if not due:
            return []
        due_ids: list[JsonValue] = [key.key_id for key in due]
        async with cli.audited(m, "key.retire", key_ids=due_ids) as intent:
            retired = await m.retire_due_keys(now=now, due=due)
            intent.result["retired"] = [key.key_id for key in retired]
        for key in retired:
            await cli.security_event(m, EventType.KEY_RETIRED, None, key_id=key.key_id)
        return retired

    retired = cli.with_manager(work)

    def human(console: Console) -> None:
        if retired:
            console.print(views.server_key_table(retired, "Retired now"))
        else:
            console.print("No key was due for retirement.")

    cli.out.emit({"retired": [views.server_key(k) for k in retired]}, human)


@keys_app.command("revoke")
def revoke_key(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key id, as `keys list` shows it.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop using a server key at once (final). Rotate first if it is the active key."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> tuple[ServerKey, bool]:
        try:
            key = await m.store.get_server_key(m.tenant, key_id)
        except NotFound:
            raise NotFound(f"server key {key_id!r} not found in tenant {m.tenant!r}") from None
        if key.state is KeyState.REVOKED:
            return key, False
        warning = (
            f" It is the ACTIVE {key.purpose.value} key: the purpose has no key until the "
            "next rotation."
            if key.state is KeyState.ACTIVE
            else ""
        )
        cli.confirm(f"Revoke {key.purpose.value} key {key.key_id} permanently?{warning}", yes=yes)
        async with cli.audited(m, "key.revoke", key_id=key.key_id, purpose=key.purpose.value):
            revoked = await m.revoke_server_key(key.key_id)
        await cli.security_event(
            m, EventType.KEY_REVOKED, None, key_id=key.key_id, purpose=key.purpose.value
        )
        return revoked, True

    key, changed = cli.with_manager(work)
    cli.out.emit(
        {"key": views.server_key(key), "changed": changed},
        lambda c: c.print(
            f"Key {key.key_id} {'revoked' if changed else 'was already revoked'}.", markup=False
        ),
    )


# -- enrollment tokens ------------------------------------------------------------------------


@token_app.command("issue")
def issue(
    ctx: typer.Context,
    ttl: Annotated[
        int | None,
        typer.Option(min=1, max=365 * 86400, help="Lifetime in seconds (default one day)."),
    ] = None,
    count: Annotated[int, typer.Option(min=1, max=1000, help="How many tokens.")] = 1,
) -> None:
    """Issue single-use enrollment tokens; each is printed once, with its expiry."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> list[IssuedToken]:
        now = cli.now()
        issued = []
        for _ in range(count):  # one intent and outcome per token, as the server's route
            async with cli.audited(m, "token.issue") as intent:
                issued.append(await m.issue_token(now=now, ttl=ttl))
                intent.result["token_id"] = issued[-1].token_id
        for t in issued:
            await cli.security_event(
                m, EventType.ADMIN_ACTION, None, action="token.issue", token_id=t.token_id
            )
        return issued

    tokens = cli.with_manager(work)

    def human(console: Console) -> None:
        for t in tokens:
            line = Text(t.token, style="bold")
            line.append(f"  ({t.token_id}, expires {views.when(t.expires_at)})", style="dim")
            console.print(line, soft_wrap=True)

    cli.out.warn(_SHOWN_ONCE)
    cli.out.emit(
        {
            "tokens": [
                {"token_id": t.token_id, "token": t.token, "expires_at": t.expires_at}
                for t in tokens
            ],
            "shown_once": True,
        },
        human,
    )


# -- admin API tokens -------------------------------------------------------------------------


@admin_token_app.command("create")
def create_admin_token(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", "-n", help="Who or what will hold it.")],
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            "-s",
            help=f"Repeat for each scope: {', '.join(ADMIN_SCOPES)}.",
        ),
    ],
) -> None:
    """Create an admin API token with the given scopes; the token is printed once."""
    cli = Cli.of(ctx)

    async def work(m: KeyManager) -> tuple[str, AdminToken]:
        # Checked before the intent, so junk never reaches the append-only log.
        check_admin_scopes(tuple(scope))
        checked = v.text(name, "name")
        scopes: list[JsonValue] = [*sorted(set(scope))]
        async with cli.audited(m, "admin-token.create", name=checked, scopes=scopes):
            made = await issue_admin_token(m, name=name, scopes=tuple(scope), now=cli.now())
        await cli.security_event(
            m,
            EventType.ADMIN_ACTION,
            None,
            action="admin-token.create",
            name=made[1].name,
            scopes=" ".join(made[1].scopes),
        )
        return made

    token, record = cli.with_manager(work)

    def human(console: Console) -> None:
        console.print(Text(token, style="bold"), soft_wrap=True)
        console.print(
            f"name {record.name}, scopes {' '.join(record.scopes)}", markup=False, style="dim"
        )

    cli.out.warn(_SHOWN_ONCE)
    cli.out.emit(
        {"token": token, "admin_token": views.admin_token(record), "shown_once": True}, human
    )


@admin_token_app.command("list")
def list_admin_tokens(ctx: typer.Context) -> None:
    """List admin API tokens: name, scopes, created, revoked (never the token)."""
    cli = Cli.of(ctx)

    async def work(store: Store) -> list[AdminToken]:
        return await store.list_admin_tokens()

    tokens = cli.with_store(work)
    cli.out.emit(
        {"admin_tokens": [views.admin_token(t) for t in tokens]},
        lambda c: c.print(views.admin_token_table(tokens)),
    )
