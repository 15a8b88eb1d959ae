from __future__ import annotations

import os
from pathlib import Path

import pytest

from qflare.errors import DecryptionFailed
from qflare.keys.envelope import (
    Binding,
    Envelope,
    EnvMasterKey,
    FileMasterKey,
    MasterKeyUnavailable,
    StaticMasterKey,
)

ROW_A = Binding("sessions", "a" * 32, "chain_state")
ROW_B = Binding("sessions", "b" * 32, "chain_state")


@pytest.fixture
def envelope() -> Envelope:
    return Envelope(StaticMasterKey(os.urandom(32)))


def test_round_trip(envelope: Envelope) -> None:
    blob = envelope.seal(b"chain key material", ROW_A)
    assert envelope.open(blob, ROW_A) == b"chain key material"
    assert b"chain key material" not in blob


def test_fresh_data_key_each_time(envelope: Envelope) -> None:
    assert envelope.seal(b"x", ROW_A) != envelope.seal(b"x", ROW_A)


@pytest.mark.parametrize(
    "other",
    [ROW_B, Binding("devices", "a" * 32, "chain_state"), Binding("sessions", "a" * 32, "other")],
)
def test_ciphertext_cannot_move_rows(envelope: Envelope, other: Binding) -> None:
    blob = envelope.seal(b"secret", ROW_A)
    with pytest.raises(DecryptionFailed):
        envelope.open(blob, other)


def test_wrong_master_key_fails() -> None:
    blob = Envelope(StaticMasterKey(os.urandom(32))).seal(b"secret", ROW_A)
    with pytest.raises(DecryptionFailed):
        Envelope(StaticMasterKey(os.urandom(32))).open(blob, ROW_A)


def test_unknown_master_key_id_is_typed() -> None:
    blob = Envelope(StaticMasterKey(os.urandom(32), "mk-2")).seal(b"secret", ROW_A)
    with pytest.raises(MasterKeyUnavailable):
        Envelope(StaticMasterKey(os.urandom(32), "mk-1")).open(blob, ROW_A)


def test_every_truncation_and_flip_fails(envelope: Envelope) -> None:
    blob = envelope.seal(b"secret", ROW_A)
    for n in range(len(blob)):
        with pytest.raises((DecryptionFailed, MasterKeyUnavailable)):
            envelope.open(blob[:n], ROW_A)
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 1
        with pytest.raises((DecryptionFailed, MasterKeyUnavailable)):
            envelope.open(bytes(flipped), ROW_A)


def test_file_provider_requires_0600(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    FileMasterKey.create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    FileMasterKey(path)  # accepted
    path.chmod(0o644)
    with pytest.raises(MasterKeyUnavailable, match="chmod 600"):
        FileMasterKey(path)
    with pytest.raises(FileExistsError):
        FileMasterKey.create(path)  # never overwrites a master key


def test_env_provider_validates() -> None:
    with pytest.raises(MasterKeyUnavailable, match="not set"):
        EnvMasterKey({})
    with pytest.raises(MasterKeyUnavailable, match="base64"):
        EnvMasterKey({"QFLARE_MASTER_KEY": "not base64!"})
    with pytest.raises(MasterKeyUnavailable, match="32 bytes"):
        EnvMasterKey({"QFLARE_MASTER_KEY": "AAAA"})


def test_repr_hides_key() -> None:
    key = os.urandom(32)
    provider = StaticMasterKey(key)
    assert key.hex() not in repr(provider) and key.hex() not in repr(Envelope(provider))
