"""The audit log over HTTP: signed checkpoints, proofs, entries and the audit keys.

Public, like a transparency log: devices call these without an admin token, to check that
their own enrollment (or revocation) was logged and that the log only ever grew. Everything
served is public by construction: entry payloads hold ids, algorithm names and public-key
hashes, never a secret (docs/AUDIT.md). ``create_app`` adds the routes behind its rate limit
(``add_audit_routes``), as plain routes of the app so that they are counted and documented like
its own. Errors go through the app's one error table; a log that cannot be read, or that was
found tampered with, answers 503.

No ``from __future__ import annotations``: FastAPI reads the signatures at run time.
"""

import base64
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.params import Depends
from fastapi.responses import PlainTextResponse

from qflare.monitor.audit import AuditLog
from qflare.monitor.checkpoint import ALGORITHM, SIGNATURE_TYPE
from qflare.monitor.entry import decode_entry
from qflare.monitor.merkle import ProofError
from qflare.server.errors import HttpError
from qflare.store import KeyPurpose

MAX_ENTRIES = 1000
_INDEX = Query(ge=0, le=2**62)


def _log(request: Request) -> AuditLog:
    audit: AuditLog = request.app.state.service.audit
    return audit


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _proof(work: Any) -> list[bytes]:
    try:
        proof: list[bytes] = await work
    except ProofError as exc:
        # A size beyond the log, an index beyond the size, first > second: the asker's doing.
        raise HttpError(400, "invalid_input", str(exc)) from None
    return proof


async def checkpoint(request: Request) -> PlainTextResponse:
    """The newest signed checkpoint (C2SP tlog-checkpoint note, ML-DSA-87). A new one is
    signed when the log has grown and the last is at least a second old."""
    signed = await _log(request).latest_checkpoint()
    return PlainTextResponse(signed.note, media_type="text/plain; charset=utf-8")


async def inclusion(
    request: Request,
    index: Annotated[int, _INDEX],
    size: Annotated[int, _INDEX],
) -> dict[str, Any]:
    """The audit path of entry ``index`` in the tree of ``size`` entries (RFC 6962 2.1.1)."""
    log = _log(request)
    proof = await _proof(log.inclusion_proof(index, size))
    return {"index": index, "size": size, "proof": [_b64(p) for p in proof]}


async def consistency(
    request: Request,
    first: Annotated[int, _INDEX],
    second: Annotated[int, _INDEX],
) -> dict[str, Any]:
    """The proof that the tree of ``second`` entries extends that of ``first`` (RFC 6962 2.1.2)."""
    log = _log(request)
    proof = await _proof(log.consistency_proof(first, second))
    return {"first": first, "second": second, "proof": [_b64(p) for p in proof]}


async def entries(
    request: Request,
    start: Annotated[int, _INDEX] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_ENTRIES)] = 100,
) -> list[dict[str, Any]]:
    """Entries from ``start``, oldest first. ``payload`` is the exact leaf data (canonical JSON
    text): its leaf hash is ``SHA-256(0x00 || payload)``."""
    found = await _log(request).entries(start, limit)
    answer = []
    for entry in found:
        try:
            data: Any = decode_entry(entry.payload).data
        except ValueError:
            data = None  # a tampered row is still served as stored: verifiers must see it
        answer.append(
            {
                "index": entry.idx,
                "ts": entry.ts.isoformat(),
                "kind": entry.kind,
                "payload": entry.payload.decode("ascii", "replace"),
                "data": data,
            }
        )
    return answer


async def keys(request: Request) -> dict[str, Any]:
    """The audit keys that sign checkpoints (public keys and key IDs). For convenience only:
    a verifier should pin the key it trusts out of band rather than take it from here."""
    log = _log(request)
    rows = await log.store.list_server_keys(log.tenant, purpose=KeyPurpose.AUDIT_SIGNING)
    trusted, _ = await log.verifiers()
    ids = {v.public_key: v.key_id for v in trusted}
    return {
        "origin": log.origin,
        "algorithm": ALGORITHM,
        "signature_type": SIGNATURE_TYPE.hex(),
        "keys": [
            {
                "key_id": row.key_id,
                "state": row.state.value,
                "note_key_id": ids[row.public_key].hex() if row.public_key in ids else None,
                "public_key": _b64(row.public_key),
            }
            for row in rows
        ],
    }


_ROUTES: tuple[tuple[str, Callable[..., Any], dict[str, Any]], ...] = (
    (
        "/v1/audit/checkpoint",
        checkpoint,
        {
            "response_class": PlainTextResponse,
            "responses": {200: {"content": {"text/plain": {}}}},
        },
    ),
    ("/v1/audit/proof/inclusion", inclusion, {}),
    ("/v1/audit/proof/consistency", consistency, {}),
    ("/v1/audit/entries", entries, {}),
    ("/v1/audit/keys", keys, {}),
)


def add_audit_routes(app: FastAPI, *, dependencies: Sequence[Depends] = ()) -> None:
    for path, endpoint, options in _ROUTES:
        app.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            tags=["audit"],
            dependencies=list(dependencies),
            **options,
        )


__all__ = ["add_audit_routes"]
