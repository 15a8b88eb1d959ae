"""Hybrid KEM: several component KEMs whose secrets are combined by one hash.

The combiner follows the X-Wing model (draft-connolly-cfrg-xwing-kem) generalised to any list
of components, and is more conservative than X-Wing: it hashes every component's name, shared
secret, ciphertext and public key, not only the classical ones, so the result stays an IND-CCA
secret as long as any one component is secure, without relying on ML-KEM's ciphertext
collision resistance (see docs/PROTOCOL.md section 4)::

    ss = SHA3-256( lp(label) || for each component i: lp(name_i) lp(ss_i) lp(ct_i) lp(pk_i) )

where ``lp(x)`` is a 4-byte big-endian length followed by ``x``. Public keys, ciphertexts and
private keys of the hybrid are the components' fixed-size encodings concatenated in order.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes

from qflare.crypto import labels
from qflare.crypto.kem import Kem, KemPrivateKey, KemPublicKey, Rng
from qflare.errors import InvalidCiphertext


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def combine(
    label: bytes, names: Sequence[str], parts: Sequence[tuple[bytes, bytes, bytes]]
) -> bytes:
    """Combine ``(shared_secret, ciphertext, public_key)`` triples into one 32-byte secret."""
    return _combine(_lp(label), [_lp(name.encode()) for name in names], parts)


def _combine(
    label_lp: bytes, name_lps: Sequence[bytes], parts: Sequence[tuple[bytes, bytes, bytes]]
) -> bytes:
    # The hash input is assembled in one join and hashed in one update: every update is a
    # call into the backend, and every ``+`` a copy of kilobytes of keys and ciphertexts.
    pieces = [label_lp]
    for name_lp, (shared, ct, pk) in zip(name_lps, parts, strict=True):
        pieces += (
            name_lp,
            len(shared).to_bytes(4, "big"),
            shared,
            len(ct).to_bytes(4, "big"),
            ct,
            len(pk).to_bytes(4, "big"),
            pk,
        )
    h = hashes.Hash(hashes.SHA3_256())
    h.update(b"".join(pieces))
    return h.finalize()


def _split(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos : pos + size])
        pos += size
    return out


class _HybridPublic(KemPublicKey):
    __slots__ = ("_hybrid", "_part_bytes", "_parts", "_raw")

    def __init__(self, hybrid: HybridKem, parts: list[KemPublicKey]) -> None:
        self._hybrid = hybrid
        self._parts = parts
        # Each component's encoding, as the combiner hashes it: encoded once, not per call.
        self._part_bytes = tuple(p.public_bytes() for p in parts)
        self._raw = b"".join(self._part_bytes)

    def encapsulate(self) -> tuple[bytes, bytes]:
        triples = []
        for part, pk in zip(self._parts, self._part_bytes, strict=True):
            shared, ct = part.encapsulate()
            triples.append((shared, ct, pk))
        return self._hybrid.combine(triples), b"".join(ct for _, ct, _ in triples)

    def public_bytes(self) -> bytes:
        return self._raw


class _HybridPrivate(KemPrivateKey):
    __slots__ = ("_hybrid", "_parts", "_public")

    def __init__(self, hybrid: HybridKem, parts: list[KemPrivateKey]) -> None:
        self._hybrid = hybrid
        self._parts = parts
        self._public: _HybridPublic | None = None  # built on first use, like its components'

    def _public_key(self) -> _HybridPublic:
        public = self._public
        if public is None:
            public = self._public = _HybridPublic(
                self._hybrid, [p.public_key() for p in self._parts]
            )
        return public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        hybrid = self._hybrid
        if len(ciphertext) != hybrid.ciphertext_size:
            raise InvalidCiphertext(f"{hybrid.name} ciphertext has the wrong length")
        cts = _split(ciphertext, hybrid.ciphertext_sizes)
        pks = self._public_key()._part_bytes
        return hybrid.combine(
            [
                (part.decapsulate(ct), ct, pk)
                for part, ct, pk in zip(self._parts, cts, pks, strict=True)
            ]
        )

    def public_key(self) -> KemPublicKey:
        return self._public_key()

    def private_bytes(self) -> bytes:
        return b"".join(p.private_bytes() for p in self._parts)


class HybridKem(Kem):
    shared_secret_size = 32

    def __init__(self, components: Sequence[Kem], label: bytes = labels.HYBRID_KEM) -> None:
        if len(components) < 2:
            raise ValueError("a hybrid KEM needs at least two components")
        self.components = tuple(components)
        self.label = label
        self.name = "+".join(k.name for k in components)
        self.public_key_size = sum(k.public_key_size for k in components)
        self.ciphertext_size = sum(k.ciphertext_size for k in components)
        self.private_key_size = sum(k.private_key_size for k in components)
        self.ciphertext_sizes = tuple(k.ciphertext_size for k in components)
        # The combiner's fixed prefixes, encoded once.
        self._label_lp = _lp(label)
        self._name_lps = tuple(_lp(k.name.encode()) for k in components)

    def combine(self, triples: Sequence[tuple[bytes, bytes, bytes]]) -> bytes:
        return _combine(self._label_lp, self._name_lps, triples)

    def generate(self, rng: Rng) -> KemPrivateKey:
        return _HybridPrivate(self, [k.generate(rng) for k in self.components])

    def from_private_bytes(self, data: bytes) -> KemPrivateKey:
        self._check_len("private key", data, self.private_key_size)
        sizes = [k.private_key_size for k in self.components]
        parts = _split(data, sizes)
        return _HybridPrivate(
            self, [k.from_private_bytes(p) for k, p in zip(self.components, parts, strict=True)]
        )

    def from_public_bytes(self, data: bytes) -> KemPublicKey:
        self._check_len("public key", data, self.public_key_size)
        parts = _split(data, [k.public_key_size for k in self.components])
        return _HybridPublic(
            self, [k.from_public_bytes(p) for k, p in zip(self.components, parts, strict=True)]
        )
