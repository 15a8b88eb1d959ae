"""Typed security events.

Every security-relevant path emits one. An event names what happened (``EventType``), how much
it matters (``Severity``), who (device, source address) and a small detail map of plain strings
(never key material: reasons, ids, counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Final


class Severity(IntEnum):
    INFO = 20
    WARNING = 30
    HIGH = 40
    CRITICAL = 50


class EventType(StrEnum):
    ENROLLMENT_OK = "enrollment.ok"
    ENROLLMENT_FAILED = "enrollment.failed"
    HANDSHAKE_STARTED = "handshake.started"
    HANDSHAKE_COMPLETED = "handshake.completed"
    HANDSHAKE_FAILED = "handshake.failed"
    SIGNATURE_INVALID = "signature.invalid"
    REPLAY_DETECTED = "replay.detected"
    TIMESTAMP_SKEW = "timestamp.out_of_window"
    RECORD_REJECTED = "record.rejected"
    SESSION_REKEYED = "session.rekeyed"
    SESSION_EXPIRED = "session.expired"
    SESSION_REVOKED = "session.revoked"
    SESSION_CLOSED = "session.closed"
    KEY_GENERATED = "key.generated"
    KEY_ROTATED = "key.rotated"
    KEY_RETIRED = "key.retired"
    KEY_REVOKED = "key.revoked"
    DEVICE_KEY_ROTATED = "device.key_rotated"
    DEVICE_QUARANTINED = "device.quarantined"
    DEVICE_REINSTATED = "device.reinstated"
    DEVICE_REVOKED = "device.revoked"
    RATE_LIMITED = "rate.limited"
    BAD_REQUEST = "request.rejected"
    ADMIN_ACTION = "admin.action"
    ADMIN_AUTH_FAILED = "admin.auth_failed"
    AUDIT_VERIFICATION_FAILED = "audit.verification_failed"
    # The detector (qflare.monitor.detect): a rule fired, and the responses it took.
    DETECTION_TRIGGERED = "detection.triggered"
    SOURCE_BLOCKED = "source.blocked"
    SOURCE_UNBLOCKED = "source.unblocked"


_SEVERITY: Final[dict[EventType, Severity]] = {
    EventType.ENROLLMENT_OK: Severity.INFO,
    EventType.ENROLLMENT_FAILED: Severity.WARNING,
    EventType.HANDSHAKE_STARTED: Severity.INFO,
    EventType.HANDSHAKE_COMPLETED: Severity.INFO,
    EventType.HANDSHAKE_FAILED: Severity.WARNING,
    EventType.SIGNATURE_INVALID: Severity.HIGH,
    EventType.REPLAY_DETECTED: Severity.HIGH,
    EventType.TIMESTAMP_SKEW: Severity.WARNING,
    EventType.RECORD_REJECTED: Severity.WARNING,
    EventType.SESSION_REKEYED: Severity.INFO,
    EventType.SESSION_EXPIRED: Severity.INFO,
    EventType.SESSION_REVOKED: Severity.WARNING,
    EventType.SESSION_CLOSED: Severity.INFO,
    EventType.KEY_GENERATED: Severity.INFO,
    EventType.KEY_ROTATED: Severity.INFO,
    EventType.KEY_RETIRED: Severity.INFO,
    EventType.KEY_REVOKED: Severity.HIGH,
    EventType.DEVICE_KEY_ROTATED: Severity.INFO,
    EventType.DEVICE_QUARANTINED: Severity.HIGH,
    EventType.DEVICE_REINSTATED: Severity.WARNING,
    EventType.DEVICE_REVOKED: Severity.HIGH,
    EventType.RATE_LIMITED: Severity.WARNING,
    EventType.BAD_REQUEST: Severity.WARNING,
    EventType.ADMIN_ACTION: Severity.INFO,
    EventType.ADMIN_AUTH_FAILED: Severity.WARNING,
    EventType.AUDIT_VERIFICATION_FAILED: Severity.CRITICAL,
    EventType.DETECTION_TRIGGERED: Severity.HIGH,
    EventType.SOURCE_BLOCKED: Severity.HIGH,
    EventType.SOURCE_UNBLOCKED: Severity.WARNING,
}

# HandshakeFailed.reason -> the event that names it best.
_HANDSHAKE_REASONS: Final[dict[str, EventType]] = {
    "signature-invalid": EventType.SIGNATURE_INVALID,
    "replay": EventType.REPLAY_DETECTED,
    "timestamp-out-of-window": EventType.TIMESTAMP_SKEW,
}


def handshake_failure_type(reason: str) -> EventType:
    return _HANDSHAKE_REASONS.get(reason, EventType.HANDSHAKE_FAILED)


# HandshakeFailed.reason -> its class, the ``class`` detail of every handshake failure event.
# "server" marks failures that are not the peer's doing (the replay check could not answer):
# detection rules never count them, so an outage cannot look like an attack.
_FAILURE_CLASSES: Final[dict[str, str]] = {
    "signature-invalid": "authentication",
    "client-finished-invalid": "authentication",
    "device-mismatch": "authentication",
    "biscuit-invalid": "authentication",
    "biscuit-unknown-key": "authentication",
    "replay": "replay",
    "timestamp-out-of-window": "freshness",
    "biscuit-expired": "freshness",
    "unknown-device": "identity",
    "device-not-allowed": "identity",
    "session-ended": "identity",
    "unknown-server-key": "identity",
    "no-common-suite": "negotiation",
    "unsupported-suite": "negotiation",
    "downgrade": "negotiation",
    "nonce-check-unavailable": "server",
}


def failure_class(reason: str) -> str:
    """``authentication``, ``replay``, ``freshness``, ``identity``, ``negotiation``,
    ``server`` or (anything else: undecodable or inconsistent input) ``malformed``."""
    return _FAILURE_CLASSES.get(reason, "malformed")


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityEvent:
    type: EventType
    ts: float
    severity: Severity | None = None
    tenant: str = "default"
    device_id: str | None = None
    source: str | None = None
    detail: dict[str, str] = field(default_factory=dict)

    @property
    def level(self) -> Severity:
        return self.severity if self.severity is not None else _SEVERITY[self.type]
