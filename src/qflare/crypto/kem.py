"""Key encapsulation: ML-KEM, Diffie-Hellman groups used as KEMs, and optional pqcrypto KEMs.

One vocabulary for all of them, after pyca/cryptography: ``generate()``, ``public_key()``,
``encapsulate()``, ``decapsulate()``, ``from_public_bytes()``. ``encapsulate`` returns
``(shared_secret, ciphertext)`` in that order everywhere.

Randomness: key generation takes an ``Rng`` so tests are deterministic (ML-KEM and X25519 keys
are derived from a seed it supplies). Encapsulation draws from OpenSSL's CSPRNG, because
pyca/cryptography offers no derandomised ML-KEM encapsulation.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm as _PycaUnsupported
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qflare.errors import InvalidCiphertext, InvalidKey, UnsupportedAlgorithm

Rng = Callable[[int], bytes]


class KemPublicKey(abc.ABC):
    __slots__ = ()

    @abc.abstractmethod
    def encapsulate(self) -> tuple[bytes, bytes]:
        """Return ``(shared_secret, ciphertext)``."""

    @abc.abstractmethod
    def public_bytes(self) -> bytes: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.public_bytes()[:8].hex()}…>"


class KemPrivateKey(abc.ABC):
    __slots__ = ()

    @abc.abstractmethod
    def decapsulate(self, ciphertext: bytes) -> bytes: ...

    @abc.abstractmethod
    def public_key(self) -> KemPublicKey: ...

    @abc.abstractmethod
    def private_bytes(self) -> bytes:
        """The compact private form (a seed where the algorithm has one). Secret."""

    def __repr__(self) -> str:
        # Never the key material: only which public key it belongs to.
        return f"<{type(self).__name__} for {self.public_key().public_bytes()[:8].hex()}…>"


class Kem(abc.ABC):
    """A named KEM. Instances are stateless and shared."""

    name: str
    public_key_size: int
    ciphertext_size: int
    shared_secret_size: int
    private_key_size: int

    @abc.abstractmethod
    def generate(self, rng: Rng) -> KemPrivateKey: ...

    @abc.abstractmethod
    def from_private_bytes(self, data: bytes) -> KemPrivateKey: ...

    @abc.abstractmethod
    def from_public_bytes(self, data: bytes) -> KemPublicKey: ...

    def _check_len(self, what: str, data: bytes, size: int) -> None:
        if len(data) != size:
            raise InvalidKey(f"{self.name} {what} must be {size} bytes, got {len(data)}")

    def __repr__(self) -> str:
        return f"<Kem {self.name}>"


# --- ML-KEM (FIPS 203) -------------------------------------------------------------------------


class _MlKemPublic(KemPublicKey):
    __slots__ = ("_key",)

    def __init__(self, key: Any) -> None:
        self._key = key

    def encapsulate(self) -> tuple[bytes, bytes]:
        shared, ct = self._key.encapsulate()
        return shared, ct

    def public_bytes(self) -> bytes:
        raw: bytes = self._key.public_bytes_raw()
        return raw


class _MlKemPrivate(KemPrivateKey):
    __slots__ = ("_ct_size", "_key", "_public")

    def __init__(self, key: Any, ct_size: int) -> None:
        self._key = key
        self._ct_size = ct_size
        # Built on first use: pyca's public_key() costs a quarter or more of key generation
        # from the seed, and a key that is only stored or only decapsulates never needs it.
        self._public: KemPublicKey | None = None

    def decapsulate(self, ciphertext: bytes) -> bytes:
        # A wrong length is a malformed message. A wrong ciphertext of the right length
        # decapsulates to a pseudorandom secret (implicit rejection, FIPS 203 7.3): the
        # caller's key confirmation is what catches it.
        if len(ciphertext) != self._ct_size:
            raise InvalidCiphertext(f"ML-KEM ciphertext must be {self._ct_size} bytes")
        shared: bytes = self._key.decapsulate(ciphertext)
        return shared

    def public_key(self) -> KemPublicKey:
        public = self._public
        if public is None:
            # Two threads racing here build equal objects; either may win.
            public = self._public = _MlKemPublic(self._key.public_key())
        return public

    def private_bytes(self) -> bytes:
        seed: bytes = self._key.private_bytes_raw()
        return seed


class MlKem(Kem):
    shared_secret_size = 32
    private_key_size = 64  # the (d, z) seed of FIPS 203 key generation

    _priv: Any
    _pub: Any

    def __init__(self, level: int) -> None:
        if level == 768:
            self._priv, self._pub = mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey
            self.public_key_size, self.ciphertext_size = 1184, 1088
        elif level == 1024:
            self._priv, self._pub = mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey
            self.public_key_size, self.ciphertext_size = 1568, 1568
        else:
            raise UnsupportedAlgorithm(f"ML-KEM-{level}")
        self.name = f"ML-KEM-{level}"

    def generate(self, rng: Rng) -> KemPrivateKey:
        return self.from_private_bytes(rng(self.private_key_size))

    def from_private_bytes(self, data: bytes) -> KemPrivateKey:
        self._check_len("seed", data, self.private_key_size)
        return _MlKemPrivate(self._priv.from_seed_bytes(data), self.ciphertext_size)

    def from_public_bytes(self, data: bytes) -> KemPublicKey:
        self._check_len("public key", data, self.public_key_size)
        try:
            key = self._pub.from_public_bytes(data)
        except ValueError:
            # FIPS 203 7.2 modulus check: a coefficient >= q makes the key invalid.
            raise InvalidKey(f"{self.name} public key fails the modulus check") from None
        return _MlKemPublic(key)


# --- Diffie-Hellman groups as KEMs ---------------------------------------------------------------
#
# encapsulate: make an ephemeral key pair, shared = DH(ephemeral, peer), ciphertext = ephemeral
# public key. The hybrid combiner hashes the ciphertext and public key with the DH output, as
# X-Wing does, so the raw DH output is never used as a key on its own.


class _DhPublic(KemPublicKey):
    __slots__ = ("_group", "_key")

    def __init__(self, group: _DhGroup, key: Any) -> None:
        self._group = group
        self._key = key

    def encapsulate(self) -> tuple[bytes, bytes]:
        eph = self._group.new_ephemeral()
        return self._group.exchange(eph, self._key), self._group.encode_public(eph.public_key())

    def public_bytes(self) -> bytes:
        return self._group.encode_public(self._key)


class _DhPrivate(KemPrivateKey):
    __slots__ = ("_group", "_key", "_public")

    def __init__(self, group: _DhGroup, key: Any) -> None:
        self._group = group
        self._key = key
        self._public: KemPublicKey | None = None  # built on first use, as for ML-KEM

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self._group.ciphertext_size:
            raise InvalidCiphertext(f"{self._group.name} share has the wrong length")
        try:
            peer = self._group.decode_public(ciphertext)
        except InvalidKey:
            raise InvalidCiphertext(f"{self._group.name} share is not a valid point") from None
        return self._group.exchange(self._key, peer)

    def public_key(self) -> KemPublicKey:
        public = self._public
        if public is None:
            public = self._public = _DhPublic(self._group, self._key.public_key())
        return public

    def private_bytes(self) -> bytes:
        return self._group.encode_private(self._key)


class _DhGroup(Kem):
    @abc.abstractmethod
    def new_ephemeral(self) -> Any: ...

    @abc.abstractmethod
    def raw_exchange(self, private: Any, public: Any) -> bytes: ...

    @abc.abstractmethod
    def encode_public(self, key: Any) -> bytes: ...

    @abc.abstractmethod
    def decode_public(self, data: bytes) -> Any: ...

    @abc.abstractmethod
    def encode_private(self, key: Any) -> bytes: ...

    @abc.abstractmethod
    def decode_private(self, data: bytes) -> Any: ...

    def exchange(self, private: Any, public: Any) -> bytes:
        try:
            return self.raw_exchange(private, public)
        except ValueError:
            # pyca refuses an all-zero X25519 output (a low-order peer point, RFC 7748 6.1).
            raise InvalidCiphertext(f"{self.name} exchange gave a degenerate secret") from None

    def generate(self, rng: Rng) -> KemPrivateKey:
        return self.from_private_bytes(rng(self.private_key_size))

    def from_private_bytes(self, data: bytes) -> KemPrivateKey:
        self._check_len("private key", data, self.private_key_size)
        return _DhPrivate(self, self.decode_private(data))

    def from_public_bytes(self, data: bytes) -> KemPublicKey:
        self._check_len("public key", data, self.public_key_size)
        return _DhPublic(self, self.decode_public(data))


class X25519Kem(_DhGroup):
    name = "X25519"
    public_key_size = ciphertext_size = shared_secret_size = private_key_size = 32

    def new_ephemeral(self) -> Any:
        return x25519.X25519PrivateKey.generate()

    def raw_exchange(self, private: Any, public: Any) -> bytes:
        shared: bytes = private.exchange(public)
        return shared

    def encode_public(self, key: Any) -> bytes:
        raw: bytes = key.public_bytes_raw()
        return raw

    def decode_public(self, data: bytes) -> Any:
        return x25519.X25519PublicKey.from_public_bytes(data)

    def encode_private(self, key: Any) -> bytes:
        raw: bytes = key.private_bytes_raw()
        return raw

    def decode_private(self, data: bytes) -> Any:
        return x25519.X25519PrivateKey.from_private_bytes(data)


class P384Kem(_DhGroup):
    name = "P-384"
    public_key_size = ciphertext_size = 97  # uncompressed SEC1 point
    shared_secret_size = private_key_size = 48

    def new_ephemeral(self) -> Any:
        return ec.generate_private_key(ec.SECP384R1())

    def raw_exchange(self, private: Any, public: Any) -> bytes:
        shared: bytes = private.exchange(ec.ECDH(), public)
        return shared

    def encode_public(self, key: Any) -> bytes:
        raw: bytes = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return raw

    def decode_public(self, data: bytes) -> Any:
        try:
            # from_encoded_point checks the point is on the curve (no invalid-curve attacks).
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), data)
        except ValueError:
            raise InvalidKey("P-384 public key is not a point on the curve") from None

    def encode_private(self, key: Any) -> bytes:
        value: int = key.private_numbers().private_value
        return value.to_bytes(48, "big")

    def decode_private(self, data: bytes) -> Any:
        try:
            return ec.derive_private_key(int.from_bytes(data, "big"), ec.SECP384R1())
        except ValueError:
            raise InvalidKey("P-384 private scalar out of range") from None


# --- Optional KEMs from the pqcrypto package ---------------------------------------------------


class _PqPublic(KemPublicKey):
    __slots__ = ("_mod", "_pk")

    def __init__(self, mod: Any, pk: bytes) -> None:
        self._mod = mod
        self._pk = pk

    def encapsulate(self) -> tuple[bytes, bytes]:
        ct, shared = self._mod.encaps(self._pk)
        return bytes(shared), bytes(ct)

    def public_bytes(self) -> bytes:
        return self._pk


class _PqPrivate(KemPrivateKey):
    __slots__ = ("_kem", "_public", "_sk")

    def __init__(self, kem: PqcryptoKem, pk: bytes, sk: bytes) -> None:
        self._kem = kem
        self._sk = sk
        self._public = _PqPublic(kem.module, pk)

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self._kem.ciphertext_size:
            raise InvalidCiphertext(f"{self._kem.name} ciphertext has the wrong length")
        return bytes(self._kem.module.decaps(self._sk, ciphertext))

    def public_key(self) -> KemPublicKey:
        return self._public

    def private_bytes(self) -> bytes:
        # pqcrypto has no seed form: keep the secret key and the public key, in that order.
        return self._sk + self._public.public_bytes()


class PqcryptoKem(Kem):
    """A KEM from the optional ``pqcrypto`` package (``pip install 'qflare[pqcrypto]'``).

    pqcrypto generates keys from its own RNG, so ``generate`` ignores ``rng``.
    """

    def __init__(self, name: str, module_name: str) -> None:
        try:
            self.module = importlib.import_module(f"pqcrypto.kem.{module_name}")
        except ImportError as exc:
            raise UnsupportedAlgorithm(
                name, "install the optional extra: pip install 'qflare[pqcrypto]'"
            ) from exc
        self.name = name
        self.public_key_size = int(self.module.PUBLIC_KEY_SIZE)
        self.ciphertext_size = int(self.module.CIPHERTEXT_SIZE)
        self.shared_secret_size = int(self.module.SHARED_SECRET_SIZE)
        self._sk_size = int(self.module.SECRET_KEY_SIZE)
        self.private_key_size = self._sk_size + self.public_key_size

    def generate(self, rng: Rng) -> KemPrivateKey:
        pk, sk = self.module.keygen()
        return _PqPrivate(self, bytes(pk), bytes(sk))

    def from_private_bytes(self, data: bytes) -> KemPrivateKey:
        self._check_len("private key", data, self.private_key_size)
        return _PqPrivate(self, data[self._sk_size :], data[: self._sk_size])

    def from_public_bytes(self, data: bytes) -> KemPublicKey:
        self._check_len("public key", data, self.public_key_size)
        return _PqPublic(self.module, data)


def probe_pyca(kem: Kem) -> None:
    """Raise ``UnsupportedAlgorithm`` if the installed OpenSSL lacks ``kem``."""
    try:
        kem.generate(lambda n: bytes(range(1, n + 1))).public_key().encapsulate()
    except _PycaUnsupported as exc:
        raise UnsupportedAlgorithm(kem.name, "the installed OpenSSL does not offer it") from exc
