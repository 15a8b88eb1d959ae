"""ML-KEM (FIPS 203) known answers through ``crypto.kem("ML-KEM-1024")`` and ``"ML-KEM-768"``.

What pyca lets QFLARE check (tests/vectors/PROVENANCE.md): key generation from the 64-byte
(d, z) seed, decapsulation of published ciphertexts (implicit rejection included), and that
malformed keys and ciphertexts are refused with QFLARE's typed errors. Encapsulation is always
randomised, so an encapsulation vector is checked by decapsulating its published ciphertext
with the seed-derived key wherever another file gives the seed of its encapsulation key.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from qflare import crypto
from qflare.errors import InvalidCiphertext, InvalidKey, QflareError

from .vectors import fixed_rng, h, params, read_gz_lines, read_json, wycheproof_cases

KEM = crypto.kem("ML-KEM-1024")
SEED, EK, CT, DK = 64, 1568, 1568, 3168
DK_PKE = 384 * 4  # FIPS 203: dk = dk_PKE || ek || H(ek) || z, with k = 4 for ML-KEM-1024


def _seeds_by_ek() -> dict[str, str]:
    """Encapsulation keys whose seed some other file publishes: ek (hex) -> seed (hex)."""
    out = {}
    for name in ("mlkem_1024_keygen_seed_test", "mlkem_1024_test"):
        for _, case in wycheproof_cases(name):
            if case.get("ek") and len(h(case["seed"])) == SEED:
                out[case["ek"]] = case["seed"]
    return out


SEEDS_BY_EK = _seeds_by_ek()


# --- key generation from the seed ----------------------------------------------------------


@pytest.mark.parametrize(("group", "case"), params("mlkem_1024_keygen_seed_test"))
def test_keygen_from_seed(group: Any, case: Any) -> None:
    seed, ek, dk = h(case["seed"]), h(case["ek"]), h(case["dk"])
    assert case["result"] == "valid"

    key = KEM.generate(fixed_rng(seed))
    assert key.public_key().public_bytes() == ek
    assert key.private_bytes() == seed  # QFLARE stores the seed, not the expanded key
    assert KEM.from_private_bytes(seed).public_key().public_bytes() == ek

    # The published expanded key cannot be imported (pyca takes seeds only), but its
    # embedded parts must agree with what QFLARE derived from the seed: the encapsulation key
    # and z, the seed's second half (the seed is d || z, in that order).
    assert len(dk) == DK
    assert dk[DK_PKE : DK_PKE + EK] == ek
    assert dk[DK_PKE + EK : DK_PKE + EK + 32] == hashlib.sha3_256(ek).digest()
    assert dk[-32:] == seed[32:]


# --- decapsulation, implicit rejection, malformed inputs ------------------------------------


@pytest.mark.parametrize(("group", "case"), params("mlkem_1024_test"))
def test_decapsulation(group: Any, case: Any) -> None:
    seed, ct = h(case["seed"]), h(case["c"])
    if case["result"] == "valid":
        key = KEM.from_private_bytes(seed)
        if case.get("ek"):
            assert key.public_key().public_bytes() == h(case["ek"])
        # Includes "Random ciphertext" and "Bit flipped ciphertext": there K is the
        # implicit-rejection secret (FIPS 203 6.3), which QFLARE must return, not refuse.
        assert key.decapsulate(ct) == h(case["K"])
        return

    assert case["result"] == "invalid"
    if len(seed) != SEED:
        with pytest.raises(InvalidKey):
            KEM.from_private_bytes(seed)
    else:
        # The only other way this file makes a case invalid is the ciphertext's length.
        assert len(ct) != CT, "an invalid case with a well-formed seed and ciphertext"
        key = KEM.from_private_bytes(seed)
        with pytest.raises(InvalidCiphertext):
            key.decapsulate(ct)


# --- encapsulation keys ---------------------------------------------------------------------


@pytest.mark.parametrize(("group", "case"), params("mlkem_1024_encaps_test"))
def test_encapsulation_key(group: Any, case: Any) -> None:
    ek = h(case["ek"])
    if case["result"] == "invalid":
        # Too short, too long, or a coefficient >= q (FIPS 203 7.2 modulus check).
        with pytest.raises(InvalidKey):
            KEM.from_public_bytes(ek)
        return

    assert case["result"] == "valid"
    public = KEM.from_public_bytes(ek)
    assert public.public_bytes() == ek
    shared, ct = public.encapsulate()  # randomised: only its shape can be checked here
    assert (len(shared), len(ct)) == (KEM.shared_secret_size, CT)

    seed = SEEDS_BY_EK.get(case["ek"])
    if seed is None:
        # "Zero secret", "Zero error", "Zero secret and error": no file gives their seed.
        return
    key = KEM.from_private_bytes(h(seed))
    assert key.decapsulate(h(case["c"])) == h(case["K"])  # the published encapsulation
    assert key.decapsulate(ct) == shared  # and QFLARE's own, to the same key


def test_encaps_vectors_mostly_checked_against_a_seed() -> None:
    """Guard the cross-file lookup above: if it silently found nothing, the decapsulation
    checks in ``test_encapsulation_key`` would all be skipped."""
    valid = [c for _, c in wycheproof_cases("mlkem_1024_encaps_test") if c["result"] == "valid"]
    with_seed = [c for c in valid if c["ek"] in SEEDS_BY_EK]
    assert len(with_seed) >= len(valid) - 3


# --- CCTV: encapsulation keys that fail the modulus check -----------------------------------

CCTV_KEYS = read_gz_lines("cctv/mlkem1024-modulus-invalid-keys.txt.gz")


def test_cctv_file_is_complete() -> None:
    assert len(CCTV_KEYS) == 1040
    assert {len(h(k)) for k in CCTV_KEYS} == {EK}


@pytest.mark.parametrize("ek", CCTV_KEYS, ids=[f"line{i + 1}" for i in range(len(CCTV_KEYS))])
def test_cctv_modulus_invalid_key_rejected(ek: str) -> None:
    with pytest.raises(QflareError) as err:
        KEM.from_public_bytes(h(ek))
    assert type(err.value) is InvalidKey


# --- X-Wing vectors as a check of the ML-KEM-768 and X25519 components ----------------------

XWING_LABEL = bytes.fromhex("5c2e2f2f5e5c")  # draft-connolly-cfrg-xwing-kem: "\\.//^\\"
XWING = read_json("xwing-test-vectors.json")


@pytest.mark.parametrize("vector", XWING, ids=[f"xwing{i}" for i in range(len(XWING))])
def test_xwing_components(vector: dict[str, str]) -> None:
    """X-Wing is ML-KEM-768 + X25519 with its own combiner. Its vectors check QFLARE's two
    components: keys from X-Wing's expanded seed, and decapsulation of its ciphertext, which,
    fed to X-Wing's combiner (written here from the draft), must give X-Wing's secret."""
    mlkem768, x25519 = crypto.kem("ML-KEM-768"), crypto.kem("X25519")
    expanded = hashlib.shake_256(h(vector["sk"])).digest(96)
    m_key = mlkem768.from_private_bytes(expanded[:64])
    x_key = x25519.from_private_bytes(expanded[64:])
    pk, ct = h(vector["pk"]), h(vector["ct"])
    m_pk, x_pk = pk[:1184], pk[1184:]
    m_ct, x_ct = ct[:1088], ct[1088:]

    assert m_key.public_key().public_bytes() == m_pk
    assert x_key.public_key().public_bytes() == x_pk
    m_ss, x_ss = m_key.decapsulate(m_ct), x_key.decapsulate(x_ct)
    assert hashlib.sha3_256(m_ss + x_ss + x_ct + x_pk + XWING_LABEL).digest() == h(vector["ss"])

    # The X25519 ciphertext is the public key of the ephemeral half of eseed.
    eph = x25519.from_private_bytes(h(vector["eseed"])[32:])
    assert eph.public_key().public_bytes() == x_ct
    # QFLARE's hybrid lays out keys and ciphertexts exactly as X-Wing does.
    hybrid = crypto.kem("ML-KEM-768+X25519").from_private_bytes(expanded)
    assert hybrid.public_key().public_bytes() == pk
