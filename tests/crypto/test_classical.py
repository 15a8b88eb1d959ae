"""X25519, HKDF-SHA256 and AES-256-GCM known answers (Wycheproof) through QFLARE's registry.

X25519 runs as QFLARE uses it, as a KEM: the vector's private key is the recipient's key and
its public value is the ciphertext (the peer's ephemeral share). "acceptable" X25519 cases
(twist points, non-canonical encodings, low-order points) are decided by QFLARE's rule, not
left open: RFC 7748 decoding is accepted, and an all-zero shared secret (RFC 7748 6.1: the
peer sent a low-order point) is refused with ``InvalidCiphertext``, never ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import pytest

from qflare import crypto
from qflare.errors import DecryptionFailed, InvalidCiphertext, InvalidKey, QflareError

from .vectors import h, params, wycheproof_cases

# --- X25519 ---------------------------------------------------------------------------------

X25519 = crypto.kem("X25519")
ZERO = bytes(32)


@pytest.mark.parametrize(("group", "case"), params("x25519_test"))
def test_x25519(group: Any, case: Any) -> None:
    assert group["curve"] == "curve25519"
    key = X25519.from_private_bytes(h(case["private"]))
    share, shared = h(case["public"]), h(case["shared"])

    if shared == ZERO:
        # Only ever labelled "acceptable" (ZeroSharedSecret): QFLARE's rule is to refuse.
        assert case["result"] == "acceptable"
        with pytest.raises(QflareError) as err:
            key.decapsulate(share)
        assert type(err.value) is InvalidCiphertext
        # Encapsulating to such a point: any ephemeral scalar gives zero too, so refused.
        with pytest.raises(InvalidCiphertext):
            X25519.from_public_bytes(share).encapsulate()
        return

    assert case["result"] in ("valid", "acceptable")
    assert key.decapsulate(share) == shared


def test_x25519_zero_secret_cases_exist() -> None:
    zero = [c for _, c in wycheproof_cases("x25519_test") if h(c["shared"]) == ZERO]
    assert len(zero) >= 10


def test_invalid_ciphertext_is_not_a_value_error() -> None:
    # The HTTP layer maps QflareError subclasses to 4xx; a ValueError would be a 500.
    assert not issubclass(InvalidCiphertext, ValueError)


# --- HKDF-SHA256 ----------------------------------------------------------------------------

HKDF = crypto.kdf("HKDF-SHA256")


@pytest.mark.parametrize(("group", "case"), params("hkdf_sha256_test"))
def test_hkdf_sha256(group: Any, case: Any) -> None:
    ikm, salt, info, size = h(case["ikm"]), h(case["salt"]), h(case["info"]), case["size"]
    if case["result"] == "invalid":
        # SizeTooLarge: more than 255 blocks (RFC 5869 2.3). The length is the local caller's
        # choice, never the peer's, so this is a programming error: ValueError.
        assert size > 255 * HKDF.digest_size
        with pytest.raises(ValueError):
            HKDF.derive(ikm, salt, info, size)
        with pytest.raises(ValueError):
            HKDF.expand(HKDF.extract(salt, ikm), info, size)
        return

    assert case["result"] == "valid"
    okm = h(case["okm"])
    assert HKDF.derive(ikm, salt, info, size) == okm
    # The key schedule uses extract and expand separately: they must compose to the same.
    assert HKDF.expand(HKDF.extract(salt, ikm), info, size) == okm


# --- AES-256-GCM ----------------------------------------------------------------------------

AEAD = crypto.aead("AES-256-GCM")


def _qflare_parameters(group: Any, case: Any) -> bool:
    """QFLARE's AES-GCM: 256-bit keys, 96-bit nonces, 128-bit tags. Also kept: 256-bit-key
    cases with an empty nonce, which are invalid and must fail as any bad open does."""
    return (
        group["keySize"] == 256
        and group["tagSize"] == 128
        and (group["ivSize"] == 96 or (group["ivSize"] == 0 and case["result"] == "invalid"))
    )


@pytest.mark.parametrize(("group", "case"), params("aes_gcm_test", keep=_qflare_parameters))
def test_aes_256_gcm(group: Any, case: Any) -> None:
    box = AEAD.key(h(case["key"]))
    iv, aad, msg = h(case["iv"]), h(case["aad"]), h(case["msg"])
    sealed = h(case["ct"]) + h(case["tag"])
    if case["result"] == "invalid":
        with pytest.raises(QflareError) as err:
            box.open(iv, sealed, aad)
        assert type(err.value) is DecryptionFailed
        return
    assert case["result"] == "valid"
    assert box.seal(iv, msg, aad) == sealed
    assert box.open(iv, sealed, aad) == msg


@pytest.mark.parametrize("key_size", [128, 192])
def test_aes_gcm_short_keys_refused(key_size: int) -> None:
    keys = {c["key"] for g, c in wycheproof_cases("aes_gcm_test") if g["keySize"] == key_size}
    assert keys
    for key in keys:
        with pytest.raises(InvalidKey):
            AEAD.key(h(key))
