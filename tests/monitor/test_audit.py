"""The audit log over both real stores: appends, proofs, checkpoints, fail-closed operations,
and ``verify_log`` against an intruder who edits, deletes, inserts and swaps rows."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest

from qflare import crypto
from qflare.config import Settings
from qflare.errors import StoreError, StoreUnavailable
from qflare.keys import Envelope, KeyManager, StaticMasterKey
from qflare.monitor import merkle
from qflare.monitor.audit import (
    CHECKPOINT_EVENT,
    AuditLog,
    AuditTampered,
    AuditUnavailable,
    VerifyReport,
    stored_checkpoints,
    verify_log,
)
from qflare.monitor.checkpoint import NoteSigner, NoteVerifier, verify_checkpoint
from qflare.monitor.entry import canonical_json, decode_entry, encode_entry
from qflare.monitor.events import EventType
from qflare.runtime import server_policy
from qflare.server import app as server_app
from qflare.server.service import Service
from qflare.store import AuditEntry, AuditRow, KeyPurpose, KeyState, Store, open_store

from .intruder import Intruder

NOW = 1_800_000_000.0
MASTER = StaticMasterKey(bytes(range(32)))
ENTRIES = 12
CHECKPOINT_SIZES = (4, 8, 11, 12)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@dataclass
class Env:
    url: str
    store: Store
    keys: KeyManager
    log: AuditLog
    clock: Clock

    async def verify(self, **kw: object) -> VerifyReport:
        trusted, revoked = await self.log.verifiers()
        return await verify_log(self.store, trusted, tenant="default", revoked=revoked, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def env(database_url: str) -> AsyncIterator[Env]:
    store = await open_store(database_url)
    clock = Clock()
    keys = KeyManager(store, Envelope(MASTER))
    await keys.initialize(now=NOW)
    try:
        yield Env(database_url, store, keys, AuditLog.for_keys(keys, clock=clock), clock)
    finally:
        await store.close()


async def fill(env: Env) -> None:
    """Twelve entries, with checkpoints at sizes 4, 8, 11 and 12."""
    for i in range(ENTRIES):
        await env.log.append("test.op", {"n": i, "who": f"device-{i}"})
        if i + 1 in CHECKPOINT_SIZES:
            await env.log.checkpoint()


# -- entries ----------------------------------------------------------------------------------


def test_canonical_json_has_one_spelling() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "é"]}) == b'{"a":[true,null,"\\u00e9"],"b":1}'
    for bad in ({"x": 1.5}, {"x": b"raw"}, {"x": float("nan")}, {1: "x"}, {"x": 2**64}):
        with pytest.raises(ValueError):
            canonical_json(bad)  # type: ignore[arg-type]


def test_entry_documents_round_trip_and_refuse_other_spellings() -> None:
    payload = encode_entry(idx=3, ts=5, kind="k", prev=b"\x01" * 32, data={"a": 1})
    doc = decode_entry(payload)
    assert (doc.idx, doc.ts, doc.kind, doc.prev, doc.data) == (3, 5, "k", b"\x01" * 32, {"a": 1})
    for bad in (
        payload.replace(b'"a":1', b'"a": 1'),  # not canonical
        payload.replace(b'"v":1', b'"v":2'),
        b"[]",
        b"\xff",
        payload.replace(b'"idx":3', b'"idx":-3'),
        payload[:-1] + b',"extra":1}',
    ):
        with pytest.raises(ValueError):
            decode_entry(bad)


async def test_entries_are_dense_chained_and_hashed(env: Env) -> None:
    entries = [await env.log.append("test.op", {"n": i}) for i in range(5)]
    assert [e.idx for e in entries] == list(range(5))
    previous = None
    for entry in await env.store.list_audit():
        assert entry.leaf_hash == merkle.leaf_hash(entry.payload)
        doc = decode_entry(entry.payload)
        assert (doc.idx, doc.kind, doc.prev) == (entry.idx, "test.op", previous)
        previous = entry.leaf_hash
    assert (await env.verify()).ok


async def test_bad_kinds_and_payloads_are_refused_before_anything_is_written(env: Env) -> None:
    for kind, data in (
        ("Bad Kind", {}),
        ("x" * 65, {}),
        ("ok", {"f": 0.5}),
        ("ok", {"x": "y" * 9000}),
    ):
        with pytest.raises(ValueError):
            await env.log.append(kind, data)  # type: ignore[arg-type]
    assert await env.store.audit_size() == 0


async def test_replicas_appending_at_once_keep_the_log_dense(env: Env) -> None:
    # Two processes' logs over the same database: each has its own idea of the head, so they
    # collide on indexes, and the loser rebuilds its entry over the winner's and retries.
    other_store = await open_store(env.url)
    try:
        other = AuditLog(other_store, clock=env.clock)
        await asyncio.gather(
            *((env.log if i % 2 else other).append("test.op", {"n": i}) for i in range(40))
        )
    finally:
        await other_store.close()
    assert await env.store.audit_size() == 40
    report = await env.verify()
    assert report.ok, report.problems
    assert sorted(decode_entry(e.payload).data["n"] for e in await env.store.list_audit()) == list(
        range(40)
    )


# -- proofs and checkpoints -------------------------------------------------------------------


async def test_proofs_verify_against_signed_checkpoints(env: Env) -> None:
    await fill(env)
    trusted, _ = await env.log.verifiers()
    notes = [n async for n in stored_checkpoints(env.store, "default")]
    checkpoints = [verify_checkpoint(n, trusted, origin=env.log.origin) for n in notes]
    assert [c.size for c in checkpoints] == list(CHECKPOINT_SIZES)
    entries = await env.store.list_audit()
    for c in checkpoints:
        for e in entries[: c.size]:
            proof = await env.log.inclusion_proof(e.idx, c.size)
            merkle.verify_inclusion(e.idx, c.size, merkle.leaf_hash(e.payload), proof, c.root)
    for old in checkpoints:
        for new in checkpoints:
            if old.size <= new.size:
                proof = await env.log.consistency_proof(old.size, new.size)
                merkle.verify_consistency(old.size, new.size, proof, old.root, new.root)
    with pytest.raises(merkle.ProofError):
        await env.log.inclusion_proof(0, ENTRIES + 1)


async def test_checkpoints_are_stored_as_security_events(env: Env) -> None:
    await env.log.append("test.op", {})
    signed = await env.log.checkpoint()
    events = await env.store.list_security_events("default")
    assert [e.type for e in events] == [CHECKPOINT_EVENT]
    assert events[0].detail == {
        "note": signed.note,
        "size": 1,
        "root": base64.b64encode(signed.root).decode(),
    }
    audit_key = await env.store.get_active_server_key("default", KeyPurpose.AUDIT_SIGNING)
    assert audit_key.algorithm == "ML-DSA-87"
    verify_checkpoint(signed.note, [NoteVerifier(env.log.origin, audit_key.public_key)])


async def test_latest_checkpoint_is_reused_until_the_log_grows_and_it_is_old(env: Env) -> None:
    log = AuditLog.for_keys(env.keys, clock=env.clock, checkpoint_interval=10.0)
    await log.append("test.op", {})
    first = await log.latest_checkpoint(now=NOW)
    assert await log.latest_checkpoint(now=NOW + 100) is first  # nothing appended
    await log.append("test.op", {})
    assert await log.latest_checkpoint(now=NOW + 5) is first  # grew, but the last is young
    second = await log.latest_checkpoint(now=NOW + 11)
    assert (first.size, second.size) == (1, 2)
    assert await log.checkpoint_if_grown(now=NOW + 12) is None
    await log.append("test.op", {})
    third = await log.checkpoint_if_grown(now=NOW + 12)
    assert third is not None and third.size == 3


async def test_an_empty_log_issues_no_periodic_checkpoint(env: Env) -> None:
    assert await env.log.checkpoint_if_grown() is None
    assert (await env.log.checkpoint()).size == 0  # on request it does


async def test_a_log_without_a_key_cannot_sign(env: Env) -> None:
    with pytest.raises(AuditUnavailable, match="signing key"):
        await AuditLog(env.store).checkpoint()


# -- fail closed ------------------------------------------------------------------------------


async def test_operation_logs_intent_then_outcome(env: Env) -> None:
    async with env.log.operation("device.quarantine", device_id="d1", actor="ops") as intent:
        intent.result["sessions_revoked"] = 2
    with pytest.raises(RuntimeError):
        async with env.log.operation("device.revoke", device_id="d2"):
            raise RuntimeError("refused")
    docs = [decode_entry(e.payload) for e in await env.store.list_audit()]
    assert [(d.kind, d.data) for d in docs] == [
        ("device.quarantine", {"device_id": "d1", "actor": "ops", "phase": "intent"}),
        (
            "device.quarantine",
            {"sessions_revoked": 2, "result": "ok", "phase": "outcome", "intent": 0},
        ),
        ("device.revoke", {"device_id": "d2", "phase": "intent"}),
        (
            "device.revoke",
            {"error": "RuntimeError", "result": "refused", "phase": "outcome", "intent": 2},
        ),
    ]


@pytest.mark.parametrize(
    "failure", [StoreUnavailable("down"), StoreError("refused by the database")]
)
async def test_an_operation_whose_intent_cannot_be_logged_does_not_happen(
    env: Env, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    async def broken(*_: object, **__: object) -> None:
        raise failure

    monkeypatch.setattr(env.store, "append_audit", broken)
    monkeypatch.setattr(env.store, "append_audit_batch", broken)
    happened = False
    with pytest.raises(AuditUnavailable):
        async with env.log.operation("device.revoke", device_id="d1"):
            happened = True
    assert not happened
    assert isinstance(AuditUnavailable("x"), StoreUnavailable)  # HTTP 503 through the table


async def test_an_unwritable_audit_table_fails_closed(env: Env) -> None:
    await env.log.append("test.op", {})
    async with Intruder(env.url) as intruder:
        await intruder.deny_appends()
    happened = False
    with pytest.raises(AuditUnavailable):
        async with env.log.operation("key.rotate", purpose="kem-static"):
            happened = True
    assert not happened
    async with Intruder(env.url) as intruder:
        await intruder.allow_appends()
    async with env.log.operation("key.rotate", purpose="kem-static"):
        happened = True
    assert happened and await env.store.audit_size() == 3


# -- what the running log refuses ---------------------------------------------------------------


async def test_the_log_refuses_to_prove_over_a_tampered_table(env: Env) -> None:
    await fill(env)
    async with Intruder(env.url) as intruder:
        await intruder.update(3, payload=b"forged")
    fresh = AuditLog.for_keys(env.keys, clock=env.clock)
    with pytest.raises(AuditTampered) as caught:
        await fresh.inclusion_proof(0, 4)
    assert caught.value.index == 3
    events = await env.store.list_security_events("default")
    assert events[-1].type == EventType.AUDIT_VERIFICATION_FAILED.value
    assert events[-1].detail["index"] == "3"


async def test_a_restarted_log_never_signs_a_view_inconsistent_with_its_last_checkpoint(
    env: Env,
) -> None:
    await fill(env)
    # A careful rewrite of the last two entries: links and leaf hashes recomputed, so every
    # row is self-consistent and only the signed checkpoints tell.
    await rewrite_suffix(env, 10)
    restarted = AuditLog.for_keys(env.keys, clock=env.clock)
    with pytest.raises(AuditTampered, match="checkpoint of size 12"):
        await restarted.checkpoint()
    assert (await env.verify()).first_bad_range == (8, 10)


# -- verify_log against an intruder ------------------------------------------------------------


async def rewrite_suffix(env: Env, first: int) -> None:
    """Replace entries ``first..`` with forged ones that are chained and hashed correctly."""
    async with Intruder(env.url) as intruder:
        rows = await intruder.rows()
        prev = rows[first - 1]["leaf_hash"] if first else None
        for row in rows[first:]:
            doc = decode_entry(row["payload"])
            payload = encode_entry(
                idx=doc.idx, ts=doc.ts, kind=doc.kind, prev=prev, data={"forged": doc.idx}
            )
            prev = merkle.leaf_hash(payload)
            await intruder.update(row["idx"], payload=payload, leaf_hash=prev)


def forge(
    row: dict[str, object], *, idx: int, prev: bytes | None, **data: object
) -> tuple[bytes, bytes]:
    doc = decode_entry(row["payload"])  # type: ignore[arg-type]
    payload = encode_entry(idx=idx, ts=doc.ts, kind=doc.kind, prev=prev, data=data)
    return payload, merkle.leaf_hash(payload)


Tamper = Callable[[Intruder], Awaitable[None]]


async def edit_naive(i: Intruder, k: int) -> None:
    row = (await i.rows())[k]
    await i.update(k, payload=row["payload"].replace(b"device-", b"DEVICE-"))


async def edit_careful(i: Intruder, k: int) -> None:
    rows = await i.rows()
    prev = rows[k - 1]["leaf_hash"] if k else None
    payload, leaf = forge(rows[k], idx=k, prev=prev, n=k, who="intruder")
    await i.update(k, payload=payload, leaf_hash=leaf)


async def edit_kind(i: Intruder, k: int) -> None:
    await i.update(k, kind="test.other")


async def edit_time(i: Intruder, k: int) -> None:
    row = (await i.rows())[k]
    await i.update(k, ts=row["ts"] - 1)


async def edit_leaf_column(i: Intruder, k: int) -> None:
    await i.update(k, leaf_hash=b"\x00" * 32)


async def delete(i: Intruder, k: int) -> None:
    await i.delete(k)


async def delete_and_close_the_gap(i: Intruder, k: int) -> None:
    await i.delete(k)
    await i.shift(k + 1, -1)


async def insert_garbage(i: Intruder, k: int) -> None:
    row = (await i.rows())[k]
    await i.shift(k, 1)
    await i.insert(k, row["ts"], "test.op", b'{"forged":true}', merkle.leaf_hash(b"x"))


async def insert_well_formed(i: Intruder, k: int) -> None:
    rows = await i.rows()
    prev = rows[k - 1]["leaf_hash"] if k else None
    payload, leaf = forge(rows[k], idx=k, prev=prev, n=-1, who="intruder")
    await i.shift(k, 1)
    await i.insert(k, rows[k]["ts"], "test.op", payload, leaf)


async def swap_naive(i: Intruder, k: int) -> None:
    rows = await i.rows()
    a, b = rows[k], rows[k + 4]
    cols = ("ts", "kind", "payload", "leaf_hash")
    await i.update(k, **{c: b[c] for c in cols})
    await i.update(k + 4, **{c: a[c] for c in cols})


async def swap_careful(i: Intruder, k: int) -> None:
    # Each row rewritten to fit its new place: index, link and leaf hash recomputed.
    rows = await i.rows()
    j = k + 4
    first, first_leaf = forge(
        rows[j],
        idx=k,
        prev=rows[k - 1]["leaf_hash"] if k else None,
        **decode_entry(rows[j]["payload"]).data,
    )
    second, second_leaf = forge(
        rows[k], idx=j, prev=rows[j - 1]["leaf_hash"], **decode_entry(rows[k]["payload"]).data
    )
    await i.update(k, payload=first, leaf_hash=first_leaf)
    await i.update(j, payload=second, leaf_hash=second_leaf)


@pytest.mark.parametrize(
    ("tamper", "k"),
    [
        (edit_naive, 0),
        (edit_naive, 5),
        (edit_naive, 11),
        (edit_careful, 0),
        (edit_careful, 5),
        (edit_careful, 11),  # the last entry: only the checkpoints of sizes 11 and 12 tell
        (edit_kind, 5),
        (edit_time, 5),
        (edit_leaf_column, 5),
        (delete, 0),
        (delete, 5),
        (delete, 11),  # the last entry: the checkpoint of size 12 says it existed
        (delete_and_close_the_gap, 5),
        (insert_garbage, 0),
        (insert_garbage, 5),
        (insert_well_formed, 5),
        (insert_well_formed, 11),
        (swap_naive, 2),
        (swap_careful, 2),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
async def test_verify_names_the_first_bad_index(
    env: Env, tamper: Callable[[Intruder, int], Awaitable[None]], k: int
) -> None:
    await fill(env)
    before = await env.verify()
    assert before.ok and before.first_bad_index is None
    assert before.checkpoints_verified == len(CHECKPOINT_SIZES)
    async with Intruder(env.url) as intruder:
        await tamper(intruder, k)
    report = await env.verify()
    assert not report.ok
    assert report.first_bad_index == k, report.problems
    assert report.first_bad_range is None
    assert report.problems[0].index == k


async def test_an_untouched_log_verifies(env: Env) -> None:
    await fill(env)
    report = await env.verify()
    assert report.ok
    assert (report.size, report.checkpoints_verified, report.problems) == (12, 4, ())
    assert report.root == await env.log.root()


async def test_a_consistent_rewrite_is_bounded_by_the_checkpoints(env: Env) -> None:
    await fill(env)
    await rewrite_suffix(env, 9)
    report = await env.verify()
    # Entries 9..11 were rewritten with every link intact: the checkpoint of size 8 still
    # matches and the one of size 11 does not, so the first bad entry is one of 8..10.
    assert not report.ok
    assert report.first_bad_range == (8, 10)
    assert report.first_bad_index == 8


async def test_checkpoints_kept_elsewhere_count(env: Env) -> None:
    await fill(env)
    outside = [n async for n in stored_checkpoints(env.store, "default")]
    async with Intruder(env.url) as intruder:
        await intruder.delete(11)
    # Without the stored checkpoint events (an intruder could delete those too), a copy kept
    # outside the database still shows that entry 11 existed.
    trusted, _ = await env.log.verifiers()
    report = await verify_log(env.store, trusted, checkpoints=outside[-1:])
    assert report.first_bad_index == 11


async def test_forged_and_foreign_checkpoints(env: Env) -> None:
    await fill(env)
    forger = crypto.signature("ML-DSA-87").generate(crypto.system_rng)
    root = await env.log.root()
    forged = NoteSigner(env.log.origin, forger).sign(env.log.origin, 12, root).note
    await env.store.append_security_event(
        "default",
        ts=(await env.store.list_audit())[0].ts,
        type=CHECKPOINT_EVENT,
        severity=20,
        detail={"note": forged},
    )
    report = await env.verify()
    assert not report.ok and report.first_bad_index is None
    assert report.checkpoint_errors == (
        "a stored checkpoint does not verify: no trusted key signed the checkpoint",
    )


async def test_checkpoints_of_a_revoked_key_are_skipped(env: Env) -> None:
    await fill(env)
    old = await env.store.get_active_server_key("default", KeyPurpose.AUDIT_SIGNING)
    await env.keys.rotate_server_key(KeyPurpose.AUDIT_SIGNING, now=NOW)
    await env.log.append("test.op", {})
    await env.log.checkpoint()
    await env.keys.revoke_server_key(old.key_id)
    assert (await env.store.get_server_key("default", old.key_id)).state is KeyState.REVOKED
    report = await env.verify()
    assert report.ok
    assert (report.checkpoints_verified, report.checkpoints_skipped) == (1, 4)


# -- group commit ---------------------------------------------------------------------------------


class Batches:
    """The store's own ``append_audit_batch``, recording the size of each batch (or failing)."""

    def __init__(self, store: Store, *, fail: bool = False) -> None:
        self.append = store.append_audit_batch
        self.fail = fail
        self.sizes: list[int] = []

    async def __call__(self, rows: Sequence[AuditRow], *, expected_idx: int) -> list[AuditEntry]:
        self.sizes.append(len(rows))
        if self.fail:
            raise StoreUnavailable("down")
        return await self.append(rows, expected_idx=expected_idx)


async def test_concurrent_appends_share_a_batch(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = Batches(env.store)
    monkeypatch.setattr(env.store, "append_audit_batch", batches)
    log = AuditLog.for_keys(env.keys, clock=env.clock, max_batch=16)
    entries = await asyncio.gather(*(log.append("test.op", {"n": i}) for i in range(50)))
    # All 50 queued before the writer ran: batches of at most 16, in order.
    assert batches.sizes == [16, 16, 16, 2]
    assert [e.idx for e in entries] == list(range(50))
    assert [decode_entry(e.payload).data["n"] for e in entries] == list(range(50))
    await log.append("test.op", {"n": 50})  # alone: a batch of one
    assert batches.sizes[-1] == 1
    await log.checkpoint()
    assert (await env.verify()).ok


async def test_a_failed_batch_fails_every_caller_in_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env.store, "append_audit_batch", Batches(env.store, fail=True))
    results = await asyncio.gather(
        *(env.log.append("test.op", {"n": i}) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, AuditUnavailable) for r in results)
    assert await env.store.audit_size() == 0


async def test_a_caller_that_gives_up_does_not_stop_the_others(env: Env) -> None:
    tasks = [asyncio.create_task(env.log.append("test.op", {"n": i})) for i in range(10)]
    await asyncio.sleep(0)
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert sum(not isinstance(d, BaseException) for d in done) == 9
    assert (await env.verify()).ok  # the given-up entry may or may not be in; the log is whole


# -- the periodic key retirement (qflare.server.app._maintain) ------------------------------------


class _OneRound:
    """``asyncio`` for ``_maintain``: its first sleep returns at once, the second ends it."""

    def __init__(self) -> None:
        self.sleeps = 0

    async def sleep(self, _: float) -> None:
        self.sleeps += 1
        if self.sleeps > 1:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    def __getattr__(self, name: str) -> object:
        return getattr(asyncio, name)


async def maintain_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_app, "asyncio", _OneRound())
    settings = Settings(tenant="default")
    service = Service(env.keys, server_policy(settings), clock=env.clock, audit=env.log)
    with pytest.raises(asyncio.CancelledError):
        await server_app._maintain(service, settings)


async def test_the_periodic_key_retirement_is_audited_and_fails_closed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await maintain_once(env, monkeypatch)  # nothing due: nothing logged
    assert await env.store.audit_size() == 0
    rotation = await env.keys.rotate_server_key(KeyPurpose.BISCUIT, now=NOW, overlap=0)
    old = rotation.previous
    assert old is not None and old.state is KeyState.RETIRING

    async with Intruder(env.url) as intruder:
        await intruder.deny_appends()
    await maintain_once(env, monkeypatch)  # the intent cannot be written: no retirement
    assert (await env.store.get_server_key("default", old.key_id)).state is KeyState.RETIRING
    assert await env.store.audit_size() == 0

    async with Intruder(env.url) as intruder:
        await intruder.allow_appends()
    await maintain_once(env, monkeypatch)
    assert (await env.store.get_server_key("default", old.key_id)).state is KeyState.RETIRED
    docs = [decode_entry(e.payload) for e in await env.store.list_audit()]
    assert [(d.kind, d.data) for d in docs] == [
        ("key.retire", {"key_ids": [old.key_id], "actor": "schedule", "phase": "intent"}),
        (
            "key.retire",
            {"retired": [old.key_id], "result": "ok", "phase": "outcome", "intent": 0},
        ),
    ]
    assert (await env.verify()).ok
