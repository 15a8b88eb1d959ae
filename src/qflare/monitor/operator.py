"""Security events for what an operator does outside the server: the ``qflare`` command.

The server stores its events through ``Service.event``; a command that quarantines a device or
rotates a key works on the store directly, and stores the same typed event here, naming the
operator as ``admin: "cli:<os user>"``. No detection rule runs on these (they are the
operator's own actions, and the command has no detector). A store that cannot take the event
does not undo the action already done: the caller is told, and warns.
"""

from __future__ import annotations

import getpass
import logging

from qflare.errors import QflareError
from qflare.keys.manager import utc
from qflare.monitor.events import EventType, SecurityEvent
from qflare.store import Store

log = logging.getLogger("qflare.monitor")


def operator_name() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:64]
    except (KeyError, OSError):  # no user name for this uid (a bare container)
        return "cli"


async def operator_event(
    store: Store,
    tenant: str,
    type: EventType,
    *,
    now: float,
    device_id: str | None = None,
    source: str | None = None,
    **detail: str,
) -> bool:
    """Store ``type`` as done by the operator; False (and a log line) if it could not."""
    ev = SecurityEvent(
        type=type,
        ts=now,
        tenant=tenant,
        device_id=device_id,
        source=source,
        detail={"admin": operator_name(), **detail},
    )
    try:
        await store.append_security_event(
            tenant,
            ts=utc(ev.ts),
            type=ev.type.value,
            severity=int(ev.level),
            device_id=device_id,
            source=source,
            detail=dict(ev.detail),
        )
    except QflareError:
        log.exception("could not store security event %s", type.value)
        return False
    return True


__all__ = ["operator_event", "operator_name"]
