"""Every domain-separation label QFLARE feeds to a KDF, MAC, hash or signature.

One module, so two purposes can never share a label by accident. Each label carries the
protocol version; a change to how a value is derived gets a new label, never a reused one.
``docs/PROTOCOL.md`` section 6 lists where each one is used.
"""

from __future__ import annotations

from typing import Final

_PREFIX: Final = b"qflare/v1/"

# Hybrid KEM combiner (PROTOCOL.md 4): hashed together with every component's name, shared
# secret, ciphertext and public key.
HYBRID_KEM: Final = _PREFIX + b"hybrid-kem"

# ML-DSA context strings (FIPS 204 "ctx"), one per kind of signed message, so that a signature
# made for one purpose never verifies for another.
SIG_CLIENT_HELLO: Final = _PREFIX + b"sig/client-hello"
SIG_ENROLLMENT: Final = _PREFIX + b"sig/enrollment"
SIG_KEY_ROTATION: Final = _PREFIX + b"sig/device-key-rotation"
SIG_AUDIT_CHECKPOINT: Final = _PREFIX + b"sig/audit-checkpoint"

# Handshake key schedule (PROTOCOL.md 6).
TRANSCRIPT: Final = _PREFIX + b"transcript"
HANDSHAKE_SECRET: Final = _PREFIX + b"handshake-secret"
SERVER_FINISHED: Final = _PREFIX + b"finished/server"
CLIENT_FINISHED: Final = _PREFIX + b"finished/client"
SESSION_SECRET: Final = _PREFIX + b"session-secret"

# Role labels mixed into every derivation that depends on who speaks.
ROLE_DEVICE: Final = b"device"
ROLE_SERVER: Final = b"server"

# Temporal key schedule (PROTOCOL.md 7).
CHAIN_INIT: Final = _PREFIX + b"chain/init"
CHAIN_NEXT: Final = _PREFIX + b"chain/next"
PURPOSE_KEY: Final = _PREFIX + b"purpose-key"
PURPOSE_IV: Final = _PREFIX + b"purpose-iv"

# Biscuit: the server's sealed pending state between ServerHello and ClientFinish.
BISCUIT: Final = _PREFIX + b"biscuit"

# Enrollment: the server's static key is MACed under a key derived from the one-time token.
ENROLLMENT_BINDING: Final = _PREFIX + b"enrollment/server-key-binding"

# Secrets at rest (envelope encryption in qflare.keys).
ENVELOPE: Final = _PREFIX + b"envelope"

ALL: Final = (
    HYBRID_KEM,
    SIG_CLIENT_HELLO,
    SIG_ENROLLMENT,
    SIG_KEY_ROTATION,
    SIG_AUDIT_CHECKPOINT,
    TRANSCRIPT,
    HANDSHAKE_SECRET,
    SERVER_FINISHED,
    CLIENT_FINISHED,
    SESSION_SECRET,
    CHAIN_INIT,
    CHAIN_NEXT,
    PURPOSE_KEY,
    PURPOSE_IV,
    BISCUIT,
    ENROLLMENT_BINDING,
    ENVELOPE,
)
