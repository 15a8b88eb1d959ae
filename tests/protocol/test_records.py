"""Record protection (docs/PROTOCOL.md section 8) and the rekey limits (section 7).

Every session here comes from a real handshake, so the keys on both sides were agreed, not
copied.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qflare.errors import (
    DecodeError,
    DecryptionFailed,
    EpochExpired,
    LocalProtocolError,
    QflareError,
    RekeyRequired,
    RemoteProtocolError,
    ReplayDetected,
)
from qflare.protocol import Counters, RekeyPolicy, ServerPolicy, Session

from .support import EPOCH_SECONDS, NOW, World

HEADER = 35
T = NOW + 2  # a moment inside the session's first epoch


@pytest.fixture
def pair(world: World) -> tuple[Session, Session]:
    device, est = world.handshake()
    return device, est.session


def state_of(session: Session) -> tuple[object, ...]:
    """What an unauthenticated record must not change."""
    s = session.export()
    return (dataclasses.replace(s.counters), s.send_epoch, s.send_sequence, s.chain)


def window_decisions(session: Session, records: list[bytes], now: int) -> list[str]:
    """Open each record on a restored copy, so the probe itself changes nothing."""
    out = []
    for record in records:
        try:
            Session.restore(session.export()).open(record, now=now)
            out.append("ok")
        except QflareError as exc:
            out.append(type(exc).__name__)
    return out


# --- Basic behaviour ------------------------------------------------------------------------


def test_record_layout(pair: tuple[Session, Session]) -> None:
    device, server = pair
    record = device.seal(b"weights", now=T, purpose="fl-update")
    assert record[0] == 1  # version
    assert record[1] == 2  # purpose id of "fl-update"
    assert record[2:18] == device.session_id
    assert int.from_bytes(record[18:26], "big") == device.epoch(T)
    assert record[26] == 0  # device -> server
    assert int.from_bytes(record[27:35], "big") == 0
    assert len(record) == HEADER + len(b"weights") + 16
    assert b"weights" not in record
    opened = server.open(record, now=T)
    assert (opened.plaintext, opened.purpose, opened.sequence) == (b"weights", "fl-update", 0)


def test_record_is_the_spec_aead_construction(pair: tuple[Session, Session]) -> None:
    # PROTOCOL.md 8.1, recomputed with pyca's AES-GCM: key and iv of (purpose, direction,
    # epoch), nonce = iv XOR seq, the header as associated data.
    device, _server = pair
    epoch = device.epoch(T)
    key = device.schedule.derive("fl-update", 0, epoch)
    iv = int.from_bytes(device.schedule.derive_iv("fl-update", 0, epoch), "big")
    bodies = set()
    for seq in range(5):
        record = device.seal(b"same plaintext", now=T, purpose="fl-update")
        nonce = (iv ^ seq).to_bytes(12, "big")
        assert AESGCM(key).decrypt(nonce, record[HEADER:], record[:HEADER]) == b"same plaintext"
        bodies.add(record[HEADER:])
    assert len(bodies) == 5  # a fresh nonce for every record


def test_sequence_numbers_count_every_record_in_an_epoch(pair: tuple[Session, Session]) -> None:
    device, server = pair
    for n, purpose in enumerate(["encryption", "fl-update", "control", "encryption"]):
        assert server.open(device.seal(b"x", now=T, purpose=purpose), now=T).sequence == n
    # A new epoch restarts the count under new keys.
    later = NOW + EPOCH_SECONDS
    assert server.open(device.seal(b"x", now=later), now=later).sequence == 0


def test_unknown_purpose_refused_locally(pair: tuple[Session, Session]) -> None:
    with pytest.raises(LocalProtocolError):
        pair[0].seal(b"x", now=T, purpose="mac")


# --- Replay window ---------------------------------------------------------------------------


def test_replayed_record_rejected(pair: tuple[Session, Session]) -> None:
    device, server = pair
    record = device.seal(b"once", now=T)
    server.open(record, now=T)
    before = state_of(server)
    with pytest.raises(ReplayDetected):
        server.open(record, now=T + 1)
    assert state_of(server) == before


def test_reordering_inside_the_window_accepted(pair: tuple[Session, Session]) -> None:
    device, server = pair
    records = [device.seal(f"r{i}".encode(), now=T) for i in range(256)]
    order = list(reversed(records))  # offsets 0..255: the full window
    for record in order:
        server.open(record, now=T)
    shuffled = [device.seal(f"s{i}".encode(), now=T) for i in range(64)]
    random.Random(7).shuffle(shuffled)
    got = sorted(server.open(r, now=T).sequence for r in shuffled)
    assert got == list(range(256, 320))
    for record in records[-3:] + shuffled[:3]:
        with pytest.raises(ReplayDetected):
            server.open(record, now=T)


def test_reordering_beyond_the_window_rejected(pair: tuple[Session, Session]) -> None:
    device, server = pair
    records = [device.seal(f"r{i}".encode(), now=T) for i in range(300)]
    server.open(records[299], now=T)
    with pytest.raises(ReplayDetected):
        server.open(records[299 - 256], now=T)  # offset 256: just outside
    with pytest.raises(ReplayDetected):
        server.open(records[0], now=T)
    assert server.open(records[299 - 255], now=T).sequence == 44  # offset 255: just inside
    assert server.counters.messages_received == 2


def test_window_survives_export_and_restore(pair: tuple[Session, Session]) -> None:
    device, server = pair
    r0, r1, r2, r3 = (device.seal(bytes([i]), now=T) for i in range(4))
    server.open(r2, now=T)
    server.open(r0, now=T)
    restored = Session.restore(server.export(), policy=server.policy)
    assert restored.counters == server.counters
    for replay in (r0, r2):
        with pytest.raises(ReplayDetected):
            restored.open(replay, now=T + 1)
    assert restored.open(r1, now=T + 1).plaintext == b"\x01"  # reordered, never seen
    assert restored.open(r3, now=T + 1).plaintext == b"\x03"
    assert restored.counters.messages_received == 4


def test_sender_restored_from_export_never_reuses_a_sequence(pair: tuple[Session, Session]):
    device, server = pair
    server.open(device.seal(b"a", now=T), now=T)
    again = Session.restore(device.export())
    record = again.seal(b"b", now=T)
    assert server.open(record, now=T).sequence == 1


# --- Epochs ---------------------------------------------------------------------------------


def test_record_from_the_previous_epoch_accepted_within_grace(pair: tuple[Session, Session]):
    device, server = pair
    record = device.seal(b"late", now=T)
    assert server.open(record, now=T + EPOCH_SECONDS).plaintext == b"late"


def test_record_from_an_erased_epoch(pair: tuple[Session, Session]) -> None:
    device, server = pair
    record = device.seal(b"old", now=T)
    with pytest.raises(EpochExpired):
        server.open(record, now=T + 2 * EPOCH_SECONDS)


def test_record_from_an_erased_epoch_with_grace_zero(world: World) -> None:
    device, est = world.handshake(policy=ServerPolicy(grace_epochs=0), grace=0)
    record = device.seal(b"old", now=T)
    with pytest.raises(EpochExpired):
        est.session.open(record, now=T + EPOCH_SECONDS)


def test_record_more_than_one_epoch_ahead_rejected(pair: tuple[Session, Session]) -> None:
    device, server = pair
    ahead = device.seal(b"from the future", now=T + 2 * EPOCH_SECONDS)
    before = (state_of(server), server.schedule.retained())
    with pytest.raises(RemoteProtocolError) as info:
        server.open(ahead, now=T)
    assert type(info.value) is RemoteProtocolError  # not a decryption or replay verdict
    assert (state_of(server), server.schedule.retained()) == before
    # One epoch later the same record is within the tolerated skew and opens.
    assert server.open(ahead, now=T + EPOCH_SECONDS).plaintext == b"from the future"


def test_skew_is_measured_against_the_receivers_clock(pair: tuple[Session, Session]) -> None:
    device, server = pair
    server.open(device.seal(b"+1", now=T + EPOCH_SECONDS), now=T)  # one ahead: tolerated
    two_ahead = device.seal(b"+2", now=T + 2 * EPOCH_SECONDS)
    # PROTOCOL.md 8.2: "no more than one ahead of the receiver's clock epoch". The server's
    # clock is still in epoch e; this record is from e+2.
    with pytest.raises(RemoteProtocolError):
        server.open(two_ahead, now=T)


@pytest.mark.parametrize(
    "skew", [EPOCH_SECONDS - 20, -(EPOCH_SECONDS - 20)], ids=["ahead", "behind"]
)
def test_crossing_epoch_boundaries_with_one_epoch_of_skew(world: World, skew: int) -> None:
    device, est = world.handshake()
    server = est.session
    seen_up, seen_down = [], []
    for step in range(0, 4 * EPOCH_SECONDS, 45):
        t = NOW + step
        up = server.open(device.seal(f"u{step}".encode(), now=t + skew), now=t)
        down = device.open(server.seal(f"d{step}".encode(), now=t), now=t + skew)
        assert (up.plaintext, down.plaintext) == (f"u{step}".encode(), f"d{step}".encode())
        seen_up.append(up.epoch)
        seen_down.append(down.epoch)
    for epochs in (seen_up, seen_down):
        assert epochs == sorted(epochs)
        assert epochs[-1] - epochs[0] >= 3  # the stream crossed at least three boundaries
    assert server.counters.messages_received == device.counters.messages_received == 27


def test_in_flight_record_across_a_boundary(pair: tuple[Session, Session]) -> None:
    device, server = pair
    boundary = (T // EPOCH_SECONDS + 1) * EPOCH_SECONDS
    late = device.seal(b"sent before", now=boundary - 1)
    server.seal(b"server moved on", now=boundary + 1)
    assert server.open(late, now=boundary + 1).epoch == (boundary - 1) // EPOCH_SECONDS


# --- Tampering and misdirection --------------------------------------------------------------


def _expected_verdict(index: int, mask: int, epoch: int) -> type[QflareError]:
    """What opening the record with byte ``index`` flipped must raise, field by field, for a
    server whose only epoch is ``epoch`` and whose window has accepted sequence number 0."""
    if index == 0:
        return DecodeError  # version
    if index == 1:
        return DecryptionFailed if (2 ^ mask) in (1, 2, 3) else DecodeError  # purpose
    if index < 18 or index == 26:
        return RemoteProtocolError  # session id, direction: checked before any key is used
    if index < 26:
        flipped = epoch ^ (mask << 8 * (25 - index))
        if flipped > epoch + 1:
            return RemoteProtocolError
        return EpochExpired if flipped < epoch else DecryptionFailed
    if 27 <= index < HEADER:
        return ReplayDetected if 1 ^ (mask << 8 * (34 - index)) == 0 else DecryptionFailed
    return DecryptionFailed  # ciphertext and tag


def test_every_byte_of_a_record_is_authenticated(pair: tuple[Session, Session]) -> None:
    device, server = pair
    server.open(device.seal(b"warm-up", now=T), now=T)  # sequence 0 is now in the window
    record = device.seal(b"model update bytes", now=T, purpose="fl-update")
    assert server.schedule.retained() == [device.epoch(T)]
    before = state_of(server)
    for i in range(len(record)):
        for mask in (0x01, 0x02, 0x80):
            tampered = bytearray(record)
            tampered[i] ^= mask
            with pytest.raises(QflareError) as info:
                server.open(bytes(tampered), now=T)
            assert type(info.value) is _expected_verdict(i, mask, device.epoch(T)), (i, mask)
    assert state_of(server) == before
    assert server.open(record, now=T).plaintext == b"model update bytes"


def test_every_truncation_of_a_record_rejected(pair: tuple[Session, Session]) -> None:
    device, server = pair
    record = device.seal(b"payload", now=T)
    for n in range(len(record)):
        with pytest.raises((DecodeError, DecryptionFailed)):
            server.open(record[:n], now=T)
    with pytest.raises(DecryptionFailed):
        server.open(record + b"\x00", now=T)
    assert server.open(record, now=T).plaintext == b"payload"


def test_record_reflected_to_its_sender_rejected(pair: tuple[Session, Session]) -> None:
    device, server = pair
    with pytest.raises(RemoteProtocolError):
        device.open(device.seal(b"mine", now=T), now=T)
    with pytest.raises(RemoteProtocolError):
        server.open(server.seal(b"mine", now=T), now=T)


def test_record_with_direction_byte_rewritten_rejected(pair: tuple[Session, Session]) -> None:
    device, _server = pair
    record = bytearray(device.seal(b"mine", now=T))
    record[26] = 1  # claim server -> device, so the device would accept the direction
    with pytest.raises(DecryptionFailed):
        device.open(bytes(record), now=T)


def test_one_devices_record_refused_by_another_devices_session(world: World) -> None:
    a_device, a_est = world.handshake("dev-a")
    b_device, b_est = world.handshake("dev-b")
    from_a = a_device.seal(b"from a", now=T)
    with pytest.raises(RemoteProtocolError):
        b_est.session.open(from_a, now=T)
    # Rewriting the session id to B's does not help: B's keys do not open A's record.
    moved = from_a[:2] + b_device.session_id + from_a[18:]
    with pytest.raises(DecryptionFailed):
        b_est.session.open(moved, now=T)
    # Neither does the server's reply to A open on device B.
    to_a = a_est.session.seal(b"to a", now=T)
    with pytest.raises(RemoteProtocolError):
        b_device.open(to_a, now=T)
    with pytest.raises(DecryptionFailed):
        b_device.open(to_a[:2] + b_device.session_id + to_a[18:], now=T)
    assert a_est.session.open(from_a, now=T).plaintext == b"from a"


# --- Unauthenticated records change nothing -------------------------------------------------


def test_forged_record_moves_neither_window_nor_counters(pair: tuple[Session, Session]):
    device, server = pair
    genuine = device.seal(b"genuine", now=T)
    forged = genuine[:-1] + bytes([genuine[-1] ^ 1])
    before = state_of(server)
    for _ in range(3):
        with pytest.raises(DecryptionFailed):
            server.open(forged, now=T)
    assert state_of(server) == before
    assert server.counters == Counters()
    assert server.open(genuine, now=T).sequence == 0  # the sequence number is still free


def test_forged_next_epoch_record_advances_nothing(world: World) -> None:
    device, est = world.handshake(policy=ServerPolicy(grace_epochs=0), grace=0)
    server = est.session
    held = server.schedule._chain[server.schedule.newest]
    ahead = device.seal(b"next", now=T + EPOCH_SECONDS)
    forged = ahead[:-1] + bytes([ahead[-1] ^ 1])
    before = (state_of(server), server.schedule.retained())
    with pytest.raises(DecryptionFailed):
        server.open(forged, now=T)
    assert (state_of(server), server.schedule.retained()) == before
    assert any(held)  # grace 0: advancing would have zeroed this epoch's chain key
    assert server.open(device.seal(b"now", now=T), now=T).plaintext == b"now"


def test_forged_record_leaves_saved_state_byte_identical(pair: tuple[Session, Session]):
    device, server = pair
    ahead = device.seal(b"next", now=T + EPOCH_SECONDS)
    forged = ahead[:-1] + bytes([ahead[-1] ^ 1])
    before = server.export()
    with pytest.raises(DecryptionFailed):
        server.open(forged, now=T)
    assert server.export() == before


def test_epoch_advance_by_a_record_drops_keys_of_erased_epochs(world: World) -> None:
    device, est = world.handshake(policy=ServerPolicy(grace_epochs=0), grace=0)
    server = est.session
    server.open(device.seal(b"e", now=T), now=T)  # caches epoch e's key
    server.open(device.seal(b"e+1", now=T + EPOCH_SECONDS), now=T)  # peer clock ahead
    assert server.schedule.oldest == device.epoch(T) + 1  # chain key of e erased...
    cached_epochs = {epoch for epoch, _purpose, _direction in server._keys}
    assert all(epoch >= server.schedule.oldest for epoch in cached_epochs)  # ... its key too


def test_session_that_accepted_the_last_sequence_number_can_be_saved(
    pair: tuple[Session, Session],
) -> None:
    device, server = pair
    state = dataclasses.replace(
        device.export(), send_epoch=device.epoch(T), send_sequence=2**64 - 1
    )
    record = Session.restore(state).seal(b"last", now=T)
    assert server.open(record, now=T).sequence == 2**64 - 1
    restored = Session.restore(server.export())
    with pytest.raises(ReplayDetected):
        restored.open(record, now=T)


def test_a_peer_cannot_ratchet_the_receiver_forward_one_epoch_at_a_time(
    pair: tuple[Session, Session],
) -> None:
    device, server = pair
    e = server.epoch(T)
    ahead = [device.seal(f"+{k}".encode(), now=T + k * EPOCH_SECONDS) for k in range(1, 5)]
    assert server.open(ahead[0], now=T).epoch == e + 1
    for record in ahead[1:]:
        with pytest.raises(RemoteProtocolError):
            server.open(record, now=T)
    assert server.schedule.newest == e + 1
    # Once the receiver's own clock moves on, the next epoch is one ahead again.
    assert server.open(ahead[1], now=T + EPOCH_SECONDS).epoch == e + 2


def test_forged_record_of_the_current_epoch_leaves_saved_state_byte_identical(
    pair: tuple[Session, Session],
) -> None:
    # No window exists for the epoch yet: the check must not create one.
    device, server = pair
    genuine = device.seal(b"now", now=T)
    forged = genuine[:-1] + bytes([genuine[-1] ^ 1])
    before = server.export()
    with pytest.raises(DecryptionFailed):
        server.open(forged, now=T)
    assert server.export() == before
    server.open(genuine, now=T)
    assert server.export() != before  # ... while an authentic record does change it


def test_a_record_from_the_next_epoch_caches_nothing_of_an_erased_epoch(world: World) -> None:
    # grace 1: the advance by a record erases epoch e-1's keys, the clock's tick never ran.
    device, est = world.handshake()
    server = est.session
    e = server.epoch(T)
    for k in (0, 1):  # cache keys of e and e+1, moving the schedule by the clock
        t = T + k * EPOCH_SECONDS
        server.open(device.seal(b"x", now=t), now=t)
    server.open(device.seal(b"+2", now=T + 2 * EPOCH_SECONDS), now=T + EPOCH_SECONDS)
    assert server.schedule.retained() == [e + 1, e + 2]
    assert {epoch for epoch, _, _ in server._keys} <= {e + 1, e + 2}
    assert server._replay.epochs() == [e + 1, e + 2]


def test_sealing_past_the_last_sequence_number_needs_a_rekey(
    pair: tuple[Session, Session],
) -> None:
    device, server = pair
    state = dataclasses.replace(
        device.export(), send_epoch=device.epoch(T), send_sequence=2**64 - 1
    )
    sender = Session.restore(state)
    assert server.open(sender.seal(b"last", now=T), now=T).sequence == 2**64 - 1
    sent = dataclasses.replace(sender.counters)
    with pytest.raises(RekeyRequired):
        sender.seal(b"one too many", now=T)
    assert sender.counters == sent
    # The next epoch has fresh keys and a fresh count.
    later = T + EPOCH_SECONDS
    assert server.open(sender.seal(b"next", now=later), now=later).sequence == 0


# --- Rekey limits ---------------------------------------------------------------------------


def _limited(world: World, policy: RekeyPolicy) -> tuple[Session, Session]:
    device, est = world.handshake(policy=ServerPolicy(rekey=policy), rekey=policy)
    assert device.policy == est.session.policy == policy
    return device, est.session


def test_message_limit(world: World) -> None:
    device, server = _limited(world, RekeyPolicy(max_messages=10, soft_fraction=0.8))
    for n in range(10):
        assert device.needs_rekey(T) == (n >= 8)
        server.open(device.seal(b"m", now=T), now=T)
    assert device.needs_rekey(T) and server.needs_rekey(T)
    sent = dataclasses.replace(device.counters)
    with pytest.raises(RekeyRequired):
        device.seal(b"one too many", now=T)
    assert device.counters == sent  # a refused seal counts nothing


def test_message_limit_enforced_by_the_receiver(world: World) -> None:
    # A sender with a laxer policy than the server's: the server refuses to open past its own.
    small = RekeyPolicy(max_messages=10)
    device, est = world.handshake(policy=ServerPolicy(rekey=small))
    records = [device.seal(b"m", now=T) for _ in range(11)]
    for record in records[:10]:
        est.session.open(record, now=T)
    with pytest.raises(RekeyRequired):
        est.session.open(records[10], now=T)
    assert est.session.counters.messages_received == 10


def test_byte_limit(world: World) -> None:
    device, server = _limited(world, RekeyPolicy(max_bytes=1000, soft_fraction=0.8))
    server.open(device.seal(b"x" * 799, now=T), now=T)
    assert not device.needs_rekey(T)
    server.open(device.seal(b"x", now=T), now=T)
    assert device.needs_rekey(T) and server.needs_rekey(T)  # 800 bytes = 80 %
    server.open(device.seal(b"x" * 200, now=T), now=T)  # exactly the limit is allowed
    with pytest.raises(RekeyRequired):
        device.seal(b"x", now=T)
    assert device.counters.bytes_sent == 1000


def test_byte_limit_counts_the_record_being_sealed(world: World) -> None:
    device, _ = _limited(world, RekeyPolicy(max_bytes=1000))
    with pytest.raises(RekeyRequired):
        device.seal(b"x" * 1001, now=T)
    assert device.counters == Counters()


def test_age_limit(world: World) -> None:
    device, server = _limited(world, RekeyPolicy(max_age_seconds=600, soft_fraction=0.8))
    # established_at is the server's time at the hello: NOW.
    assert not device.needs_rekey(NOW + 479)
    assert device.needs_rekey(NOW + 480) and server.needs_rekey(NOW + 480)
    record = device.seal(b"at the limit", now=NOW + 600)
    assert server.open(record, now=NOW + 600).plaintext == b"at the limit"
    with pytest.raises(RekeyRequired):
        device.seal(b"too old", now=NOW + 601)
    late = device.seal(b"sealed in time", now=NOW + 590)
    with pytest.raises(RekeyRequired):
        server.open(late, now=NOW + 601)
