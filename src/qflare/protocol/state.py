"""Handshake state machines as tables (docs/PROTOCOL.md section 9).

``TRANSITIONS[(role, state)][event] -> next state``. An event missing from the table is an
illegal move and raises ``LocalProtocolError``; any failure moves the machine to FAILED, which
has no way out, so a failed handshake object can never be reused.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from qflare.errors import LocalProtocolError


class Role(Enum):
    DEVICE = "device"
    SERVER = "server"


class State(Enum):
    START = "start"
    WAIT_SERVER_HELLO = "wait-server-hello"
    HELLO_RECEIVED = "hello-received"
    AUTHENTICATED = "authenticated"
    SERVER_HELLO_SENT = "server-hello-sent"
    ESTABLISHED = "established"
    FAILED = "failed"


class Event(Enum):
    SEND_CLIENT_HELLO = "send-client-hello"
    RECV_SERVER_HELLO = "recv-server-hello"
    RECV_CLIENT_HELLO = "recv-client-hello"
    AUTHENTICATE_DEVICE = "authenticate-device"
    SEND_SERVER_HELLO = "send-server-hello"
    RECV_CLIENT_FINISH = "recv-client-finish"


TRANSITIONS: Final[dict[tuple[Role, State], dict[Event, State]]] = {
    (Role.DEVICE, State.START): {Event.SEND_CLIENT_HELLO: State.WAIT_SERVER_HELLO},
    (Role.DEVICE, State.WAIT_SERVER_HELLO): {Event.RECV_SERVER_HELLO: State.ESTABLISHED},
    (Role.DEVICE, State.ESTABLISHED): {},
    (Role.DEVICE, State.FAILED): {},
    # A server handshake object handles one message exchange. The hello path and the finish
    # path are separate because the biscuit carries the state between them.
    (Role.SERVER, State.START): {
        Event.RECV_CLIENT_HELLO: State.HELLO_RECEIVED,
        Event.RECV_CLIENT_FINISH: State.ESTABLISHED,
    },
    (Role.SERVER, State.HELLO_RECEIVED): {Event.AUTHENTICATE_DEVICE: State.AUTHENTICATED},
    (Role.SERVER, State.AUTHENTICATED): {Event.SEND_SERVER_HELLO: State.SERVER_HELLO_SENT},
    (Role.SERVER, State.SERVER_HELLO_SENT): {},
    (Role.SERVER, State.ESTABLISHED): {},
    (Role.SERVER, State.FAILED): {},
}


# The same table split by role, so that a move is one lookup by state.
_ROWS: Final[dict[Role, dict[State, dict[Event, State]]]] = {
    role: {state: exits for (r, state), exits in TRANSITIONS.items() if r is role} for role in Role
}


class StateMachine:
    __slots__ = ("_rows", "role", "state")

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.START
        self._rows = _ROWS[role]

    def _illegal(self, event: Event) -> LocalProtocolError:
        return LocalProtocolError(
            f"{event.value} is not allowed for a {self.role.value} in state {self.state.value}"
        )

    def expect(self, event: Event) -> None:
        """Raise unless ``event`` is legal now, without moving."""
        if event not in self._rows[self.state]:
            raise self._illegal(event)

    def fire(self, event: Event) -> None:
        nxt = self._rows[self.state].get(event)
        if nxt is None:
            raise self._illegal(event)
        self.state = nxt

    def fail(self) -> None:
        self.state = State.FAILED
