"""The registry: every advertised name resolves, unknown names fail with a typed error that
names them, ``available()`` and ``require()`` tell the truth, and the optional pqcrypto
algorithms work when the extra is installed."""

from __future__ import annotations

import importlib.util

import pytest

from qflare import crypto
from qflare.crypto import registry
from qflare.errors import CryptoError, InvalidSignature, UnsupportedAlgorithm

KINDS = {
    "kem": (registry._KEMS, crypto.kem),
    "signature": (registry._SIGNATURES, crypto.signature),
    "kdf": (registry._KDFS, crypto.kdf),
    "aead": (registry._AEADS, crypto.aead),
}
HAVE_PQCRYPTO = importlib.util.find_spec("pqcrypto") is not None


def _kind(name: str) -> str:
    return next(kind for kind, (table, _) in KINDS.items() if name in table)


def test_names_are_unique_and_cover_every_kind() -> None:
    names = crypto.names()
    assert len(names) == len(set(names))
    assert {_kind(n) for n in names} == set(KINDS)


@pytest.mark.parametrize("name", crypto.names())
def test_every_name_resolves_to_an_object_of_that_name(name: str) -> None:
    if name in registry.OPTIONAL and not HAVE_PQCRYPTO:
        pytest.skip("the optional pqcrypto extra is not installed")
    _, lookup = KINDS[_kind(name)]
    obj = lookup(name)
    assert obj.name == name
    assert lookup(name) is obj  # instances are stateless and shared


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("unknown", ["ML-KEM-512", "X448", "", "ml-kem-1024", "AES-128-GCM"])
def test_unknown_name_is_a_typed_error_naming_it(kind: str, unknown: str) -> None:
    _, lookup = KINDS[kind]
    with pytest.raises(UnsupportedAlgorithm) as err:
        lookup(unknown)
    assert err.value.algorithm == unknown
    assert repr(unknown) in str(err.value)
    assert isinstance(err.value, CryptoError)


def test_names_of_one_kind_are_unknown_to_the_others() -> None:
    with pytest.raises(UnsupportedAlgorithm):
        crypto.kem("ML-DSA-44")
    with pytest.raises(UnsupportedAlgorithm):
        crypto.signature("ML-KEM-1024")
    with pytest.raises(UnsupportedAlgorithm):
        crypto.aead("HKDF-SHA256")
    with pytest.raises(UnsupportedAlgorithm):
        crypto.kdf("AES-256-GCM")


def test_hybrid_names_resolve_from_their_parts() -> None:
    hybrid = crypto.kem("ML-KEM-1024+X25519")
    assert isinstance(hybrid, crypto.HybridKem)
    assert [k.name for k in hybrid.components] == ["ML-KEM-1024", "X25519"]
    assert hybrid.public_key_size == 1568 + 32
    with pytest.raises(UnsupportedAlgorithm) as err:
        crypto.kem("ML-KEM-1024+X448")
    assert err.value.algorithm == "X448"


def test_available_reports_every_name() -> None:
    status = crypto.available()
    assert list(status) == crypto.names()
    for name, reason in status.items():
        if name in registry.OPTIONAL and not HAVE_PQCRYPTO:
            assert reason is not None and "pqcrypto" in reason
        else:
            assert reason is None, f"{name}: {reason}"


def test_require_passes_for_available_names() -> None:
    crypto.require(["ML-KEM-1024+X25519", "ML-DSA-65", "HKDF-SHA3-512", "AES-256-GCM"])


def test_require_names_every_missing_algorithm_in_one_error() -> None:
    with pytest.raises(UnsupportedAlgorithm) as err:
        crypto.require(["X25519", "ML-KEM-1024+Nope", "Bogus", "AES-256-GCM"])
    assert err.value.algorithm == "Nope, Bogus"
    message = str(err.value)
    assert "Nope: not a known algorithm" in message
    assert "Bogus: not a known algorithm" in message
    assert "X25519" not in message


# --- the optional pqcrypto algorithms -------------------------------------------------------

needs_pqcrypto = pytest.mark.skipif(not HAVE_PQCRYPTO, reason="pqcrypto is not installed")


@needs_pqcrypto
@pytest.mark.parametrize("name", ["HQC-256", "Classic-McEliece-6960119"])
def test_pqcrypto_kem(name: str) -> None:
    kem = crypto.kem(name)
    key = kem.generate(crypto.system_rng)
    shared, ct = kem.from_public_bytes(key.public_key().public_bytes()).encapsulate()
    assert len(ct) == kem.ciphertext_size
    assert len(shared) == kem.shared_secret_size
    assert key.decapsulate(ct) == shared
    # The stored private form loads back into a key that decapsulates the same.
    reloaded = kem.from_private_bytes(key.private_bytes())
    assert reloaded.decapsulate(ct) == shared
    assert reloaded.public_key().public_bytes() == key.public_key().public_bytes()


@needs_pqcrypto
@pytest.mark.parametrize("name", ["SLH-DSA-SHAKE-256f", "SLH-DSA-SHA2-128s"])
def test_pqcrypto_signature(name: str) -> None:
    scheme = crypto.signature(name)
    key = scheme.generate(crypto.system_rng)
    message, context = b"a model update", b"qflare/v1/test"
    signature = key.sign(message, context)
    public = scheme.from_public_bytes(key.public_key().public_bytes())
    public.verify(signature, message, context)
    with pytest.raises(InvalidSignature):
        public.verify(signature, message, b"qflare/v1/other")
    with pytest.raises(InvalidSignature):
        public.verify(signature, message + b"!", context)
    reloaded = scheme.from_private_bytes(key.private_bytes())
    public.verify(reloaded.sign(message, context), message, context)
