"""The one table from error type to HTTP status and stable error code.

Handlers raise typed errors; the app turns them into ``{"error": code, "message": text}`` with
the status below. The first matching class wins, so subclasses come before their parents.
Public messages are fixed strings per code: what went wrong in detail goes to the security
monitor, not to the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from qflare import errors as e
from qflare.fl.aggregator import UpdateRejected
from qflare.keys import MasterKeyUnavailable, SessionStateTampered, SessionUnusable
from qflare.store import InvalidInput


class HttpError(e.QflareError):
    """An HTTP-level refusal that has no counterpart below the server layer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


class Unauthorized(e.QflareError):
    pass


class Forbidden(e.QflareError):
    pass


class RateLimited(e.QflareError):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__("rate limited")


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    code: str
    message: str


ERRORS: Final[tuple[tuple[type[BaseException], ErrorSpec], ...]] = (
    (e.HandshakeFailed, ErrorSpec(401, "handshake_failed", "handshake failed")),
    (e.ReplayDetected, ErrorSpec(409, "replay_detected", "record or message seen before")),
    (e.EpochExpired, ErrorSpec(410, "epoch_expired", "record from an erased epoch")),
    (e.RekeyRequired, ErrorSpec(409, "rekey_required", "session must rekey")),
    (e.DecodeError, ErrorSpec(400, "malformed", "malformed message")),
    (e.DecryptionFailed, ErrorSpec(400, "record_rejected", "record rejected")),
    (e.RemoteProtocolError, ErrorSpec(400, "protocol_error", "protocol error")),
    (UpdateRejected, ErrorSpec(409, "update_rejected", "model update rejected")),
    (e.LocalProtocolError, ErrorSpec(409, "protocol_state", "not allowed in this state")),
    (e.InvalidSignature, ErrorSpec(400, "invalid_signature", "signature did not verify")),
    (e.InvalidKey, ErrorSpec(400, "invalid_key", "key of the wrong algorithm or length")),
    (e.UnsupportedAlgorithm, ErrorSpec(400, "unsupported_algorithm", "algorithm not supported")),
    (e.TokenRejected, ErrorSpec(403, "token_rejected", "enrollment token rejected")),
    (e.DeviceNotAllowed, ErrorSpec(403, "device_not_allowed", "device not allowed")),
    (SessionUnusable, ErrorSpec(410, "session_closed", "session closed, expired or revoked")),
    (SessionStateTampered, ErrorSpec(410, "session_closed", "session closed, expired or revoked")),
    (MasterKeyUnavailable, ErrorSpec(503, "unavailable", "service temporarily unavailable")),
    (InvalidInput, ErrorSpec(400, "invalid_input", "invalid input")),
    (e.NotFound, ErrorSpec(404, "not_found", "not found")),
    (e.Conflict, ErrorSpec(409, "conflict", "already exists")),
    # Fail closed: when the store cannot answer (for example the durable replay check), refuse.
    (e.StoreUnavailable, ErrorSpec(503, "unavailable", "service temporarily unavailable")),
    (Unauthorized, ErrorSpec(401, "unauthorized", "missing or invalid admin token")),
    (Forbidden, ErrorSpec(403, "forbidden", "admin token lacks the required scope")),
    (RateLimited, ErrorSpec(429, "rate_limited", "too many requests")),
    (e.QflareError, ErrorSpec(400, "rejected", "request rejected")),
)


# Refusals the framework makes on its own (no route matched, wrong method, a body it could not
# read): the same shape, by HTTP status.
HTTP_STATUS_ERRORS: Final[dict[int, ErrorSpec]] = {
    400: ErrorSpec(400, "invalid_request", "request body is invalid"),
    404: ErrorSpec(404, "not_found", "not found"),
    405: ErrorSpec(405, "method_not_allowed", "method not allowed"),
    413: ErrorSpec(413, "too_large", "request body too large"),
    415: ErrorSpec(415, "unsupported_media_type", "unsupported media type"),
}


def spec_for_status(status: int) -> ErrorSpec:
    """The answer for a refusal the framework raised with only a status."""
    if status in HTTP_STATUS_ERRORS:
        return HTTP_STATUS_ERRORS[status]
    if status < 500:
        return ErrorSpec(status, "rejected", "request rejected")
    return ErrorSpec(500, "internal", "internal error")


def spec_for(exc: BaseException) -> ErrorSpec:
    if isinstance(exc, HttpError):
        return ErrorSpec(exc.status, exc.code, str(exc))
    for cls, spec in ERRORS:
        if isinstance(exc, cls):
            return spec
    return ErrorSpec(500, "internal", "internal error")
