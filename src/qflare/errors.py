"""The one error tree of QFLARE.

Every failure QFLARE raises on purpose is a ``QflareError``::

    QflareError
    ├── CryptoError
    │   ├── UnsupportedAlgorithm     the installed backend lacks a named algorithm
    │   ├── InvalidKey               key bytes of the wrong length or encoding
    │   ├── InvalidCiphertext        a KEM ciphertext of the wrong length or a degenerate share
    │   ├── InvalidSignature         a signature did not verify
    │   └── DecryptionFailed         an AEAD open failed (tag, key, nonce or AAD wrong)
    ├── ProtocolError
    │   ├── DecodeError              bytes that are not a canonical message
    │   ├── LocalProtocolError       this side was asked to break the protocol's rules
    │   └── RemoteProtocolError      the peer broke them
    │       ├── HandshakeFailed      any handshake failure; ``reason`` classifies it
    │       ├── ReplayDetected       a nonce, ClientFinish or record seen before
    │       ├── EpochExpired         a record from an epoch whose keys are erased
    │       └── RekeyRequired        a session that exceeded its age, message or byte limit
    ├── StoreError
    │   ├── NotFound
    │   ├── Conflict                 a unique key already taken
    │   └── StoreUnavailable         the database could not answer
    └── KeyManagementError
        ├── TokenRejected            unknown, expired, used or forged enrollment token
        └── DeviceNotAllowed         unknown, quarantined or revoked device

Messages never carry secrets. A peer only ever learns that a handshake failed; the
``reason`` attribute is for the security monitor and the logs.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "CryptoError",
    "DecodeError",
    "DecryptionFailed",
    "DeviceNotAllowed",
    "EpochExpired",
    "HandshakeFailed",
    "InvalidCiphertext",
    "InvalidKey",
    "InvalidSignature",
    "KeyManagementError",
    "LocalProtocolError",
    "NotFound",
    "ProtocolError",
    "QflareError",
    "RekeyRequired",
    "RemoteProtocolError",
    "ReplayDetected",
    "StoreError",
    "StoreUnavailable",
    "TokenRejected",
    "UnsupportedAlgorithm",
]


class QflareError(Exception):
    """Root of every error QFLARE raises on purpose."""


class CryptoError(QflareError):
    pass


class UnsupportedAlgorithm(CryptoError):
    def __init__(self, algorithm: str, detail: str = "") -> None:
        self.algorithm = algorithm
        msg = f"algorithm {algorithm!r} is not available"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class InvalidKey(CryptoError):
    pass


class InvalidCiphertext(CryptoError):
    pass


class InvalidSignature(CryptoError):
    pass


class DecryptionFailed(CryptoError):
    """One uninformative error for every failed authenticated decryption."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


class ProtocolError(QflareError):
    pass


class DecodeError(ProtocolError):
    pass


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass


class HandshakeFailed(RemoteProtocolError):
    """The handshake failed. ``str()`` is the same for every cause; ``reason`` is not."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__("handshake failed")


class ReplayDetected(RemoteProtocolError):
    pass


class EpochExpired(RemoteProtocolError):
    pass


class RekeyRequired(RemoteProtocolError):
    pass


class StoreError(QflareError):
    pass


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class StoreUnavailable(StoreError):
    pass


class KeyManagementError(QflareError):
    pass


class TokenRejected(KeyManagementError):
    """One message for every cause (no oracle for token guessing); ``reason`` is for logs."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__("enrollment token rejected")


class DeviceNotAllowed(KeyManagementError):
    pass
