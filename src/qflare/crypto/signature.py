"""Signatures: ML-DSA (FIPS 204) from pyca/cryptography, SLH-DSA from the optional pqcrypto.

``verify()`` raises ``InvalidSignature``; it never returns a bool. Every call takes a context
string (FIPS 204 "ctx") from ``qflare.crypto.labels``, so a signature made for one kind of
message never verifies as another. ``verify_any_context()`` is the standard's verification with
any context, the empty one included, for signatures made outside QFLARE (published test
vectors); nothing in QFLARE's own protocol calls it.

pyca always hedges ML-DSA signing (fresh randomness per signature), so signatures are not
reproducible byte for byte; key generation from a 32-byte seed is.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa

from qflare.crypto.kem import Rng
from qflare.errors import InvalidKey, InvalidSignature, UnsupportedAlgorithm

_MAX_CONTEXT = 255  # FIPS 204 5.2: ctx is at most 255 bytes


def _check_context(context: bytes) -> None:
    if not context or len(context) > _MAX_CONTEXT:
        raise ValueError("a signature context must be 1..255 bytes")


class SignaturePublicKey(abc.ABC):
    __slots__ = ()

    def verify(self, signature: bytes, message: bytes, context: bytes) -> None:
        """Raise ``InvalidSignature`` unless ``signature`` signs ``message`` under ``context``.

        ``context`` must be one of QFLARE's labels (1..255 bytes); an empty or over-long one
        is a programming error (``ValueError``), never the peer's doing.
        """
        _check_context(context)
        self._verify(signature, message, context)

    def verify_any_context(self, signature: bytes, message: bytes, context: bytes) -> None:
        """FIPS 204 / FIPS 205 verification with any context of 0..255 bytes, empty included.

        For signatures QFLARE did not make (published known-answer vectors, interoperability
        checks), which may use the empty context. QFLARE's own messages use ``verify``: its
        non-empty context is the rule that keeps one kind of signed message from passing as
        another. A context over 255 bytes cannot have been signed, so, as the standard's
        Verify returns false for it, this raises ``InvalidSignature``.
        """
        if len(context) > _MAX_CONTEXT:
            raise InvalidSignature("signature context is longer than 255 bytes")
        self._verify(signature, message, context)

    @abc.abstractmethod
    def _verify(self, signature: bytes, message: bytes, context: bytes) -> None:
        """Verify; ``context`` is already known to be at most 255 bytes."""

    @abc.abstractmethod
    def public_bytes(self) -> bytes: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.public_bytes()[:8].hex()}…>"


class SignaturePrivateKey(abc.ABC):
    __slots__ = ()

    @abc.abstractmethod
    def sign(self, message: bytes, context: bytes) -> bytes: ...

    @abc.abstractmethod
    def public_key(self) -> SignaturePublicKey: ...

    @abc.abstractmethod
    def private_bytes(self) -> bytes:
        """The compact private form (the seed for ML-DSA). Secret."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} for {self.public_key().public_bytes()[:8].hex()}…>"


class SignatureScheme(abc.ABC):
    name: str
    public_key_size: int
    signature_size: int
    private_key_size: int

    @abc.abstractmethod
    def generate(self, rng: Rng) -> SignaturePrivateKey: ...

    @abc.abstractmethod
    def from_private_bytes(self, data: bytes) -> SignaturePrivateKey: ...

    @abc.abstractmethod
    def from_public_bytes(self, data: bytes) -> SignaturePublicKey: ...

    def _check_len(self, what: str, data: bytes, size: int) -> None:
        if len(data) != size:
            raise InvalidKey(f"{self.name} {what} must be {size} bytes, got {len(data)}")

    def __repr__(self) -> str:
        return f"<SignatureScheme {self.name}>"


class _MlDsaPublic(SignaturePublicKey):
    __slots__ = ("_key", "_sig_size")

    def __init__(self, key: Any, sig_size: int) -> None:
        self._key = key
        self._sig_size = sig_size

    def _verify(self, signature: bytes, message: bytes, context: bytes) -> None:
        if len(signature) != self._sig_size:
            raise InvalidSignature("signature has the wrong length")
        try:
            self._key.verify(signature, message, context)
        except _PycaInvalidSignature:
            raise InvalidSignature("signature did not verify") from None

    def public_bytes(self) -> bytes:
        raw: bytes = self._key.public_bytes_raw()
        return raw


class _MlDsaPrivate(SignaturePrivateKey):
    __slots__ = ("_key", "_public", "_sig_size")

    def __init__(self, key: Any, sig_size: int) -> None:
        self._key = key
        self._sig_size = sig_size
        self._public: SignaturePublicKey | None = None  # built on first use

    def sign(self, message: bytes, context: bytes) -> bytes:
        _check_context(context)
        signature: bytes = self._key.sign(message, context)
        return signature

    def public_key(self) -> SignaturePublicKey:
        public = self._public
        if public is None:
            public = self._public = _MlDsaPublic(self._key.public_key(), self._sig_size)
        return public

    def private_bytes(self) -> bytes:
        seed: bytes = self._key.private_bytes_raw()
        return seed


_MLDSA_PARAMS: dict[int, tuple[Any, Any, int, int]] = {
    # level: (private class, public class, public key size, signature size)  — FIPS 204 table 2
    44: (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey, 1312, 2420),
    65: (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey, 1952, 3309),
    87: (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey, 2592, 4627),
}


class MlDsa(SignatureScheme):
    private_key_size = 32  # the xi seed of FIPS 204 key generation

    def __init__(self, level: int) -> None:
        try:
            self._priv, self._pub, self.public_key_size, self.signature_size = _MLDSA_PARAMS[level]
        except KeyError:
            raise UnsupportedAlgorithm(f"ML-DSA-{level}") from None
        self.name = f"ML-DSA-{level}"

    def generate(self, rng: Rng) -> SignaturePrivateKey:
        return self.from_private_bytes(rng(self.private_key_size))

    def from_private_bytes(self, data: bytes) -> SignaturePrivateKey:
        self._check_len("seed", data, self.private_key_size)
        return _MlDsaPrivate(self._priv.from_seed_bytes(data), self.signature_size)

    def from_public_bytes(self, data: bytes) -> SignaturePublicKey:
        self._check_len("public key", data, self.public_key_size)
        try:
            key = self._pub.from_public_bytes(data)
        except ValueError:
            raise InvalidKey(f"{self.name} public key is malformed") from None
        return _MlDsaPublic(key, self.signature_size)


class _PqSigPublic(SignaturePublicKey):
    __slots__ = ("_mod", "_pk")

    def __init__(self, mod: Any, pk: bytes) -> None:
        self._mod = mod
        self._pk = pk

    def _verify(self, signature: bytes, message: bytes, context: bytes) -> None:
        try:
            self._mod.verify(self._pk, message, signature, context=context)
        except Exception:
            # pqcrypto raises its own error type (and ValueError for bad lengths); all mean "no".
            raise InvalidSignature("signature did not verify") from None

    def public_bytes(self) -> bytes:
        return self._pk


class _PqSigPrivate(SignaturePrivateKey):
    __slots__ = ("_mod", "_public", "_sk")

    def __init__(self, mod: Any, pk: bytes, sk: bytes) -> None:
        self._mod = mod
        self._sk = sk
        self._public = _PqSigPublic(mod, pk)

    def sign(self, message: bytes, context: bytes) -> bytes:
        _check_context(context)
        return bytes(self._mod.sign(self._sk, message, context=context))

    def public_key(self) -> SignaturePublicKey:
        return self._public

    def private_bytes(self) -> bytes:
        return self._sk + self._public.public_bytes()


class PqcryptoSignature(SignatureScheme):
    """A signature scheme from the optional ``pqcrypto`` package; ``generate`` ignores ``rng``."""

    def __init__(self, name: str, module_name: str) -> None:
        try:
            self.module = importlib.import_module(f"pqcrypto.sign.{module_name}")
        except ImportError as exc:
            raise UnsupportedAlgorithm(
                name, "install the optional extra: pip install 'qflare[pqcrypto]'"
            ) from exc
        self.name = name
        self.public_key_size = int(self.module.PUBLIC_KEY_SIZE)
        self.signature_size = int(self.module.SIGNATURE_SIZE)
        self._sk_size = int(self.module.SECRET_KEY_SIZE)
        self.private_key_size = self._sk_size + self.public_key_size

    def generate(self, rng: Rng) -> SignaturePrivateKey:
        pk, sk = self.module.keygen()
        return _PqSigPrivate(self.module, bytes(pk), bytes(sk))

    def from_private_bytes(self, data: bytes) -> SignaturePrivateKey:
        self._check_len("private key", data, self.private_key_size)
        return _PqSigPrivate(self.module, data[self._sk_size :], data[: self._sk_size])

    def from_public_bytes(self, data: bytes) -> SignaturePublicKey:
        self._check_len("public key", data, self.public_key_size)
        return _PqSigPublic(self.module, data)
