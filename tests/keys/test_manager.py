"""KeyManager over both real stores: tokens, enrollment, device and server keys, sessions."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import asyncpg
import pytest

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import (
    Conflict,
    DeviceNotAllowed,
    InvalidKey,
    InvalidSignature,
    ReplayDetected,
    TokenRejected,
    UnsupportedAlgorithm,
)
from qflare.keys import (
    EnrollmentRequest,
    Envelope,
    KeyManager,
    KeyPolicy,
    SessionStateTampered,
    SessionUnusable,
    StaticMasterKey,
)
from qflare.protocol import ClientHandshake, ServerHandshake, ServerPolicy
from qflare.protocol.enrollment import (
    enrollment_proof_message,
    key_rotation_message,
    server_key_binding,
)
from qflare.protocol.handshake import Established
from qflare.store import (
    DeviceState,
    FinishOutcome,
    InvalidIdentifier,
    KeyPurpose,
    KeyState,
    SessionStatus,
    Store,
    open_store,
)

NOW = 1_800_000_000.0
MASTER = StaticMasterKey(bytes(range(32)))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    s = await open_store(database_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def km(store: Store) -> KeyManager:
    policy = KeyPolicy(refresh_seconds=0, device_algorithms=("ML-DSA-44", "ML-DSA-65"))
    manager = KeyManager(store, Envelope(MASTER), policy=policy)
    await manager.initialize(now=NOW)
    return manager


def enrollment(
    token: str, device_id: str, algorithm: str = "ML-DSA-44"
) -> tuple[EnrollmentRequest, crypto.SignaturePrivateKey]:
    key = crypto.signature(algorithm).generate(crypto.system_rng)
    public = key.public_key().public_bytes()
    proof = key.sign(
        enrollment_proof_message(device_id, algorithm, public, token), labels.SIG_ENROLLMENT
    )
    return EnrollmentRequest(
        token=token, device_id=device_id, algorithm=algorithm, public_key=public, proof=proof
    ), key


async def enrolled(km: KeyManager, device_id: str) -> crypto.SignaturePrivateKey:
    token = await km.issue_token(now=NOW)
    request, key = enrollment(token.token, device_id)
    await km.enroll(request, now=NOW)
    return key


# -- set-up and tokens ------------------------------------------------------------------------


async def test_initialize_creates_one_key_per_purpose_and_is_idempotent(
    km: KeyManager, store: Store
) -> None:
    keys = await km.server_keys()
    assert sorted(k.purpose for k in keys) == sorted(KeyPurpose)
    assert all(k.state is KeyState.ACTIVE for k in keys)
    assert await km.initialize(now=NOW + 10) == []
    assert [k.key_id for k in await km.server_keys()] == [k.key_id for k in keys]


async def test_private_keys_are_stored_sealed(km: KeyManager) -> None:
    static, _ = await km.handshake_keys(now=NOW)
    for key in await km.server_keys():
        if key.purpose is KeyPurpose.KEM_STATIC:
            seed = static[key.key_id].private.private_bytes()
            assert seed not in key.encrypted_private
            assert len(key.encrypted_private) > len(seed)


async def test_enrollment_pins_the_active_static_key_with_a_token_bound_mac(
    km: KeyManager,
) -> None:
    token = await km.issue_token(now=NOW)
    assert token.token not in repr(token)
    request, _ = enrollment(token.token, "dev-1")
    result = await km.enroll(request, now=NOW + 1)
    assert result.device.state is DeviceState.ENROLLED
    (active,) = [
        k
        for k in await km.server_keys()
        if k.purpose is KeyPurpose.KEM_STATIC and k.state is KeyState.ACTIVE
    ]
    assert result.server_key.key_id == active.key_id
    assert result.server_key.public_key == active.public_key
    expected = server_key_binding(token.token, "dev-1", result.server_key)
    assert crypto.constant_time_equal(result.server_key_binding, expected)
    assert not crypto.constant_time_equal(
        result.server_key_binding, server_key_binding("qft_other", "dev-1", result.server_key)
    )


async def test_a_token_is_single_use(km: KeyManager) -> None:
    token = await km.issue_token(now=NOW)
    await km.enroll(enrollment(token.token, "dev-1")[0], now=NOW)
    with pytest.raises(TokenRejected) as info:
        await km.enroll(enrollment(token.token, "dev-2")[0], now=NOW)
    assert info.value.reason == "used"
    with pytest.raises(Exception, match=r"not found|NotFound"):
        await km.device("dev-2")


async def test_expired_and_forged_tokens_are_rejected_with_one_message(km: KeyManager) -> None:
    token = await km.issue_token(now=NOW, ttl=60)
    with pytest.raises(TokenRejected) as expired:
        await km.enroll(enrollment(token.token, "dev-1")[0], now=NOW + 60)
    with pytest.raises(TokenRejected) as forged:
        await km.enroll(enrollment(token.token + "x", "dev-1")[0], now=NOW)
    with pytest.raises(TokenRejected) as huge:
        await km.enroll(enrollment("q" * 10_000, "dev-1")[0], now=NOW)
    assert (expired.value.reason, forged.value.reason, huge.value.reason) == (
        "expired",
        "unknown",
        "malformed",
    )
    assert len({str(expired.value), str(forged.value), str(huge.value)}) == 1


async def test_bad_requests_do_not_burn_the_token(km: KeyManager) -> None:
    token = (await km.issue_token(now=NOW)).token
    request, _ = enrollment(token, "dev-1")
    other, _ = enrollment(token, "dev-1")
    elsewhere, _ = enrollment("qft_another", "dev-1")
    bad = [
        (replace(request, proof=other.proof), InvalidSignature),  # another key's proof
        (replace(elsewhere, token=token), InvalidSignature),  # a proof bound to another token
        (enrollment(token, "dev-1", "ML-DSA-87")[0], UnsupportedAlgorithm),  # not in the policy
        (replace(request, public_key=request.public_key[:-1]), InvalidKey),
    ]
    for bad_request, error in bad:
        with pytest.raises(error):
            await km.enroll(bad_request, now=NOW)
    for bad_id in ("dev'; DROP TABLE devices;--", "x" * 10_000, ""):
        with pytest.raises(InvalidIdentifier):
            await km.enroll(enrollment(token, bad_id)[0], now=NOW)
    result = await km.enroll(request, now=NOW)
    assert result.device.device_id == "dev-1"


async def test_a_taken_device_id_leaves_the_token_unused(km: KeyManager) -> None:
    await enrolled(km, "dev-1")
    token = (await km.issue_token(now=NOW)).token
    with pytest.raises(Conflict):
        await km.enroll(enrollment(token, "dev-1")[0], now=NOW)
    assert (await km.enroll(enrollment(token, "dev-2")[0], now=NOW)).device.device_id == "dev-2"


async def test_concurrent_enrollments_with_one_token_enroll_exactly_one(km: KeyManager) -> None:
    token = (await km.issue_token(now=NOW)).token
    requests = [enrollment(token, f"dev-{i}")[0] for i in range(25)]
    results = await asyncio.gather(
        *(km.enroll(r, now=NOW) for r in requests), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) == 1
    assert all(isinstance(r, TokenRejected) for r in results if r not in ok)


# -- device keys and states -------------------------------------------------------------------


async def test_device_key_rotation_needs_both_signatures_and_is_single_use(
    km: KeyManager,
) -> None:
    old = await enrolled(km, "dev-1")
    new = crypto.signature("ML-DSA-65").generate(crypto.system_rng)
    public = new.public_key().public_bytes()
    message = key_rotation_message("dev-1", 1, "ML-DSA-65", public)
    by_old = old.sign(message, labels.SIG_KEY_ROTATION)
    by_new = new.sign(message, labels.SIG_KEY_ROTATION)
    with pytest.raises(InvalidSignature):  # the new key alone cannot authorise the change
        await km.rotate_device_key(
            "dev-1",
            algorithm="ML-DSA-65",
            public_key=public,
            current_signature=by_new,
            new_signature=by_new,
            now=NOW,
        )
    with pytest.raises(InvalidSignature):  # a signature made for enrollment is not accepted
        await km.rotate_device_key(
            "dev-1",
            algorithm="ML-DSA-65",
            public_key=public,
            current_signature=old.sign(message, labels.SIG_ENROLLMENT),
            new_signature=by_new,
            now=NOW,
        )
    args = {
        "algorithm": "ML-DSA-65",
        "public_key": public,
        "current_signature": by_old,
        "new_signature": by_new,
        "now": NOW,
    }
    assert await km.rotate_device_key("dev-1", **args) == 2  # type: ignore[arg-type]
    _, key = await km.device_key("dev-1")
    assert key.algorithm == "ML-DSA-65"
    assert key.public.public_bytes() == public
    with pytest.raises(InvalidSignature):  # the captured request replayed
        await km.rotate_device_key("dev-1", **args)  # type: ignore[arg-type]


async def test_quarantine_revokes_sessions_and_reinstate_undoes_it(km: KeyManager) -> None:
    key = await enrolled(km, "dev-1")
    session_id, _ = await handshake(km, "dev-1", key)
    device = await km.quarantine("dev-1", reason="burst of failures", now=NOW)
    assert device.state is DeviceState.QUARANTINED
    with pytest.raises(DeviceNotAllowed):
        km.require_allowed(device)
    with pytest.raises(SessionUnusable):
        await km.load_session(session_id, now=NOW)
    assert (await km.reinstate("dev-1")).state is DeviceState.ACTIVE
    with pytest.raises(Conflict):  # only a quarantined device can be reinstated
        await km.reinstate("dev-1")


async def test_revocation_is_permanent(km: KeyManager) -> None:
    key = await enrolled(km, "dev-1")
    await handshake(km, "dev-1", key)
    device, sessions = await km.revoke_device("dev-1", reason="stolen", now=NOW)
    assert (device.state, sessions) == (DeviceState.REVOKED, 1)
    with pytest.raises(Conflict):
        await km.reinstate("dev-1")
    with pytest.raises(Conflict):
        await km.quarantine("dev-1", reason="x", now=NOW)


# -- server key ring --------------------------------------------------------------------------


async def test_rotation_keeps_the_previous_static_key_until_the_overlap_ends(
    km: KeyManager,
) -> None:
    (before,) = await km.published_server_keys(now=NOW)
    rotation = await km.rotate_server_key(KeyPurpose.KEM_STATIC, now=NOW, overlap=100)
    static, _ = await km.handshake_keys(now=NOW + 1)
    assert set(static) == {before.key_id, rotation.active.key_id}
    published = await km.published_server_keys(now=NOW + 1)
    assert [k.key_id for k in published] == [before.key_id, rotation.active.key_id]
    assert await km.retire_due_keys(now=NOW + 99) == []
    (retired,) = await km.retire_due_keys(now=NOW + 100)
    assert retired.key_id == before.key_id
    static, _ = await km.handshake_keys(now=NOW + 101)
    assert set(static) == {rotation.active.key_id}


async def test_rotation_if_active_rotates_once_across_replicas(
    km: KeyManager, store: Store
) -> None:
    (current,) = await km.published_server_keys(now=NOW)
    other = KeyManager(store, Envelope(MASTER))
    results = await asyncio.gather(
        km.rotate_server_key(KeyPurpose.KEM_STATIC, now=NOW, if_active=current.key_id),
        other.rotate_server_key(KeyPurpose.KEM_STATIC, now=NOW, if_active=current.key_id),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    active = [
        k
        for k in await km.server_keys()
        if k.purpose is KeyPurpose.KEM_STATIC and k.state is KeyState.ACTIVE
    ]
    assert len(active) == 1


async def test_a_revoked_key_stops_working_at_once(km: KeyManager) -> None:
    (old,) = await km.published_server_keys(now=NOW)
    await km.rotate_server_key(KeyPurpose.KEM_STATIC, now=NOW)
    await km.revoke_server_key(old.key_id)
    static, _ = await km.handshake_keys(now=NOW)
    assert old.key_id not in static
    with pytest.raises(Conflict):  # nothing leaves REVOKED
        await km.store.set_server_key_state(km.tenant, old.key_id, KeyState.RETIRED)


async def test_a_master_key_change_cannot_open_the_ring(store: Store, km: KeyManager) -> None:
    stranger = KeyManager(store, Envelope(StaticMasterKey(bytes(32))), policy=km.policy)
    with pytest.raises(Exception, match=r"decryption failed|not configured"):
        await stranger.handshake_keys(now=NOW)


async def test_nonce_check_is_durable_and_keeps_a_timestamp_floor(
    km: KeyManager, database_url: str
) -> None:
    await enrolled(km, "dev-1")
    assert await km.first_use("dev-1", b"n" * 32, 1000, now=NOW)
    assert not await km.first_use("dev-1", b"n" * 32, 1000, now=NOW)
    # A restarted server (new manager, new connection) still refuses it.
    again = KeyManager(await open_store(database_url), Envelope(MASTER))
    try:
        assert not await again.first_use("dev-1", b"n" * 32, 1000, now=NOW)
    finally:
        await again.store.close()
    # A fresh nonce with a timestamp below an accepted one is refused too.
    assert await km.first_use("dev-1", b"m" * 32, 1100, now=NOW)
    assert not await km.first_use("dev-1", b"o" * 32, 1050, now=NOW)


# -- sessions ---------------------------------------------------------------------------------


async def until_finish(
    km: KeyManager, device_id: str, key: crypto.SignaturePrivateKey, *, now: float = NOW
) -> tuple[ClientHandshake, bytes, Callable[[], Established]]:
    """Hello and ServerHello of an enrolled device, the server half through ``km``. Returns
    the client, its ClientFinish, and a function that lets a fresh server object (as another
    replica would) verify that ClientFinish, as many times as a test retransmits it."""
    pinned = (await km.published_server_keys(now=now))[-1]
    client = ClientHandshake(
        device_id=device_id, identity=key, identity_algorithm="ML-DSA-44", server_key=pinned
    )
    static, biscuits = await km.handshake_keys(now=now)
    server = ServerHandshake(policy=ServerPolicy(), static_keys=static, biscuits=biscuits)
    wire = client.client_hello(now=int(now), rng=crypto.system_rng)
    hello = server.receive_client_hello(wire, now=int(now))
    _, device_key = await km.device_key(hello.device_id)
    server.authenticate(device_key)
    fresh = await km.first_use(hello.device_id, hello.nonce, hello.timestamp, now=now)
    finish = client.receive_server_hello(
        server.server_hello(rng=crypto.system_rng, seen_before=lambda *_: not fresh)
    )

    def established() -> Established:
        finisher = ServerHandshake(policy=ServerPolicy(), static_keys=static, biscuits=biscuits)
        return finisher.receive_client_finish(finish, now=int(now))

    return client, finish, established


async def handshake(
    km: KeyManager, device_id: str, key: crypto.SignaturePrivateKey, *, now: float = NOW
) -> tuple[bytes, ClientHandshake]:
    """The whole in-process handshake; returns the stored session id and the client (whose
    ``session`` is the device's half)."""
    client, _, established = await until_finish(km, device_id, key, now=now)
    done = await km.complete_handshake(established(), None, now=now)
    assert done.outcome is FinishOutcome.CREATED and done.loaded is not None
    return done.loaded.record.session_id, client


async def test_a_restarted_server_resumes_the_session_and_refuses_replays(
    km: KeyManager, database_url: str
) -> None:
    key = await enrolled(km, "dev-1")
    session_id, client = await handshake(km, "dev-1", key)
    assert client.session is not None
    first = client.session.seal(b"update 1", now=NOW + 1)
    second = client.session.seal(b"update 2", now=NOW + 2)

    loaded = await km.load_session(session_id, now=NOW + 1)
    assert loaded.session.open(first, now=NOW + 1).plaintext == b"update 1"
    await km.save_session(loaded, now=NOW + 1)

    restarted = KeyManager(await open_store(database_url), Envelope(MASTER))
    try:
        loaded = await restarted.load_session(session_id, now=NOW + 2)
        with pytest.raises(ReplayDetected):
            loaded.session.open(first, now=NOW + 2)
        assert loaded.session.open(second, now=NOW + 2).plaintext == b"update 2"
        saved = await restarted.save_session(loaded, now=NOW + 2)
        assert saved.record.counters.messages_received == 2
    finally:
        await restarted.store.close()


async def test_a_stale_writer_is_refused(km: KeyManager) -> None:
    key = await enrolled(km, "dev-1")
    session_id, _ = await handshake(km, "dev-1", key)
    a = await km.load_session(session_id, now=NOW)
    b = await km.load_session(session_id, now=NOW)
    a.session.seal(b"reply", now=NOW)
    await km.save_session(a, now=NOW)
    b.session.seal(b"reply", now=NOW)  # the same sequence number: must never be sent
    with pytest.raises(Conflict):
        await km.save_session(b, now=NOW)


async def test_a_retransmitted_finish_gets_the_stored_session_back(km: KeyManager) -> None:
    client, _, established = await until_finish(km, "dev-1", await enrolled(km, "dev-1"))
    first = await km.complete_handshake(established(), None, now=NOW)
    assert first.outcome is FinishOutcome.CREATED and first.loaded is not None
    assert client.session is not None
    record = client.session.seal(b"once", now=NOW)
    first.loaded.session.open(record, now=NOW)
    await km.save_session(first.loaded, now=NOW)
    again = await km.complete_handshake(established(), None, now=NOW)
    assert again.outcome is FinishOutcome.EXISTS and again.loaded is not None
    with pytest.raises(ReplayDetected):  # the window survived the retransmission
        again.loaded.session.open(record, now=NOW)


async def swap_chain_states(database_url: str, a: bytes, b: bytes) -> None:
    """Swap two sessions' sealed states directly in the database, as an intruder would."""
    select = "SELECT session_id, encrypted_chain_state FROM sessions"
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
            rows = dict(db.execute(select).fetchall())
            for target, source in ((a, b), (b, a)):
                db.execute(
                    "UPDATE sessions SET encrypted_chain_state=? WHERE session_id=?",
                    (rows[source], target),
                )
        return
    base, _, query = database_url.partition("?")
    schema = dict(part.split("=") for part in query.split("&"))["schema"]
    conn = await asyncpg.connect(base, server_settings={"search_path": schema})
    try:
        rows = {bytes(r[0]): bytes(r[1]) for r in await conn.fetch(select)}
        for target, source in ((a, b), (b, a)):
            await conn.execute(
                "UPDATE sessions SET encrypted_chain_state=$1 WHERE session_id=$2",
                rows[source],
                target,
            )
    finally:
        await conn.close()


async def test_swapped_session_states_open_neither(km: KeyManager, database_url: str) -> None:
    key = await enrolled(km, "dev-1")
    a, _ = await handshake(km, "dev-1", key)
    b, _ = await handshake(km, "dev-1", key, now=NOW + 1)
    await swap_chain_states(database_url, a, b)
    for session_id in (a, b):
        with pytest.raises(SessionStateTampered):
            await km.load_session(session_id, now=NOW + 1)


async def test_an_expired_or_revoked_session_is_unusable(km: KeyManager) -> None:
    key = await enrolled(km, "dev-1")
    session_id, _ = await handshake(km, "dev-1", key)
    with pytest.raises(SessionUnusable):
        await km.load_session(session_id, now=NOW + km.policy.session_lifetime)
    record = await km.revoke_session(session_id, now=NOW)
    assert record.state is SessionStatus.REVOKED
    with pytest.raises(SessionUnusable):
        await km.load_session(session_id, now=NOW)


async def test_complete_handshake_stores_the_state_after_the_first_answer(
    km: KeyManager,
) -> None:
    """``complete_handshake`` seals the first answer before the insert: one write holds the
    post-answer state, and a retransmission gets the stored session, never a reset, and no
    answer sealed from the fresh copy."""
    client, _, established = await until_finish(km, "dev-1", await enrolled(km, "dev-1"))
    first = established()
    done = await km.complete_handshake(first, b"answer", purpose="control", now=NOW)
    assert done.outcome is FinishOutcome.CREATED
    assert done.loaded is not None and done.sealed is not None
    loaded, sealed = done.loaded, done.sealed
    assert not done.rekey  # the device's first handshake
    assert done.device.state is DeviceState.ACTIVE and done.device.last_seen is not None
    assert loaded.record.expires_at == km.session_expires_at(first)
    assert loaded.record.counters.messages_sent == 1 and loaded.record.version == 0
    assert client.session is not None
    assert client.session.open(sealed, now=NOW).plaintext == b"answer"
    # A restart reads the stored row: it goes on after the answer, it does not repeat it.
    reloaded = await km.load_session(loaded.record.session_id, now=NOW)
    assert reloaded.session.export().counters.messages_sent == 1
    again = await km.complete_handshake(established(), b"other", purpose="control", now=NOW)
    assert again.outcome is FinishOutcome.EXISTS and again.sealed is None
    assert again.loaded is not None
    assert again.loaded.record == loaded.record  # untouched by the retransmission
