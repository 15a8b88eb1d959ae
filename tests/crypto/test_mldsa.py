"""ML-DSA (FIPS 204) known answers through ``crypto.signature("ML-DSA-44" | "-65" | "-87")``.

Contexts. QFLARE's ``verify`` takes a non-empty context from ``qflare.crypto.labels`` and
treats an empty one as a programming error; most published vectors use the empty context.
Those are checked with ``verify_any_context``, the standard's verification with any context of
0..255 bytes (empty included). Vectors with a non-empty context go through ``verify`` as well.

Results. Every case is checked against its label: "valid" must verify, "invalid" must be
refused with a typed error (``InvalidKey`` when the public key cannot be parsed,
``InvalidSignature`` otherwise). "acceptable" would mean the standard allows either outcome;
no ML-DSA file here uses it, but if one did, either outcome passes as long as a refusal is
one of those two typed errors (never ``ValueError`` or a pyca exception).

Signing. pyca always hedges ML-DSA signing, so "sign_seed" vectors check key generation from
the 32-byte seed and that the published signature verifies, not the signature bytes. Their
``Internal`` cases give ``mu`` instead of a message; only their key generation is checked.
"""

from __future__ import annotations

from typing import Any

import pytest

from qflare import crypto
from qflare.errors import InvalidKey, InvalidSignature, QflareError

from .vectors import fixed_rng, h, params, wycheproof

LEVELS = (44, 65, 87)


def _scheme(level: int) -> crypto.SignatureScheme:
    return crypto.signature(f"ML-DSA-{level}")


def _other_context(ctx: bytes) -> bytes:
    return ctx[:-1] + bytes([ctx[-1] ^ 1]) if ctx else b"\x00"


# --- key generation from the seed -----------------------------------------------------------


def _keygen_params() -> list[Any]:
    out = []
    for level in LEVELS:
        for i, group in enumerate(wycheproof(f"mldsa_{level}_sign_seed_test")["testGroups"]):
            first = group["tests"][0]["tcId"]
            out.append(pytest.param(level, group, id=f"ML-DSA-{level}-group{i}-tc{first}"))
    return out


@pytest.mark.parametrize(("level", "group"), _keygen_params())
def test_keygen_from_seed(level: int, group: Any) -> None:
    scheme = _scheme(level)
    seed = h(group["privateSeed"])
    if len(seed) != scheme.private_key_size:
        # Flagged IncorrectPrivateKeyLength: every case of the group is invalid.
        assert {c["result"] for c in group["tests"]} == {"invalid"}
        with pytest.raises(InvalidKey):
            scheme.from_private_bytes(seed)
        return
    key = scheme.generate(fixed_rng(seed))
    assert key.public_key().public_bytes() == h(group["publicKey"])
    assert key.private_bytes() == seed


# --- published signatures from the sign_seed files ------------------------------------------


def _sign_params() -> list[Any]:
    out = []
    for level in LEVELS:
        out += [
            pytest.param(level, *p.values, id=f"ML-DSA-{level}-{p.id}")
            for p in params(
                f"mldsa_{level}_sign_seed_test",
                # Internal cases carry mu, not a message: nothing to verify through the API.
                # Groups with a malformed seed are covered by test_keygen_from_seed.
                keep=lambda g, c: "msg" in c and len(h(g["privateSeed"])) == 32,
            )
        ]
    return out


@pytest.mark.parametrize(("level", "group", "case"), _sign_params())
def test_published_signature(level: int, group: Any, case: Any) -> None:
    scheme = _scheme(level)
    public = scheme.from_private_bytes(h(group["privateSeed"])).public_key()
    msg, ctx, sig = h(case["msg"]), h(case.get("ctx")), h(case["sig"])

    if case["result"] == "invalid":
        # The one kind of invalid case with a usable key: a 256-byte context, which the
        # standard forbids. QFLARE refuses to sign with it (a caller's bug: contexts are
        # QFLARE's own labels) and verification under it can only fail.
        assert "InvalidContext" in case["flags"] and len(ctx) > 255
        key = scheme.from_private_bytes(h(group["privateSeed"]))
        with pytest.raises(ValueError, match="context"):
            key.sign(msg, ctx)
        with pytest.raises(InvalidSignature):
            public.verify_any_context(sig, msg, ctx)
        return

    assert case["result"] == "valid"
    public.verify_any_context(sig, msg, ctx)
    if ctx:
        public.verify(sig, msg, ctx)  # the production path, for contexts it accepts
    else:
        with pytest.raises(ValueError, match="context"):
            public.verify(sig, msg, ctx)  # QFLARE's rule: every signature names its purpose
    # The context is bound into the signature: under any other it must not verify.
    with pytest.raises(InvalidSignature):
        public.verify_any_context(sig, msg, _other_context(ctx))


# --- verify files: accept or reject exactly as labelled -------------------------------------


def _verify_params() -> list[Any]:
    out = []
    for level in LEVELS:
        out += [
            pytest.param(level, *p.values, id=f"ML-DSA-{level}-{p.id}")
            for p in params(f"mldsa_{level}_verify_test")
        ]
    return out


def _verify(level: int, group: Any, case: Any) -> QflareError | None:
    """Parse the key and verify through QFLARE; the typed error if it refused, else None."""
    try:
        public = _scheme(level).from_public_bytes(h(group["publicKey"]))
        public.verify_any_context(h(case["sig"]), h(case["msg"]), h(case.get("ctx")))
    except (InvalidKey, InvalidSignature) as exc:
        return exc
    return None


@pytest.mark.parametrize(("level", "group", "case"), _verify_params())
def test_verify(level: int, group: Any, case: Any) -> None:
    refused = _verify(level, group, case)
    if case["result"] == "valid":
        assert refused is None, f"valid signature refused: {refused!r}"
        ctx = h(case.get("ctx"))
        if ctx:
            public = _scheme(level).from_public_bytes(h(group["publicKey"]))
            public.verify(h(case["sig"]), h(case["msg"]), ctx)
    elif case["result"] == "invalid":
        assert refused is not None, "invalid signature accepted"
    else:
        assert case["result"] == "acceptable"  # either outcome; a refusal is typed (above)


def test_verify_files_have_both_outcomes() -> None:
    """The labels drive the assertions above; make sure there is something on both sides."""
    for level in LEVELS:
        results = {
            c["result"]
            for g in wycheproof(f"mldsa_{level}_verify_test")["testGroups"]
            for c in g["tests"]
        }
        assert {"valid", "invalid"} <= results
