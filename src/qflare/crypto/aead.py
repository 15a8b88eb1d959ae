"""Authenticated encryption: AES-256-GCM and ChaCha20-Poly1305, 256-bit keys only.

A 256-bit key gives about 128-bit security against an attacker with Grover's algorithm, and
256-bit against classical search. Every failure of ``open`` raises the same
``DecryptionFailed``: no oracle for which part was wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qflare.errors import DecryptionFailed, InvalidKey, UnsupportedAlgorithm

_CIPHERS: dict[str, Any] = {"AES-256-GCM": AESGCM, "ChaCha20-Poly1305": ChaCha20Poly1305}

# InvalidTag: wrong key, nonce, AAD or tag. ValueError: a nonce or ciphertext of a length the
# cipher refuses (a ciphertext shorter than its tag, for one).
_OPEN_FAILURES = (InvalidTag, ValueError)

# (nonce, data, aad) -> data: the shape of seal, open and the cipher's encrypt and decrypt.
_Crypt = Callable[[bytes, bytes, bytes], bytes]


def _opener(decrypt: _Crypt) -> _Crypt:
    def open(nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return decrypt(nonce, ciphertext, aad)
        except _OPEN_FAILURES:
            raise DecryptionFailed() from None

    return open


class AeadKey:
    """A keyed AEAD instance; the cipher object is built once per key, not per record.

    ``seal(nonce, plaintext, aad)`` returns ciphertext || tag. ``open(nonce, ciphertext, aad)``
    returns the plaintext or raises ``DecryptionFailed``, the same error for every cause.

    Both are bound once, here, rather than being methods that call the cipher: they are on
    every record's path, a 1 KiB record takes well under a microsecond, and each Python call
    layer added about 10 % to that (bench/crypto.py). ``seal`` is the cipher's own ``encrypt``;
    ``open`` is one function around ``decrypt`` that exists only to hide why it failed.
    """

    __slots__ = ("open", "seal")

    seal: _Crypt
    open: _Crypt

    def __init__(self, cipher: Any) -> None:
        self.seal = cipher.encrypt
        self.open = _opener(cipher.decrypt)

    def __repr__(self) -> str:
        return "<AeadKey>"


class Aead:
    key_size = 32
    nonce_size = 12
    tag_size = 16

    __slots__ = ("_cls", "name")

    def __init__(self, name: str) -> None:
        try:
            self._cls = _CIPHERS[name]
        except KeyError:
            raise UnsupportedAlgorithm(name) from None
        self.name = name

    def key(self, key: bytes) -> AeadKey:
        if len(key) != self.key_size:
            raise InvalidKey(f"{self.name} keys are {self.key_size} bytes, got {len(key)}")
        return AeadKey(self._cls(key))

    def __repr__(self) -> str:
        return f"<Aead {self.name}>"
