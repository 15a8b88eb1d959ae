"""The one contract every store backend passes.

``StoreContract`` holds the tests; ``TestSqliteStore`` and ``TestPostgresStore`` at the bottom
only say how to get a migrated database URL. Concurrency tests open several independent store
handles on the same database (``peers``), so SQLite's file locking and PostgreSQL's row locks
are what is exercised, not an in-process lock.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from store_support import NOW, schema_of, with_query, without_query

from qflare.errors import Conflict, NotFound, QflareError
from qflare.store import (
    AuditRow,
    DeviceKeyState,
    DeviceState,
    FinishOutcome,
    HandshakeFinish,
    InvalidIdentifier,
    InvalidInput,
    KeyPurpose,
    KeyState,
    MigrationError,
    SchemaNotCurrent,
    SecurityEventRow,
    SessionCounters,
    SessionRecord,
    SessionStatus,
    Store,
    TokenNotRedeemable,
    migrate,
    open_store,
    status,
)
from qflare.store.base import MAX_AUDIT_BATCH, MAX_EVENT_BATCH

T = "acme"
NAIVE = datetime(2030, 1, 1, 12, 0)
OTHER = "globex"
HOUR = timedelta(hours=1)

BAD_IDS: list[Any] = [
    "x'; DROP TABLE devices; --",
    'a"b',
    "a b",
    "dev/1",
    "dev\x00",
    "dév",
    "",
    "a" * 65,
    "a" * 10_000,
    "1 OR 1=1",
    123,
    None,
    b"dev-1",
    ["dev-1"],
]


def sid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def digest(n: int) -> bytes:
    return n.to_bytes(32, "big")


def session_fields(n: int = 1, device_id: str = "dev-1", **kw: Any) -> dict[str, Any]:
    """The keyword arguments of ``finish_handshake`` for ``sid(n)``."""
    args: dict[str, Any] = {
        "session_id": sid(n),
        "device_id": device_id,
        "suite": 1,
        "epoch": 100,
        "encrypted_chain_state": b"sealed-chain",
        "replay_window": b"\x00" * 8,
        "now": NOW,
        "expires_at": NOW + HOUR,
    }
    args.update(kw)
    return args


def audit_row(n: int, *, kind: str = "batch", payload: bytes | None = None) -> AuditRow:
    return AuditRow(
        ts=NOW, kind=kind, payload=b"p%d" % n if payload is None else payload, leaf_hash=digest(n)
    )


class StoreContract:
    # -- fixtures ---------------------------------------------------------------------------

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError("each backend's test class provides a migrated database URL")

    @pytest.fixture
    async def store(self, url: str) -> AsyncIterator[Store]:
        store = await open_store(url)
        await store.create_tenant(T, "Acme Corp", now=NOW)
        try:
            yield store
        finally:
            await store.close()

    @pytest.fixture
    async def peers(self, url: str, store: Store) -> AsyncIterator[list[Store]]:
        handles = [await open_store(url) for _ in range(4)]
        try:
            yield handles
        finally:
            for handle in handles:
                await handle.close()

    async def device(self, store: Store, device_id: str = "dev-1", tenant: str = T) -> None:
        await store.create_device(tenant, device_id, now=NOW)

    async def session(
        self,
        store: Store,
        n: int = 1,
        device_id: str = "dev-1",
        *,
        state: SessionStatus | None = None,
        **kw: Any,
    ) -> SessionRecord:
        """Session ``sid(n)`` as a ClientFinish creates it, then moved to ``state`` if given."""
        done = await self.finish(store, n, device_id, **kw)
        assert done.outcome is FinishOutcome.CREATED and done.session is not None
        if state is None:
            return done.session
        return await store.update_session(T, sid(n), expected_version=0, now=NOW, state=state)

    async def finish(
        self, store: Store, n: int = 1, device_id: str = "dev-1", **kw: Any
    ) -> HandshakeFinish:
        """``finish_handshake`` of session ``sid(n)``."""
        return await store.finish_handshake(T, **session_fields(n, device_id, **kw))

    async def rotate(self, store: Store, key_id: str, **kw: Any) -> Any:
        args: dict[str, Any] = {
            "key_id": key_id,
            "purpose": KeyPurpose.KEM_STATIC,
            "algorithm": "ML-KEM-1024+X25519",
            "public_key": b"pub-" + key_id.encode(),
            "encrypted_private": b"sealed-" + key_id.encode(),
            "now": NOW,
        }
        args.update(kw)
        return await store.rotate_server_key(T, **args)

    # -- tenants ----------------------------------------------------------------------------

    async def test_tenant_round_trip(self, store: Store) -> None:
        tenant = await store.get_tenant(T)
        assert (tenant.id, tenant.name, tenant.created_at) == (T, "Acme Corp", NOW)
        with pytest.raises(Conflict):
            await store.create_tenant(T, "again", now=NOW)
        with pytest.raises(NotFound):
            await store.get_tenant("nobody")

    # -- devices ----------------------------------------------------------------------------

    async def test_device_round_trip_and_uniqueness(self, store: Store) -> None:
        created = await store.create_device(T, "dev-1", now=NOW)
        assert created == await store.get_device(T, "dev-1")
        assert created.state is DeviceState.ENROLLED
        assert (created.failure_count, created.last_seen, created.last_handshake_ts) == (
            0,
            None,
            None,
        )
        with pytest.raises(Conflict):
            await store.create_device(T, "dev-1", now=NOW)
        with pytest.raises(NotFound):
            await store.get_device(T, "dev-2")
        with pytest.raises(NotFound):  # unknown tenant: the foreign key refuses it
            await store.create_device("no-such-tenant", "dev-1", now=NOW)

    async def test_list_devices_pages_and_filters(self, store: Store) -> None:
        for i in range(7):
            await store.create_device(
                T, f"dev-{i}", now=NOW, state=DeviceState.ACTIVE if i % 2 else DeviceState.ENROLLED
            )
        first = await store.list_devices(T, limit=3)
        rest = await store.list_devices(T, after=first[-1].device_id, limit=100)
        assert [d.device_id for d in first + rest] == [f"dev-{i}" for i in range(7)]
        active = await store.list_devices(T, state=DeviceState.ACTIVE)
        assert [d.device_id for d in active] == ["dev-1", "dev-3", "dev-5"]

    async def test_device_state_compare_and_set(self, store: Store) -> None:
        await self.device(store)
        changed = await store.set_device_state(
            T,
            "dev-1",
            DeviceState.QUARANTINED,
            reason="5 bad signatures",
            expected=DeviceState.ENROLLED,
        )
        assert (changed.state, changed.state_reason) == (
            DeviceState.QUARANTINED,
            "5 bad signatures",
        )
        with pytest.raises(Conflict):  # someone else already moved it
            await store.set_device_state(
                T, "dev-1", DeviceState.ACTIVE, expected=DeviceState.ENROLLED
            )
        assert (await store.get_device(T, "dev-1")).state is DeviceState.QUARANTINED
        with pytest.raises(NotFound):
            await store.set_device_state(T, "ghost", DeviceState.REVOKED)

    async def test_device_failures(self, store: Store) -> None:
        await self.device(store)
        assert [await store.record_device_failure(T, "dev-1") for _ in range(3)] == [1, 2, 3]
        await store.reset_device_failures(T, "dev-1")
        assert (await store.get_device(T, "dev-1")).failure_count == 0
        with pytest.raises(NotFound):
            await store.record_device_failure(T, "ghost")
        with pytest.raises(NotFound):
            await store.reset_device_failures(T, "ghost")

    async def test_get_device_with_key(self, store: Store) -> None:
        await self.device(store)
        with pytest.raises(NotFound):  # a device without an active key
            await store.get_device_with_key(T, "dev-1")
        for pk in (b"pk0", b"pk1"):
            await store.add_device_key(T, "dev-1", algorithm="ML-DSA-44", public_key=pk, now=NOW)
        await store.set_device_state(T, "dev-1", DeviceState.QUARANTINED, reason="why")
        device, key = await store.get_device_with_key(T, "dev-1")
        assert device == await store.get_device(T, "dev-1")  # the state as it is now
        assert key == await store.get_device_key(T, "dev-1")
        assert (key.version, key.public_key) == (2, b"pk1")
        with pytest.raises(NotFound):
            await store.get_device_with_key(T, "ghost")
        with pytest.raises(NotFound):  # another tenant's device of the same id is not seen
            await store.get_device_with_key(OTHER, "dev-1")
        for bad in BAD_IDS:
            with pytest.raises(InvalidInput):
                await store.get_device_with_key(T, bad)

    async def test_accept_handshake(self, store: Store) -> None:
        await self.device(store)
        await self.device(store, "dev-2")
        exp = NOW + HOUR
        n1, n2, n3 = os.urandom(32), os.urandom(32), os.urandom(32)
        assert await store.accept_handshake(T, "dev-1", n1, timestamp=1_000, expires_at=exp)
        assert (await store.get_device(T, "dev-1")).last_handshake_ts == 1_000
        # The same nonce again: refused, nothing changes (not even with a later timestamp).
        assert not await store.accept_handshake(T, "dev-1", n1, timestamp=1_500, expires_at=exp)
        assert (await store.get_device(T, "dev-1")).last_handshake_ts == 1_000
        # Equal timestamp, new nonce: the nonce decides.
        assert await store.accept_handshake(T, "dev-1", n2, timestamp=1_000, expires_at=exp)
        # Below the floor: refused and nothing written, the nonce included...
        assert not await store.accept_handshake(T, "dev-1", n3, timestamp=999, expires_at=exp)
        assert (await store.get_device(T, "dev-1")).last_handshake_ts == 1_000
        # ...and refused again however often it comes (the floor never falls).
        assert not await store.accept_handshake(T, "dev-1", n3, timestamp=999, expires_at=exp)
        # Nonces are per device.
        assert await store.accept_handshake(T, "dev-2", n1, timestamp=5, expires_at=exp)
        # The floor rises; the refused n3 was not recorded: at the floor, it is still new.
        assert await store.accept_handshake(T, "dev-1", n3, timestamp=2_000, expires_at=exp)
        assert not await store.accept_handshake(T, "dev-1", n2, timestamp=2_000, expires_at=exp)
        assert (await store.get_device(T, "dev-1")).last_handshake_ts == 2_000
        # One device's floor does not move another's.
        assert (await store.get_device(T, "dev-2")).last_handshake_ts == 5
        with pytest.raises(NotFound):
            await store.accept_handshake(T, "ghost", n1, timestamp=1, expires_at=exp)

    @pytest.mark.parametrize(
        "args",
        [
            {"nonce": b"short"},
            {"nonce": "not-bytes"},
            {"timestamp": -1},
            {"timestamp": "10"},
            {"expires_at": NAIVE},
            {"device_id": "bad id"},
        ],
    )
    async def test_accept_handshake_bad_input(self, store: Store, args: dict[str, Any]) -> None:
        await self.device(store)
        call: dict[str, Any] = {
            "device_id": "dev-1",
            "nonce": b"n" * 32,
            "timestamp": 10,
            "expires_at": NOW + HOUR,
        }
        call.update(args)
        device_id, nonce = call.pop("device_id"), call.pop("nonce")
        with pytest.raises(InvalidInput):
            await store.accept_handshake(T, device_id, nonce, **call)
        # Nothing was written: no floor, and the nonce is still new.
        assert (await store.get_device(T, "dev-1")).last_handshake_ts is None
        assert await store.accept_handshake(
            T, "dev-1", b"n" * 32, timestamp=10, expires_at=NOW + HOUR
        )

    async def test_concurrent_accept_handshake_same_nonce_once(
        self, store: Store, peers: list[Store]
    ) -> None:
        await self.device(store)
        nonce = os.urandom(32)
        results = await asyncio.gather(
            *(
                peers[i % len(peers)].accept_handshake(
                    T, "dev-1", nonce, timestamp=10 + i % 3, expires_at=NOW + HOUR
                )
                for i in range(40)
            )
        )
        assert results.count(True) == 1

    async def test_concurrent_accept_handshake_floor_only_rises(
        self, store: Store, peers: list[Store]
    ) -> None:
        await self.device(store)
        stamps = list(range(100, 140))
        random.shuffle(stamps)
        results = await asyncio.gather(
            *(
                peers[i % len(peers)].accept_handshake(
                    T, "dev-1", os.urandom(32), timestamp=ts, expires_at=NOW + HOUR
                )
                for i, ts in enumerate(stamps)
            )
        )
        accepted = [ts for ts, ok in zip(stamps, results, strict=True) if ok]
        assert 139 in accepted  # the newest is never below the floor
        assert (await store.get_device(T, "dev-1")).last_handshake_ts == 139

    # -- the handshake: finish_handshake ----------------------------------------------------

    async def test_finish_handshake_creates_the_session_and_touches_the_device(
        self, store: Store
    ) -> None:
        await self.device(store)
        await store.set_device_state(T, "dev-1", DeviceState.ENROLLED, reason="re-enrolled")
        counters = SessionCounters(messages_sent=1, bytes_sent=321)
        done = await self.finish(store, now=NOW + HOUR, counters=counters)
        # The device's first handshake: no last_seen before it.
        assert (done.outcome, done.previous_last_seen) == (FinishOutcome.CREATED, None)
        # The device after the touch: ENROLLED -> ACTIVE (its reason cleared), last_seen set,
        # the floor untouched.
        assert (
            done.device.state,
            done.device.state_reason,
            done.device.last_seen,
            done.device.last_handshake_ts,
        ) == (DeviceState.ACTIVE, None, NOW + HOUR, None)
        assert done.device == await store.get_device(T, "dev-1")
        assert done.session == await store.get_session(T, sid(1))
        assert (done.session.state, done.session.counters, done.session.version) == (
            SessionStatus.ACTIVE,
            counters,
            0,
        )
        assert (done.session.created_at, done.session.updated_at) == (NOW + HOUR, NOW + HOUR)
        # A second session of the device (a rekey): previous_last_seen is the first one's now;
        # last_seen never moves backwards; counters default to zero.
        rekey = await self.finish(store, 2, now=NOW)
        assert rekey.outcome is FinishOutcome.CREATED and rekey.session is not None
        assert rekey.previous_last_seen == NOW + HOUR
        assert rekey.session.counters == SessionCounters()
        assert rekey.device.last_seen == NOW + HOUR
        # An ACTIVE device keeps its state and its reason.
        await store.set_device_state(T, "dev-1", DeviceState.ACTIVE, reason="reinstated")
        again = await self.finish(store, 3, now=NOW + 2 * HOUR)
        assert (again.outcome, again.device.state, again.device.state_reason) == (
            FinishOutcome.CREATED,
            DeviceState.ACTIVE,
            "reinstated",
        )
        assert (again.previous_last_seen, again.device.last_seen) == (NOW + HOUR, NOW + 2 * HOUR)

    async def test_finish_handshake_retransmitted_is_exists_and_writes_nothing(
        self, store: Store
    ) -> None:
        await self.device(store)
        await self.device(store, "dev-2")
        first = await self.finish(store)
        live = await store.update_session(
            T, sid(1), expected_version=0, now=NOW, counters=SessionCounters(messages_sent=7)
        )
        device = await store.get_device(T, "dev-1")
        again = await self.finish(
            store,
            encrypted_chain_state=b"reset!",
            counters=SessionCounters(messages_sent=99),
            now=NOW + HOUR,
        )
        assert (again.outcome, again.session, again.device, again.previous_last_seen) == (
            FinishOutcome.EXISTS,
            live,
            device,
            NOW,
        )
        assert again.session != first.session  # the stored row, not this call's
        assert await store.get_session(T, sid(1)) == live
        assert await store.get_device(T, "dev-1") == device  # not touched
        # Another device's ClientFinish with the same id gets the row too (the caller checks
        # device_id), and its device is not touched.
        other = await self.finish(store, 1, "dev-2")
        assert (other.outcome, other.session, other.device.state, other.previous_last_seen) == (
            FinishOutcome.EXISTS,
            live,
            DeviceState.ENROLLED,
            None,
        )
        assert other.device == await store.get_device(T, "dev-2")

    @pytest.mark.parametrize("state", [DeviceState.QUARANTINED, DeviceState.REVOKED])
    async def test_finish_handshake_for_a_refused_device_writes_nothing(
        self, store: Store, state: DeviceState
    ) -> None:
        await self.device(store)
        await self.session(store, 1)  # last_seen NOW
        await store.set_device_state(T, "dev-1", state, reason="rule")
        device = await store.get_device(T, "dev-1")
        for n in (1, 2):  # a new session, and a retransmission of an existing one
            done = await self.finish(store, n, now=NOW + HOUR)
            assert (done.outcome, done.session, done.device, done.previous_last_seen) == (
                FinishOutcome.NOT_ALLOWED,
                None,
                device,
                NOW,
            )
        assert await store.get_device(T, "dev-1") == device  # no touch
        assert [s.session_id for s in await store.list_device_sessions(T, "dev-1")] == [sid(1)]

    @pytest.mark.parametrize(
        "args",
        [
            {"session_id": b"short"},
            {"session_id": "s" * 16},
            {"suite": 70_000},
            {"suite": "1"},
            {"epoch": -1},
            {"encrypted_chain_state": b""},
            {"encrypted_chain_state": b"x" * (3 * 1024 * 1024)},
            {"replay_window": "w"},
            {"now": NAIVE},
            {"expires_at": "later"},
            {"expires_at": NAIVE},
            {"counters": (1, 0, 1, 0)},
            {"counters": SessionCounters(bytes_sent=-1)},
            *({"device_id": bad} for bad in BAD_IDS[:6]),
        ],
        ids=repr,
    )
    async def test_finish_handshake_bad_input_writes_nothing(
        self, store: Store, args: dict[str, Any]
    ) -> None:
        await self.device(store)
        with pytest.raises(InvalidInput):
            await store.finish_handshake(T, **session_fields(**args))
        device = await store.get_device(T, "dev-1")
        assert (device.state, device.last_seen) == (DeviceState.ENROLLED, None)
        assert await store.list_device_sessions(T, "dev-1") == []

    async def test_finish_handshake_unknown_device_or_tenant(self, store: Store) -> None:
        await store.create_tenant(OTHER, "Globex", now=NOW)
        await self.device(store)
        with pytest.raises(NotFound):
            await store.finish_handshake(T, **session_fields(device_id="ghost"))
        with pytest.raises(NotFound):  # another tenant's device of the same id is not seen
            await store.finish_handshake(OTHER, **session_fields())
        for bad in BAD_IDS:
            with pytest.raises(InvalidInput):
                await store.finish_handshake(bad, **session_fields())
        assert await store.list_device_sessions(T, "dev-1") == []

    async def test_concurrent_finish_handshake_same_session_creates_once(
        self, store: Store, peers: list[Store]
    ) -> None:
        await self.device(store)
        results = await asyncio.gather(
            *(
                self.finish(peers[i % len(peers)], now=NOW + i * timedelta(seconds=1))
                for i in range(40)
            )
        )
        outcomes = [r.outcome for r in results]
        assert outcomes.count(FinishOutcome.CREATED) == 1
        assert outcomes.count(FinishOutcome.EXISTS) == 39
        created = next(r for r in results if r.outcome is FinishOutcome.CREATED)
        assert created.previous_last_seen is None
        # Every EXISTS got the row CREATED inserted, and saw the device after its touch.
        assert await store.list_device_sessions(T, "dev-1") == [created.session]
        assert all(r.session == created.session for r in results)
        assert all(
            r.previous_last_seen == created.device.last_seen
            for r in results
            if r.outcome is FinishOutcome.EXISTS
        )
        assert await store.get_device(T, "dev-1") == created.device

    async def test_finish_handshake_and_a_quarantine_do_not_interleave(
        self, store: Store, peers: list[Store]
    ) -> None:
        for i in range(12):
            await self.device(store, f"dev-{i}")

        async def race(i: int) -> HandshakeFinish:
            quarantine = peers[(i + 1) % len(peers)].set_device_state(
                T, f"dev-{i}", DeviceState.QUARANTINED, reason="race"
            )
            done, _ = await asyncio.gather(
                self.finish(peers[i % len(peers)], i, f"dev-{i}"), quarantine
            )
            return done

        for done in await asyncio.gather(*(race(i) for i in range(12))):
            # Either wholly before the quarantine (it created and activated) or wholly after
            # (refused, nothing written): never a session created for a quarantined device.
            assert done.previous_last_seen is None
            if done.outcome is FinishOutcome.CREATED:
                assert done.device.state is DeviceState.ACTIVE
            else:
                assert done.outcome is FinishOutcome.NOT_ALLOWED
                assert done.device.state is DeviceState.QUARANTINED
                assert await store.list_device_sessions(T, done.device.device_id) == []

    async def test_concurrent_failure_counts_are_not_lost(
        self, store: Store, peers: list[Store]
    ) -> None:
        await self.device(store)
        await asyncio.gather(
            *(peers[i % len(peers)].record_device_failure(T, "dev-1") for i in range(40))
        )
        assert (await store.get_device(T, "dev-1")).failure_count == 40

    # -- device identity keys ---------------------------------------------------------------

    async def test_device_keys_version_and_single_active(self, store: Store) -> None:
        await self.device(store)
        for i in range(3):
            key = await store.add_device_key(
                T, "dev-1", algorithm="ML-DSA-44", public_key=b"pk%d" % i, now=NOW
            )
            assert (key.version, key.state) == (i + 1, DeviceKeyState.ACTIVE)
        keys = await store.list_device_keys(T, "dev-1")
        assert [(k.version, k.state) for k in keys] == [
            (1, DeviceKeyState.RETIRED),
            (2, DeviceKeyState.RETIRED),
            (3, DeviceKeyState.ACTIVE),
        ]
        assert (await store.get_device_key(T, "dev-1")).public_key == b"pk2"
        assert (await store.get_device_key(T, "dev-1", 1)).public_key == b"pk0"
        with pytest.raises(NotFound):
            await store.get_device_key(T, "dev-1", 9)
        with pytest.raises(NotFound):
            await store.add_device_key(T, "ghost", algorithm="ML-DSA-44", public_key=b"k", now=NOW)

    async def test_concurrent_device_key_additions(self, store: Store, peers: list[Store]) -> None:
        await self.device(store)
        await asyncio.gather(
            *(
                peers[i % len(peers)].add_device_key(
                    T, "dev-1", algorithm="ML-DSA-44", public_key=b"pk%d" % i, now=NOW
                )
                for i in range(20)
            )
        )
        keys = await store.list_device_keys(T, "dev-1")
        assert [k.version for k in keys] == list(range(1, 21))
        assert [k.version for k in keys if k.state is DeviceKeyState.ACTIVE] == [20]

    # -- enrollment tokens ------------------------------------------------------------------

    async def test_token_single_use(self, store: Store) -> None:
        token = await store.create_token(
            T, token_id="tok-1", token_hash=digest(1), now=NOW, expires_at=NOW + HOUR
        )
        assert (token.used_at, token.used_by_device) == (None, None)
        used = await store.redeem_token(T, digest(1), now=NOW, device_id="dev-1")
        assert (used.token_id, used.used_at, used.used_by_device) == ("tok-1", NOW, "dev-1")
        with pytest.raises(TokenNotRedeemable) as used_twice:
            await store.redeem_token(T, digest(1), now=NOW, device_id="dev-2")
        assert used_twice.value.reason == "used"
        with pytest.raises(TokenNotRedeemable) as unknown:
            await store.redeem_token(T, digest(2), now=NOW, device_id="dev-1")
        assert unknown.value.reason == "unknown"
        # One message for every cause: the text is no oracle.
        assert str(used_twice.value) == str(unknown.value)

    async def test_token_expiry_and_tenant_scope(self, store: Store) -> None:
        await store.create_tenant(OTHER, "Globex", now=NOW)
        await store.create_token(
            T, token_id="tok-1", token_hash=digest(1), now=NOW, expires_at=NOW + HOUR
        )
        with pytest.raises(TokenNotRedeemable) as other_tenant:
            await store.redeem_token(OTHER, digest(1), now=NOW, device_id="dev-1")
        assert other_tenant.value.reason == "unknown"
        with pytest.raises(TokenNotRedeemable) as expired:  # expires_at is exclusive
            await store.redeem_token(T, digest(1), now=NOW + HOUR, device_id="dev-1")
        assert expired.value.reason == "expired"
        with pytest.raises(InvalidInput):
            await store.create_token(
                T, token_id="tok-2", token_hash=digest(2), now=NOW, expires_at=NOW
            )
        with pytest.raises(Conflict):
            await store.create_token(
                T, token_id="tok-3", token_hash=digest(1), now=NOW, expires_at=NOW + HOUR
            )

    async def test_hundred_concurrent_redemptions_one_success(
        self, store: Store, peers: list[Store]
    ) -> None:
        await store.create_token(
            T, token_id="tok-1", token_hash=digest(7), now=NOW, expires_at=NOW + HOUR
        )
        results = await asyncio.gather(
            *(
                peers[i % len(peers)].redeem_token(T, digest(7), now=NOW, device_id=f"dev-{i}")
                for i in range(100)
            ),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1
        assert all(isinstance(e, TokenNotRedeemable) and e.reason == "used" for e in losers)
        assert len(losers) == 99
        with pytest.raises(TokenNotRedeemable):
            await store.redeem_token(T, digest(7), now=NOW, device_id="late")

    async def test_enroll_device_is_atomic(self, store: Store) -> None:
        await store.create_token(
            T, token_id="tok-1", token_hash=digest(1), now=NOW, expires_at=NOW + HOUR
        )
        await self.device(store, "taken")
        with pytest.raises(Conflict):
            await store.enroll_device(
                T, digest(1), now=NOW, device_id="taken", algorithm="ML-DSA-44", public_key=b"k"
            )
        # The failed enrollment rolled back the redemption too: the token still works.
        enrolled = await store.enroll_device(
            T, digest(1), now=NOW, device_id="dev-9", algorithm="ML-DSA-44", public_key=b"k"
        )
        assert enrolled.token.used_by_device == "dev-9"
        assert enrolled.device == await store.get_device(T, "dev-9")
        assert enrolled.key == await store.get_device_key(T, "dev-9")
        assert enrolled.key.version == 1
        with pytest.raises(TokenNotRedeemable):
            await store.enroll_device(
                T, digest(1), now=NOW, device_id="dev-10", algorithm="ML-DSA-44", public_key=b"k"
            )
        with pytest.raises(NotFound):
            await store.get_device(T, "dev-10")

    # -- server keys ------------------------------------------------------------------------

    async def test_rotation_demotes_previous_key(self, store: Store) -> None:
        first = await self.rotate(store, "k1")
        assert first.previous is None
        assert (first.active.version, first.active.state, first.active.activated_at) == (
            1,
            KeyState.ACTIVE,
            NOW,
        )
        second = await self.rotate(store, "k2", previous_retire_after=NOW + 7 * 24 * HOUR)
        assert second.previous is not None
        assert second.previous.key_id == "k1"
        assert (second.previous.state, second.previous.retire_after) == (
            KeyState.RETIRING,
            NOW + 7 * 24 * HOUR,
        )
        assert second.active.version == 2
        assert (await store.get_active_server_key(T, KeyPurpose.KEM_STATIC)).key_id == "k2"
        # Purposes rotate independently.
        audit = await self.rotate(store, "a1", purpose=KeyPurpose.AUDIT_SIGNING)
        assert (audit.previous, audit.active.version) == (None, 1)
        listed = await store.list_server_keys(T, purpose=KeyPurpose.KEM_STATIC)
        assert [(k.key_id, k.state) for k in listed] == [
            ("k1", KeyState.RETIRING),
            ("k2", KeyState.ACTIVE),
        ]
        assert [k.key_id for k in await store.list_server_keys(T, state=KeyState.ACTIVE)] == [
            "a1",
            "k2",
        ]
        fetched = await store.get_server_key(T, "k2")
        assert (fetched.public_key, fetched.encrypted_private) == (b"pub-k2", b"sealed-k2")

    async def test_rotation_if_active_rotates_once(self, store: Store) -> None:
        await self.rotate(store, "k1")
        await self.rotate(store, "k2", if_active="k1")
        with pytest.raises(Conflict):  # a second replica on the same schedule
            await self.rotate(store, "k3", if_active="k1")
        with pytest.raises(NotFound):
            await store.get_server_key(T, "k3")
        with pytest.raises(Conflict):
            await self.rotate(store, "k2")  # key ids are unique

    async def test_concurrent_rotations_leave_one_active_key(
        self, store: Store, peers: list[Store]
    ) -> None:
        await asyncio.gather(
            *(
                peers[i % len(peers)].rotate_server_key(
                    T,
                    key_id=f"k{i}",
                    purpose=KeyPurpose.KEM_STATIC,
                    algorithm="ML-KEM-1024+X25519",
                    public_key=b"p",
                    encrypted_private=b"s",
                    now=NOW,
                )
                for i in range(20)
            )
        )
        keys = await store.list_server_keys(T, purpose=KeyPurpose.KEM_STATIC)
        assert sorted(k.version for k in keys) == list(range(1, 21))
        active = [k for k in keys if k.state is KeyState.ACTIVE]
        assert len(active) == 1
        assert active[0].version == 20  # the last rotation to commit wins
        assert all(k.state is KeyState.RETIRING for k in keys if k is not active[0])

    async def test_concurrent_conditional_rotations_rotate_once(
        self, store: Store, peers: list[Store]
    ) -> None:
        await self.rotate(store, "k0")
        results = await asyncio.gather(
            *(
                peers[i % len(peers)].rotate_server_key(
                    T,
                    key_id=f"k{i + 1}",
                    purpose=KeyPurpose.KEM_STATIC,
                    algorithm="ML-KEM-1024+X25519",
                    public_key=b"p",
                    encrypted_private=b"s",
                    now=NOW,
                    if_active="k0",
                )
                for i in range(10)
            ),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
        assert len(await store.list_server_keys(T)) == 2

    async def test_server_key_state_machine(self, store: Store) -> None:
        await self.rotate(store, "k1")
        await self.rotate(store, "k2")
        with pytest.raises(InvalidInput):
            await store.set_server_key_state(T, "k1", KeyState.ACTIVE)
        with pytest.raises(Conflict):
            await store.set_server_key_state(T, "k1", KeyState.RETIRED, expected=KeyState.ACTIVE)
        retired = await store.set_server_key_state(
            T, "k1", KeyState.RETIRED, expected=KeyState.RETIRING
        )
        assert retired.state is KeyState.RETIRED
        with pytest.raises(Conflict):  # keys only move forward
            await store.set_server_key_state(T, "k1", KeyState.RETIRING)
        assert (
            await store.set_server_key_state(T, "k1", KeyState.REVOKED)
        ).state is KeyState.REVOKED
        with pytest.raises(Conflict):  # revoked is final
            await store.set_server_key_state(T, "k1", KeyState.RETIRED)
        revoked = await store.set_server_key_state(T, "k2", KeyState.REVOKED)
        assert revoked.state is KeyState.REVOKED
        with pytest.raises(NotFound):
            await store.get_active_server_key(T, KeyPurpose.KEM_STATIC)
        with pytest.raises(NotFound):
            await store.set_server_key_state(T, "nope", KeyState.REVOKED)

    # -- sessions ---------------------------------------------------------------------------

    async def test_update_session_optimistic(self, store: Store) -> None:
        await self.device(store)
        await self.session(store)
        updated = await store.update_session(
            T,
            sid(1),
            expected_version=0,
            now=NOW + HOUR,
            epoch=105,
            encrypted_chain_state=b"chain-2",
            counters=SessionCounters(messages_sent=3, bytes_sent=300),
        )
        assert (updated.version, updated.epoch, updated.encrypted_chain_state) == (
            1,
            105,
            b"chain-2",
        )
        assert updated.replay_window == b"\x00" * 8  # not given, not changed
        assert updated.counters == SessionCounters(messages_sent=3, bytes_sent=300)
        assert (updated.updated_at, updated.created_at) == (NOW + HOUR, NOW)
        assert updated == await store.get_session(T, sid(1))
        with pytest.raises(Conflict):
            await store.update_session(T, sid(1), expected_version=0, now=NOW, epoch=999)
        assert (await store.get_session(T, sid(1))).epoch == 105
        with pytest.raises(NotFound):
            await store.update_session(T, sid(9), expected_version=0, now=NOW)
        with pytest.raises(InvalidInput):
            await store.update_session(
                T,
                sid(1),
                expected_version=1,
                now=NOW,
                counters={"messages_sent": 1},  # type: ignore[arg-type]
            )
        assert (await store.get_session(T, sid(1))).version == 1

    async def test_two_writers_cannot_both_win(self, store: Store, peers: list[Store]) -> None:
        await self.device(store)
        await self.session(store)
        results = await asyncio.gather(
            *(
                peers[i % len(peers)].update_session(
                    T, sid(1), expected_version=0, now=NOW, epoch=200 + i
                )
                for i in range(8)
            ),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, BaseException)]
        assert len(winners) == 1
        assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
        stored = await store.get_session(T, sid(1))
        assert (stored.version, stored.epoch) == (1, winners[0].epoch)

    async def test_revoke_device_sessions(self, store: Store) -> None:
        await self.device(store)
        await self.device(store, "dev-2")
        await self.session(store, 1)
        await self.session(store, 2, state=SessionStatus.PENDING)
        await self.session(store, 3, state=SessionStatus.EXPIRED)
        await self.session(store, 4, device_id="dev-2")
        assert await store.revoke_device_sessions(T, "dev-1", now=NOW + HOUR) == 2
        states = [s.state for s in await store.list_device_sessions(T, "dev-1")]
        assert states == [SessionStatus.REVOKED, SessionStatus.REVOKED, SessionStatus.EXPIRED]
        assert (await store.get_session(T, sid(4))).state is SessionStatus.ACTIVE
        assert await store.revoke_device_sessions(T, "dev-1", now=NOW) == 0
        with pytest.raises(NotFound):
            await store.revoke_device_sessions(T, "ghost", now=NOW)

    # -- audit log --------------------------------------------------------------------------

    async def test_audit_dense_indexes(self, store: Store) -> None:
        assert await store.audit_size() == 0
        for i in range(3):
            entry = await store.append_audit(
                ts=NOW, kind="enroll", payload=b"p%d" % i, leaf_hash=digest(i), expected_idx=i
            )
            assert entry.idx == i
        with pytest.raises(Conflict):
            await store.append_audit(
                ts=NOW, kind="enroll", payload=b"x", leaf_hash=digest(9), expected_idx=1
            )
        assert await store.audit_size() == 3
        entries = await store.list_audit(start=1, limit=5)
        assert [(e.idx, e.payload, e.leaf_hash) for e in entries] == [
            (1, b"p1", digest(1)),
            (2, b"p2", digest(2)),
        ]

    async def test_concurrent_audit_appends_stay_dense(
        self, store: Store, peers: list[Store]
    ) -> None:
        await asyncio.gather(
            *(
                peers[i % len(peers)].append_audit(
                    ts=NOW, kind="event", payload=b"%d" % i, leaf_hash=digest(i)
                )
                for i in range(30)
            )
        )
        entries = await store.list_audit()
        assert [e.idx for e in entries] == list(range(30))
        assert sorted(e.payload for e in entries) == sorted(b"%d" % i for i in range(30))

    # -- audit log: batched appends -----------------------------------------------------------

    async def test_audit_batch_appends_in_order_at_dense_indexes(self, store: Store) -> None:
        for i in range(2):
            await store.append_audit(
                ts=NOW, kind="single", payload=b"s%d" % i, leaf_hash=digest(i), expected_idx=i
            )
        rows = [audit_row(i, kind="batch") for i in range(2, 7)]
        entries = await store.append_audit_batch(rows, expected_idx=2)
        assert [(e.idx, e.kind, e.payload, e.leaf_hash, e.ts) for e in entries] == [
            (i, "batch", b"p%d" % i, digest(i), NOW) for i in range(2, 7)
        ]
        stored = await store.list_audit()
        assert [e.idx for e in stored] == list(range(7))
        assert stored[2:] == entries
        one = await store.append_audit_batch([audit_row(7)], expected_idx=7)
        assert [e.idx for e in one] == [7]
        after = await store.append_audit(ts=NOW, kind="k", payload=b"", leaf_hash=digest(8))
        assert after.idx == 8 and await store.audit_size() == 9

    @pytest.mark.parametrize("expected", [0, 1, 3, 4, 100])
    async def test_audit_batch_at_another_index_is_a_conflict(
        self, store: Store, expected: int
    ) -> None:
        await store.append_audit_batch([audit_row(0), audit_row(1)], expected_idx=0)
        with pytest.raises(Conflict):
            await store.append_audit_batch([audit_row(10), audit_row(11)], expected_idx=expected)
        assert [e.payload for e in await store.list_audit()] == [b"p0", b"p1"]

    @pytest.mark.parametrize(
        "rows",
        [
            [],
            [audit_row(i) for i in range(MAX_AUDIT_BATCH + 1)],
            [audit_row(0), AuditRow(ts=NOW, kind="k", payload=b"x", leaf_hash=b"short")],
            [audit_row(0), AuditRow(ts=NOW, kind="k" * 65, payload=b"x", leaf_hash=digest(1))],
            [audit_row(0), AuditRow(ts=NAIVE, kind="k", payload=b"x", leaf_hash=digest(1))],
            [audit_row(0), AuditRow(ts=NOW, kind="k", payload="text", leaf_hash=digest(1))],  # type: ignore[arg-type]
            [audit_row(0), ("ts", "kind", b"payload", digest(1))],
            b"not rows",
        ],
    )
    async def test_a_bad_row_fails_the_whole_audit_batch(self, store: Store, rows: Any) -> None:
        await store.append_audit(ts=NOW, kind="k", payload=b"first", leaf_hash=digest(0))
        with pytest.raises(InvalidInput):
            await store.append_audit_batch(rows, expected_idx=1)
        with pytest.raises(InvalidInput):
            await store.append_audit_batch([audit_row(1)], expected_idx=-1)
        assert [e.payload for e in await store.list_audit()] == [b"first"]

    async def test_a_row_the_database_refuses_rolls_back_the_whole_audit_batch(
        self, store: Store, url: str
    ) -> None:
        await store.append_audit_batch([audit_row(0)], expected_idx=0)
        await self.refuse_audit_kind(url, "poison")
        rows = [audit_row(1), audit_row(2), audit_row(3, kind="poison"), audit_row(4)]
        with pytest.raises(QflareError):
            await store.append_audit_batch(rows, expected_idx=1)
        assert [e.idx for e in await store.list_audit()] == [0]
        # Nothing of it stayed behind: the same index takes the batch without the bad row.
        entries = await store.append_audit_batch(rows[:2] + rows[3:], expected_idx=1)
        assert [(e.idx, e.payload) for e in entries] == [(1, b"p1"), (2, b"p2"), (3, b"p4")]
        assert [e.idx for e in await store.list_audit()] == [0, 1, 2, 3]

    async def test_audit_batches_racing_single_appends_stay_dense(
        self, store: Store, peers: list[Store]
    ) -> None:
        async def batcher(b: int) -> int:
            handle = peers[b % len(peers)]
            for n in range(3):
                rows = [audit_row(0, payload=b"b%d.%d.%d" % (b, n, j)) for j in range(4)]
                while True:
                    try:
                        size = await handle.audit_size()
                        await handle.append_audit_batch(rows, expected_idx=size)
                        break
                    except Conflict:  # a single append or another batch took the index
                        await asyncio.sleep(0)
            return b

        async def single(i: int) -> None:
            await peers[i % len(peers)].append_audit(
                ts=NOW, kind="single", payload=b"s%d" % i, leaf_hash=digest(i)
            )

        await asyncio.gather(*(batcher(b) for b in range(6)), *(single(i) for i in range(30)))
        entries = await store.list_audit()
        payloads = [e.payload for e in entries]
        assert [e.idx for e in entries] == list(range(6 * 3 * 4 + 30))  # no gap
        assert len(set(payloads)) == len(payloads)  # no duplicate
        assert set(payloads) == {b"s%d" % i for i in range(30)} | {
            b"b%d.%d.%d" % (b, n, j) for b in range(6) for n in range(3) for j in range(4)
        }
        for b in range(6):
            for n in range(3):
                # Each batch sits at consecutive indexes, in its own order.
                first = payloads.index(b"b%d.%d.0" % (b, n))
                assert payloads[first : first + 4] == [b"b%d.%d.%d" % (b, n, j) for j in range(4)]

    async def refuse_audit_kind(self, url: str, kind: str) -> None:
        """Make the database itself refuse audit rows of ``kind`` (a trigger, as the owner)."""
        raise NotImplementedError

    # -- security events --------------------------------------------------------------------

    async def test_security_events(self, store: Store) -> None:
        first = await store.append_security_event(
            T,
            ts=NOW,
            type="replay.detected",
            severity=40,
            device_id="unknown-device",  # attacks name devices that do not exist
            source="203.0.113.7",
            detail={"reason": "nonce", "count": 2, "nested": {"ok": True}, "list": [1, None]},
        )
        assert first.detail == {
            "reason": "nonce",
            "count": 2,
            "nested": {"ok": True},
            "list": [1, None],
        }
        second = await store.append_security_event(
            T, ts=NOW + HOUR, type="rate.limited", severity=30
        )
        assert second.id > first.id
        assert second.detail == {}
        assert [e.id for e in await store.list_security_events(T)] == [first.id, second.id]
        assert [e.id for e in await store.list_security_events(T, device_id="unknown-device")] == [
            first.id
        ]
        assert [e.id for e in await store.list_security_events(T, since=NOW + HOUR)] == [second.id]
        assert [e.id for e in await store.list_security_events(T, after_id=first.id)] == [second.id]
        for bad in ({"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]):
            with pytest.raises(InvalidInput):
                await store.append_security_event(T, ts=NOW, type="t", severity=1, detail=bad)  # type: ignore[arg-type]

    async def test_append_security_events(self, store: Store) -> None:
        rows = [
            SecurityEventRow(ts=NOW, type="handshake.started", severity=20, device_id="dev-1"),
            SecurityEventRow(
                ts=NOW + HOUR,
                type="handshake.completed",
                severity=20,
                device_id="dev-1",
                source="198.51.100.7",
                detail={"session": "00ff", "retransmitted": "false"},
            ),
            SecurityEventRow(ts=NOW, type="session.rekeyed", severity=20, device_id="ghost"),
        ]
        assert await store.append_security_events(T, rows) == 3
        stored = await store.list_security_events(T)
        assert [(e.type, e.device_id, e.ts) for e in stored] == [
            (r.type, r.device_id, r.ts) for r in rows
        ]
        assert stored[1].detail == {"session": "00ff", "retransmitted": "false"}
        assert stored[1].source == "198.51.100.7" and stored[0].detail == {}
        assert stored[0].id < stored[1].id < stored[2].id  # ids in the order given
        assert await store.list_security_events(OTHER) == []

    async def test_append_security_events_bad_batches_write_nothing(self, store: Store) -> None:
        good = SecurityEventRow(ts=NOW, type="handshake.started", severity=20)
        bad_batches: list[Any] = [
            [],
            [good] * (MAX_EVENT_BATCH + 1),
            [good, SecurityEventRow(ts=NAIVE, type="t", severity=20)],
            [good, SecurityEventRow(ts=NOW, type="", severity=20)],
            [good, SecurityEventRow(ts=NOW, type="t", severity=5000)],
            [good, SecurityEventRow(ts=NOW, type="t", severity=20, detail={"x": object()})],
            [good, "not a row"],
            "not rows",
            good,
        ]
        for batch in bad_batches:
            with pytest.raises(InvalidInput):
                await store.append_security_events(T, batch)
        with pytest.raises(InvalidInput):
            await store.append_security_events("bad tenant", [good])
        assert await store.list_security_events(T) == []
        assert await store.append_security_events(T, [good] * MAX_EVENT_BATCH) == MAX_EVENT_BATCH

    # -- admin tokens -----------------------------------------------------------------------

    async def test_admin_tokens(self, store: Store) -> None:
        token = await store.create_admin_token(
            token_hash=digest(5), name="ops", scopes=("keys.write", "devices.read"), now=NOW
        )
        assert (token.scopes, token.revoked) == (("devices.read", "keys.write"), False)
        assert await store.get_admin_token(digest(5)) == token
        with pytest.raises(Conflict):
            await store.create_admin_token(token_hash=digest(5), name="dup", scopes=(), now=NOW)
        assert (await store.revoke_admin_token(digest(5))).revoked
        assert (await store.get_admin_token(digest(5))).revoked
        assert [t.name for t in await store.list_admin_tokens()] == ["ops"]
        with pytest.raises(NotFound):
            await store.get_admin_token(digest(6))
        with pytest.raises(InvalidIdentifier):
            await store.create_admin_token(token_hash=digest(7), name="x", scopes=("a b",), now=NOW)
        with pytest.raises(InvalidInput):
            await store.create_admin_token(token_hash=digest(7), name="x", scopes="admin", now=NOW)  # type: ignore[arg-type]

    # -- cleanup ----------------------------------------------------------------------------

    async def test_cleanup_deletes_only_expired_rows_in_batches(self, store: Store) -> None:
        await store.create_tenant(OTHER, "Globex", now=NOW)
        for tenant in (T, OTHER):
            await self.device(store, "dev-1", tenant)
        past, future = NOW - HOUR, NOW + HOUR
        for i in range(7):
            tenant = T if i % 2 else OTHER
            expires = past if i < 5 else future
            await store.finish_handshake(
                tenant,
                session_id=sid(i),
                device_id="dev-1",
                suite=1,
                epoch=1,
                encrypted_chain_state=b"c",
                replay_window=b"",
                now=NOW - 2 * HOUR,
                expires_at=expires,
            )
            # Each tenant's timestamps rise, so every ClientHello is accepted.
            assert await store.accept_handshake(
                tenant, "dev-1", digest(i), timestamp=i, expires_at=expires
            )
            await store.create_token(
                tenant,
                token_id=f"t{i}",
                token_hash=digest(100 + i),
                now=NOW - 2 * HOUR,
                expires_at=expires,
            )
        counts = await store.cleanup(NOW, batch_size=2)
        assert (counts.sessions, counts.nonces, counts.tokens) == (5, 5, 5)
        assert counts.total == 15
        assert (await store.cleanup(NOW, batch_size=2)).total == 0
        # What had not expired is still there, in both tenants.
        assert (await store.get_session(T, sid(5))).session_id == sid(5)
        assert (await store.get_session(OTHER, sid(6))).session_id == sid(6)
        with pytest.raises(NotFound):
            await store.get_session(T, sid(1))
        # At each floor (T: 5, OTHER: 6) the nonce decides: 5 is kept, 0 was deleted.
        assert not await store.accept_handshake(
            T, "dev-1", digest(5), timestamp=5, expires_at=future
        )
        assert await store.accept_handshake(
            OTHER, "dev-1", digest(0), timestamp=6, expires_at=future
        )
        with pytest.raises(TokenNotRedeemable) as gone:
            await store.redeem_token(OTHER, digest(100), now=past - HOUR, device_id="d")
        assert gone.value.reason == "unknown"
        assert (await store.redeem_token(T, digest(105), now=NOW, device_id="d")).token_id == "t5"

    # -- bad input --------------------------------------------------------------------------

    @pytest.mark.parametrize("bad", BAD_IDS, ids=lambda b: repr(b)[:24])
    async def test_bad_identifiers_are_refused_and_nothing_is_written(
        self, store: Store, bad: Any
    ) -> None:
        with pytest.raises(InvalidIdentifier) as err:
            await store.create_device(T, bad, now=NOW)
        assert isinstance(err.value, ValueError)
        assert isinstance(err.value, QflareError)
        assert "DROP" not in str(err.value) and len(str(err.value)) < 200  # never echoes input
        with pytest.raises(InvalidIdentifier):
            await store.create_device(bad, "dev-1", now=NOW)
        with pytest.raises(InvalidIdentifier):
            await store.create_token(
                T, token_id=bad, token_hash=digest(1), now=NOW, expires_at=NOW + HOUR
            )
        with pytest.raises(InvalidIdentifier):
            await store.get_device(T, bad)
        assert await store.list_devices(T) == []
        with pytest.raises(TokenNotRedeemable):
            await store.redeem_token(T, digest(1), now=NOW, device_id="dev-1")

    async def test_sql_metacharacters_in_free_text_are_stored_verbatim(self, store: Store) -> None:
        name = "Robert'); DROP TABLE devices; --"
        await store.create_tenant("bobby", name, now=NOW)
        assert (await store.get_tenant("bobby")).name == name
        await self.device(store)
        reason = "'; UPDATE devices SET state='active' WHERE '1'='1"
        await store.set_device_state(T, "dev-1", DeviceState.QUARANTINED, reason=reason)
        device = await store.get_device(T, "dev-1")
        assert (device.state, device.state_reason) == (DeviceState.QUARANTINED, reason)

    @pytest.mark.parametrize(
        ("call", "error"),
        [
            (lambda s: s.create_tenant("t2", "x" * 10_000, now=NOW), InvalidInput),
            (lambda s: s.create_tenant("t2", "", now=NOW), InvalidInput),
            (lambda s: s.create_tenant("t2", "nul\x00", now=NOW), InvalidInput),
            (lambda s: s.create_tenant("t2", 5, now=NOW), InvalidInput),
            (lambda s: s.create_tenant("t2", "ok", now=datetime(2030, 1, 1)), InvalidInput),
            (lambda s: s.create_tenant("t2", "ok", now="2030-01-01"), InvalidInput),
            (lambda s: s.create_device(T, "d2", now=NOW, state="bogus"), InvalidInput),
            (
                lambda s: s.add_device_key(T, "dev-1", algorithm="a", public_key="pk", now=NOW),
                InvalidInput,
            ),
            (
                lambda s: s.add_device_key(
                    T, "dev-1", algorithm="a" * 10_000, public_key=b"k", now=NOW
                ),
                InvalidInput,
            ),
            (
                lambda s: s.add_device_key(
                    T, "dev-1", algorithm="a", public_key=bytearray(b"k"), now=NOW
                ),
                InvalidInput,
            ),
            (lambda s: s.get_device_key(T, "dev-1", True), InvalidInput),
            (lambda s: s.get_device_key(T, "dev-1", 0), InvalidInput),
            (lambda s: s.get_device_key(T, "dev-1", 2**63), InvalidInput),
            (
                lambda s: s.redeem_token(T, "ab" * 16, now=NOW, device_id="dev-1"),
                InvalidInput,
            ),
            (lambda s: s.get_session(T, b"x" * 15), InvalidInput),
            (lambda s: s.list_devices(T, limit=0), InvalidInput),
            (lambda s: s.list_devices(T, state="gone"), InvalidInput),
            (lambda s: s.cleanup(NOW, batch_size=0), InvalidInput),
            (
                lambda s: s.append_audit(ts=NOW, kind="k", payload=b"", leaf_hash=b"short"),
                InvalidInput,
            ),
        ],
    )
    async def test_wrong_types_and_sizes_are_refused(
        self, store: Store, call: Any, error: type
    ) -> None:
        await self.device(store)
        with pytest.raises(error):
            await call(store)
        assert [d.device_id for d in await store.list_devices(T)] == ["dev-1"]
        assert await store.list_device_keys(T, "dev-1") == []
        assert await store.audit_size() == 0
        with pytest.raises(NotFound):
            await store.get_tenant("t2")

    # -- tenant scoping through the API -----------------------------------------------------

    async def test_tenants_do_not_see_each_other(self, store: Store) -> None:
        await store.create_tenant(OTHER, "Globex", now=NOW)
        await self.device(store)
        await self.session(store)
        await self.rotate(store, "k1")
        with pytest.raises(NotFound):
            await store.get_device(OTHER, "dev-1")
        with pytest.raises(NotFound):
            await store.get_session(OTHER, sid(1))
        with pytest.raises(NotFound):
            await store.get_server_key(OTHER, "k1")
        with pytest.raises(NotFound):
            await store.set_device_state(OTHER, "dev-1", DeviceState.REVOKED)
        assert await store.list_devices(OTHER) == []
        # The same ids are free in the other tenant.
        await self.device(store, "dev-1", OTHER)
        assert (await store.get_device(T, "dev-1")).tenant_id == T

    # -- secrets stay out of reprs ----------------------------------------------------------

    async def test_reprs_hold_no_secrets(self, store: Store) -> None:
        await self.device(store)
        session = await self.session(store, encrypted_chain_state=b"SECRET-CHAIN")
        key = (await self.rotate(store, "k1", encrypted_private=b"SECRET-PRIVATE")).active
        token = await store.create_token(
            T, token_id="t", token_hash=b"SECRET-HASH-0123456789", now=NOW, expires_at=NOW + HOUR
        )
        for record in (session, key, token):
            assert "SECRET" not in repr(record)
        assert "SECRET" not in repr(store)

    # -- schema and migrations --------------------------------------------------------------

    async def test_migrate_is_idempotent_and_status_reports(self, url: str) -> None:
        assert await migrate(url) == []
        report = await status(url)
        assert report.current
        assert [(a.version, a.name) for a in report.applied] == [
            (1, "initial"),
            (2, "hot_paths"),
            (3, "handshake_paths"),
            (4, "handshake_finish"),
        ]
        assert all(a.applied_at == NOW for a in report.applied)

    async def test_unmigrated_database_is_refused(self, fresh_url: str) -> None:
        before = await status(fresh_url)
        assert (before.applied, [m.version for m in before.pending]) == ((), [1, 2, 3, 4])
        with pytest.raises(SchemaNotCurrent):
            await open_store(fresh_url)
        store = await open_store(fresh_url, migrate=True)
        await store.close()
        assert (await status(fresh_url)).current

    async def test_edited_migration_is_detected(self, url: str) -> None:
        await self.tamper_migration_checksum(url)
        with pytest.raises(MigrationError):
            await status(url)
        with pytest.raises(MigrationError):
            await migrate(url)
        with pytest.raises(SchemaNotCurrent):
            await open_store(url)

    @pytest.fixture
    def fresh_url(self) -> str:
        raise NotImplementedError

    async def tamper_migration_checksum(self, url: str) -> None:
        raise NotImplementedError

    # -- crash safety -----------------------------------------------------------------------

    async def test_sigkill_mid_write_keeps_every_commit_and_no_partial_state(
        self, store: Store, url: str
    ) -> None:
        await store.create_tenant("crash", "Crash test", now=NOW)
        await store.create_device("crash", "holder", now=NOW)
        await store.finish_handshake(
            "crash",
            session_id=b"S" * 16,
            device_id="holder",
            suite=1,
            epoch=0,
            encrypted_chain_state=b"c",
            replay_window=b"",
            now=NOW,
            expires_at=NOW + HOUR,
        )
        seed = int.from_bytes(os.urandom(4), "big")
        rng = random.Random(seed)
        # Several runs, each killed after a random number of commits plus a random delay, so
        # the kill lands at different points of the loop, inside transactions as well.
        for run in range(6):
            start = run * 10_000
            reported = await self.run_and_kill(url, start, rng.randint(6, 40), rng.random() / 50)
            fresh = await open_store(url)
            try:
                await self.check_after_crash(fresh, start, reported, f"seed={seed} run={run}")
            finally:
                await fresh.close()
            await self.check_integrity(url)

    @staticmethod
    async def run_and_kill(url: str, start: int, lines: int, delay: float) -> list[str]:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("crash_child.py")),
            url,
            str(start),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        reported: list[str] = []
        try:
            async with asyncio.timeout(30):
                while len(reported) < lines:
                    line = await child.stdout.readline()
                    if not line:
                        break
                    reported.append(line.decode().strip())
                await asyncio.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            out, err = await child.communicate()
        assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
        reported += [line for line in out.decode().splitlines() if line.strip()]
        assert len(reported) >= lines, err.decode()[-2000:]
        return reported

    @staticmethod
    async def check_after_crash(fresh: Store, start: int, reported: list[str], why: str) -> None:
        enrolled = [r.split()[1] for r in reported if r.startswith("enrolled")]
        rotated = [r.split()[1] for r in reported if r.startswith("rotated")]
        audited = [int(r.split()[1]) for r in reported if r.startswith("audit")]
        versions = [int(r.split()[1]) for r in reported if r.startswith("session")]

        # Every reported commit is there.
        for device_id in enrolled:
            assert (await fresh.get_device("crash", device_id)).device_id == device_id, why
        keys = await fresh.list_server_keys("crash", purpose=KeyPurpose.KEM_STATIC)
        assert set(rotated) <= {k.key_id for k in keys}, why
        entries = await fresh.list_audit(limit=10_000)
        assert set(audited) <= {e.idx for e in entries}, why
        session = await fresh.get_session("crash", b"S" * 16)
        assert session.version >= max(versions, default=0), why

        # No transaction is visible in part. Enrollment: device, key and used token together.
        devices = {
            d.device_id
            for d in await fresh.list_devices("crash", limit=10_000)
            if d.device_id.startswith("dev-")
            and int(d.device_id[4:]) >= start
            and int(d.device_id[4:]) < start + 10_000
        }
        made = len(devices)
        assert devices == {f"dev-{i}" for i in range(start, start + made)}, why
        assert made - len(enrolled) in (0, 1), why
        for device_id in devices:
            assert (await fresh.get_device_key("crash", device_id)).version == 1, why
        for n in range(start, start + made + 2):
            try:
                await fresh.redeem_token(
                    "crash", n.to_bytes(4, "big") * 8, now=NOW, device_id="probe"
                )
            except TokenNotRedeemable as exc:
                # Used exactly when its device exists; unknown only past the last one made.
                assert exc.reason in ("used", "unknown"), why
                assert (exc.reason == "used") == (n < start + made), (why, n)
            else:
                assert n == start + made, (why, n)  # created, not yet redeemed: the killed step
        # Rotation: exactly one active key, versions without gaps, the newest one active.
        assert [k.state for k in keys].count(KeyState.ACTIVE) == 1, why
        assert sorted(k.version for k in keys) == list(range(1, len(keys) + 1)), why
        assert max(keys, key=lambda k: k.version).state is KeyState.ACTIVE, why
        assert all(k.state is KeyState.RETIRING for k in keys if k.version < len(keys)), why
        # Audit: dense. Session: the counter written with each version matches it.
        assert [e.idx for e in entries] == list(range(len(entries))), why
        assert session.counters.messages_sent == session.version, why

    async def check_integrity(self, url: str) -> None:
        """Backend-specific physical integrity check after the crash test."""


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def url(self, sqlite_url: str) -> str:
        return sqlite_url

    @pytest.fixture
    def fresh_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'fresh' / 'q.db'}"

    async def tamper_migration_checksum(self, url: str) -> None:
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute("UPDATE schema_migrations SET checksum = ?", (b"\x00" * 32,))
        db.close()

    async def refuse_audit_kind(self, url: str, kind: str) -> None:
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute(
                "CREATE TRIGGER refuse_kind BEFORE INSERT ON audit_entries "
                f"WHEN NEW.kind = '{kind}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        db.close()

    async def check_integrity(self, url: str) -> None:
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        finally:
            db.close()


@pytest.mark.postgres
class TestPostgresStore(StoreContract):
    @pytest.fixture
    def url(self, pg_url: str) -> str:
        return pg_url

    @pytest.fixture
    async def fresh_url(self, postgres_url: str) -> AsyncIterator[str]:
        schema = f"qflare_t_{uuid.uuid4().hex[:16]}"
        try:
            yield with_query(postgres_url, schema=schema)
        finally:
            conn = await asyncpg.connect(postgres_url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

    async def tamper_migration_checksum(self, url: str) -> None:
        conn = await asyncpg.connect(
            without_query(url), server_settings={"search_path": schema_of(url)}
        )
        try:
            await conn.execute("UPDATE schema_migrations SET checksum = $1", b"\x00" * 32)
        finally:
            await conn.close()

    async def refuse_audit_kind(self, url: str, kind: str) -> None:
        conn = await asyncpg.connect(
            without_query(url), server_settings={"search_path": schema_of(url)}
        )
        try:
            await conn.execute(
                "CREATE FUNCTION refuse_kind() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused'; END $$"
            )
            await conn.execute(
                "CREATE TRIGGER refuse_kind BEFORE INSERT ON audit_entries FOR EACH ROW "
                f"WHEN (NEW.kind = '{kind}') EXECUTE FUNCTION refuse_kind()"
            )
        finally:
            await conn.close()
