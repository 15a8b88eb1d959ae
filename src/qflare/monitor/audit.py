"""The audit log: an append-only RFC 6962 Merkle tree over the store, and its verifier.

Entries. Each entry's payload (the ``payload`` column) is one canonical JSON document, and its
leaf hash is ``SHA-256(0x00 || payload)``::

    {"data":{...},"idx":7,"kind":"device.enroll","prev":"<base64 leaf hash of entry 6>",
     "ts":1718000000123456,"v":1}

* ``idx`` binds the entry to its position: a row moved to another index (swapped, shifted to
  make room for an inserted row, shifted down over a deleted one) no longer fits there.
* ``prev`` (``null`` for entry 0) chains each entry to the one before it. An edit whose author
  also recomputed the leaf hash still breaks the link from the next entry, which is what lets
  the verifier name the edited index rather than only "somewhere below this checkpoint".
* ``kind`` and ``ts`` (microseconds since the epoch) repeat the row's columns, so an edit of
  a column is as visible as an edit of the payload.

Appends are optimistic: the entry is built for the next index the log expects, appended with
``expected_idx``, and rebuilt and retried if another writer (a replica) took that index first.
In one process one writer task takes the queued appends, so they never race each other, and
takes all that queued up together in one ``Store.append_audit_batch`` transaction (group
commit: one commit for the lot). An append that cannot be written raises ``AuditUnavailable``
(a ``StoreUnavailable``: HTTP 503), and the operation it records must not happen:
``AuditLog.operation`` writes the intent entry first and the outcome after (docs/AUDIT.md,
"Fail closed").

Checkpoints (``qflare.monitor.checkpoint``) are signed with the tenant's active ML-DSA-87 audit
key and kept as security events of type ``audit.checkpoint`` (detail: the note), because the
store has no checkpoint table and the events table is, like the audit table, insert-only for
the application role. The latest one is also kept in memory. Before the log signs a new
checkpoint it checks that the new tree extends the last one issued, so it never signs two
inconsistent views (tlog-checkpoint: "A log MUST not sign any checkpoint which is inconsistent
with any checkpoint it previously signed").

``verify_log`` recomputes everything from the payloads: leaf hashes, links, the tree, and every
stored (or supplied) checkpoint's signature and root at its size, and names the first bad index.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from qflare import crypto
from qflare.errors import Conflict, QflareError, StoreUnavailable
from qflare.monitor import merkle
from qflare.monitor.checkpoint import (
    Checkpoint,
    CheckpointError,
    NoteSigner,
    NoteVerifier,
    signed_by,
    verify_checkpoint,
)
from qflare.monitor.entry import decode_entry, encode_entry
from qflare.monitor.events import EventType, Severity
from qflare.monitor.merkle import MerkleTree
from qflare.store import AuditEntry, AuditRow, KeyPurpose, KeyState, ServerKey, Store
from qflare.store.base import MAX_AUDIT_BATCH
from qflare.store.models import JsonValue

if TYPE_CHECKING:
    from qflare.keys import KeyManager

log = logging.getLogger("qflare.audit")

CHECKPOINT_EVENT: Final = "audit.checkpoint"
MAX_PAYLOAD: Final = 8192
PAGE: Final = 1000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)
_KIND: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Look for the newest stored checkpoint in the last hour first, then wider: checkpoints are
# issued while the log grows, so the newest one is usually recent and the scan short.
_LOOKBACK: Final = (3600.0, 86400.0, 30 * 86400.0, None)

SigningKeySource = Callable[[], Awaitable[tuple[ServerKey, crypto.SignaturePrivateKey]]]


class AuditUnavailable(StoreUnavailable):
    """An audit entry could not be written (or read): the operation it records is refused."""


class AuditTampered(AuditUnavailable):
    """The stored log is not the log that was written; nothing is signed or proven over it."""

    def __init__(self, index: int, reason: str) -> None:
        self.index, self.reason = index, reason
        super().__init__(f"audit entry {index}: {reason}")


def default_origin(tenant: str) -> str:
    """The log's origin line and key name when none is configured."""
    return f"qflare.local/{tenant}/audit"


def micros(ts: datetime) -> int:
    return (ts - _EPOCH) // _MICRO


# -- the log ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    kind: str
    body: dict[str, JsonValue]
    at: datetime
    done: asyncio.Future[AuditEntry]


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.done.done():
        pending.done.set_exception(exc)


@dataclass(slots=True)
class Intent:
    """The intent entry of an operation in progress; ``result`` goes into its outcome entry."""

    op: str
    index: int
    result: dict[str, JsonValue] = field(default_factory=dict)


class AuditLog:
    """The audit log of one QFLARE deployment, over its store.

    ``signing_key`` (``KeyManager.audit_signing_key``) is needed to issue checkpoints; a log
    without it can append and prove but not sign. ``checkpoint_interval``: the shortest time
    between two checkpoints ``latest_checkpoint`` issues (each is an ML-DSA-87 signature and a
    stored event, so a flood of requests cannot turn into a flood of either).
    """

    def __init__(
        self,
        store: Store,
        *,
        tenant: str = "default",
        origin: str | None = None,
        signing_key: SigningKeySource | None = None,
        clock: Callable[[], float] = time.time,
        checkpoint_interval: float = 1.0,
        max_attempts: int = 50,
        max_batch: int = 256,
    ) -> None:
        self.store = store
        self.tenant = tenant
        self.origin = origin or default_origin(tenant)
        self.clock = clock
        self.checkpoint_interval = checkpoint_interval
        self.max_attempts = max_attempts
        self._signing_key = signing_key
        self._head: tuple[int, bytes | None] | None = None  # next index, last leaf hash
        self._tree: MerkleTree | None = None
        self._latest: Checkpoint | None = None
        self._latest_at = 0.0
        self._previous_loaded = False
        self.max_batch = max(1, min(max_batch, MAX_AUDIT_BATCH))
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._tree_lock = asyncio.Lock()
        self._checkpoint_lock = asyncio.Lock()

    @classmethod
    def for_keys(cls, keys: KeyManager, **options: Any) -> AuditLog:
        return cls(keys.store, tenant=keys.tenant, signing_key=keys.audit_signing_key, **options)

    def __repr__(self) -> str:
        return f"<AuditLog {self.origin} store={type(self.store).__name__}>"

    # -- appending ------------------------------------------------------------------------------

    async def _read_head(self) -> tuple[int, bytes | None]:
        size = await self.store.audit_size()
        if size == 0:
            return 0, None
        last = await self.store.list_audit(start=size - 1, limit=1)
        if not last or last[0].idx != size - 1:
            raise AuditUnavailable("the audit log has no entry at its last index")
        return size, merkle.leaf_hash(last[0].payload)

    async def append(
        self, kind: str, data: Mapping[str, JsonValue], *, now: float | None = None
    ) -> AuditEntry:
        """Append one entry at the next index and return it once it is committed;
        ``AuditUnavailable`` if it cannot be written.

        Group commit: appends made while another is being written queue up, and the next
        write takes them all (up to ``max_batch``) in one ``Store.append_audit_batch``
        transaction. A caller only returns once its own entry is committed.
        """
        if not _KIND.fullmatch(kind):
            raise ValueError("an audit kind is 1..64 characters of [a-z0-9._-]")
        body = dict(data)
        # The longest this entry can encode to, checking its values on the way: refused here,
        # before it is queued with others.
        longest = encode_entry(idx=2**62, ts=2**62, kind=kind, prev=bytes(32), data=body)
        if len(longest) > MAX_PAYLOAD:
            raise ValueError(f"an audit entry is at most {MAX_PAYLOAD} bytes")
        at = datetime.fromtimestamp(self.clock() if now is None else now, UTC)
        done: asyncio.Future[AuditEntry] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(kind, body, at, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # Shielded: a caller that gives up does not cancel a write others are part of.
        return await asyncio.shield(done)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue[: self.max_batch] = self._queue[: self.max_batch], []
            try:
                entries = await self._write(batch)
            except asyncio.CancelledError:
                for pending in [*batch, *self._queue]:
                    _fail(pending, AuditUnavailable("the audit writer was stopped"))
                self._queue.clear()
                raise
            except Exception as exc:  # handed to every caller it concerns
                for pending in batch:
                    _fail(pending, exc)
                continue
            for pending, entry in zip(batch, entries, strict=True):
                if not pending.done.done():
                    pending.done.set_result(entry)

    async def _write(self, batch: list[_Pending]) -> list[AuditEntry]:
        for attempt in range(self.max_attempts):
            try:
                if self._head is None:
                    self._head = await self._read_head()
                idx, prev = self._head
                rows: list[AuditRow] = []
                for pending in batch:
                    payload = encode_entry(
                        idx=idx + len(rows),
                        ts=micros(pending.at),
                        kind=pending.kind,
                        prev=prev,
                        data=pending.body,
                        check=False,  # checked by append()
                    )
                    prev = merkle.leaf_hash(payload)
                    rows.append(
                        AuditRow(ts=pending.at, kind=pending.kind, payload=payload, leaf_hash=prev)
                    )
                entries = await self.store.append_audit_batch(rows, expected_idx=idx)
            except Conflict:
                # Another writer took the index: rebuild the entries over the new head.
                self._head = None
                await asyncio.sleep(min(0.05, 0.001 * attempt))
                continue
            except QflareError as exc:
                self._head = None
                log.error("audit append failed: %s", type(exc).__name__)
                raise AuditUnavailable("the audit log cannot be written") from exc
            self._head = (idx + len(rows), rows[-1].leaf_hash)
            tree = self._tree
            if tree is not None and len(tree) == idx:
                for row in rows:
                    tree.append(row.leaf_hash)
            return entries
        raise AuditUnavailable("the audit log is too contended to append")

    @contextlib.asynccontextmanager
    async def operation(self, op: str, /, **fields: JsonValue) -> AsyncIterator[Intent]:
        """Fail closed: log the intent, then run the body, then log how it ended.

        If the intent cannot be written, ``AuditUnavailable`` is raised before the body runs,
        so the operation does not happen. The outcome entry (``result`` "ok" with whatever the
        body put in ``intent.result``, or "refused" with the error's type) is best effort: the
        operation has already happened or failed, and the intent entry records the attempt.
        """
        entry = await self.append(op, {**fields, "phase": "intent"})
        intent = Intent(op, entry.idx)
        try:
            yield intent
        except Exception as exc:
            await self._outcome(intent, {"error": type(exc).__name__, "result": "refused"})
            raise
        await self._outcome(intent, {**intent.result, "result": "ok"})

    async def _outcome(self, intent: Intent, result: dict[str, JsonValue]) -> None:
        try:
            await self.append(intent.op, {**result, "phase": "outcome", "intent": intent.index})
        except (AuditUnavailable, ValueError):
            log.exception("could not log the outcome of audit entry %d", intent.index)

    # -- reading and proving --------------------------------------------------------------------

    async def size(self) -> int:
        try:
            return await self.store.audit_size()
        except QflareError as exc:
            raise AuditUnavailable("the audit log cannot be read") from exc

    async def entries(self, start: int = 0, limit: int = 100) -> list[AuditEntry]:
        try:
            return await self.store.list_audit(start=start, limit=limit)
        except QflareError as exc:
            raise AuditUnavailable("the audit log cannot be read") from exc

    async def tree(self) -> MerkleTree:
        """The tree over every stored entry, read incrementally and checked as it is read.

        Each new row must sit at the next index, hash to its stored leaf hash, decode as the
        entry logged there and link to the entry before it; otherwise ``AuditTampered``.
        """
        async with self._tree_lock:
            tree = self._tree if self._tree is not None else MerkleTree()
            while True:
                try:
                    rows = await self.store.list_audit(start=len(tree), limit=PAGE)
                except QflareError as exc:
                    raise AuditUnavailable("the audit log cannot be read") from exc
                if not rows:
                    break
                for row in rows:
                    previous = tree.leaf(len(tree) - 1) if len(tree) else None
                    problem = _row_problem(row, len(tree), previous)
                    if problem is not None:
                        await self._tampered(problem)
                    tree.append(merkle.leaf_hash(row.payload))
            self._tree = tree
            return tree

    async def _tampered(self, problem: AuditTampered) -> None:
        log.critical("audit log tampered: %s", problem)
        with contextlib.suppress(QflareError):
            await self.store.append_security_event(
                self.tenant,
                ts=datetime.fromtimestamp(self.clock(), UTC),
                type=EventType.AUDIT_VERIFICATION_FAILED.value,
                severity=int(Severity.CRITICAL),
                detail={"index": str(problem.index), "reason": problem.reason},
            )
        raise problem

    async def _tree_of(self, size: int) -> MerkleTree:
        tree = await self.tree()
        if not 0 <= size <= len(tree):
            raise merkle.ProofError(f"the log has {len(tree)} entries, not {size}")
        return tree

    async def root(self, size: int | None = None) -> bytes:
        tree = await self.tree()
        return tree.root(size)

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return (await self._tree_of(size)).inclusion_proof(index, size)

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        return (await self._tree_of(second)).consistency_proof(first, second)

    # -- checkpoints ----------------------------------------------------------------------------

    async def _signer(self) -> NoteSigner:
        if self._signing_key is None:
            raise AuditUnavailable("this audit log has no signing key")
        try:
            _, private = await self._signing_key()
        except QflareError as exc:
            raise AuditUnavailable("the audit signing key is unavailable") from exc
        return NoteSigner(self.origin, private)

    async def verifiers(self) -> tuple[list[NoteVerifier], list[NoteVerifier]]:
        """(trusted, revoked) audit keys of the tenant's key ring, as note verifiers.

        Trusting the key ring is trusting the database; a verifier that must hold against
        whoever can write the database pins the public keys elsewhere.
        """
        keys = await self.store.list_server_keys(self.tenant, purpose=KeyPurpose.AUDIT_SIGNING)
        trusted: list[NoteVerifier] = []
        revoked: list[NoteVerifier] = []
        for key in keys:
            verifier = NoteVerifier(self.origin, key.public_key)
            (revoked if key.state is KeyState.REVOKED else trusted).append(verifier)
        return trusted, revoked

    async def _newest_stored(self) -> Checkpoint | None:
        """The newest checkpoint stored for this origin whose signature verifies."""
        trusted, _ = await self.verifiers()
        now = self.clock()
        for window in _LOOKBACK:
            since = None if window is None else datetime.fromtimestamp(now - window, UTC)
            newest: Checkpoint | None = None
            async for note in stored_checkpoints(self.store, self.tenant, since=since):
                try:
                    newest = verify_checkpoint(note, trusted, origin=self.origin)
                except CheckpointError:
                    continue  # verify_log reports it; here only a trustworthy one counts
            if newest is not None:
                return newest
        return None

    async def checkpoint(self, *, now: float | None = None) -> Checkpoint:
        """Sign and store a checkpoint of the whole log as it is now."""
        async with self._checkpoint_lock:
            return await self._issue(self.clock() if now is None else now)

    async def _issue(self, now: float) -> Checkpoint:
        tree = await self.tree()
        if not self._previous_loaded:
            # After a start the last checkpoint this log signed is only in the store.
            try:
                self._latest = self._latest or await self._newest_stored()
            except QflareError as exc:
                raise AuditUnavailable("stored checkpoints cannot be read") from exc
            self._previous_loaded = True
        previous = self._latest
        if previous is not None and (
            previous.size > len(tree) or tree.root(previous.size) != previous.root
        ):
            await self._tampered(
                AuditTampered(
                    min(previous.size, len(tree)),
                    f"the log no longer extends the checkpoint of size {previous.size}",
                )
            )
        signed = (await self._signer()).sign(self.origin, len(tree), tree.root())
        try:
            await self.store.append_security_event(
                self.tenant,
                ts=datetime.fromtimestamp(now, UTC),
                type=CHECKPOINT_EVENT,
                severity=int(Severity.INFO),
                detail={
                    "note": signed.note,
                    "size": signed.size,
                    "root": base64.b64encode(signed.root).decode(),
                },
            )
        except QflareError as exc:
            raise AuditUnavailable("the checkpoint cannot be stored") from exc
        self._latest, self._latest_at = signed, now
        return signed

    async def latest_checkpoint(self, *, now: float | None = None) -> Checkpoint:
        """The newest checkpoint; a new one if the log grew and the last is old enough."""
        now = self.clock() if now is None else now
        async with self._checkpoint_lock:
            latest = self._latest
            if latest is not None:
                young = now - self._latest_at < self.checkpoint_interval
                if young or latest.size == await self.size():
                    return latest
            return await self._issue(now)

    async def checkpoint_if_grown(self, *, now: float | None = None) -> Checkpoint | None:
        """The periodic task: a new checkpoint if entries were appended since the last one."""
        now = self.clock() if now is None else now
        async with self._checkpoint_lock:
            if self._latest is not None and self._latest.size == await self.size():
                return None
            if self._latest is None and await self.size() == 0:
                return None
            return await self._issue(now)


async def stored_checkpoints(
    store: Store, tenant: str, *, since: datetime | None = None
) -> AsyncIterator[str]:
    """Every stored checkpoint note of ``tenant``, oldest first."""
    after: int | None = None
    while True:
        events = await store.list_security_events(tenant, since=since, after_id=after, limit=PAGE)
        if not events:
            return
        for event in events:
            note = event.detail.get("note")
            if event.type == CHECKPOINT_EVENT and isinstance(note, str):
                yield note
        after = events[-1].id


# -- verification -------------------------------------------------------------------------------


def _row_problem(row: AuditEntry, position: int, previous: bytes | None) -> AuditTampered | None:
    """What is wrong with ``row`` read at ``position`` after an entry with leaf ``previous``."""
    if row.idx != position:
        return AuditTampered(position, f"entry {position} is missing (next stored: {row.idx})")
    leaf = merkle.leaf_hash(row.payload)
    if leaf != row.leaf_hash:
        return AuditTampered(position, "the payload does not hash to the stored leaf hash")
    try:
        doc = decode_entry(row.payload)
    except ValueError as exc:
        return AuditTampered(position, f"the payload is not an audit entry ({exc})")
    if doc.idx != position:
        return AuditTampered(position, f"holds the entry logged at index {doc.idx}")
    if doc.kind != row.kind or doc.ts != micros(row.ts):
        return AuditTampered(position, "the kind or time column disagrees with the payload")
    if doc.prev != previous:
        return AuditTampered(position, f"does not link to entry {position - 1}")
    return None


@dataclass(frozen=True, slots=True)
class Problem:
    """A finding of ``verify_log``: entry ``index`` (or, with ``last``, one of ``index..last``)
    is not the entry that was logged there."""

    index: int
    reason: str
    last: int | None = None

    def __str__(self) -> str:
        where = f"{self.index}" if self.last is None else f"{self.index}..{self.last}"
        return f"entry {where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    size: int
    root: bytes
    checkpoints_verified: int
    checkpoints_skipped: int
    problems: tuple[Problem, ...]
    checkpoint_errors: tuple[str, ...]
    first_bad_index: int | None
    first_bad_range: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and not self.checkpoint_errors


@dataclass(slots=True)
class _Scan:
    tree: MerkleTree = field(default_factory=MerkleTree)
    problems: list[Problem] = field(default_factory=list)
    broken_links: set[int] = field(default_factory=set)
    ended: bool = False  # a gap: the rows after it do not sit where they were logged


def _scan_row(scan: _Scan, row: AuditEntry) -> None:
    position = len(scan.tree)
    if row.idx != position:
        scan.problems.append(
            Problem(position, f"missing (the next stored entry is {row.idx}): deleted")
        )
        scan.ended = True
        return
    leaf = merkle.leaf_hash(row.payload)
    if leaf != row.leaf_hash:
        scan.problems.append(Problem(position, "the payload does not hash to its leaf hash"))
    try:
        doc = decode_entry(row.payload)
    except ValueError as exc:
        scan.problems.append(Problem(position, f"not an audit entry: {exc}"))
        scan.tree.append(leaf)
        return
    if doc.idx > position:
        scan.problems.append(Problem(position, f"holds the entry logged at {doc.idx}"))
    elif doc.idx < position:
        if scan.tree.leaf(doc.idx) == leaf:
            scan.problems.append(Problem(position, f"a copy of entry {doc.idx}"))
        else:
            # The entry logged at doc.idx now sits here, so what sits at doc.idx was put there
            # afterwards (an inserted row with the rows after it shifted up, or a swap).
            scan.problems.append(
                Problem(doc.idx, f"replaced: the entry logged here is now at {position}")
            )
    if doc.kind != row.kind or doc.ts != micros(row.ts):
        scan.problems.append(Problem(position, "the kind or time column was changed"))
    expected = scan.tree.leaf(position - 1) if position else None
    # A row that belongs elsewhere is reported as such; its link says nothing about its place.
    if doc.idx == position and doc.prev != expected:
        scan.broken_links.add(position)
    scan.tree.append(leaf)


def _link_problems(broken: set[int], size: int) -> list[Problem]:
    # Entry p does not link to p - 1. If p + 1 still links to p, entry p is as it was logged
    # (its leaf is what p + 1 recorded), so p - 1 changed after p was written. If p + 1 does
    # not link to p either, p itself changed.
    problems = []
    for p in sorted(broken):
        if p == 0 or p + 1 in broken:
            problems.append(Problem(p, "altered: it no longer links to the entry before it"))
        elif p + 1 < size:
            problems.append(Problem(p - 1, f"altered: entry {p} recorded another entry here"))
        else:
            problems.append(
                Problem(p - 1, f"altered (or the link of entry {p}): entry {p} recorded another")
            )
    return problems


async def verify_log(
    store: Store,
    public_keys: Sequence[NoteVerifier],
    *,
    tenant: str = "default",
    origin: str | None = None,
    revoked: Sequence[NoteVerifier] = (),
    checkpoints: Iterable[str] = (),
) -> VerifyReport:
    """Recompute the whole log from its payloads and check it against every checkpoint.

    ``public_keys``: the audit keys whose checkpoints count (names must be the log's origin).
    ``revoked``: keys whose checkpoints are skipped, not trusted and not failed. ``checkpoints``:
    further notes kept outside the database (a device's, a witness's, an operator's copy).

    The first bad index is the smallest index with direct evidence against its row (missing,
    a leaf hash or link that does not match, a row that belongs elsewhere). When only a
    checkpoint disagrees, the first bad index lies between the largest checkpoint that still
    matches and the smallest that does not (``first_bad_range``); it is exact when they are
    one entry apart.
    """
    origin = origin or default_origin(tenant)
    scan = _Scan()
    while not scan.ended:
        rows = await store.list_audit(start=len(scan.tree), limit=PAGE)
        if not rows:
            break
        for row in rows:
            _scan_row(scan, row)
            if scan.ended:
                break
    tree, size = scan.tree, len(scan.tree)
    problems = scan.problems + _link_problems(scan.broken_links, size)

    notes = [n async for n in stored_checkpoints(store, tenant)]
    notes.extend(checkpoints)
    errors: list[str] = []
    matching: list[int] = []
    mismatching: list[int] = []
    skipped = verified = 0
    for note in notes:
        try:
            if not signed_by(note, public_keys) and signed_by(note, revoked):
                skipped += 1
                continue
            cp = verify_checkpoint(note, public_keys, origin=origin)
        except CheckpointError as exc:
            errors.append(f"a stored checkpoint does not verify: {exc}")
            continue
        verified += 1
        if cp.size > size:
            problems.append(
                Problem(size, f"missing: the checkpoint of size {cp.size} covers it: deleted")
            )
        elif tree.root(cp.size) == cp.root:
            matching.append(cp.size)
        else:
            mismatching.append(cp.size)

    first = min((p.index for p in problems), default=None)
    first_range: tuple[int, int] | None = None
    if mismatching:
        bad_size = min(mismatching)
        low = max((s for s in matching if s < bad_size), default=0)
        if first is None or first >= bad_size:
            # Only the checkpoint shows it: everything below ``low`` is proven intact.
            problems.append(
                Problem(
                    low,
                    f"the checkpoint of size {bad_size} does not match the log",
                    None if low == bad_size - 1 else bad_size - 1,
                )
            )
            first = low
            if low != bad_size - 1:
                first_range = (low, bad_size - 1)
    problems.sort(key=lambda p: p.index)
    return VerifyReport(
        size=size,
        root=tree.root(),
        checkpoints_verified=verified,
        checkpoints_skipped=skipped,
        problems=tuple(problems),
        checkpoint_errors=tuple(errors),
        first_bad_index=first,
        first_bad_range=first_range,
    )


__all__ = [
    "CHECKPOINT_EVENT",
    "AuditRow",
    "AuditLog",
    "AuditTampered",
    "AuditUnavailable",
    "Intent",
    "Problem",
    "VerifyReport",
    "default_origin",
    "micros",
    "stored_checkpoints",
    "verify_log",
]
