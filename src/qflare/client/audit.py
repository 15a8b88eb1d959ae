"""Checking the server's audit log from a device (or any client): docs/AUDIT.md.

What a device can check without trusting the server:

* ``checkpoint_flow``: the newest checkpoint, verified against the audit public key the device
  pinned out of band (``NoteVerifier``); a note that no pinned key signed is refused;
* ``inclusion_flow``: that entry ``index`` is in the tree a verified checkpoint commits to,
  and what it says (its payload is hashed here, not taken on the server's word);
* ``find_flow`` + ``inclusion_flow``: that its own enrollment (``device.enroll`` with its
  device id) was logged;
* ``consistency_flow``: that a newer checkpoint extends an older one, so the log it saw
  before was not rewritten since.

Like ``qflare.client.flow``, each conversation is a generator of ``Request``s written once and
driven by ``AuditClient`` (blocking httpx) or ``AsyncAuditClient``. Failures raise
``AuditCheckFailed`` (the log did not prove what was asked) or ``ServerRejected`` (the server
refused the request).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx

from qflare.errors import QflareError
from qflare.monitor import merkle
from qflare.monitor.checkpoint import (
    Checkpoint,
    CheckpointError,
    NoteVerifier,
    verify_checkpoint,
)
from qflare.monitor.entry import decode_entry

from .device import adrive, drive
from .flow import Request, Response, ServerRejected, _check

PAGE = 1000


class AuditCheckFailed(QflareError):
    """The audit log did not prove what was asked: a bad signature, proof or entry."""


@dataclass(frozen=True, slots=True)
class LoggedEntry:
    """An entry whose payload was hashed here and proven to be at ``index`` in ``checkpoint``
    (when ``checkpoint`` is set)."""

    index: int
    kind: str
    data: dict[str, Any]
    leaf_hash: bytes
    payload: bytes = field(repr=False)
    checkpoint: Checkpoint | None = None


def _get(path: str, **query: int | str) -> Request:
    return Request("GET", f"{path}?{urlencode(query)}" if query else path)


def _json(resp: Response) -> Any:
    try:
        return json.loads(_check(resp).body)
    except ValueError:
        raise AuditCheckFailed("the server's answer is not JSON") from None


def _hashes(values: Any) -> list[bytes]:
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (binascii.Error, ValueError, TypeError):
        raise AuditCheckFailed("a proof is not a list of base64 hashes") from None


def _entry(item: Any) -> LoggedEntry:
    try:
        payload = str(item["payload"]).encode("ascii")
        index = int(item["index"])
    except (KeyError, TypeError, ValueError, UnicodeEncodeError):
        raise AuditCheckFailed("an entry is malformed") from None
    try:
        doc = decode_entry(payload)
    except ValueError as exc:
        raise AuditCheckFailed(f"entry {index} is not an audit entry: {exc}") from None
    if doc.idx != index:
        raise AuditCheckFailed(f"entry {index} says it was logged at {doc.idx}")
    return LoggedEntry(index, doc.kind, doc.data, merkle.leaf_hash(payload), payload)


def checkpoint_flow(
    keys: Sequence[NoteVerifier], *, origin: str | None = None
) -> Generator[Request, Response, Checkpoint]:
    """The server's newest checkpoint, signed by one of ``keys``."""
    resp = _check((yield _get("/v1/audit/checkpoint")))
    try:
        return verify_checkpoint(resp.body.decode("utf-8"), keys, origin=origin)
    except (CheckpointError, UnicodeDecodeError) as exc:
        raise AuditCheckFailed(f"the checkpoint does not verify: {exc}") from None


def entries_flow(start: int, limit: int = 100) -> Generator[Request, Response, list[LoggedEntry]]:
    """Entries from ``start`` as the server states them (hashed here, not yet proven)."""
    found = _json((yield _get("/v1/audit/entries", start=start, limit=limit)))
    if not isinstance(found, list):
        raise AuditCheckFailed("the entries answer is not a list")
    return [_entry(item) for item in found]


def inclusion_flow(checkpoint: Checkpoint, index: int) -> Generator[Request, Response, LoggedEntry]:
    """Entry ``index``, proven to be in the tree ``checkpoint`` (already verified) commits to."""
    if not 0 <= index < checkpoint.size:
        raise AuditCheckFailed(f"entry {index} is not below the checkpoint's size")
    entries = yield from entries_flow(index, 1)
    if not entries or entries[0].index != index:
        raise AuditCheckFailed(f"the server did not return entry {index}")
    entry = entries[0]
    doc = _json((yield _get("/v1/audit/proof/inclusion", index=index, size=checkpoint.size)))
    proof = _hashes(doc.get("proof") if isinstance(doc, dict) else None)
    try:
        merkle.verify_inclusion(index, checkpoint.size, entry.leaf_hash, proof, checkpoint.root)
    except merkle.ProofError as exc:
        raise AuditCheckFailed(f"entry {index} is not in the checkpoint: {exc}") from None
    return LoggedEntry(
        entry.index, entry.kind, entry.data, entry.leaf_hash, entry.payload, checkpoint
    )


def consistency_flow(old: Checkpoint, new: Checkpoint) -> Generator[Request, Response, None]:
    """Check that ``new`` extends ``old`` (both verified): the log only grew in between."""
    if old.origin != new.origin:
        raise AuditCheckFailed("the two checkpoints are of different logs")
    if old.size > new.size:
        raise AuditCheckFailed("the newer checkpoint is smaller than the older one")
    proof: list[bytes] = []
    if 0 < old.size < new.size:
        query = {"first": old.size, "second": new.size}
        doc = _json((yield _get("/v1/audit/proof/consistency", **query)))
        proof = _hashes(doc.get("proof") if isinstance(doc, dict) else None)
    try:
        merkle.verify_consistency(old.size, new.size, proof, old.root, new.root)
    except merkle.ProofError as exc:
        raise AuditCheckFailed(f"the log was rewritten between the checkpoints: {exc}") from None


def find_flow(
    kind: str, match: Mapping[str, Any], *, start: int = 0, stop: int | None = None
) -> Generator[Request, Response, list[LoggedEntry]]:
    """Every entry of ``kind`` whose data holds ``match`` (scanned from ``start`` to ``stop``).

    The server could leave an entry out of its answer; only ``inclusion_flow`` proves one.
    """
    found: list[LoggedEntry] = []
    index = start
    while stop is None or index < stop:
        limit = PAGE if stop is None else min(PAGE, stop - index)
        page = yield from entries_flow(index, limit)
        if not page:
            break
        for entry in page:
            if entry.kind == kind and all(entry.data.get(k) == v for k, v in match.items()):
                found.append(entry)
        index = page[-1].index + 1
    return found


def enrollment_flow(
    checkpoint: Checkpoint, device_id: str
) -> Generator[Request, Response, LoggedEntry]:
    """The intent entry of ``device_id``'s enrollment, proven included in ``checkpoint``."""
    match = {"device_id": device_id, "phase": "intent"}
    found = yield from find_flow("device.enroll", match, stop=checkpoint.size)
    if not found:
        raise AuditCheckFailed(f"no enrollment of {device_id} below size {checkpoint.size}")
    return (yield from inclusion_flow(checkpoint, found[-1].index))


class AuditClient:
    """The audit flows over a blocking httpx client; ``keys`` are the pinned audit keys."""

    def __init__(
        self,
        http: httpx.Client,
        keys: Sequence[NoteVerifier],
        *,
        origin: str | None = None,
    ) -> None:
        self.http, self.keys, self.origin = http, tuple(keys), origin

    def checkpoint(self) -> Checkpoint:
        result: Checkpoint = drive(self.http, checkpoint_flow(self.keys, origin=self.origin))[0]
        return result

    def inclusion(self, checkpoint: Checkpoint, index: int) -> LoggedEntry:
        result: LoggedEntry = drive(self.http, inclusion_flow(checkpoint, index))[0]
        return result

    def consistency(self, old: Checkpoint, new: Checkpoint) -> None:
        drive(self.http, consistency_flow(old, new))

    def enrollment(self, checkpoint: Checkpoint, device_id: str) -> LoggedEntry:
        result: LoggedEntry = drive(self.http, enrollment_flow(checkpoint, device_id))[0]
        return result


class AsyncAuditClient:
    """The same over an async httpx client."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        keys: Sequence[NoteVerifier],
        *,
        origin: str | None = None,
    ) -> None:
        self.http, self.keys, self.origin = http, tuple(keys), origin

    async def checkpoint(self) -> Checkpoint:
        flow = checkpoint_flow(self.keys, origin=self.origin)
        result: Checkpoint = (await adrive(self.http, flow))[0]
        return result

    async def inclusion(self, checkpoint: Checkpoint, index: int) -> LoggedEntry:
        result: LoggedEntry = (await adrive(self.http, inclusion_flow(checkpoint, index)))[0]
        return result

    async def consistency(self, old: Checkpoint, new: Checkpoint) -> None:
        await adrive(self.http, consistency_flow(old, new))

    async def enrollment(self, checkpoint: Checkpoint, device_id: str) -> LoggedEntry:
        result: LoggedEntry = (await adrive(self.http, enrollment_flow(checkpoint, device_id)))[0]
        return result


__all__ = [
    "AsyncAuditClient",
    "AuditCheckFailed",
    "AuditClient",
    "LoggedEntry",
    "ServerRejected",
    "checkpoint_flow",
    "consistency_flow",
    "enrollment_flow",
    "entries_flow",
    "find_flow",
    "inclusion_flow",
]
