"""Audit log entries: the canonical JSON document each leaf of the tree hashes.

Shared by the log (``qflare.monitor.audit``), its verifier and the device SDK's audit helper
(``qflare.client.audit``), so it imports nothing but the standard library. The format, and
why each field is there, is in ``qflare.monitor.audit`` and docs/AUDIT.md.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

ENTRY_VERSION: Final = 1
MAX_DEPTH: Final = 8


def check_json(value: object, depth: int = 0) -> None:
    # Floats have no single canonical spelling, and bytes no JSON one: a payload that could be
    # written two ways could not be recomputed by a verifier byte for byte.
    if depth > MAX_DEPTH:
        raise ValueError("audit payload is nested too deeply")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("audit payload integers are 64-bit")
        return
    if isinstance(value, list | tuple):
        for item in value:
            check_json(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("audit payload keys are strings")
            check_json(item, depth + 1)
        return
    raise ValueError(f"audit payloads hold no {type(value).__name__} values")


def canonical_json(value: Mapping[str, object], *, check: bool = True) -> bytes:
    """Sorted keys, no spaces, ASCII only: one byte string per value."""
    if check:
        check_json(dict(value))
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


@dataclass(frozen=True, slots=True)
class EntryDocument:
    """A decoded entry payload."""

    idx: int
    ts: int  # microseconds since the epoch
    kind: str
    prev: bytes | None
    data: dict[str, Any]


def encode_entry(
    *,
    idx: int,
    ts: int,
    kind: str,
    prev: bytes | None,
    data: Mapping[str, object],
    check: bool = True,
) -> bytes:
    """The payload of an entry; ``check=False`` skips re-checking values already checked."""
    return canonical_json(
        {
            "v": ENTRY_VERSION,
            "idx": idx,
            "ts": ts,
            "kind": kind,
            "prev": None if prev is None else base64.b64encode(prev).decode(),
            "data": dict(data),
        },
        check=check,
    )


def decode_entry(payload: bytes) -> EntryDocument:
    """Parse a payload; ``ValueError`` unless it is exactly what ``encode_entry`` writes."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("payload is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"v", "idx", "ts", "kind", "prev", "data"}:
        raise ValueError("payload is not an audit entry document")
    if doc["v"] != ENTRY_VERSION:
        raise ValueError("unknown audit entry version")
    idx, ts, kind, prev, data = doc["idx"], doc["ts"], doc["kind"], doc["prev"], doc["data"]
    if type(idx) is not int or type(ts) is not int or idx < 0:
        raise ValueError("entry index and time are integers")
    if not isinstance(kind, str) or not isinstance(data, dict):
        raise ValueError("entry kind is a string and data an object")
    prev_hash: bytes | None = None
    if prev is not None:
        try:
            prev_hash = base64.b64decode(str(prev), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("entry link is not base64") from None
    if encode_entry(idx=idx, ts=ts, kind=kind, prev=prev_hash, data=data) != payload:
        raise ValueError("payload is not in canonical form")
    return EntryDocument(idx, ts, kind, prev_hash, data)


__all__ = [
    "ENTRY_VERSION",
    "EntryDocument",
    "canonical_json",
    "check_json",
    "decode_entry",
    "encode_entry",
]
