"""Named, versioned cipher suites (docs/PROTOCOL.md section 3).

A suite fixes every primitive of a session: the ephemeral KEM, the device signature scheme,
the KDF (whose hash is also the transcript hash and the Finished MAC) and the record AEAD.
The wire carries only the 16-bit id; both transcript and signature cover the offer and the
choice, so neither can be changed in flight.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from qflare import crypto
from qflare.errors import UnsupportedAlgorithm


@dataclass(frozen=True, slots=True, kw_only=True)
class Suite:
    id: int
    name: str
    kem: str
    signature: str
    kdf: str
    aead: str

    def algorithms(self) -> tuple[str, ...]:
        return (self.kem, self.signature, self.kdf, self.aead)

    def kem_impl(self) -> crypto.Kem:
        return crypto.kem(self.kem)

    def kdf_impl(self) -> crypto.Hkdf:
        return crypto.kdf(self.kdf)


def _suite(id_: int, kem: str, sig: str, kdf: str = "HKDF-SHA3-512") -> Suite:
    return Suite(
        id=id_,
        name=f"QFLARE-v1/{kem}/{sig}/{kdf}/AES-256-GCM",
        kem=kem,
        signature=sig,
        kdf=kdf,
        aead="AES-256-GCM",
    )


# Hybrid ML-KEM-1024 + X25519 with ML-DSA-44 device signatures is the default: the device
# signature only has to resist forgery during the handshake's lifetime, so the fastest ML-DSA
# level serves, and 65/87 are there for operators who want more margin.
HYBRID_X25519_MLDSA44: Final = _suite(0x0101, "ML-KEM-1024+X25519", "ML-DSA-44")
HYBRID_X25519_MLDSA65: Final = _suite(0x0102, "ML-KEM-1024+X25519", "ML-DSA-65")
HYBRID_X25519_MLDSA87: Final = _suite(0x0103, "ML-KEM-1024+X25519", "ML-DSA-87")
# The pairing the IETF level-5 hybrids use.
HYBRID_P384_MLDSA87: Final = _suite(0x0201, "ML-KEM-1024+P-384", "ML-DSA-87")
# Pure post-quantum: no classical component at all.
PURE_PQ_MLDSA44: Final = _suite(0x0301, "ML-KEM-1024", "ML-DSA-44")
# Lattice + code-based + classical: survives a break of ML-KEM or of HQC. Needs pqcrypto.
PARANOID: Final = _suite(0x0401, "ML-KEM-1024+HQC-256+X25519", "ML-DSA-87")

ALL_SUITES: Final = (
    HYBRID_X25519_MLDSA44,
    HYBRID_X25519_MLDSA65,
    HYBRID_X25519_MLDSA87,
    HYBRID_P384_MLDSA87,
    PURE_PQ_MLDSA44,
    PARANOID,
)
DEFAULT_SUITE: Final = HYBRID_X25519_MLDSA44
_BY_ID: Final = {s.id: s for s in ALL_SUITES}
_BY_NAME: Final = {s.name: s for s in ALL_SUITES}


def by_id(suite_id: int) -> Suite:
    try:
        return _BY_ID[suite_id]
    except KeyError:
        raise UnsupportedAlgorithm(f"suite 0x{suite_id:04x}") from None


def find(suite_id: int) -> Suite | None:
    """The suite with this id, or None if it is not one QFLARE knows."""
    return _BY_ID.get(suite_id)


def by_name(name: str) -> Suite:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedAlgorithm(name, "not a known suite") from None


def for_signature(algorithm: str, kem: str = DEFAULT_SUITE.kem) -> list[Suite]:
    """The suites a device holding a key of ``algorithm`` can offer, for the given KEM."""
    return [s for s in ALL_SUITES if s.signature == algorithm and s.kem == kem]


def require_suites(suites: Iterable[Suite]) -> None:
    """Fail at start-up, naming the missing algorithms, if a configured suite cannot run."""
    crypto.require({name for s in suites for name in s.algorithms()})
