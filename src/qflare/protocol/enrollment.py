"""What a device signs or checks when it enrolls or replaces its identity key.

See docs/KEYS.md, "Enrollment" and "Device key rotation".

These are messages, not a conversation: the device SDK builds them, the key manager checks
them, and both import them from here so the two sides cannot drift apart.
"""

from __future__ import annotations

from qflare import crypto
from qflare.crypto import labels
from qflare.protocol.handshake import PinnedServerKey
from qflare.protocol.keyschedule import info, u64


def token_hash(token: str) -> bytes:
    """SHA-256 of the token: what the store keeps and what the enrollment proof binds."""
    return crypto.kdf("HKDF-SHA256").hash(token.encode())


def enrollment_proof_message(
    device_id: str, algorithm: str, public_key: bytes, token: str
) -> bytes:
    """Signed by the new identity key (context ``SIG_ENROLLMENT``): proof of possession,
    bound to the one-time token so a proof cannot be replayed with another token."""
    return info(device_id.encode(), algorithm.encode(), public_key, token_hash(token))


def server_key_binding(token: str, device_id: str, key: PinnedServerKey) -> bytes:
    """A MAC over the server key keyed by the one-time token, so a party that does not know
    the token cannot substitute its own static key during enrollment."""
    kdf = crypto.kdf("HKDF-SHA3-512")
    mac_key = kdf.derive(token.encode(), None, labels.ENROLLMENT_BINDING, 32)
    message = info(device_id.encode(), key.key_id.encode(), key.algorithm.encode(), key.public_key)
    return kdf.mac(mac_key, message)


def key_rotation_message(
    device_id: str, current_version: int, algorithm: str, public_key: bytes
) -> bytes:
    """Signed (context ``SIG_KEY_ROTATION``) by the current key, to authorise the change, and
    by the new key, to prove possession. The version makes a captured request single-use."""
    return info(device_id.encode(), u64(current_version), algorithm.encode(), public_key)
