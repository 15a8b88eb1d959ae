"""Generate ``qflare_hybrid_vectors.json``: pinned outputs of QFLARE's hybrid KEM combiner.

Run from the repository root::

    .venv/bin/python tests/vectors/gen_hybrid_vectors.py          # rewrite the file
    .venv/bin/python tests/vectors/gen_hybrid_vectors.py --check  # exit 1 if it would change

QFLARE's combiner is X-Wing-like but not byte-identical to X-Wing, so no published vector
covers it. These vectors pin it, computed independently of ``qflare.crypto``:

* the combiner is written here again from its specification (docs/PROTOCOL.md section 4),
  with ``hashlib`` rather than QFLARE's code, so a test comparing the two checks the code
  against the spec and not merely against itself;
* component inputs come from published vectors wherever they exist (an ML-KEM-1024 seed,
  ciphertext and shared secret from Wycheproof, an X25519 private key, peer share and shared
  secret from Wycheproof, the X-Wing draft's ML-KEM-768+X25519 key pair and ciphertext). Only
  values that no vector publishes (X25519 public keys from private keys, the ML-KEM-768 and
  P-384 shared secrets) are computed here, with pyca/cryptography directly.

Everything is deterministic: no randomness is drawn, and the output is byte-for-byte stable.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HERE = Path(__file__).resolve().parent
OUT = HERE / "qflare_hybrid_vectors.json"

# docs/PROTOCOL.md section 4, written out here rather than imported from qflare.crypto.labels.
LABEL = b"qflare/v1/hybrid-kem"


def lp(data: bytes) -> bytes:
    """``lp(x)``: a u32 big-endian length, then ``x``."""
    return len(data).to_bytes(4, "big") + data


def combine(label: bytes, names: list[str], parts: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """ss = SHA3-256(lp(label) || for each component: lp(name) lp(ss) lp(ct) lp(pk))."""
    data = lp(label)
    for name, (ss, ct, pk) in zip(names, parts, strict=True):
        data += lp(name.encode()) + lp(ss) + lp(ct) + lp(pk)
    return hashlib.sha3_256(data).digest()


def wycheproof_case(file: str, tc_id: int) -> dict[str, Any]:
    with gzip.open(HERE / "wycheproof" / file, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    for group in doc["testGroups"]:
        for case in group["tests"]:
            if case["tcId"] == tc_id:
                assert case["result"] == "valid", (file, tc_id)
                return dict(case)
    raise KeyError(f"{file} has no tcId {tc_id}")


def shake(tag: bytes, n: int) -> bytes:
    """Fixed 'random-looking' bytes for inputs no vector provides."""
    return hashlib.shake_256(b"qflare hybrid test vector / " + tag).digest(n)


def combine_cases() -> list[dict[str, Any]]:
    """The combiner alone, on fixed inputs (no KEM involved)."""
    a = (shake(b"ss-a", 32), shake(b"ct-a", 48), shake(b"pk-a", 40))
    b = (shake(b"ss-b", 32), shake(b"ct-b", 32), shake(b"pk-b", 32))
    c = (shake(b"ss-c", 48), shake(b"ct-c", 97), shake(b"pk-c", 97))
    cases: list[tuple[str, bytes, list[str], list[tuple[bytes, bytes, bytes]]]] = [
        ("two-components", LABEL, ["ML-KEM-1024", "X25519"], [a, b]),
        ("three-components", LABEL, ["ML-KEM-1024", "X25519", "P-384"], [a, b, c]),
        ("components-swapped", LABEL, ["X25519", "ML-KEM-1024"], [b, a]),
        ("other-label", b"qflare/v1/some-other-label", ["ML-KEM-1024", "X25519"], [a, b]),
        ("empty-fields", LABEL, ["A", "B"], [(b"", b"", b""), (b"", b"", b"")]),
        # The next two hash the same concatenated bytes split differently: only the length
        # prefixes tell them apart, so they must give different secrets.
        ("split-1", LABEL, ["A", "B"], [(b"ab", b"c", b""), (b"", b"", b"")]),
        ("split-2", LABEL, ["A", "B"], [(b"a", b"bc", b""), (b"", b"", b"")]),
    ]
    return [
        {
            "id": cid,
            "label": label.hex(),
            "names": names,
            "parts": [[ss.hex(), ct.hex(), pk.hex()] for ss, ct, pk in parts],
            "shared_secret": combine(label, names, parts).hex(),
        }
        for cid, label, names, parts in cases
    ]


def _x25519_part(case: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes]:
    """(private key, ciphertext, shared secret, public key) of a Wycheproof X25519 case, read
    as a KEM: the recipient holds ``private``, the peer's share ``public`` is the ciphertext."""
    private, share = bytes.fromhex(case["private"]), bytes.fromhex(case["public"])
    public = x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    return private, share, bytes.fromhex(case["shared"]), public


def _mlkem1024_part(case: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes]:
    """(seed, ciphertext, shared secret, public key) of a Wycheproof ML-KEM-1024 case."""
    return (
        bytes.fromhex(case["seed"]),
        bytes.fromhex(case["c"]),
        bytes.fromhex(case["K"]),
        bytes.fromhex(case["ek"]),
    )


def _p384_part(tag: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """A P-384 component from fixed scalars: (private scalar, ephemeral share, ECDH, public)."""
    curve = ec.SECP384R1()
    sk = ec.derive_private_key(int.from_bytes(shake(tag + b"/static", 47), "big"), curve)
    eph = ec.derive_private_key(int.from_bytes(shake(tag + b"/ephemeral", 47), "big"), curve)
    share = eph.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    public = sk.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return (
        sk.private_numbers().private_value.to_bytes(48, "big"),
        share,
        sk.exchange(ec.ECDH(), eph.public_key()),
        public,
    )


def _xwing_parts(vector: dict[str, str]) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """The X-Wing draft's key pair and ciphertext, split into ML-KEM-768 and X25519 parts.

    X-Wing expands its 32-byte decapsulation key with SHAKE256 to 96 bytes: an ML-KEM-768
    (d, z) seed, then an X25519 private key. pk = pk_M || pk_X and ct = ct_M || ct_X, which is
    exactly how QFLARE lays out ``ML-KEM-768+X25519`` keys and ciphertexts.
    """
    expanded = hashlib.shake_256(bytes.fromhex(vector["sk"])).digest(96)
    m_sk = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    x_sk = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    ct = bytes.fromhex(vector["ct"])
    m_ct, x_ct = ct[:1088], ct[1088:]
    return [
        (expanded[:64], m_ct, m_sk.decapsulate(m_ct), m_sk.public_key().public_bytes_raw()),
        (
            expanded[64:],
            x_ct,
            x_sk.exchange(x25519.X25519PublicKey.from_public_bytes(x_ct)),
            x_sk.public_key().public_bytes_raw(),
        ),
    ]


def kem_case(
    cid: str, names: list[str], parts: list[tuple[bytes, bytes, bytes, bytes]], source: str
) -> dict[str, Any]:
    return {
        "id": cid,
        "kem": "+".join(names),
        "source": source,
        "private_key": b"".join(p[0] for p in parts).hex(),
        "public_key": b"".join(p[3] for p in parts).hex(),
        "ciphertext": b"".join(p[1] for p in parts).hex(),
        "shared_secret": combine(LABEL, names, [(p[2], p[1], p[3]) for p in parts]).hex(),
    }


def kem_cases() -> list[dict[str, Any]]:
    mlkem_valid = _mlkem1024_part(wycheproof_case("mlkem_1024_test.json.gz", 2))
    # tcId 152: a bit-flipped ciphertext; its published K is the implicit-rejection secret.
    mlkem_flipped = _mlkem1024_part(wycheproof_case("mlkem_1024_test.json.gz", 152))
    x_normal = _x25519_part(wycheproof_case("x25519_test.json.gz", 1))
    x_other = _x25519_part(wycheproof_case("x25519_test.json.gz", 34))
    xwing = json.loads((HERE / "xwing-test-vectors.json").read_text(encoding="utf-8"))
    return [
        kem_case(
            "mlkem1024-x25519",
            ["ML-KEM-1024", "X25519"],
            [mlkem_valid, x_normal],
            "ML-KEM-1024: wycheproof mlkem_1024_test.json tcId 2; "
            "X25519: wycheproof x25519_test.json tcId 1",
        ),
        kem_case(
            "mlkem1024-x25519-implicit-rejection",
            ["ML-KEM-1024", "X25519"],
            [mlkem_flipped, x_other],
            "ML-KEM-1024: wycheproof mlkem_1024_test.json tcId 152 (bit-flipped ciphertext); "
            "X25519: wycheproof x25519_test.json tcId 34",
        ),
        kem_case(
            "mlkem1024-x25519-p384",
            ["ML-KEM-1024", "X25519", "P-384"],
            [mlkem_valid, x_normal, _p384_part(b"p384-a")],
            "ML-KEM-1024 and X25519 as in mlkem1024-x25519; P-384 from fixed SHAKE256 scalars",
        ),
        *(
            kem_case(
                f"xwing-{i}-keys-qflare-combiner",
                ["ML-KEM-768", "X25519"],
                _xwing_parts(vector),
                f"xwing-test-vectors.json vector {i}: X-Wing's key pair and ciphertext, "
                "combined with QFLARE's combiner (not X-Wing's)",
            )
            for i, vector in enumerate(xwing)
        ),
    ]


def build() -> str:
    doc = {
        "description": "Pinned outputs of QFLARE's hybrid KEM combiner (docs/PROTOCOL.md 4). "
        "Generated by tests/vectors/gen_hybrid_vectors.py; do not edit by hand.",
        "combiner": "ss = SHA3-256(lp(label) || for each component i: "
        "lp(name_i) lp(ss_i) lp(ct_i) lp(pk_i)), lp(x) = u32 big-endian length || x",
        "label": LABEL.hex(),
        "combine": combine_cases(),
        "kem": kem_cases(),
    }
    return json.dumps(doc, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.name} is out of date: rerun {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
