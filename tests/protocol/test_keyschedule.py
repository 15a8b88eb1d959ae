"""The temporal key schedule (docs/PROTOCOL.md section 7).

The derivations are recomputed here from the formulas in the spec with pyca's HKDF directly,
so the tests check the schedule against the document, not against itself.
"""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st

from qflare import crypto
from qflare.errors import EpochExpired, LocalProtocolError
from qflare.protocol import PURPOSES, EpochKeySchedule, ServerPolicy, Session, epoch_of

from .support import NOW, World

KDF = crypto.kdf("HKDF-SHA3-512")
SECRET = bytes(range(32))
SID = bytes(range(100, 116))
E = 1_000_000


def _lp(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA3_512(), length, info).derive(prk)


def spec_chain(secret: bytes, session_id: bytes, e0: int, epoch: int) -> bytes:
    key = _expand(secret, _lp(b"qflare/v1/chain/init", session_id, struct.pack(">Q", e0)), 32)
    for e in range(e0 + 1, epoch + 1):
        key = _expand(key, _lp(b"qflare/v1/chain/next", struct.pack(">Q", e)), 32)
    return key


def spec_key(chain: bytes, purpose: str, direction: int, epoch: int, sid: bytes, iv: bool) -> bytes:
    label = b"qflare/v1/purpose-iv" if iv else b"qflare/v1/purpose-key"
    info = _lp(label, purpose.encode(), bytes([direction]), struct.pack(">Q", epoch), sid)
    return _expand(chain, info, 12 if iv else 32)


def exported_chain(sched: EpochKeySchedule) -> dict[int, bytes]:
    """Read the chain keys out of an export, with the layout of the saved state."""
    data = sched.export()
    n = data[1]
    return {
        struct.unpack_from(">Q", data, 2 + 40 * i)[0]: data[10 + 40 * i : 42 + 40 * i]
        for i in range(n)
    }


def all_keys_of(sched: EpochKeySchedule, epoch: int) -> list[bytes]:
    return [
        f(purpose, direction, epoch)
        for purpose in PURPOSES
        for direction in (0, 1)
        for f in (sched.derive, sched.derive_iv)
    ]


# --- Epochs --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, database=None)
@given(t=st.integers(0, 2**64 - 1), seconds=st.integers(1, 10**7))
def test_epoch_is_floor_of_time_over_epoch_seconds(t: int, seconds: int) -> None:
    assert epoch_of(t, seconds) == t // seconds
    start = seconds * (t // seconds)
    assert epoch_of(start, seconds) == t // seconds  # a boundary opens its epoch
    if start:
        assert epoch_of(start - 1, seconds) == t // seconds - 1


@settings(max_examples=100, deadline=None, database=None)
@given(t=st.integers(0, 2**33), seconds=st.integers(1, 10**5), frac=st.floats(0, 0.99))
def test_epoch_of_fractional_time_is_floored(t: int, seconds: int, frac: float) -> None:
    # Unix times of this century: a float still resolves far below one second here.
    assert epoch_of(t + frac, seconds) == t // seconds


def test_negative_time_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        epoch_of(-1, 300)


@pytest.mark.parametrize("epoch_seconds", [60, 300, 7])
def test_records_carry_the_epoch_of_their_time(world: World, epoch_seconds: int) -> None:
    device, est = world.handshake(policy=ServerPolicy(epoch_seconds=epoch_seconds))
    server = est.session
    assert device.epoch_seconds == server.epoch_seconds == epoch_seconds
    for t in range(NOW + 1, NOW + 12 * epoch_seconds, max(1, epoch_seconds // 3)):
        up = device.seal(b"u", now=t)
        assert struct.unpack_from(">Q", up, 18)[0] == t // epoch_seconds
        assert server.open(up, now=t).epoch == t // epoch_seconds
        assert device.open(server.seal(b"d", now=t), now=t).epoch == t // epoch_seconds


# --- The chain, against the spec ------------------------------------------------------------


def test_schedule_follows_the_spec_formulas() -> None:
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=2)
    assert exported_chain(sched) == {E: spec_chain(SECRET, SID, E, E)}
    for epoch in (E, E + 1, E + 2, E + 3):
        sched.advance_to(epoch)
        chain = spec_chain(SECRET, SID, E, epoch)
        assert exported_chain(sched)[epoch] == chain
        for purpose in PURPOSES:
            for direction in (0, 1):
                assert sched.derive(purpose, direction, epoch) == spec_key(
                    chain, purpose, direction, epoch, SID, iv=False
                )
                assert sched.derive_iv(purpose, direction, epoch) == spec_key(
                    chain, purpose, direction, epoch, SID, iv=True
                )
    # A key for a future epoch is the same whether derived ahead or after advancing.
    ahead = sched.derive("control", 1, E + 6)
    assert ahead == spec_key(spec_chain(SECRET, SID, E, E + 6), "control", 1, E + 6, SID, False)


def test_schedule_is_bound_to_session_id_and_start() -> None:
    base = EpochKeySchedule.start(KDF, SECRET, SID, E).derive("encryption", 0, E)
    other_sid = EpochKeySchedule.start(KDF, SECRET, bytes(16), E).derive("encryption", 0, E)
    other_secret = EpochKeySchedule.start(KDF, bytes(32), SID, E).derive("encryption", 0, E)
    assert len({base, other_sid, other_secret}) == 3


def test_derived_keys_are_distinct_per_purpose_direction_and_epoch() -> None:
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=2)
    sched.advance_to(E + 2)
    keys = [
        sched.derive(purpose, direction, epoch)
        for epoch in (E, E + 1, E + 2, E + 3)
        for purpose in PURPOSES
        for direction in (0, 1)
    ]
    ivs = [
        sched.derive_iv(purpose, direction, epoch)
        for epoch in (E, E + 1, E + 2, E + 3)
        for purpose in PURPOSES
        for direction in (0, 1)
    ]
    assert len(set(keys)) == len(keys) == 4 * len(PURPOSES) * 2
    assert len(set(ivs)) == len(ivs)
    assert not set(keys) & set(exported_chain(sched).values())
    assert all(len(k) == 32 for k in keys) and all(len(iv) == 12 for iv in ivs)


# --- Forward secrecy across epochs -----------------------------------------------------------


@pytest.mark.parametrize("grace", [0, 1])
def test_state_after_the_grace_window_cannot_reach_back(grace: int) -> None:
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=grace)
    old_chain = exported_chain(sched)[E]
    old_keys = all_keys_of(sched, E)

    sched.advance_to(E + grace)  # still inside the grace window: epoch E is usable
    assert all_keys_of(sched, E) == old_keys

    sched.advance_to(E + grace + 1)  # E falls out of the window
    snapshot = sched.export()
    assert E not in sched.retained()
    for secret in [old_chain, *old_keys]:
        assert secret not in snapshot
    for s in (sched, EpochKeySchedule.restore(KDF, SID, snapshot)):
        for purpose in PURPOSES:
            with pytest.raises(EpochExpired):
                s.derive(purpose, 0, E)
            with pytest.raises(EpochExpired):
                s.derive_iv(purpose, 1, E)
    # The newer epochs are still reachable, and equal to a fresh walk forward.
    assert sched.derive("encryption", 0, E + grace + 1) == spec_key(
        spec_chain(SECRET, SID, E, E + grace + 1), "encryption", 0, E + grace + 1, SID, False
    )


def test_grace_one_at_the_next_epoch_still_holds_the_previous() -> None:
    # With grace 1 a snapshot taken at e+1 can still derive e (that is the grace window); it
    # is at e+2 that e is gone (PROTOCOL.md 7).
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=1)
    sched.advance_to(E + 1)
    assert sched.retained() == [E, E + 1]
    sched.advance_to(E + 2)
    assert sched.retained() == [E + 1, E + 2]
    with pytest.raises(EpochExpired):
        sched.derive("encryption", 0, E)


@pytest.mark.parametrize("grace", [0, 1, 2])
def test_advancing_zeroes_the_erased_chain_keys(grace: int) -> None:
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=grace)
    sched.advance_to(E + grace)
    held = {e: sched._chain[e] for e in sched.retained()}
    before = {e: bytes(buf) for e, buf in held.items()}
    assert all(any(b) for b in before.values())

    sched.advance_to(E + grace + 2)  # two steps: E and E+1 fall out
    for epoch, buf in held.items():
        if epoch < sched.oldest:
            assert isinstance(buf, bytearray)
            assert buf == bytearray(len(buf)), f"chain key of epoch {epoch} not zeroed"
        else:
            assert bytes(buf) == before[epoch]
    assert sched.retained() == list(range(E + 2, E + grace + 3))


def test_jumping_many_epochs_ahead_keeps_only_the_window() -> None:
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=1)
    first = sched._chain[E]
    sched.advance_to(E + 50)
    assert sched.retained() == [E + 49, E + 50]
    assert first == bytearray(32)
    assert exported_chain(sched)[E + 50] == spec_chain(SECRET, SID, E, E + 50)


def test_erase_zeroes_everything() -> None:
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=1)
    sched.advance_to(E + 1)
    held = [sched._chain[e] for e in sched.retained()]
    sched.erase()
    assert all(buf == bytearray(32) for buf in held)


def test_deriving_ahead_stores_and_erases_nothing() -> None:
    # Trying an unauthenticated record from the next epoch derives a key ahead; that must not
    # move the schedule (PROTOCOL.md 8.2).
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=0)
    held = sched._chain[E]
    sched.derive("encryption", 0, E + 1)
    sched.derive_iv("encryption", 0, E + 3)
    assert sched.retained() == [E]
    assert bytes(held) == spec_chain(SECRET, SID, E, E)


def test_advancing_backwards_is_a_no_op() -> None:
    sched = EpochKeySchedule.start(KDF, SECRET, SID, E, grace=1)
    sched.advance_to(E + 3)
    state = sched.export()
    sched.advance_to(E)
    assert sched.export() == state


def test_session_snapshot_cannot_open_records_of_erased_epochs(world: World) -> None:
    device, est = world.handshake()
    server = est.session
    old = device.seal(b"secret of epoch e", now=NOW)
    e = device.epoch(NOW)
    old_chain = exported_chain(server.schedule)[e]
    later = NOW + 2 * 300  # e + 2, grace 1
    server.seal(b"tick", now=later)
    state = server.export()
    assert old_chain not in state.chain
    with pytest.raises(EpochExpired):
        Session.restore(state).open(old, now=later)
    with pytest.raises(EpochExpired):
        server.open(old, now=later)


def test_closing_a_session_zeroes_its_chain(world: World) -> None:
    device, _ = world.handshake()
    held = [device.schedule._chain[e] for e in device.schedule.retained()]
    device.close()
    assert all(buf == bytearray(32) for buf in held)
