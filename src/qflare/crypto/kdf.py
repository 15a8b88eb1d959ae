"""HKDF (RFC 5869) and the hash and HMAC that go with it, as one named suite component.

``Hkdf("SHA3-512")`` gives the transcript hash, the Finished MAC and the key derivation of a
suite, all over the same hash function.
"""

from __future__ import annotations

import hmac as _hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _pyca_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from qflare.errors import UnsupportedAlgorithm

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA3-512": hashes.SHA3_512,
    "SHA3-256": hashes.SHA3_256,
    "SHA-256": hashes.SHA256,
    "SHA-512": hashes.SHA512,
}


class Hkdf:
    """HKDF over one hash function, plus that hash and HMAC with it."""

    __slots__ = ("_algorithm", "digest_size", "hash_name", "name")

    def __init__(self, hash_name: str, name: str | None = None) -> None:
        """``name`` is the registry's name when it is not ``HKDF-<hash_name>`` (the registry
        says ``HKDF-SHA256``, after RFC 5869, for the hash FIPS 180-4 calls ``SHA-256``)."""
        try:
            self._algorithm = _HASHES[hash_name]()
        except KeyError:
            raise UnsupportedAlgorithm(name or f"HKDF-{hash_name}") from None
        self.hash_name = hash_name
        self.name = name or f"HKDF-{hash_name}"
        self.digest_size: int = self._algorithm.digest_size

    def hash(self, data: bytes) -> bytes:
        h = hashes.Hash(self._algorithm)
        h.update(data)
        return h.finalize()

    def mac(self, key: bytes, data: bytes) -> bytes:
        h = _pyca_hmac.HMAC(key, self._algorithm)
        h.update(data)
        return h.finalize()

    def verify_mac(self, key: bytes, data: bytes, tag: bytes) -> bool:
        # Constant-time comparison: a timing difference would let a forger learn the tag byte
        # by byte.
        return _hmac.compare_digest(self.mac(key, data), tag)

    def extract(self, salt: bytes, ikm: bytes) -> bytes:
        return HKDF.extract(self._algorithm, salt, ikm)

    def expand(self, prk: bytes, info: bytes, length: int) -> bytes:
        return HKDFExpand(self._algorithm, length, info).derive(prk)

    def derive(self, ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
        return HKDF(self._algorithm, length, salt, info).derive(ikm)

    def __repr__(self) -> str:
        return f"<Hkdf {self.hash_name}>"


def scrypt(passphrase: bytes, salt: bytes, *, n: int = 2**15, r: int = 8, p: int = 1) -> bytes:
    """A 32-byte key from a passphrase (RFC 7914); the cost makes guessing expensive."""
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)
