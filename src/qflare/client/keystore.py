"""The device keystore: one passphrase-encrypted file holding a device's identity.

Format (JSON, so an operator can see what it is without seeing what is in it)::

    {"format": "qflare-keystore", "version": 1,
     "kdf": {"name": "scrypt", "salt": b64, "n": 32768, "r": 8, "p": 1},
     "nonce": b64, "ciphertext": b64}

The plaintext is JSON with the device id, the identity key's algorithm and seed, and the
server keys the device pinned at enrollment. The file is created with mode 0600 and replaced
atomically (write a temporary file, fsync, rename), so a crash never leaves half a keystore.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qflare import crypto
from qflare.errors import DecryptionFailed, QflareError
from qflare.protocol.handshake import PinnedServerKey

_AAD = b"qflare/v1/keystore"


class KeystoreError(QflareError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceIdentity:
    device_id: str
    algorithm: str
    seed: bytes = field(repr=False)
    server_url: str
    server_keys: tuple[PinnedServerKey, ...]

    def signing_key(self) -> crypto.SignaturePrivateKey:
        return crypto.signature(self.algorithm).from_private_bytes(self.seed)

    @property
    def server_key(self) -> PinnedServerKey:
        """The newest pinned server key (the last one learned)."""
        return self.server_keys[-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "algorithm": self.algorithm,
            "seed": _b64(self.seed),
            "server_url": self.server_url,
            "server_keys": [
                {"key_id": k.key_id, "algorithm": k.algorithm, "public_key": _b64(k.public_key)}
                for k in self.server_keys
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceIdentity:
        return cls(
            device_id=data["device_id"],
            algorithm=data["algorithm"],
            seed=_unb64(data["seed"]),
            server_url=data["server_url"],
            server_keys=tuple(
                PinnedServerKey(
                    key_id=k["key_id"], algorithm=k["algorithm"], public_key=_unb64(k["public_key"])
                )
                for k in data["server_keys"]
            ),
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


StrPath = str | os.PathLike[str]


def save(
    path: StrPath, identity: DeviceIdentity, passphrase: str, *, scrypt_n: int = 2**15
) -> None:
    path = Path(path)
    salt, nonce = crypto.system_rng(16), crypto.system_rng(12)
    key = crypto.scrypt(passphrase.encode(), salt, n=scrypt_n)
    sealed = (
        crypto.aead("AES-256-GCM")
        .key(key)
        .seal(nonce, json.dumps(identity.to_json()).encode(), _AAD)
    )
    doc = {
        "format": "qflare-keystore",
        "version": 1,
        "kdf": {"name": "scrypt", "salt": _b64(salt), "n": scrypt_n, "r": 8, "p": 1},
        "nonce": _b64(nonce),
        "ciphertext": _b64(sealed),
    }
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: StrPath, passphrase: str) -> DeviceIdentity:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != "qflare-keystore" or doc.get("version") != 1:
            raise KeystoreError(f"{path} is not a QFLARE keystore (version 1)")
        kdf = doc["kdf"]
        if kdf["name"] != "scrypt" or not 2**14 <= int(kdf["n"]) <= 2**20:
            raise KeystoreError(f"{path} uses unsupported key-derivation parameters")
        key = crypto.scrypt(passphrase.encode(), _unb64(kdf["salt"]), n=int(kdf["n"]))
        nonce, sealed = _unb64(doc["nonce"]), _unb64(doc["ciphertext"])
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise KeystoreError(f"{path} is not a valid QFLARE keystore") from None
    try:
        plain = crypto.aead("AES-256-GCM").key(key).open(nonce, sealed, _AAD)
    except DecryptionFailed:
        raise KeystoreError("wrong passphrase or damaged keystore") from None
    return DeviceIdentity.from_json(json.loads(plain))
