"""QFLARE's protocol core, sans-I/O: codec, handshake state machines, epoch keys, records.

No sockets, HTTP, SQL, clock reads or implicit randomness: time and an ``Rng`` are arguments,
and storage answers through callbacks. Specification: ``docs/PROTOCOL.md``.
"""

from __future__ import annotations

from qflare.protocol.biscuit import BiscuitKeys
from qflare.protocol.handshake import (
    ClientHandshake,
    DeviceKey,
    Established,
    NonceCheck,
    PinnedServerKey,
    ServerHandshake,
    ServerPolicy,
    ServerStaticKey,
)
from qflare.protocol.keyschedule import EpochKeySchedule, epoch_of
from qflare.protocol.messages import ClientFinish, ClientHello, MessageType, ServerHello
from qflare.protocol.record import (
    PURPOSES,
    Counters,
    Direction,
    Record,
    RekeyPolicy,
    Session,
    SessionState,
)
from qflare.protocol.replay import EpochReplayWindows, ReplayWindow
from qflare.protocol.suites import ALL_SUITES, DEFAULT_SUITE, Suite

__all__ = [
    "ALL_SUITES",
    "DEFAULT_SUITE",
    "PURPOSES",
    "BiscuitKeys",
    "ClientFinish",
    "ClientHandshake",
    "ClientHello",
    "Counters",
    "DeviceKey",
    "Direction",
    "EpochKeySchedule",
    "EpochReplayWindows",
    "Established",
    "MessageType",
    "NonceCheck",
    "PinnedServerKey",
    "Record",
    "RekeyPolicy",
    "ReplayWindow",
    "ServerHandshake",
    "ServerHello",
    "ServerPolicy",
    "ServerStaticKey",
    "Session",
    "SessionState",
    "Suite",
    "epoch_of",
]
