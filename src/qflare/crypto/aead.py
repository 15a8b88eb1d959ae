"""Authenticated encryption: AES-256-GCM and ChaCha20-Poly1305, 256-bit keys only.

A 256-bit key gives about 128-bit security against an attacker with Grover's algorithm, and
256-bit against classical search. Every failure of ``open`` raises the same
``DecryptionFailed``: no oracle for which part was wrong.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qflare.errors import DecryptionFailed, InvalidKey, UnsupportedAlgorithm

_CIPHERS: dict[str, Any] = {"AES-256-GCM": AESGCM, "ChaCha20-Poly1305": ChaCha20Poly1305}


class AeadKey:
    """A keyed AEAD instance; the cipher object is built once per key, not per record."""

    __slots__ = ("_cipher",)

    def __init__(self, cipher: Any) -> None:
        self._cipher = cipher

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        sealed: bytes = self._cipher.encrypt(nonce, plaintext, aad)
        return sealed

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            opened: bytes = self._cipher.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError):
            # ValueError: a nonce or ciphertext of a length the cipher refuses.
            raise DecryptionFailed() from None
        return opened

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
