"""Server CPU per complete QFLARE handshake against its crypto lower bound, in process.

Run: ``.venv/bin/python bench/handshake.py [--quick] [--rounds N] [--iterations N] [--check]``

What is timed (default suite ML-KEM-1024+X25519 / ML-DSA-44 / HKDF-SHA3-512 / AES-256-GCM):

* server: on a fresh ``ServerHandshake``, ``receive_client_hello`` + ``authenticate`` (device
  lookup is an already-parsed ``DeviceKey``) + ``server_hello`` (``seen_before`` is an
  in-memory set) and, on another fresh ``ServerHandshake`` as a replica would,
  ``receive_client_finish``. Building the ``ServerHandshake`` objects is included.
* bound: the same run's cost of the raw pyca/cryptography calls the server cannot avoid (see
  ``bound_*`` below for the list and how it was counted), on inputs of the same sizes.
* client (reported, no target): ``ClientHandshake`` construction + ``client_hello`` +
  ``receive_server_hello``.

Each round runs a batch of K complete handshakes phase by phase (all K client hellos, then all
K ``receive_client_hello``, all K ``authenticate``, ...), so the client's work lies outside
every server timing and every handshake gets its own fresh ClientHello (nonce); then a batch of
K bound iterations. The order of the two sides alternates every round. Reported: medians over
rounds of µs per handshake, and the median of the per-round ratios server/bound. Target: at
most 1.3 times the bound.
"""

from __future__ import annotations

import argparse
import collections
import gc
import hmac as std_hmac
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from qflare import crypto
from qflare.crypto import labels
from qflare.protocol import (
    DEFAULT_SUITE,
    BiscuitKeys,
    ClientHandshake,
    ClientHello,
    DeviceKey,
    Established,
    PinnedServerKey,
    ServerHandshake,
    ServerHello,
    ServerPolicy,
    ServerStaticKey,
)
from qflare.protocol import keyschedule as ks

try:
    import _timing as T
except ImportError:  # imported as bench.<name> (e.g. by a test) rather than run as a script
    from bench import _timing as T

BUDGET_S = 30.0
QUICK_BUDGET_S = 4.0
TARGET = 1.3
NOW = 1_700_000_000
DEVICE_ID = "bench-device-0001"
SERVER_KEY_ID = "srv-bench-1"

SERVER_PHASES = ("receive_client_hello", "authenticate", "server_hello", "receive_client_finish")
CLIENT_PHASES = ("client_hello", "receive_server_hello")


@dataclass
class World:
    """The long-lived state of one server and one enrolled device."""

    policy: ServerPolicy
    static_keys: dict[str, ServerStaticKey]
    biscuits: BiscuitKeys
    biscuit_key: bytes
    identity: crypto.SignaturePrivateKey
    pin: PinnedServerKey
    device: DeviceKey
    seen: set[tuple[str, bytes]] = field(default_factory=set)

    def seen_before(self, device_id: str, nonce: bytes, timestamp: int) -> bool:
        key = (device_id, nonce)
        if key in self.seen:
            return True
        self.seen.add(key)
        return False

    def client(self) -> ClientHandshake:
        return ClientHandshake(
            device_id=DEVICE_ID,
            identity=self.identity,
            identity_algorithm=DEFAULT_SUITE.signature,
            server_key=self.pin,
        )

    def server(self) -> ServerHandshake:
        return ServerHandshake(
            policy=self.policy, static_keys=self.static_keys, biscuits=self.biscuits
        )


def make_world() -> World:
    rng = crypto.system_rng
    suite = DEFAULT_SUITE
    static = crypto.kem(suite.kem).generate(rng)
    identity = crypto.signature(suite.signature).generate(rng)
    biscuit_key = rng(32)
    return World(
        policy=ServerPolicy(suites=(suite,)),
        static_keys={
            SERVER_KEY_ID: ServerStaticKey(
                key_id=SERVER_KEY_ID, algorithm=suite.kem, private=static
            )
        },
        biscuits=BiscuitKeys({1: biscuit_key}, 1),
        biscuit_key=biscuit_key,
        identity=identity,
        pin=PinnedServerKey(
            key_id=SERVER_KEY_ID,
            algorithm=suite.kem,
            public_key=static.public_key().public_bytes(),
        ),
        device=DeviceKey(
            device_id=DEVICE_ID, algorithm=suite.signature, public=identity.public_key()
        ),
    )


# --- the QFLARE side -----------------------------------------------------------------------------


Pairs = list[tuple[ClientHandshake, Established]]


def qflare_batch(world: World, k: int) -> tuple[dict[str, int], Pairs]:
    """K complete handshakes, each phase timed over the whole batch. Returns CPU ns per phase."""
    rng = crypto.system_rng
    ns: dict[str, int] = {}
    clients: list[ClientHandshake] = []
    hellos: list[bytes] = []
    servers: list[ServerHandshake] = []
    server_hellos: list[bytes] = []
    finishes: list[bytes] = []
    established: list[Established] = []

    def client_hello() -> None:
        for _ in range(k):
            c = world.client()
            hellos.append(c.client_hello(now=NOW, rng=rng))
            clients.append(c)

    def receive_client_hello() -> None:
        for hello in hellos:
            s = world.server()
            s.receive_client_hello(hello, now=NOW)
            servers.append(s)

    def authenticate() -> None:
        device = world.device
        for s in servers:
            s.authenticate(device)

    def server_hello() -> None:
        seen_before = world.seen_before
        for s in servers:
            server_hellos.append(s.server_hello(rng=rng, seen_before=seen_before))

    def receive_server_hello() -> None:
        for c, sh in zip(clients, server_hellos, strict=True):
            finishes.append(c.receive_server_hello(sh))

    def receive_client_finish() -> None:
        for cf in finishes:
            established.append(world.server().receive_client_finish(cf, now=NOW + 1))

    # The client's work runs between the server's phases but outside their timings.
    for name, fn in (
        ("client_hello", client_hello),
        ("receive_client_hello", receive_client_hello),
        ("authenticate", authenticate),
        ("server_hello", server_hello),
        ("receive_server_hello", receive_server_hello),
        ("receive_client_finish", receive_client_finish),
    ):
        ns[name] = T.timed(fn)
    return ns, list(zip(clients, established, strict=True))


def check_sessions(pairs: Pairs) -> None:
    """Every handshake of the batch must have produced matching sessions (untimed)."""
    for client, est in pairs:
        if client.session is None or client.session.session_id != est.session.session_id:
            raise SystemExit("bench/handshake.py: a handshake did not establish a session")
    client, est = pairs[-1]
    record = client.session.seal(b"bench", now=NOW + 2, purpose="fl-update")
    if est.session.open(record, now=NOW + 2).plaintext != b"bench":
        raise SystemExit("bench/handshake.py: the established session does not open a record")


# --- the lower bound -----------------------------------------------------------------------------
#
# What the server cannot avoid, counted by reading handshake.py and the modules it calls
# (hybrid.py, kem.py, kdf.py, keyschedule.py, biscuit.py, aead.py), and cross-checked at run time
# by the call census printed at the end (sys.setprofile over one server handshake of each side):
#
#   authenticate           ML-DSA-44 verify of the ClientHello's signed part        (1 verify)
#   server_hello           static hybrid decapsulation: ML-KEM-1024 decaps, X25519 parse of
#                            the static ciphertext's share + exchange, SHA3-256 combiner
#                          ephemeral hybrid encapsulation to the device's key share: parse the
#                            ML-KEM-1024 and X25519 public keys, ML-KEM-1024 encaps, X25519
#                            keygen + exchange + encode, SHA3-256 combiner
#                          session id (16 B) and biscuit nonce (12 B) from os.urandom
#                          ks.handshake_secret: 1 HKDF-Extract (HMAC-SHA3-512)
#                          ks.transcript_hash th2 and th3: 2 SHA3-512
#                          ks.finished_key(server): 1 HKDF-Expand, 64 B
#                          kdf.mac (server Finished): 1 HMAC-SHA3-512
#                          biscuit seal: 1 AES-256-GCM encrypt
#   receive_client_finish  biscuit open: 1 AES-256-GCM decrypt
#                          ks.finished_key(client): 1 HKDF-Expand, 64 B
#                          kdf.verify_mac: 1 HMAC-SHA3-512 + compare_digest
#                          ks.session_secret: 1 HKDF-Expand, 32 B
#                          EpochKeySchedule.start: 1 HKDF-Expand, 32 B (first chain key)
#   receive_client_hello   none: decoding and checks only
#
# Totals: 1 ML-DSA-44 verify, 1 ML-KEM-1024 decaps + 1 encaps + 1 public-key parse, 2 X25519
# exchanges + 1 keygen + 2 public-key parses, 2 SHA3-256, 2 SHA3-512, 3 HMAC-SHA3-512 (one of
# them as HKDF-Extract), 4 HKDF-Expand, 1 AES-GCM seal + 1 open, 2 os.urandom.
#
# Parsing the peer's public keys is in the bound: raw code must do it too (and the ML-KEM parse,
# with its FIPS 203 modulus check, is not free). Each hash gets one update of an input exactly
# as long as QFLARE's (content does not change SHA-3's cost); building those inputs from parts,
# message encoding and decoding, and re-encoding public keys are left out: they are the
# overhead being measured.


@dataclass
class Bound:
    authenticate: Callable[[], object]
    server_hello: Callable[[], object]
    receive_client_finish: Callable[[], object]


def make_bound(world: World) -> Bound:
    """Raw pyca calls on inputs taken from one real handshake of ``world``."""
    rng = crypto.system_rng
    suite = DEFAULT_SUITE
    mk, xk = crypto.kem("ML-KEM-1024"), crypto.kem("X25519")
    m_ct, m_pk = mk.ciphertext_size, mk.public_key_size

    # One reference handshake, whose messages give the bound its inputs.
    client = world.client()
    hello_bytes = client.client_hello(now=NOW, rng=rng)
    server = world.server()
    server.receive_client_hello(hello_bytes, now=NOW)
    server.authenticate(world.device)
    sh_bytes = server.server_hello(rng=rng, seen_before=world.seen_before)
    cf_bytes = client.receive_server_hello(sh_bytes)
    world.server().receive_client_finish(cf_bytes, now=NOW + 1)
    hello = ClientHello.decode(hello_bytes)
    sh = ServerHello.decode(sh_bytes)

    # Raw keys: the same key material as the World's.
    static_priv = world.static_keys[SERVER_KEY_ID].private.private_bytes()
    static_m = mlkem.MLKEM1024PrivateKey.from_seed_bytes(static_priv[: mk.private_key_size])
    static_x = x25519.X25519PrivateKey.from_private_bytes(static_priv[mk.private_key_size :])
    device_pk = mldsa.MLDSA44PublicKey.from_public_bytes(world.device.public.public_bytes())
    aesgcm = AESGCM(world.biscuit_key)
    sha3_256, sha3_512 = hashes.SHA3_256(), hashes.SHA3_512()
    if suite.kdf != "HKDF-SHA3-512":
        raise SystemExit("bench/handshake.py: the bound is written for HKDF-SHA3-512")

    signed = hello_bytes[: -4 - len(hello.signature)]
    static_ct = hello.static_ciphertext
    share = hello.key_shares[0][1]
    device_id, key_id = DEVICE_ID.encode(), SERVER_KEY_ID.encode()
    combine_input = bytes(
        4
        + len(labels.HYBRID_KEM)
        + sum(
            16 + len(k.name) + k.shared_secret_size + k.ciphertext_size + k.public_key_size
            for k in (mk, xk)
        )
    )
    hs_ikm = bytes(len(ks.info(bytes(32), bytes(32))))
    th2_input = ks.info(labels.TRANSCRIPT, hello_bytes, sh.core())
    th3_input = ks.info(labels.TRANSCRIPT, hello_bytes, sh.core(), sh.finished)
    server_fk_info = ks.info(labels.SERVER_FINISHED, labels.ROLE_SERVER, device_id, key_id)
    client_fk_info = ks.info(labels.CLIENT_FINISHED, labels.ROLE_DEVICE, device_id, key_id)
    biscuit = sh.biscuit
    biscuit_nonce, biscuit_sealed = biscuit[1:13], biscuit[13:]
    biscuit_aad = labels.BISCUIT + sh.session_id
    biscuit_plain = aesgcm.decrypt(biscuit_nonce, biscuit_sealed, biscuit_aad)
    contents = world.biscuits.open(sh.session_id, biscuit, now=NOW + 1)
    hs, th3 = contents.handshake_secret, contents.transcript_hash
    session_info = ks.info(labels.SESSION_SECRET, device_id, key_id, sh.session_id, th3)
    client_finished = cf_bytes[-64:]
    epoch = ks.epoch_of(NOW, world.policy.epoch_seconds)
    chain_info = ks.info(labels.CHAIN_INIT, sh.session_id, ks.u64(epoch))

    def sha(algorithm: Any, data: bytes) -> bytes:
        h = hashes.Hash(algorithm)
        h.update(data)
        return h.finalize()

    def mac(key: bytes, data: bytes) -> bytes:
        h = pyca_hmac.HMAC(key, sha3_512)
        h.update(data)
        return h.finalize()

    def bound_server_hello() -> object:
        # Static hybrid decapsulation.
        s_m = static_m.decapsulate(static_ct[:m_ct])
        s_x = static_x.exchange(x25519.X25519PublicKey.from_public_bytes(static_ct[m_ct:]))
        s_ss = sha(sha3_256, combine_input)
        # Ephemeral hybrid encapsulation to the device's key share.
        peer_m = mlkem.MLKEM1024PublicKey.from_public_bytes(share[:m_pk])
        peer_x = x25519.X25519PublicKey.from_public_bytes(share[m_pk:])
        e_m, e_m_ct = peer_m.encapsulate()
        eph = x25519.X25519PrivateKey.generate()
        e_x, e_x_ct = eph.exchange(peer_x), eph.public_key().public_bytes_raw()
        e_ss = sha(sha3_256, combine_input)
        session_id = os.urandom(16)
        # Key schedule, Finished MAC, biscuit.
        hs = HKDF.extract(sha3_512, labels.HANDSHAKE_SECRET, hs_ikm)
        th2 = sha(sha3_512, th2_input)
        server_mac = mac(HKDFExpand(sha3_512, 64, server_fk_info).derive(hs), th2)
        th3 = sha(sha3_512, th3_input)
        sealed = aesgcm.encrypt(os.urandom(12), biscuit_plain, biscuit_aad)
        return (s_m, s_x, s_ss, e_m, e_m_ct, e_x, e_x_ct, e_ss, session_id, server_mac, th3, sealed)

    def bound_receive_client_finish() -> object:
        aesgcm.decrypt(biscuit_nonce, biscuit_sealed, biscuit_aad)
        cfk = HKDFExpand(sha3_512, 64, client_fk_info).derive(hs)
        ok = std_hmac.compare_digest(mac(cfk, th3), client_finished)
        secret = HKDFExpand(sha3_512, 32, session_info).derive(hs)
        chain = HKDFExpand(sha3_512, 32, chain_info).derive(secret)
        return ok, chain

    # The bound really computes what the server computes where that is deterministic: the
    # client Finished MAC it checks must match, and so must the first chain key.
    ok, chain = bound_receive_client_finish()
    server_chain = ks.EpochKeySchedule.start(
        crypto.kdf(suite.kdf),
        ks.session_secret(
            crypto.kdf(suite.kdf),
            hs,
            ks.HandshakeContext(DEVICE_ID, SERVER_KEY_ID),
            sh.session_id,
            th3,
        ),
        sh.session_id,
        epoch,
    )
    if not ok or server_chain.export()[-32:] != chain:
        raise SystemExit("bench/handshake.py: the raw bound does not reproduce the handshake")
    device_pk.verify(hello.signature, signed, labels.SIG_CLIENT_HELLO)
    static_secret = crypto.combine(
        labels.HYBRID_KEM,
        [mk.name, xk.name],
        [
            (static_m.decapsulate(static_ct[:m_ct]), static_ct[:m_ct], world.pin.public_key[:m_pk]),
            (
                static_x.exchange(x25519.X25519PublicKey.from_public_bytes(static_ct[m_ct:])),
                static_ct[m_ct:],
                world.pin.public_key[m_pk:],
            ),
        ],
    )
    if static_secret != world.static_keys[SERVER_KEY_ID].private.decapsulate(static_ct):
        raise SystemExit("bench/handshake.py: the raw static decapsulation differs")

    return Bound(
        authenticate=partial(device_pk.verify, hello.signature, signed, labels.SIG_CLIENT_HELLO),
        server_hello=bound_server_hello,
        receive_client_finish=bound_receive_client_finish,
    )


def bound_batch(bound: Bound, k: int) -> dict[str, int]:
    return {
        "authenticate": T.time_batch(bound.authenticate, k),
        "server_hello": T.time_batch(bound.server_hello, k),
        "receive_client_finish": T.time_batch(bound.receive_client_finish, k),
    }


# --- the call census -----------------------------------------------------------------------------

_CRYPTO_MODULES = {"mlkem", "mldsa", "x25519", "posix", "_hashlib"}
_CRYPTO_PREFIXES = ("MLKEM", "MLDSA", "X25519", "Hash.", "HMAC.", "HKDF", "AESGCM")
# Calls whose count may differ without the work differing: re-encoding a public key the server
# already has the bytes of, and feeding one hash input in several updates.
_GLUE = (".public_bytes_raw", "Hash.update")


def census(fn: Callable[[], object]) -> collections.Counter[str]:
    """Count the C-level calls into pyca/cryptography (and urandom, compare_digest) of ``fn``."""
    counts: collections.Counter[str] = collections.Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "c_call":
            return
        module = getattr(arg, "__module__", None)
        name = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", "?")
        if module in _CRYPTO_MODULES:
            counts[f"{module}.{name}"] += 1
        elif name.startswith(_CRYPTO_PREFIXES):
            counts[name] += 1

    if isinstance(fn, partial):  # a partial calls its function from C, unseen by the profiler
        func, args = fn.func, fn.args
        fn = lambda: func(*args)  # noqa: E731
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counts


def census_table(world: World, bound: Bound) -> str:
    rng = crypto.system_rng
    client = world.client()
    hello = client.client_hello(now=NOW, rng=rng)
    server = world.server()
    box: dict[str, bytes] = {}

    def hello_path() -> None:
        server.receive_client_hello(hello, now=NOW)
        server.authenticate(world.device)
        box["sh"] = server.server_hello(rng=rng, seen_before=world.seen_before)

    ours = census(hello_path)
    finish = client.receive_server_hello(box["sh"])
    ours += census(lambda: world.server().receive_client_finish(finish, now=NOW + 1))
    raw = census(bound.authenticate)
    raw += census(bound.server_hello)
    raw += census(bound.receive_client_finish)
    rows = []
    mismatched = []
    for name in sorted(set(ours) | set(raw), key=str.lower):
        q, b = ours.get(name, 0), raw.get(name, 0)
        if q == b:
            note = ""
        elif name.endswith(_GLUE):
            note = "glue, left out of the bound"
        else:
            note = "MISMATCH"
            mismatched.append(name)
        rows.append([name, str(q), str(b), note])
    if mismatched:
        # The server's code changed since the bound was written: the ratio means little.
        print(
            "bench/handshake.py: WARNING: the bound's primitive calls differ from the server's: "
            + ", ".join(mismatched),
            file=sys.stderr,
        )
    return T.table(["pyca call per server handshake", "qflare", "bound", ""], rows)


# --- driver --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/handshake.py",
        description="Server-side CPU per complete QFLARE handshake (default suite, in process) "
        "against the same run's raw crypto lower bound; also the client's CPU. Prints a "
        "phase table, a call census and one RESULT line; the target is server/bound <= "
        "--target.",
    )
    T.add_common_arguments(
        parser,
        budget=BUDGET_S,
        quick_budget=QUICK_BUDGET_S,
        target=TARGET,
        iterations_help="handshakes per round (default: sized from --budget)",
    )
    args = parser.parse_args(argv)
    T.resolve_common(args, budget=BUDGET_S, quick_budget=QUICK_BUDGET_S)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = T.Progress("handshake")
    progress.note("setting up keys and checking the raw bound against a real handshake")
    world = make_world()
    bound = make_bound(world)

    # Size the batch from a short trial of both sides (also the warm-up).
    trial_k = 8
    trial_ns, pairs = qflare_batch(world, trial_k)
    check_sessions(pairs)
    bound_ns = bound_batch(bound, trial_k)
    per_handshake = (sum(trial_ns.values()) + sum(bound_ns.values())) / trial_k
    if args.iterations is not None:
        k = args.iterations
    else:
        k = T.iterations_for(per_handshake, args.budget * 1e9 / args.rounds, minimum=5)
    progress.note(
        f"{args.rounds} rounds of {k} handshakes (~{per_handshake * k * args.rounds / 1e9:.0f} s)"
    )

    server: dict[str, list[float]] = {p: [] for p in (*SERVER_PHASES, *CLIENT_PHASES)}
    lower: dict[str, list[float]] = {p: [] for p in SERVER_PHASES}
    totals: dict[str, list[float]] = {"server": [], "bound": [], "client": [], "ratio": []}
    for r in range(args.rounds):
        gc.collect()
        got_q: dict[str, int] = {}
        got_b: dict[str, int] = {}
        sides = ["qflare", "bound"] if r % 2 == 0 else ["bound", "qflare"]
        for side in sides:
            progress.note(f"round {r + 1}/{args.rounds}: {side}")
            if side == "qflare":
                got_q, pairs = qflare_batch(world, k)
            else:
                got_b = bound_batch(bound, k)
        check_sessions(pairs)
        del pairs
        for phase, spent in got_q.items():
            server[phase].append(spent / k)
        for phase in SERVER_PHASES:
            lower[phase].append(got_b.get(phase, 0) / k)
        s_total = sum(got_q[p] for p in SERVER_PHASES) / k
        b_total = sum(got_b.values()) / k
        totals["server"].append(s_total)
        totals["bound"].append(b_total)
        totals["client"].append(sum(got_q[p] for p in CLIENT_PHASES) / k)
        totals["ratio"].append(s_total / b_total)
    progress.note("call census (one extra handshake, untimed)")
    census_text = census_table(world, bound)
    progress.done()

    def us(values: list[float]) -> str:
        return f"{T.median(values) / 1e3:.1f}"

    rows = []
    for phase in SERVER_PHASES:
        has_bound = any(lower[phase])
        ratios = [q / b for q, b in zip(server[phase], lower[phase], strict=True) if b]
        rows.append(
            [
                f"server {phase}",
                us(server[phase]),
                us(lower[phase]) if has_bound else "-",
                f"{T.median(ratios):.3f}" if has_bound else "-",
            ]
        )
    ratio = T.median(totals["ratio"])
    rows.append(["server total", us(totals["server"]), us(totals["bound"]), f"{ratio:.3f}"])
    rows.extend([f"client {phase}", us(server[phase]), "", ""] for phase in CLIENT_PHASES)
    rows.append(["client total", us(totals["client"]), "", ""])

    print(
        f"# suite {DEFAULT_SUITE.name}; clock {T.CLOCK_NAME}; {args.rounds} interleaved rounds "
        f"of {k} handshakes; µs per handshake are medians over rounds; ratio = median of "
        "per-round server/bound"
    )
    print(T.table(["phase", "qflare µs", "bound µs", "ratio"], rows))
    print("# per-round server/bound: " + " ".join(f"{x:.3f}" for x in totals["ratio"]))
    print()
    print(census_text)
    print()
    status = T.verdict(ratio, args.target)
    print(
        f"{status}: server handshake {ratio:.3f}x its crypto lower bound vs target "
        f"<= {args.target:g}"
    )
    print(
        T.result_line(
            handshake_us=T.median(totals["server"]) / 1e3,
            bound_us=T.median(totals["bound"]) / 1e3,
            ratio=ratio,
            client_us=T.median(totals["client"]) / 1e3,
            target=args.target,
            status=status,
            handshakes=k,
            rounds=args.rounds,
            clock=T.CLOCK_NAME,
        )
    )
    sys.stdout.flush()
    return 1 if args.check and status == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
