"""The registry of named algorithms: the one way the rest of QFLARE obtains a primitive.

Names are the standards' names (``"ML-KEM-1024"``, ``"ML-DSA-44"``, ``"HKDF-SHA3-512"``).
A hybrid KEM is named by its components joined with ``+`` (``"ML-KEM-1024+X25519"``).
``require()`` is called at start-up and fails with a message naming every missing algorithm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from cryptography.exceptions import UnsupportedAlgorithm as _PycaUnsupported

from qflare.crypto.aead import Aead
from qflare.crypto.hybrid import HybridKem
from qflare.crypto.kdf import Hkdf
from qflare.crypto.kem import Kem, MlKem, P384Kem, PqcryptoKem, X25519Kem
from qflare.crypto.signature import MlDsa, PqcryptoSignature, SignatureScheme
from qflare.errors import UnsupportedAlgorithm

_KEMS: dict[str, Callable[[], Kem]] = {
    "ML-KEM-768": lambda: MlKem(768),
    "ML-KEM-1024": lambda: MlKem(1024),
    "X25519": X25519Kem,
    "P-384": P384Kem,
    "HQC-256": lambda: PqcryptoKem("HQC-256", "hqc_256"),
    "Classic-McEliece-6960119": lambda: PqcryptoKem("Classic-McEliece-6960119", "mceliece_6960119"),
}
_SIGNATURES: dict[str, Callable[[], SignatureScheme]] = {
    "ML-DSA-44": lambda: MlDsa(44),
    "ML-DSA-65": lambda: MlDsa(65),
    "ML-DSA-87": lambda: MlDsa(87),
    "SLH-DSA-SHAKE-256f": lambda: PqcryptoSignature("SLH-DSA-SHAKE-256f", "slh_dsa_shake_256f"),
    "SLH-DSA-SHA2-128s": lambda: PqcryptoSignature("SLH-DSA-SHA2-128s", "slh_dsa_sha2_128s"),
}
_KDFS: dict[str, Callable[[], Hkdf]] = {
    "HKDF-SHA3-512": lambda: Hkdf("SHA3-512"),
    "HKDF-SHA256": lambda: Hkdf("SHA-256", "HKDF-SHA256"),
}
_AEADS: dict[str, Callable[[], Aead]] = {
    "AES-256-GCM": lambda: Aead("AES-256-GCM"),
    "ChaCha20-Poly1305": lambda: Aead("ChaCha20-Poly1305"),
}
# Algorithms that need the optional pqcrypto extra rather than pyca/cryptography.
OPTIONAL = frozenset(
    {"HQC-256", "Classic-McEliece-6960119", "SLH-DSA-SHAKE-256f", "SLH-DSA-SHA2-128s"}
)


def _fixed_rng(n: int) -> bytes:
    return bytes(range(1, n + 1))


@functools.cache
def kem(name: str) -> Kem:
    if "+" in name:
        return HybridKem([kem(part) for part in name.split("+")])
    try:
        factory = _KEMS[name]
    except KeyError:
        raise UnsupportedAlgorithm(name, "not a known KEM") from None
    return factory()


@functools.cache
def signature(name: str) -> SignatureScheme:
    try:
        factory = _SIGNATURES[name]
    except KeyError:
        raise UnsupportedAlgorithm(name, "not a known signature scheme") from None
    return factory()


@functools.cache
def kdf(name: str) -> Hkdf:
    try:
        return _KDFS[name]()
    except KeyError:
        raise UnsupportedAlgorithm(name, "not a known KDF") from None


@functools.cache
def aead(name: str) -> Aead:
    try:
        return _AEADS[name]()
    except KeyError:
        raise UnsupportedAlgorithm(name, "not a known AEAD") from None


def names() -> list[str]:
    return [*_KEMS, *_SIGNATURES, *_KDFS, *_AEADS]


@functools.cache
def _probe(name: str) -> str | None:
    """Exercise ``name`` once; return why it is unavailable, or None if it works."""
    try:
        if name in _KEMS:
            k = kem(name)
            if name in OPTIONAL:
                return None  # generating a McEliece key takes ~100 ms: importing is enough
            priv = k.generate(_fixed_rng)
            shared, ct = priv.public_key().encapsulate()
            if priv.decapsulate(ct) != shared:
                return "decapsulation does not match encapsulation"
        elif name in _SIGNATURES:
            s = signature(name)
            if name not in OPTIONAL:
                key = s.generate(_fixed_rng)
                key.public_key().verify(key.sign(b"probe", b"probe"), b"probe", b"probe")
        elif name in _KDFS:
            kdf(name).derive(b"probe", None, b"probe", 32)
        elif name in _AEADS:
            box = aead(name).key(bytes(32))
            box.open(bytes(12), box.seal(bytes(12), b"probe", b""), b"")
        else:
            return "not a known algorithm"
    except UnsupportedAlgorithm as exc:
        return str(exc)
    except _PycaUnsupported as exc:
        return f"the installed OpenSSL does not offer it ({exc})"
    return None


def available() -> dict[str, str | None]:
    """Every registered name mapped to None (usable) or the reason it is not."""
    return {name: _probe(name) for name in names()}


def require(wanted: Iterable[str]) -> None:
    """Fail with one message naming every algorithm in ``wanted`` that cannot be used."""
    missing = {}
    for name in wanted:
        for part in name.split("+"):
            reason = _probe(part)
            if reason is not None:
                missing[part] = reason
    if missing:
        detail = "; ".join(f"{n}: {r}" for n, r in missing.items())
        raise UnsupportedAlgorithm(", ".join(missing), detail)
