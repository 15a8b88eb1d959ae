"""The hybrid KEM against its pinned vectors (tests/vectors/qflare_hybrid_vectors.json).

QFLARE's combiner is X-Wing-like but not X-Wing, so no published vector covers it. The pinned
vectors are computed by ``tests/vectors/gen_hybrid_vectors.py`` from the specification
(docs/PROTOCOL.md section 4) with ``hashlib``, over component values taken from published
vectors, so these tests check QFLARE's code against the spec, not against itself.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import InvalidCiphertext, InvalidKey

from .vectors import VECTORS, h, read_json, wycheproof_cases

PINNED = read_json("qflare_hybrid_vectors.json")


def _triples(parts: list[list[str]]) -> list[tuple[bytes, bytes, bytes]]:
    return [(h(ss), h(ct), h(pk)) for ss, ct, pk in parts]


def test_pinned_label_is_the_protocol_label() -> None:
    assert h(PINNED["label"]) == labels.HYBRID_KEM


@pytest.mark.parametrize("case", PINNED["combine"], ids=[c["id"] for c in PINNED["combine"]])
def test_combine(case: dict[str, Any]) -> None:
    got = crypto.combine(h(case["label"]), case["names"], _triples(case["parts"]))
    assert got == h(case["shared_secret"])


def test_length_prefixes_separate_fields() -> None:
    """split-1 and split-2 hash the same bytes cut differently; only the prefixes differ."""
    by_id = {c["id"]: c for c in PINNED["combine"]}
    one, two = by_id["split-1"], by_id["split-2"]
    assert b"".join(map(h, one["parts"][0])) == b"".join(map(h, two["parts"][0]))
    assert one["shared_secret"] != two["shared_secret"]


@pytest.mark.parametrize("case", PINNED["kem"], ids=[c["id"] for c in PINNED["kem"]])
def test_hybrid_kem(case: dict[str, Any]) -> None:
    kem = crypto.kem(case["kem"])
    private, public, ct = h(case["private_key"]), h(case["public_key"]), h(case["ciphertext"])
    assert (len(private), len(public), len(ct)) == (
        kem.private_key_size,
        kem.public_key_size,
        kem.ciphertext_size,
    )
    key = kem.from_private_bytes(private)
    assert key.private_bytes() == private
    assert key.public_key().public_bytes() == public
    assert key.decapsulate(ct) == h(case["shared_secret"])
    # The same through generate(), which draws each component's seed in order.
    pos = 0

    def rng(n: int) -> bytes:
        nonlocal pos
        pos += n
        return private[pos - n : pos]

    assert kem.generate(rng).decapsulate(ct) == h(case["shared_secret"])
    assert pos == len(private)

    # Encapsulation is randomised: a fresh one must round-trip through the same key.
    shared, fresh_ct = kem.from_public_bytes(public).encapsulate()
    assert len(fresh_ct) == kem.ciphertext_size
    assert key.decapsulate(fresh_ct) == shared


def test_hybrid_combiner_method_matches_function() -> None:
    case = PINNED["kem"][0]
    kem = crypto.kem(case["kem"])
    assert isinstance(kem, crypto.HybridKem)
    triples = [(bytes([i]) * 32, bytes([i]) * 8, bytes([i]) * 4) for i in range(2)]
    names = [k.name for k in kem.components]
    assert kem.combine(triples) == crypto.combine(labels.HYBRID_KEM, names, triples)


def test_generator_reproduces_the_committed_file() -> None:
    """The pinned file is exactly what its generator writes (nobody edited it by hand)."""
    gen = VECTORS / "gen_hybrid_vectors.py"
    run = subprocess.run(
        [sys.executable, str(gen), "--check"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr


# --- malformed input to the hybrid: the components' typed errors come through ---------------

HYBRID = crypto.kem("ML-KEM-1024+X25519")
PINNED_1024 = next(c for c in PINNED["kem"] if c["kem"] == "ML-KEM-1024+X25519")


def _low_order_x25519_shares() -> list[str]:
    return sorted(
        {c["public"] for _, c in wycheproof_cases("x25519_test") if h(c["shared"]) == bytes(32)}
    )


@pytest.mark.parametrize("share", _low_order_x25519_shares())
def test_low_order_x25519_share_in_hybrid_refused(share: str) -> None:
    key = HYBRID.from_private_bytes(h(PINNED_1024["private_key"]))
    ct = h(PINNED_1024["ciphertext"])
    with pytest.raises(InvalidCiphertext):
        key.decapsulate(ct[:1568] + h(share))


@pytest.mark.parametrize("delta", [-1, 1])
def test_hybrid_ciphertext_of_wrong_length_refused(delta: int) -> None:
    key = HYBRID.from_private_bytes(h(PINNED_1024["private_key"]))
    ct = h(PINNED_1024["ciphertext"])
    with pytest.raises(InvalidCiphertext):
        key.decapsulate(ct[:-1] if delta < 0 else ct + b"\x00")


def _invalid_mlkem_keys() -> list[Any]:
    return [
        pytest.param(c["ek"], id=f"tc{c['tcId']}")
        for _, c in wycheproof_cases("mlkem_1024_encaps_test")
        if c["result"] == "invalid" and len(h(c["ek"])) == 1568
    ]


@pytest.mark.parametrize("ek", _invalid_mlkem_keys())
def test_hybrid_public_key_with_invalid_mlkem_part_refused(ek: str) -> None:
    x25519_part = h(PINNED_1024["public_key"])[1568:]
    with pytest.raises(InvalidKey):
        HYBRID.from_public_bytes(h(ek) + x25519_part)
