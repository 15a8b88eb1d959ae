from __future__ import annotations

import json
from pathlib import Path

import pytest

from qflare import crypto
from qflare.client.keystore import DeviceIdentity, KeystoreError, load, save
from qflare.protocol import PinnedServerKey

N = 2**14  # the smallest cost the loader accepts: keeps the test fast


def _identity() -> DeviceIdentity:
    key = crypto.signature("ML-DSA-44").generate(crypto.system_rng)
    return DeviceIdentity(
        device_id="dev-1",
        algorithm="ML-DSA-44",
        seed=key.private_bytes(),
        server_url="http://127.0.0.1:1",
        server_keys=(
            PinnedServerKey(key_id="k1", algorithm="ML-KEM-1024+X25519", public_key=b"p" * 10),
        ),
    )


def test_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "device.keystore"
    ident = _identity()
    save(path, ident, "correct horse", scrypt_n=N)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load(path, "correct horse")
    assert loaded == ident
    assert ident.seed.hex() not in path.read_text()
    assert ident.seed.hex() not in repr(loaded)


def test_a_path_may_be_a_string(tmp_path: Path) -> None:
    ident = _identity()
    save(str(tmp_path / "k"), ident, "pw", scrypt_n=N)
    assert load(str(tmp_path / "k"), "pw") == ident


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save(path, _identity(), "right", scrypt_n=N)
    with pytest.raises(KeystoreError, match="passphrase"):
        load(path, "wrong")


def test_damaged_or_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("{}")
    with pytest.raises(KeystoreError):
        load(path, "x")
    path.write_text("not json")
    with pytest.raises(KeystoreError):
        load(path, "x")
    with pytest.raises(KeystoreError, match="cannot read"):
        load(tmp_path / "missing", "x")
    save(path, _identity(), "pw", scrypt_n=N)
    doc = json.loads(path.read_text())
    doc["kdf"]["n"] = 2  # a downgraded cost must not be honoured
    path.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="parameters"):
        load(path, "pw")


def test_replace_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save(path, _identity(), "pw", scrypt_n=N)
    save(path, _identity(), "pw", scrypt_n=N)
    assert [p.name for p in tmp_path.iterdir()] == ["k"]
