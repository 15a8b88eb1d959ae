"""Record protection for an established session (docs/PROTOCOL.md section 8).

A record is ``header || AEAD(key, nonce, plaintext, aad=header)`` with the 35-byte header::

    u8 version | u8 purpose | 16 session id | u64 epoch | u8 direction | u64 sequence

The key and IV come from the epoch schedule for (purpose, direction, epoch); the nonce is the
IV XOR the sequence number, so a nonce never repeats under one key. The sequence restarts at
zero in each epoch because each epoch has its own keys.

Large records are built and opened without copying their body (docs/PERFORMANCE.md): from
``IN_PLACE_MIN`` bytes of plaintext up, ``seal`` writes the header and the AEAD output straight
into the one buffer that becomes the returned ``bytes``, and ``open`` always hands the AEAD a
``memoryview`` of the record's body rather than a slice copy. The bytes on the wire, the AAD,
the nonces and every check are the same on both paths.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Final

from qflare import crypto
from qflare.errors import (
    DecodeError,
    EpochExpired,
    LocalProtocolError,
    RekeyRequired,
    RemoteProtocolError,
)
from qflare.protocol.codec import PROTOCOL_VERSION
from qflare.protocol.keyschedule import EpochKeySchedule, epoch_of
from qflare.protocol.messages import SESSION_ID_SIZE
from qflare.protocol.replay import EpochReplayWindows
from qflare.protocol.suites import Suite, by_id

HEADER_SIZE: Final = 35
# The header's fields in order, big-endian, no padding: the codec's u8, u8, fixed(16), u64, u8,
# u64, in one call (it is on every record's path).
_HEADER: Final = struct.Struct(f">BB{SESSION_ID_SIZE}sQBQ")
MAX_RECORD_PLAINTEXT: Final = 64 * 1024 * 1024
MAX_SEQUENCE: Final = 2**64 - 1  # the header's u64
# Plaintexts from this size up are sealed in place (``_seal_in_place``). Below it,
# ``header + seal(...)`` is quicker: the in-place path's fixed cost (~1.5 µs) is more than
# copying a small record; measured, the two cost the same at about 64 KiB.
IN_PLACE_MIN: Final = 64 * 1024

# Anything with the buffer protocol over bytes: a record or a plaintext need not be ``bytes``.
BytesLike = bytes | bytearray | memoryview


def _seal_in_place(
    key: crypto.AeadKey, nonce: bytes, plaintext: BytesLike, header: bytes, tag_size: int
) -> bytes:
    """``header + key.seal(nonce, plaintext, header)``, with the body written once.

    The concatenation writes a large record twice (the AEAD's result, then the copy behind the
    header), into two fresh buffers that glibc may hand back to the kernel and fault in again
    page by page on every call. Here the record's one buffer is a ``BytesIO``'s: sized exactly,
    the header written, the AEAD output written into a view of the rest (``seal_into``), the
    views released (while one is alive ``getvalue()`` copies), and ``getvalue()`` returns that
    same buffer as the ``bytes`` (CPython gives a ``BytesIO`` buffer away without a copy when
    nothing else refers to it; elsewhere it is one copy, still correct). Callers get plain
    ``bytes``, as the HTTP client and server they hand records to want.
    """
    out = io.BytesIO()
    out.seek(HEADER_SIZE + len(plaintext) + tag_size - 1)
    out.write(b"\0")  # the buffer at its final size, in one allocation
    out.seek(0)
    out.write(header)
    with out.getbuffer() as view, view[HEADER_SIZE:] as body:
        key.seal_into(nonce, plaintext, header, body)
    return out.getvalue()


class Direction(IntEnum):
    DEVICE_TO_SERVER = 0
    SERVER_TO_DEVICE = 1


# Wire ids of the record purposes. A purpose also selects the key: an "fl-update" key never
# decrypts an "encryption" record, even inside one session and epoch.
PURPOSES: Final = {"encryption": 1, "fl-update": 2, "control": 3}
_PURPOSE_NAMES: Final = {v: k for k, v in PURPOSES.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class RekeyPolicy:
    """When a session must be replaced by a fresh KEM exchange (post-compromise security).

    The message bound keeps each per-epoch AES-GCM key far below the 2^32 invocations of
    NIST SP 800-38D; the byte bound keeps the total under 2^36 bytes.
    """

    max_age_seconds: int = 3600
    max_messages: int = 1 << 24
    max_bytes: int = 1 << 36
    # needs_rekey() turns true at this fraction of any limit, before hard failures start.
    soft_fraction: float = 0.8


@dataclass(frozen=True, slots=True)
class Record:
    purpose: str
    epoch: int
    sequence: int
    plaintext: bytes = field(repr=False)


@dataclass(slots=True, kw_only=True)
class Counters:
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionState:
    """Everything needed to restore a session after a restart. ``chain`` is secret."""

    session_id: bytes
    suite: int
    role: Direction
    established_at: int
    epoch_seconds: int
    chain: bytes = field(repr=False)
    replay: bytes
    send_epoch: int
    send_sequence: int
    counters: Counters


class Session:
    """The record layer of one side of one session. Not thread-safe: one owner at a time."""

    def __init__(
        self,
        *,
        session_id: bytes,
        suite: Suite,
        role: Direction,
        schedule: EpochKeySchedule,
        established_at: int,
        epoch_seconds: int,
        policy: RekeyPolicy | None = None,
        replay: EpochReplayWindows | None = None,
        send_epoch: int = -1,
        send_sequence: int = 0,
        counters: Counters | None = None,
    ) -> None:
        self.session_id = session_id
        self.suite = suite
        self.role = role  # the direction this side sends in
        self.schedule = schedule
        self.established_at = established_at
        self.epoch_seconds = epoch_seconds
        self.policy = policy or RekeyPolicy()
        self.counters = counters or Counters()
        self._replay = replay or EpochReplayWindows()
        self._send_epoch = send_epoch
        self._send_seq = send_sequence
        self._aead = crypto.aead(suite.aead)
        self._keys: dict[tuple[int, int, int], tuple[crypto.AeadKey, int]] = {}

    @property
    def peer_direction(self) -> Direction:
        return Direction(1 - self.role)

    def epoch(self, now: float) -> int:
        return epoch_of(now, self.epoch_seconds)

    def _tick(self, now: float) -> int:
        """Advance the schedule to the clock's epoch; return the epoch to send in."""
        epoch = self.epoch(now)
        if epoch > self.schedule.newest:
            self._advance(epoch)
        return self.schedule.newest

    def _advance(self, epoch: int) -> None:
        """Ratchet the schedule to ``epoch`` and drop everything of the epochs it erased: their
        replay windows and their cached AEAD keys, not only their chain keys."""
        self.schedule.advance_to(epoch)
        oldest = self.schedule.oldest
        self._replay.forget_before(oldest)
        self._keys = {k: v for k, v in self._keys.items() if k[0] >= oldest}

    def _key(self, epoch: int, purpose_id: int, direction: int) -> tuple[crypto.AeadKey, int]:
        cached = self._keys.get((epoch, purpose_id, direction))
        if cached is None:
            purpose = _PURPOSE_NAMES[purpose_id]
            key = self.schedule.derive(purpose, direction, epoch)
            iv = self.schedule.derive_iv(purpose, direction, epoch)
            cached = (self._aead.key(key), int.from_bytes(iv, "big"))
            if epoch <= self.schedule.newest:  # never cache a key for an unconfirmed epoch
                self._keys[(epoch, purpose_id, direction)] = cached
        return cached

    def _check_limits(self, now: float, extra_bytes: int = 0) -> None:
        c, p = self.counters, self.policy
        if now - self.established_at > p.max_age_seconds:
            raise RekeyRequired("session exceeded its maximum age")
        if max(c.messages_sent, c.messages_received) >= p.max_messages:
            raise RekeyRequired("session exceeded its message limit")
        if max(c.bytes_sent, c.bytes_received) + extra_bytes > p.max_bytes:
            raise RekeyRequired("session exceeded its byte limit")

    def needs_rekey(self, now: float) -> bool:
        c, p, f = self.counters, self.policy, self.policy.soft_fraction
        return (
            now - self.established_at >= p.max_age_seconds * f
            or max(c.messages_sent, c.messages_received) >= p.max_messages * f
            or max(c.bytes_sent, c.bytes_received) >= p.max_bytes * f
        )

    def _header(self, purpose_id: int, epoch: int, direction: int, seq: int) -> bytes:
        # struct's "16s" would pad or cut a session id of another length: refuse it, as the
        # codec's fixed() does. The integers are in range by then (struct.error otherwise).
        if len(self.session_id) != SESSION_ID_SIZE:
            raise ValueError(f"field must be {SESSION_ID_SIZE} bytes, got {len(self.session_id)}")
        return _HEADER.pack(PROTOCOL_VERSION, purpose_id, self.session_id, epoch, direction, seq)

    def seal(self, plaintext: BytesLike, *, now: float, purpose: str = "encryption") -> bytes:
        """Seal ``plaintext`` (only read, never changed) as one record; return its bytes."""
        purpose_id = PURPOSES.get(purpose)
        if purpose_id is None:
            raise LocalProtocolError(f"unknown record purpose {purpose!r}")
        size = len(plaintext)
        if size > MAX_RECORD_PLAINTEXT:
            raise LocalProtocolError("record plaintext too large")
        self._check_limits(now, size)
        epoch = self._tick(now)
        if epoch != self._send_epoch:
            self._send_epoch, self._send_seq = epoch, 0
        seq = self._send_seq
        if seq > MAX_SEQUENCE:
            raise RekeyRequired("sequence numbers of this epoch are used up")
        self._send_seq += 1
        key, iv = self._key(epoch, purpose_id, self.role)
        header = self._header(purpose_id, epoch, self.role, seq)
        nonce = (iv ^ seq).to_bytes(12, "big")
        self.counters.messages_sent += 1
        self.counters.bytes_sent += size
        if size < IN_PLACE_MIN:
            return header + key.seal(nonce, plaintext, header)
        return _seal_in_place(key, nonce, plaintext, header, self._aead.tag_size)

    def open(self, record: BytesLike, *, now: float) -> Record:
        """Check and open one record of the peer's; nothing changes unless it authenticates."""
        if len(record) < HEADER_SIZE + self._aead.tag_size:
            raise DecodeError("record shorter than header and tag")
        version, purpose_id, session_id, epoch, direction, seq = _HEADER.unpack_from(record)
        if version != PROTOCOL_VERSION:
            raise DecodeError(f"unknown record version {version}")
        if purpose_id not in _PURPOSE_NAMES:
            raise DecodeError(f"unknown record purpose {purpose_id}")
        if session_id != self.session_id:
            raise RemoteProtocolError("record belongs to another session")
        # A record in our own sending direction is one of ours reflected back at us.
        # (1 - role is peer_direction's value, without building the enum member.)
        if direction != 1 - self.role:
            raise RemoteProtocolError("record has the wrong direction")
        self._check_limits(now)
        self._tick(now)
        # One epoch of clock skew is tolerated, measured against our own clock: not against
        # the schedule, which an earlier next-epoch record may already have moved forward
        # (else each accepted record would let the next be one more epoch ahead).
        if epoch > self.epoch(now) + 1:
            raise RemoteProtocolError("record from a future epoch")
        if epoch < self.schedule.oldest:
            raise EpochExpired(f"record from erased epoch {epoch}")
        self._replay.check(epoch, seq)
        key, iv = self._key(epoch, purpose_id, direction)
        nonce = (iv ^ seq).to_bytes(12, "big")
        # The body through a view, not a slice: a slice would copy the whole record first.
        # (The view is a temporary: it is released as soon as open returns or raises.)
        plaintext = key.open(nonce, memoryview(record)[HEADER_SIZE:], record[:HEADER_SIZE])
        # Only an authenticated record may move state: the epoch, the window or the counters.
        if epoch > self.schedule.newest:
            self._advance(epoch)
        self._replay.accept(epoch, seq)
        self.counters.messages_received += 1
        self.counters.bytes_received += len(plaintext)
        return Record(_PURPOSE_NAMES[purpose_id], epoch, seq, plaintext)

    def export(self) -> SessionState:
        return SessionState(
            session_id=self.session_id,
            suite=self.suite.id,
            role=self.role,
            established_at=self.established_at,
            epoch_seconds=self.epoch_seconds,
            chain=self.schedule.export(),
            replay=self._replay.export(),
            send_epoch=self._send_epoch,
            send_sequence=self._send_seq,
            counters=replace(self.counters),
        )

    @classmethod
    def restore(cls, state: SessionState, policy: RekeyPolicy | None = None) -> Session:
        suite = by_id(state.suite)
        return cls(
            session_id=state.session_id,
            suite=suite,
            role=state.role,
            schedule=EpochKeySchedule.restore(suite.kdf_impl(), state.session_id, state.chain),
            established_at=state.established_at,
            epoch_seconds=state.epoch_seconds,
            policy=policy,
            replay=EpochReplayWindows.restore(state.replay),
            send_epoch=state.send_epoch,
            send_sequence=state.send_sequence,
            counters=replace(state.counters),
        )

    def close(self) -> None:
        """Erase every key this session holds."""
        self.schedule.erase()
        self._keys.clear()

    def __repr__(self) -> str:
        epochs = self.schedule.retained()
        return f"<Session {self.session_id.hex()} role={self.role.name} epochs={epochs}>"
