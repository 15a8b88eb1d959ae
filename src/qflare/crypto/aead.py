"""Authenticated encryption: AES-256-GCM and ChaCha20-Poly1305, 256-bit keys only.

A 256-bit key gives about 128-bit security against an attacker with Grover's algorithm, and
256-bit against classical search. Every failure of ``open`` and ``open_into`` raises the same
``DecryptionFailed``: no oracle for which part was wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qflare.errors import CryptoError, DecryptionFailed, InvalidKey, UnsupportedAlgorithm

# What the AEAD reads (plaintext, ciphertext, AAD): any contiguous buffer of bytes. What
# ``seal_into`` and ``open_into`` write into: a ``bytearray``, or a writable byte ``memoryview``.
BytesLike = bytes | bytearray | memoryview
WritableBuffer = bytearray | memoryview

_CIPHERS: dict[str, Any] = {"AES-256-GCM": AESGCM, "ChaCha20-Poly1305": ChaCha20Poly1305}

# InvalidTag: wrong key, nonce, AAD or tag. ValueError: a nonce or ciphertext of a length the
# cipher refuses (a ciphertext shorter than its tag, for one).
_OPEN_FAILURES = (InvalidTag, ValueError)

# (nonce, data, aad) -> data: the shape of seal, open and the cipher's encrypt and decrypt.
_Crypt = Callable[[bytes, BytesLike, BytesLike], bytes]


def _opener(decrypt: _Crypt) -> _Crypt:
    def open(nonce: bytes, ciphertext: BytesLike, aad: BytesLike) -> bytes:
        try:
            return decrypt(nonce, ciphertext, aad)
        except _OPEN_FAILURES:
            raise DecryptionFailed() from None

    return open


def _wrong_size(out: WritableBuffer, size: int) -> CryptoError:
    # The caller's own mistake, found before the cipher runs: never a DecryptionFailed, which
    # would blame the peer.
    return CryptoError(f"output buffer must be {size} bytes, got {len(out)}")


class AeadKey:
    """A keyed AEAD instance; the cipher object is built once per key, not per record.

    ``seal(nonce, plaintext, aad)`` returns ciphertext || tag. ``open(nonce, ciphertext, aad)``
    returns the plaintext or raises ``DecryptionFailed``, the same error for every cause.

    Both are bound once, here, rather than being methods that call the cipher: they are on
    every record's path, a 1 KiB record takes well under a microsecond, and each Python call
    layer added about 10 % to that (bench/crypto.py). ``seal`` is the cipher's own ``encrypt``;
    ``open`` is one function around ``decrypt`` that exists only to hide why it failed.

    ``seal_into(nonce, plaintext, aad, out)`` and ``open_into(nonce, ciphertext, aad, out)`` do
    the same into the caller's writable buffer (a ``bytearray``, or a writable byte
    ``memoryview``, e.g. a slice of a bigger frame) of exactly ``len(plaintext) + tag_size`` /
    ``len(ciphertext) - tag_size`` bytes, and return the number of bytes written. They are for
    large data, where a fresh result object and a copy of it into a bigger frame cost more
    than the cipher (docs/PERFORMANCE.md), and so are plain methods: a call layer is lost in
    the cipher's time there, and binding them per key would tax every key. An output buffer of
    another size is a ``CryptoError`` (not ``DecryptionFailed``: the caller's mistake, not the
    peer's), raised before the cipher runs; for ``open_into`` a ciphertext shorter than its tag
    is ``DecryptionFailed`` first, as in ``open``. A failed ``open_into`` raises
    ``DecryptionFailed`` and leaves ``out`` zeroed: the cipher writes the plaintext before it
    checks the tag, and no unauthenticated plaintext is left behind. Inputs are only read.
    """

    __slots__ = ("_cipher", "open", "seal")

    seal: _Crypt
    open: _Crypt

    def __init__(self, cipher: Any) -> None:
        self._cipher = cipher
        self.seal = cipher.encrypt
        self.open = _opener(cipher.decrypt)

    def seal_into(
        self, nonce: bytes, plaintext: BytesLike, aad: BytesLike, out: WritableBuffer
    ) -> int:
        size = len(plaintext) + Aead.tag_size
        if len(out) != size:
            raise _wrong_size(out, size)
        written: int = self._cipher.encrypt_into(nonce, plaintext, aad, out)
        return written

    def open_into(
        self, nonce: bytes, ciphertext: BytesLike, aad: BytesLike, out: WritableBuffer
    ) -> int:
        size = len(ciphertext) - Aead.tag_size
        if size < 0:  # shorter than its tag: a bad ciphertext, as in open
            raise DecryptionFailed()
        if len(out) != size:
            raise _wrong_size(out, size)
        try:
            written: int = self._cipher.decrypt_into(nonce, ciphertext, aad, out)
        except _OPEN_FAILURES:
            out[:] = bytes(size)  # the unauthenticated plaintext the cipher left there
            raise DecryptionFailed() from None
        return written

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
