"""Session state at rest: everything ``Session.restore`` needs, sealed to its session row.

The sealed blob is the authority. It holds the epoch chain (secret), the send position, the
counters and the replay windows, so an attacker who can write the database but not read the
master key cannot roll a session's replay window or counters back: the columns beside it
(``epoch``, ``replay_window``, the counters) are copies for operators and for queries, and a
copy that disagrees with the blob is refused as tampering.

Plaintext layout (inside ``Envelope``, bound to ``sessions/<session id>/state``)::

    u8 version=1 | u16 suite | u8 role | u64 established_at | u32 epoch_seconds
    | u64 send_epoch+1 | u64 send_sequence | u64 x4 counters
    | opaque32 chain | opaque32 replay
"""

from __future__ import annotations

from qflare.errors import DecodeError, KeyManagementError
from qflare.keys.envelope import Binding, Envelope
from qflare.protocol.codec import Reader, Writer
from qflare.protocol.record import Counters, Direction, SessionState
from qflare.store.models import SessionCounters, SessionRecord

_VERSION = 1
_MAX_PART = 1 << 20


class SessionStateTampered(KeyManagementError):
    """A stored session whose columns disagree with its sealed state, or that does not open."""


def binding(session_id: bytes) -> Binding:
    return Binding("sessions", session_id.hex(), "state")


def seal_state(envelope: Envelope, state: SessionState) -> bytes:
    c = state.counters
    plain = (
        Writer()
        .u8(_VERSION)
        .u16(state.suite)
        .u8(int(state.role))
        .u64(state.established_at)
        .u32(state.epoch_seconds)
        .u64(state.send_epoch + 1)
        .u64(state.send_sequence)
        .u64(c.messages_sent)
        .u64(c.messages_received)
        .u64(c.bytes_sent)
        .u64(c.bytes_received)
        .opaque32(state.chain)
        .opaque32(state.replay)
        .getvalue()
    )
    return envelope.seal(plain, binding(state.session_id))


def counters_of(state: SessionState) -> SessionCounters:
    c = state.counters
    return SessionCounters(
        messages_sent=c.messages_sent,
        messages_received=c.messages_received,
        bytes_sent=c.bytes_sent,
        bytes_received=c.bytes_received,
    )


def open_state(envelope: Envelope, record: SessionRecord) -> SessionState:
    """Open the sealed state of ``record``; ``SessionStateTampered`` if anything disagrees."""
    try:
        plain = envelope.open(record.encrypted_chain_state, binding(record.session_id))
    except KeyManagementError:
        raise
    except Exception as exc:  # DecryptionFailed: swapped, edited or truncated
        raise SessionStateTampered("stored session state does not open") from exc
    try:
        r = Reader(plain)
        if r.u8() != _VERSION:
            raise DecodeError("unknown session state version")
        suite, role = r.u16(), Direction(r.u8())
        established_at, epoch_seconds = r.u64(), r.u32()
        send_epoch, send_sequence = r.u64() - 1, r.u64()
        counters = Counters(
            messages_sent=r.u64(),
            messages_received=r.u64(),
            bytes_sent=r.u64(),
            bytes_received=r.u64(),
        )
        chain = r.opaque32(max_len=_MAX_PART)
        replay = r.opaque32(max_len=_MAX_PART)
        r.done()
    except (DecodeError, ValueError) as exc:
        raise SessionStateTampered("stored session state is malformed") from exc
    if replay != record.replay_window or suite != record.suite:
        raise SessionStateTampered("session columns disagree with the sealed state")
    return SessionState(
        session_id=record.session_id,
        suite=suite,
        role=role,
        established_at=established_at,
        epoch_seconds=epoch_seconds,
        chain=chain,
        replay=replay,
        send_epoch=send_epoch,
        send_sequence=send_sequence,
        counters=counters,
    )
