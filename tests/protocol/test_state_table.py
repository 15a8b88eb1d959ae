"""The handshake state machines are the table in ``qflare/protocol/state.py`` (PROTOCOL.md 9).

Checked three ways: the table's own shape (reachability, no exits from terminal states); every
(role, state) reached through the real API; and random sequences of real method calls, where
any call the table does not allow must raise ``LocalProtocolError`` and leave the state alone,
an allowed call with good input must move to exactly the state the table names, and an allowed
call with bad input must fail into FAILED.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflare.errors import HandshakeFailed, LocalProtocolError
from qflare.protocol import ClientHandshake, ServerHandshake
from qflare.protocol.state import TRANSITIONS, Event, Role, State

from .support import NOW, World, never_seen

TERMINAL = {
    Role.DEVICE: {State.ESTABLISHED, State.FAILED},
    Role.SERVER: {State.SERVER_HELLO_SENT, State.ESTABLISHED, State.FAILED},
}

# Which public method fires which event.
CLIENT_METHODS = {
    "client_hello": Event.SEND_CLIENT_HELLO,
    "receive_server_hello": Event.RECV_SERVER_HELLO,
}
SERVER_METHODS = {
    "receive_client_hello": Event.RECV_CLIENT_HELLO,
    "authenticate": Event.AUTHENTICATE_DEVICE,
    "server_hello": Event.SEND_SERVER_HELLO,
    "receive_client_finish": Event.RECV_CLIENT_FINISH,
}


def states_of(role: Role) -> set[State]:
    return {state for r, state in TRANSITIONS if r is role}


# --- The table ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_every_state_in_the_table_is_reachable_from_start(role: Role) -> None:
    reached, queue = {State.START}, deque([State.START])
    while queue:
        for nxt in TRANSITIONS[(role, queue.popleft())].values():
            assert (role, nxt) in TRANSITIONS, f"{role} can move to {nxt}, which has no row"
            if nxt not in reached:
                reached.add(nxt)
                queue.append(nxt)
    # FAILED is entered by failing, not by an event: everything else by events.
    assert reached == states_of(role) - {State.FAILED}
    assert State.FAILED in states_of(role)


@pytest.mark.parametrize("role", list(Role))
def test_failed_and_terminal_states_have_no_exits(role: Role) -> None:
    no_exits = {state for state in states_of(role) if not TRANSITIONS[(role, state)]}
    assert no_exits == TERMINAL[role]
    assert not TRANSITIONS[(role, State.FAILED)]


def test_no_event_leads_back_to_start_or_into_failed() -> None:
    for exits in TRANSITIONS.values():
        assert State.START not in exits.values()
        assert State.FAILED not in exits.values()


def test_every_event_is_used_by_exactly_one_role() -> None:
    by_role = {
        role: {event for (r, _), exits in TRANSITIONS.items() if r is role for event in exits}
        for role in Role
    }
    assert by_role[Role.DEVICE] == set(CLIENT_METHODS.values())
    assert by_role[Role.SERVER] == set(SERVER_METHODS.values())
    assert set(Event) == by_role[Role.DEVICE] | by_role[Role.SERVER]


# --- The real objects -----------------------------------------------------------------------


@dataclass
class Inputs:
    """Valid messages made once: a ClientHello and a ClientFinish of dev-a."""

    client_hello: bytes
    client_finish: bytes


@pytest.fixture(scope="module")
def inputs(world_factory: Callable[[bytes], World]) -> Inputs:
    run = world_factory(b"state-table/inputs").run()
    return Inputs(run.client_hello, run.client_finish)


@dataclass
class Driver:
    """Calls a method on a client or server object with good or bad input."""

    world: World
    inputs: Inputs
    client: ClientHandshake
    server: ServerHandshake
    server_hello_for_client: bytes = b""
    log: list[str] = field(default_factory=list)

    def call(self, method: str, good: bool) -> None:
        w, c, s = self.world, self.client, self.server
        if method == "client_hello":
            hello = c.client_hello(now=NOW, rng=w.rng if good else (lambda n: b""))
            self.server_hello_for_client = w.answer(hello)
        elif method == "receive_server_hello":
            c.receive_server_hello(self.server_hello_for_client if good else b"\x01\x02")
        elif method == "receive_client_hello":
            s.receive_client_hello(self.inputs.client_hello if good else b"\x01\x01", now=NOW)
        elif method == "authenticate":
            s.authenticate(w.devices["dev-a" if good else "dev-b"].key)
        elif method == "server_hello":
            s.server_hello(rng=w.rng, seen_before=never_seen if good else (lambda *_: True))
        elif method == "receive_client_finish":
            data = self.inputs.client_finish if good else b"\x01\x03"
            s.receive_client_finish(data, now=NOW + 1)
        else:  # pragma: no cover
            raise AssertionError(method)

    def step(self, method: str, good: bool) -> None:
        """Call ``method`` and check the outcome against the table."""
        if method in CLIENT_METHODS:
            obj, role, event = self.client, Role.DEVICE, CLIENT_METHODS[method]
        else:
            obj, role, event = self.server, Role.SERVER, SERVER_METHODS[method]
        before = State(obj.state)
        exits = TRANSITIONS[(role, before)]
        self.log.append(f"{role.value}.{method}({'good' if good else 'bad'}) in {before.value}")
        if event not in exits:
            with pytest.raises(LocalProtocolError):
                self.call(method, good)
            assert State(obj.state) is before, self.log
        elif good:
            self.call(method, good)
            assert State(obj.state) is exits[event], self.log
        else:
            with pytest.raises(HandshakeFailed):
                self.call(method, good)
            assert State(obj.state) is State.FAILED, self.log


def _driver(world: World, inputs: Inputs) -> Driver:
    return Driver(world, inputs, world.client(), world.server())


# Paths through the real API to every (role, state), including FAILED.
PATHS: dict[tuple[Role, State], list[tuple[str, bool]]] = {
    (Role.DEVICE, State.START): [],
    (Role.DEVICE, State.WAIT_SERVER_HELLO): [("client_hello", True)],
    (Role.DEVICE, State.ESTABLISHED): [("client_hello", True), ("receive_server_hello", True)],
    (Role.DEVICE, State.FAILED): [("client_hello", True), ("receive_server_hello", False)],
    (Role.SERVER, State.START): [],
    (Role.SERVER, State.HELLO_RECEIVED): [("receive_client_hello", True)],
    (Role.SERVER, State.AUTHENTICATED): [
        ("receive_client_hello", True),
        ("authenticate", True),
    ],
    (Role.SERVER, State.SERVER_HELLO_SENT): [
        ("receive_client_hello", True),
        ("authenticate", True),
        ("server_hello", True),
    ],
    (Role.SERVER, State.ESTABLISHED): [("receive_client_finish", True)],
    (Role.SERVER, State.FAILED): [("receive_client_hello", True), ("authenticate", False)],
}


def test_paths_cover_the_whole_table() -> None:
    assert set(PATHS) == set(TRANSITIONS)


@pytest.mark.parametrize(
    ("role", "state"), list(PATHS), ids=[f"{r.value}-{s.value}" for r, s in PATHS]
)
def test_every_state_is_reached_through_the_api_and_refuses_the_rest(
    world: World, inputs: Inputs, role: Role, state: State
) -> None:
    driver = _driver(world, inputs)
    for method, good in PATHS[(role, state)]:
        driver.step(method, good)
    obj = driver.client if role is Role.DEVICE else driver.server
    assert obj.state == state.value
    methods = CLIENT_METHODS if role is Role.DEVICE else SERVER_METHODS
    for method, event in methods.items():
        if event in TRANSITIONS[(role, state)]:
            continue
        with pytest.raises(LocalProtocolError):
            driver.call(method, True)  # even with perfectly good input
        assert obj.state == state.value


actions = st.lists(
    st.tuples(st.sampled_from([*CLIENT_METHODS, *SERVER_METHODS]), st.booleans()),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(actions)
def test_random_call_sequences_follow_the_table(
    world_factory: Callable[[bytes], World], inputs: Inputs, sequence: list[tuple[str, bool]]
) -> None:
    driver = _driver(world_factory(b"state-table/random"), inputs)
    for method, good in sequence:
        driver.step(method, good)
