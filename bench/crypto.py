"""Per-operation cost of QFLARE's crypto registry wrappers against raw pyca/cryptography.

Run: ``.venv/bin/python bench/crypto.py [--quick] [--rounds N] [--iterations N] [--check]``

For every operation the two sides get the same inputs (same seeds, keys, ciphertexts,
messages) and are checked once to give the same results before any timing. Each round times a
batch of the raw call and a batch of the QFLARE call back to back, swapping which goes first
every round; rounds go over all operations before the next round starts, so a burst of noise
from a neighbour lands on one round of many operations rather than on all rounds of one.
Reported: median µs per call of each side, and the median over rounds of the per-round ratio
qflare/raw. The target is a ratio (wrapper overhead at most 1.1 times raw), never an absolute time.

Randomised operations (ML-KEM and hybrid encapsulation, ML-DSA signing, which pyca always
hedges) cannot be given identical randomness; they are compared over many calls instead. ML-DSA
signing in particular varies a lot per call (rejection sampling), so it gets bigger batches.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qflare import crypto
from qflare.crypto import labels

try:
    import _timing as T
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _timing as T

BUDGET_S = 35.0
QUICK_BUDGET_S = 4.0
TARGET = 1.1
SIGN_WEIGHT = 6  # ML-DSA signing: ~0.6-0.7 coefficient of variation per call


@dataclass
class Op:
    key: str  # RESULT-friendly name
    title: str  # table name
    raw: Any
    qflare: Any
    weight: float = 1.0
    n: int = 0
    raw_ns: list[float] = field(default_factory=list)
    qflare_ns: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def _seeded(size: int, tag: int) -> bytes:
    return bytes((tag * 37 + i) % 256 for i in range(size))


def _fixed_rng(seed: bytes) -> Any:
    """An ``Rng`` that hands out ``seed`` (C-level lookup: no Python frame of its own)."""
    return {len(seed): seed}.__getitem__


def _same(what: str, a: object, b: object) -> None:
    if a != b:
        raise SystemExit(f"bench/crypto.py: raw and qflare disagree on {what}")


def mlkem_ops(level: int) -> list[Op]:
    priv_cls = {768: mlkem.MLKEM768PrivateKey, 1024: mlkem.MLKEM1024PrivateKey}[level]
    kem = crypto.kem(f"ML-KEM-{level}")
    seed = _seeded(64, level)
    raw_sk = priv_cls.from_seed_bytes(seed)
    raw_pk = raw_sk.public_key()
    q_sk = kem.generate(_fixed_rng(seed))
    q_pk = kem.from_public_bytes(raw_pk.public_bytes_raw())
    _same("ML-KEM public key", q_sk.public_key().public_bytes(), raw_pk.public_bytes_raw())
    _, ct = raw_pk.encapsulate()
    _same("ML-KEM decapsulation", q_sk.decapsulate(ct), raw_sk.decapsulate(ct))
    q_ss, q_ct = q_pk.encapsulate()
    _same("ML-KEM encapsulation", raw_sk.decapsulate(q_ct), q_ss)
    p = f"mlkem{level}"
    return [
        Op(
            f"{p}_keygen",
            f"ML-KEM-{level} keygen (seed)",
            partial(priv_cls.from_seed_bytes, seed),
            partial(kem.generate, _fixed_rng(seed)),
        ),
        Op(f"{p}_encaps", f"ML-KEM-{level} encaps", raw_pk.encapsulate, q_pk.encapsulate),
        Op(
            f"{p}_decaps",
            f"ML-KEM-{level} decaps",
            partial(raw_sk.decapsulate, ct),
            partial(q_sk.decapsulate, ct),
        ),
    ]


def x25519_ops() -> list[Op]:
    kem = crypto.kem("X25519")
    seed, peer_seed = _seeded(32, 1), _seeded(32, 2)
    raw_sk = x25519.X25519PrivateKey.from_private_bytes(seed)
    q_sk = kem.generate(_fixed_rng(seed))
    peer = x25519.X25519PrivateKey.from_private_bytes(peer_seed).public_key()
    peer_bytes = peer.public_bytes_raw()
    q_peer = kem.from_public_bytes(peer_bytes)
    _same(
        "X25519 public key",
        q_sk.public_key().public_bytes(),
        raw_sk.public_key().public_bytes_raw(),
    )

    def raw_exchange() -> bytes:
        # What qflare's decapsulate does with the raw API: parse the peer share, then DH.
        return raw_sk.exchange(x25519.X25519PublicKey.from_public_bytes(peer_bytes))

    def raw_encaps() -> tuple[bytes, bytes]:
        # Ephemeral key, DH with the peer, encode the ephemeral public key as the ciphertext.
        eph = x25519.X25519PrivateKey.generate()
        return eph.exchange(peer), eph.public_key().public_bytes_raw()

    _same("X25519 exchange", q_sk.decapsulate(peer_bytes), raw_exchange())
    ss, ct = q_peer.encapsulate()
    _same(
        "X25519 encapsulation",
        x25519.X25519PrivateKey.from_private_bytes(peer_seed).exchange(
            x25519.X25519PublicKey.from_public_bytes(ct)
        ),
        ss,
    )
    return [
        Op(
            "x25519_keygen",
            "X25519 keygen (seed)",
            partial(x25519.X25519PrivateKey.from_private_bytes, seed),
            partial(kem.generate, _fixed_rng(seed)),
        ),
        Op(
            "x25519_exchange",
            "X25519 exchange (parse peer + DH)",
            raw_exchange,
            partial(q_sk.decapsulate, peer_bytes),
        ),
        Op(
            "x25519_encaps",
            "X25519 encaps (eph keygen + DH)",
            raw_encaps,
            q_peer.encapsulate,
        ),
    ]


def mldsa_ops(level: int, message: bytes) -> list[Op]:
    priv_cls = {
        44: mldsa.MLDSA44PrivateKey,
        65: mldsa.MLDSA65PrivateKey,
        87: mldsa.MLDSA87PrivateKey,
    }[level]
    scheme = crypto.signature(f"ML-DSA-{level}")
    ctx = labels.SIG_CLIENT_HELLO
    seed = _seeded(32, level)
    raw_sk = priv_cls.from_seed_bytes(seed)
    raw_pk = raw_sk.public_key()
    q_sk = scheme.generate(_fixed_rng(seed))
    q_pk = scheme.from_public_bytes(raw_pk.public_bytes_raw())
    _same("ML-DSA public key", q_sk.public_key().public_bytes(), raw_pk.public_bytes_raw())
    sig = raw_sk.sign(message, ctx)
    raw_pk.verify(q_sk.sign(message, ctx), message, ctx)
    q_pk.verify(sig, message, ctx)
    p = f"mldsa{level}"
    return [
        Op(
            f"{p}_keygen",
            f"ML-DSA-{level} keygen (seed)",
            partial(priv_cls.from_seed_bytes, seed),
            partial(scheme.generate, _fixed_rng(seed)),
        ),
        Op(
            f"{p}_sign",
            f"ML-DSA-{level} sign {len(message)} B",
            partial(raw_sk.sign, message, ctx),
            partial(q_sk.sign, message, ctx),
            weight=SIGN_WEIGHT,
        ),
        Op(
            f"{p}_verify",
            f"ML-DSA-{level} verify {len(message)} B",
            partial(raw_pk.verify, sig, message, ctx),
            partial(q_pk.verify, sig, message, ctx),
        ),
    ]


def hkdf_ops() -> list[Op]:
    ops = []
    for name, algorithm, length in (
        ("SHA3-512", hashes.SHA3_512(), 64),
        ("SHA256", hashes.SHA256(), 32),
    ):
        kdf = crypto.kdf(f"HKDF-{name}")
        ikm, salt, info = _seeded(64, 3), _seeded(64, 4), _seeded(64, 5)

        def raw(
            algorithm: Any = algorithm,
            length: int = length,
            salt: bytes = salt,
            info: bytes = info,
            ikm: bytes = ikm,
        ) -> bytes:
            return HKDF(algorithm, length, salt, info).derive(ikm)

        _same(f"HKDF-{name}", kdf.derive(ikm, salt, info, length), raw())
        key = name.lower().replace("-", "_")
        ops.append(
            Op(
                f"hkdf_{key}_derive",
                f"HKDF-{name} derive {length} B",
                raw,
                partial(kdf.derive, ikm, salt, info, length),
            )
        )
    return ops


def aead_ops() -> list[Op]:
    key, nonce, aad = _seeded(32, 6), _seeded(12, 7), _seeded(32, 8)
    raw = AESGCM(key)
    box = crypto.aead("AES-256-GCM").key(key)
    ops = []
    for size, tag in ((1024, "1k"), (1 << 20, "1m")):
        plain = _seeded(size, 9)
        sealed = raw.encrypt(nonce, plain, aad)
        _same("AES-GCM seal", box.seal(nonce, plain, aad), sealed)
        _same("AES-GCM open", box.open(nonce, sealed, aad), plain)
        label = "1 KiB" if size == 1024 else "1 MiB"
        ops += [
            Op(
                f"aes256gcm_seal_{tag}",
                f"AES-256-GCM seal {label}",
                partial(raw.encrypt, nonce, plain, aad),
                partial(box.seal, nonce, plain, aad),
            ),
            Op(
                f"aes256gcm_open_{tag}",
                f"AES-256-GCM open {label}",
                partial(raw.decrypt, nonce, sealed, aad),
                partial(box.open, nonce, sealed, aad),
            ),
        ]
    return ops


def hybrid_ops() -> list[Op]:
    """ML-KEM-1024+X25519 against the sum of its raw parts, done in one function.

    The raw side does what any implementation of the combiner must: the ML-KEM operation, the
    X25519 operation, and one SHA3-256 over an input exactly as long as the combiner's
    (label, and per component name, secret, ciphertext and public key, each length-prefixed).
    It hashes a prebuilt buffer of that length in one update: SHA3's cost depends only on the
    length, and building the buffer is exactly the kind of glue whose cost we want to expose.
    """
    hybrid = crypto.kem("ML-KEM-1024+X25519")
    mk, xk = crypto.kem("ML-KEM-1024"), crypto.kem("X25519")
    m_seed, x_seed = _seeded(64, 10), _seeded(32, 11)
    q_sk = hybrid.from_private_bytes(m_seed + x_seed)
    q_pk = hybrid.from_public_bytes(q_sk.public_key().public_bytes())
    m_sk = mlkem.MLKEM1024PrivateKey.from_seed_bytes(m_seed)
    m_pk = m_sk.public_key()
    x_sk = x25519.X25519PrivateKey.from_private_bytes(x_seed)
    x_pk = x_sk.public_key()
    combined_len = (
        4
        + len(labels.HYBRID_KEM)
        + sum(
            16 + len(k.name) + k.shared_secret_size + k.ciphertext_size + k.public_key_size
            for k in (mk, xk)
        )
    )
    combine_input = _seeded(combined_len, 12)
    sha3_256 = hashes.SHA3_256()
    m_ct_size = mk.ciphertext_size

    def raw_sha3(data: bytes) -> bytes:
        h = hashes.Hash(sha3_256)
        h.update(data)
        return h.finalize()

    def raw_encaps() -> tuple[bytes, bytes, bytes, bytes]:
        m_ss, m_ct = m_pk.encapsulate()
        eph = x25519.X25519PrivateKey.generate()
        x_ss, x_ct = eph.exchange(x_pk), eph.public_key().public_bytes_raw()
        return raw_sha3(combine_input), m_ct + x_ct, m_ss, x_ss

    def raw_decaps(ct: bytes) -> tuple[bytes, bytes, bytes]:
        m_ss = m_sk.decapsulate(ct[:m_ct_size])
        x_ss = x_sk.exchange(x25519.X25519PublicKey.from_public_bytes(ct[m_ct_size:]))
        return raw_sha3(combine_input), m_ss, x_ss

    ss, ct = q_pk.encapsulate()
    _same("hybrid decapsulation", q_sk.decapsulate(ct), ss)
    _same("hybrid ciphertext size", len(raw_encaps()[1]), len(ct))
    # The raw parts really are what the hybrid computes: recombine them with qflare's combiner.
    parts = [
        (m_sk.decapsulate(ct[:m_ct_size]), ct[:m_ct_size], m_pk.public_bytes_raw()),
        (
            x_sk.exchange(x25519.X25519PublicKey.from_public_bytes(ct[m_ct_size:])),
            ct[m_ct_size:],
            x_pk.public_bytes_raw(),
        ),
    ]
    _same("hybrid parts", crypto.combine(labels.HYBRID_KEM, [mk.name, xk.name], parts), ss)
    _same(
        "hybrid combiner input length",
        4
        + len(labels.HYBRID_KEM)
        + sum(
            16 + len(n) + sum(map(len, t)) for n, t in zip((mk.name, xk.name), parts, strict=True)
        ),
        combined_len,
    )
    return [
        Op(
            "hybrid_encaps",
            "ML-KEM-1024+X25519 encaps",
            raw_encaps,
            q_pk.encapsulate,
        ),
        Op(
            "hybrid_decaps",
            "ML-KEM-1024+X25519 decaps",
            partial(raw_decaps, ct),
            partial(q_sk.decapsulate, ct),
        ),
    ]


def build_ops() -> list[Op]:
    message = _seeded(1024, 13)
    return [
        *mlkem_ops(768),
        *mlkem_ops(1024),
        *x25519_ops(),
        *mldsa_ops(44, message),
        *mldsa_ops(65, message),
        *mldsa_ops(87, message),
        *hkdf_ops(),
        *aead_ops(),
        *hybrid_ops(),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/crypto.py",
        description="Cost of QFLARE's crypto registry wrappers against raw pyca/cryptography "
        "calls on the same inputs, measured as interleaved rounds in one run. Prints a "
        "table and one RESULT line; the target is qflare/raw <= --target for every "
        "operation.",
    )
    T.add_common_arguments(
        parser,
        budget=BUDGET_S,
        quick_budget=QUICK_BUDGET_S,
        target=TARGET,
        iterations_help="calls per batch for every operation (default: sized from --budget "
        "so each operation gets a fair share of the time)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="SUBSTRING",
        help="measure only operations whose key contains SUBSTRING (repeatable)",
    )
    args = parser.parse_args(argv)
    T.resolve_common(args, budget=BUDGET_S, quick_budget=QUICK_BUDGET_S)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("crypto")
    progress.note("preparing inputs and checking raw == qflare results")
    ops = build_ops()
    if args.only:
        ops = [op for op in ops if any(s in op.key for s in args.only)]
        if not ops:
            raise SystemExit("--only matched no operation")

    # Size batches: each operation gets a share of the budget proportional to its weight,
    # split over rounds and the two sides. Both sides always run the same number of calls.
    batch_ns = args.budget * 1e9 / (args.rounds * 2 * sum(op.weight for op in ops))
    for i, op in enumerate(ops, 1):
        progress.step(f"calibrating {i}/{len(ops)} {op.title}")
        if args.iterations is not None:
            op.n = args.iterations
        else:
            # Calibrate on a slice of the batch: signing varies too much per call to be sized
            # from a couple of calls.
            slice_ns = min(20e6, batch_ns * op.weight / 4)
            cost = max(T.per_call_ns(op.raw, slice_ns), T.per_call_ns(op.qflare, slice_ns))
            op.n = T.iterations_for(cost, batch_ns * op.weight)
    overhead = T.harness_overhead_ns()

    for r in range(args.rounds):
        progress.note(f"round {r + 1}/{args.rounds}")
        for i, op in enumerate(ops, 1):
            progress.step(f"round {r + 1}/{args.rounds} op {i}/{len(ops)} {op.title}")
            sides = [("raw", op.raw), ("qflare", op.qflare)]
            if r % 2:
                sides.reverse()  # alternate which side runs first
            got = {name: T.time_batch(fn, op.n) / op.n for name, fn in sides}
            op.raw_ns.append(got["raw"])
            op.qflare_ns.append(got["qflare"])
            op.ratios.append(got["qflare"] / got["raw"])
    progress.done()

    rows = []
    ratios = []
    for op in ops:
        ratio = T.median(op.ratios)
        ratios.append((ratio, op.key))
        rows.append(
            [
                op.title,
                f"{T.median(op.raw_ns) / 1e3:.2f}",
                f"{T.median(op.qflare_ns) / 1e3:.2f}",
                f"{ratio:.3f}",
                f"{min(op.ratios):.3f}..{max(op.ratios):.3f}",
                str(op.n),
                "" if ratio <= args.target else "over",
            ]
        )
    print(
        f"# clock {T.CLOCK_NAME}; {args.rounds} interleaved rounds; µs are medians per call; "
        "ratio = median of per-round qflare/raw"
    )
    print(f"# loop overhead per call (both sides alike, not subtracted): {overhead:.0f} ns")
    print(
        T.table(
            ["op", "raw µs", "qflare µs", "ratio", "round range", "calls/batch", ""],
            rows,
        )
    )
    worst_ratio, worst_key = max(ratios)
    median_ratio = T.median([r for r, _ in ratios])
    status = T.verdict(worst_ratio, args.target)
    over = [key for ratio, key in ratios if ratio > args.target]
    print(
        f"{status}: worst wrapper ratio {worst_ratio:.3f} ({worst_key}) vs target "
        f"<= {args.target:g}" + (f"; over target: {', '.join(over)}" if over else "")
    )

    by_key = {op.key: op for op in ops}
    result: dict[str, object] = {
        "wrapper_ratio_max": worst_ratio,
        "wrapper_ratio_median": median_ratio,
        "worst_op": worst_key,
    }
    for key in (
        "mlkem1024_keygen",
        "mlkem1024_encaps",
        "mlkem1024_decaps",
        "mldsa44_sign",
        "mldsa44_verify",
        "hybrid_encaps",
        "hybrid_decaps",
    ):
        if key in by_key:
            result[f"{key}_us"] = T.median(by_key[key].qflare_ns) / 1e3
    result.update(
        target=args.target, status=status, ops=len(ops), rounds=args.rounds, clock=T.CLOCK_NAME
    )
    print(T.result_line(**result))
    sys.stdout.flush()
    return 1 if args.check and status == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
