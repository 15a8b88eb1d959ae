"""QFLARE's crypto core: named algorithms over pyca/cryptography (and optional pqcrypto).

The only package in QFLARE that imports a cryptography library. It does no I/O: randomness for
key generation is passed in as an ``Rng`` (``system_rng`` in production).
"""

from __future__ import annotations

import secrets

from qflare.crypto import labels
from qflare.crypto.aead import Aead, AeadKey
from qflare.crypto.hybrid import HybridKem, combine
from qflare.crypto.kdf import Hkdf, scrypt
from qflare.crypto.kem import Kem, KemPrivateKey, KemPublicKey, Rng
from qflare.crypto.registry import aead, available, kdf, kem, names, require, signature
from qflare.crypto.signature import SignaturePrivateKey, SignaturePublicKey, SignatureScheme


def system_rng(n: int) -> bytes:
    """The operating system's CSPRNG; pass it wherever an ``Rng`` is wanted outside tests."""
    return secrets.token_bytes(n)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare MACs and token hashes without leaking where they differ."""
    return secrets.compare_digest(a, b)


__all__ = [
    "Aead",
    "AeadKey",
    "Hkdf",
    "HybridKem",
    "Kem",
    "KemPrivateKey",
    "KemPublicKey",
    "Rng",
    "SignaturePrivateKey",
    "SignaturePublicKey",
    "SignatureScheme",
    "aead",
    "available",
    "combine",
    "constant_time_equal",
    "kdf",
    "kem",
    "labels",
    "names",
    "require",
    "scrypt",
    "signature",
    "system_rng",
]
