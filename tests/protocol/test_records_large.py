"""Large records (docs/PROTOCOL.md section 8, docs/PERFORMANCE.md): FL updates of a megabyte.

From ``IN_PLACE_MIN`` bytes of plaintext up, ``Session.seal`` builds the record in one buffer
(``AeadKey.seal_into`` behind the header) and ``Session.open`` reads the body through a view.
That is an implementation choice only: the records must be byte for byte the spec's
construction on both sides of the threshold, every bit of them authenticated, the caller's
buffers left alone, and no copy of the record made on the way (checked with tracemalloc).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import tracemalloc
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qflare.errors import DecryptionFailed, QflareError
from qflare.protocol import PURPOSES, Counters, Session
from qflare.protocol.record import HEADER_SIZE, IN_PLACE_MIN

from .support import World
from .test_records import T, _expected_verdict, state_of

MIB = 1 << 20
TAG = 16
# Both sides of the in-place threshold, the threshold itself, and a megabyte.
SIZES = (0, 1, IN_PLACE_MIN - 1, IN_PLACE_MIN, IN_PLACE_MIN + 1, MIB)


@pytest.fixture
def pair(world: World) -> tuple[Session, Session]:
    device, est = world.handshake()
    return device, est.session


def spec_record(device: Session, plaintext: bytes, seq: int, purpose: str = "fl-update") -> bytes:
    """PROTOCOL.md 8.1 recomputed with pyca's AES-GCM, the record layer not involved."""
    epoch = device.epoch(T)
    key = device.schedule.derive(purpose, 0, epoch)
    iv = int.from_bytes(device.schedule.derive_iv(purpose, 0, epoch), "big")
    header = (
        bytes([1, PURPOSES[purpose]])
        + device.session_id
        + epoch.to_bytes(8, "big")
        + bytes([0])
        + seq.to_bytes(8, "big")
    )
    return header + AESGCM(key).encrypt((iv ^ seq).to_bytes(12, "big"), plaintext, header)


@pytest.mark.parametrize("size", SIZES)
def test_large_records_round_trip_as_the_spec_construction(
    pair: tuple[Session, Session], size: int
) -> None:
    device, server = pair
    for seq in range(2):
        plaintext = os.urandom(size)
        record = device.seal(plaintext, now=T, purpose="fl-update")
        assert type(record) is bytes  # what HTTP clients and servers are handed
        assert len(record) == HEADER_SIZE + size + TAG
        assert record == spec_record(device, plaintext, seq)
        opened = server.open(record, now=T)
        assert type(opened.plaintext) is bytes
        assert (opened.plaintext, opened.purpose, opened.sequence) == (plaintext, "fl-update", seq)
    assert device.counters.bytes_sent == server.counters.bytes_received == 2 * size
    assert device.counters.messages_sent == server.counters.messages_received == 2


@pytest.mark.parametrize("size", [IN_PLACE_MIN - 1, IN_PLACE_MIN, MIB])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_bytes_like_plaintext_and_record(
    pair: tuple[Session, Session], size: int, kind: Callable[[bytes], object]
) -> None:
    device, server = pair
    plaintext = os.urandom(size)
    record = device.seal(kind(plaintext), now=T)  # type: ignore[arg-type]
    assert record == spec_record(device, plaintext, 0, "encryption")
    assert server.open(kind(record), now=T).plaintext == plaintext  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1000, IN_PLACE_MIN, MIB])
def test_seal_leaves_the_callers_plaintext_alone(pair: tuple[Session, Session], size: int) -> None:
    device, server = pair
    buffer = bytearray(os.urandom(size))
    original = bytes(buffer)
    record = device.seal(buffer, now=T)
    assert buffer == original  # not encrypted in place, not zeroed
    with memoryview(buffer) as view:
        record_from_view = device.seal(view, now=T)
    assert buffer == original
    buffer.append(0)  # no view of it is left behind: it can still be resized
    # The record does not share memory with the plaintext: changing one leaves the other.
    buffer[:] = bytes(len(buffer))
    assert server.open(record, now=T).plaintext == original
    assert server.open(record_from_view, now=T).plaintext == original


@pytest.mark.parametrize("size", [1000, MIB])
def test_open_leaves_the_callers_record_alone(pair: tuple[Session, Session], size: int) -> None:
    device, server = pair
    plaintext = os.urandom(size)
    record = bytearray(device.seal(plaintext, now=T))
    original = bytes(record)
    opened = server.open(record, now=T)
    assert record == original
    record.append(0)  # the view open took of it is released
    record[:] = bytes(len(record))  # and the plaintext it returned is its own
    assert opened.plaintext == plaintext


def test_failed_open_of_a_bytearray_record_releases_it(pair: tuple[Session, Session]) -> None:
    device, server = pair
    record = bytearray(device.seal(os.urandom(MIB), now=T))
    record[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        server.open(record, now=T)
    record.append(0)  # no view left behind on the failure path either


def _positions(size: int, rng: random.Random) -> list[int]:
    """Every header byte, every tag byte, the edges of the ciphertext, the 16-byte block and
    4 KiB page edges a fragmented write would fall on, and random bytes in between."""
    body_end = size - TAG
    picked = set(range(HEADER_SIZE))
    picked |= set(range(body_end, size))
    picked |= {HEADER_SIZE, HEADER_SIZE + 1, body_end - 1, body_end - 2}
    for edge in range(HEADER_SIZE + 16, body_end, 4096 * 17):
        picked |= {edge - 1, edge, edge + 1}
    for edge in range(4096, body_end, 4096 * 13):
        picked |= {edge - 1, edge}
    picked |= {rng.randrange(HEADER_SIZE, body_end) for _ in range(200)}
    return sorted(picked)


@pytest.mark.parametrize("size", [IN_PLACE_MIN, MIB])
def test_a_flipped_bit_anywhere_in_a_large_record_is_rejected(
    pair: tuple[Session, Session], size: int
) -> None:
    device, server = pair
    server.open(device.seal(b"warm-up", now=T), now=T)  # sequence 0 is now in the window
    plaintext = os.urandom(size)
    record = device.seal(plaintext, now=T, purpose="fl-update")
    before = state_of(server)
    tampered = bytearray(record)  # flipped in place and flipped back: one copy for all
    positions = _positions(len(record), random.Random(f"large/{size}"))
    for i in positions:
        bits = range(8) if i < HEADER_SIZE or i >= len(record) - TAG else (i % 8,)
        for bit in bits:
            mask = 1 << bit
            tampered[i] ^= mask
            with pytest.raises(QflareError) as info:
                server.open(tampered, now=T)
            tampered[i] ^= mask
            assert type(info.value) is _expected_verdict(i, mask, device.epoch(T)), (i, mask)
    assert tampered == record
    assert state_of(server) == before  # not one of them moved the window or the counters
    assert server.open(record, now=T).plaintext == plaintext


def test_every_bit_of_the_tag_and_the_ciphertext_edges(pair: tuple[Session, Session]) -> None:
    """The bytes an off-by-one in the framing would miss, with every bit of each flipped."""
    device, server = pair
    record = device.seal(os.urandom(MIB), now=T)
    edges = [
        HEADER_SIZE - 1,
        HEADER_SIZE,
        len(record) - TAG - 1,
        *range(len(record) - TAG, len(record)),
    ]
    tampered = bytearray(record)
    for i in edges:
        for bit in range(8):
            tampered[i] ^= 1 << bit
            with pytest.raises(QflareError):
                server.open(tampered, now=T)
            tampered[i] ^= 1 << bit
    assert server.counters == Counters()


def test_large_record_truncated_or_extended_rejected(pair: tuple[Session, Session]) -> None:
    device, server = pair
    record = device.seal(os.urandom(MIB), now=T)
    for cut in (1, TAG - 1, TAG, TAG + 1, 4096, MIB):
        with pytest.raises(DecryptionFailed):
            server.open(record[:-cut], now=T)
    with pytest.raises(DecryptionFailed):
        server.open(record + b"\x00", now=T)
    assert server.counters == Counters()
    assert len(server.open(record, now=T).plaintext) == MIB


def test_seal_consumes_a_sequence_number_per_record_on_both_paths(
    pair: tuple[Session, Session],
) -> None:
    device, server = pair
    sizes = [10, MIB, IN_PLACE_MIN - 1, IN_PLACE_MIN, 0]
    records = [device.seal(os.urandom(n), now=T) for n in sizes]
    assert [server.open(r, now=T).sequence for r in records] == list(range(len(sizes)))
    assert len({r[HEADER_SIZE:] for r in records}) == len(sizes)


def test_session_id_of_the_wrong_length_refused_when_sealing(
    pair: tuple[Session, Session],
) -> None:
    device, _server = pair
    state = dataclasses.replace(device.export(), session_id=device.session_id + b"\x00")
    with pytest.raises(ValueError, match="16 bytes"):
        Session.restore(state).seal(os.urandom(MIB), now=T)


@pytest.mark.skipif(
    platform.python_implementation() != "CPython",
    reason="zero-copy BytesIO.getvalue() is CPython's; elsewhere it is one copy, still correct",
)
def test_a_large_record_is_not_copied(pair: tuple[Session, Session]) -> None:
    """The point of the in-place path: sealing a MiB allocates about one record, opening it
    about one plaintext. ``header + seal(...)`` and ``record[HEADER_SIZE:]`` each held two."""
    device, server = pair
    plaintext = os.urandom(MIB)
    device.seal(b"x", now=T)  # keys derived and cached before measuring
    server.open(device.seal(b"x", now=T), now=T)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        record = device.seal(plaintext, now=T)
        sealed_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        opened = server.open(record, now=T)
        opened_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert opened.plaintext == plaintext
    assert sealed_peak < 1.25 * len(record), sealed_peak
    assert opened_peak < 1.25 * MIB, opened_peak
