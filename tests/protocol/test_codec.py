"""The canonical encoding (docs/PROTOCOL.md section 2 and 5) and the saved-state codecs.

Properties: ``decode(encode(m)) == m`` and the bytes match the layout the spec writes down;
exactly one encoding is accepted, so every truncation, every extension, an unknown version or
type, an out-of-range length, a duplicate suite, a key share tagged with a suite not offered or
an identifier outside ``[A-Za-z0-9._-]{1,64}`` is a ``DecodeError`` (or a ``ValueError`` when
building the message). Decoding never raises anything but ``DecodeError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import string
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflare import crypto
from qflare.errors import DecodeError, ReplayDetected
from qflare.protocol import (
    ClientFinish,
    ClientHello,
    EpochKeySchedule,
    EpochReplayWindows,
    MessageType,
    ReplayWindow,
    ServerHello,
)
from qflare.protocol.messages import peek_type

from .support import (
    NOW,
    World,
    opaque32,
    u8,
    u16,
    u64,
    wire_client_finish,
    wire_client_hello,
    wire_server_hello,
)

HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

IDENT_ALPHABET = string.ascii_letters + string.digits + "._-"
idents = st.text(alphabet=IDENT_ALPHABET, min_size=1, max_size=64)
u8s = st.integers(0, 0xFF)
u16s = st.integers(0, 0xFFFF)
u64s = st.integers(0, 2**64 - 1)
blobs = st.binary(min_size=1, max_size=96)
macs = st.binary(min_size=32, max_size=64)


@st.composite
def client_hellos(draw: st.DrawFn) -> ClientHello:
    suites = draw(st.lists(u16s, min_size=1, max_size=16, unique=True))
    tags = draw(st.lists(st.sampled_from(suites), min_size=1, max_size=len(suites), unique=True))
    return ClientHello(
        device_id=draw(idents),
        server_key_id=draw(idents),
        suites=tuple(suites),
        timestamp=draw(u64s),
        nonce=draw(st.binary(min_size=32, max_size=32)),
        static_ciphertext=draw(blobs),
        key_shares=tuple((tag, draw(blobs)) for tag in tags),
        signature=draw(blobs),
    )


@st.composite
def server_hellos(draw: st.DrawFn) -> ServerHello:
    return ServerHello(
        session_id=draw(st.binary(min_size=16, max_size=16)),
        suite=draw(u16s),
        server_time=draw(u64s),
        epoch_seconds=draw(st.integers(1, 2**32 - 1)),
        ephemeral_ciphertext=draw(blobs),
        finished=draw(macs),
        biscuit=draw(st.binary(min_size=1, max_size=1024)),
    )


@st.composite
def client_finishes(draw: st.DrawFn) -> ClientFinish:
    return ClientFinish(
        session_id=draw(st.binary(min_size=16, max_size=16)),
        biscuit=draw(st.binary(min_size=1, max_size=1024)),
        finished=draw(macs),
    )


def _assert_every_prefix_and_extension_rejected(decode: Callable[[bytes], object], data: bytes):
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode(data[:n])
    for extra in (b"\x00", b"\x01", b"\x00" * 7, b"\xff" * 64, data):
        with pytest.raises(DecodeError):
            decode(data + extra)


# --- Round trips, against the layout written in the spec -----------------------------------


@HYPOTHESIS
@given(client_hellos())
def test_client_hello_round_trip_and_layout(msg: ClientHello) -> None:
    data = msg.encode()
    assert data == wire_client_hello(
        device_id=msg.device_id,
        server_key_id=msg.server_key_id,
        suites=msg.suites,
        timestamp=msg.timestamp,
        nonce=msg.nonce,
        static_ciphertext=msg.static_ciphertext,
        key_shares=msg.key_shares,
        signature=msg.signature,
    )
    assert ClientHello.decode(data) == msg
    # The signed part is the message minus exactly its trailing signature field.
    assert data == msg.signed_part() + opaque32(msg.signature)
    _assert_every_prefix_and_extension_rejected(ClientHello.decode, data)


@HYPOTHESIS
@given(server_hellos())
def test_server_hello_round_trip_and_layout(msg: ServerHello) -> None:
    data = msg.encode()
    assert data == wire_server_hello(
        session_id=msg.session_id,
        suite=msg.suite,
        server_time=msg.server_time,
        epoch_seconds=msg.epoch_seconds,
        ephemeral_ciphertext=msg.ephemeral_ciphertext,
        finished=msg.finished,
        biscuit=msg.biscuit,
    )
    assert ServerHello.decode(data) == msg
    # The core (what the Finished MAC covers) excludes exactly the MAC and the biscuit.
    assert data.startswith(msg.core())
    assert len(data) == len(msg.core()) + 1 + len(msg.finished) + 4 + len(msg.biscuit)
    _assert_every_prefix_and_extension_rejected(ServerHello.decode, data)


@HYPOTHESIS
@given(client_finishes())
def test_client_finish_round_trip_and_layout(msg: ClientFinish) -> None:
    data = msg.encode()
    assert data == wire_client_finish(
        session_id=msg.session_id, biscuit=msg.biscuit, finished=msg.finished
    )
    assert ClientFinish.decode(data) == msg
    _assert_every_prefix_and_extension_rejected(ClientFinish.decode, data)


@HYPOTHESIS
@given(
    kind=st.sampled_from([ClientHello, ServerHello, ClientFinish]),
    data=st.binary(max_size=200),
)
def test_decoding_arbitrary_bytes_raises_only_decode_error(kind: type, data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        kind.decode(data)


@HYPOTHESIS
@given(msg=client_hellos(), index=st.integers(0, 10_000), value=st.integers(0, 255))
def test_mutated_client_hello_raises_only_decode_error(msg: ClientHello, index: int, value: int):
    data = bytearray(msg.encode())
    data[index % len(data)] = value
    try:
        decoded = ClientHello.decode(bytes(data))
    except DecodeError:
        return
    # Anything that still decodes must re-encode to exactly the same bytes (canonical).
    assert decoded.encode() == bytes(data)


@HYPOTHESIS
@given(
    msg=st.one_of(client_hellos(), server_hellos(), client_finishes()),
    edits=st.lists(
        st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 10_000), u8s),
        min_size=1,
        max_size=3,
    ),
)
def test_edited_message_decodes_canonically_or_not_at_all(
    msg: ClientHello | ServerHello | ClientFinish, edits: list[tuple[str, int, int]]
) -> None:
    # Substitutions, insertions and deletions anywhere, in every message type: decoding either
    # refuses with DecodeError or yields a message that re-encodes to exactly these bytes.
    data = bytearray(msg.encode())
    for op, index, value in edits:
        at = index % (len(data) + 1)
        if op == "insert":
            data.insert(at, value)
        elif data:
            at %= len(data)
            if op == "set":
                data[at] = value
            else:
                del data[at]
    try:
        decoded = type(msg).decode(bytes(data))
    except DecodeError:
        return
    assert decoded.encode() == bytes(data)


# --- Real handshake messages: every truncation and extension --------------------------------


@pytest.fixture(scope="module")
def real_messages(world_factory: Callable[[bytes], World]) -> dict[str, bytes]:
    run = world_factory(b"codec/real-messages").run()
    return {
        "client_hello": run.client_hello,
        "server_hello": run.server_hello,
        "client_finish": run.client_finish,
    }


DECODERS = {
    "client_hello": ClientHello.decode,
    "server_hello": ServerHello.decode,
    "client_finish": ClientFinish.decode,
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_real_message_decodes_and_reencodes(real_messages: dict[str, bytes], name: str) -> None:
    data = real_messages[name]
    assert DECODERS[name](data).encode() == data  # type: ignore[attr-defined]
    # bytearray and memoryview are bytes too.
    assert DECODERS[name](bytearray(data)) == DECODERS[name](memoryview(data))


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_truncation_of_real_message_rejected(
    real_messages: dict[str, bytes], name: str
) -> None:
    data, decode = real_messages[name], DECODERS[name]
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode(data[:n])


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_extension_of_real_message_rejected(
    real_messages: dict[str, bytes], name: str
) -> None:
    data, decode = real_messages[name], DECODERS[name]
    for n in range(1, 65):
        for filler in (b"\x00", b"\xa5"):
            with pytest.raises(DecodeError):
                decode(data + filler * n)
    with pytest.raises(DecodeError):
        decode(data + data)


# --- Version, type ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("version", [0, 2, 0x81, 0xFF])
def test_unknown_version_rejected(real_messages: dict[str, bytes], name: str, version: int):
    data = bytes([version]) + real_messages[name][1:]
    with pytest.raises(DecodeError):
        DECODERS[name](data)
    with pytest.raises(DecodeError):
        peek_type(data)


@pytest.mark.parametrize(("name", "decoder"), list(itertools.permutations(DECODERS, 2)))
def test_message_of_another_type_rejected(
    real_messages: dict[str, bytes], name: str, decoder: str
) -> None:
    with pytest.raises(DecodeError):
        DECODERS[decoder](real_messages[name])


OWN_TYPE = {"client_hello": 1, "server_hello": 2, "client_finish": 3}


@pytest.mark.parametrize(
    ("name", "msg_type"),
    [(n, t) for n in DECODERS for t in (0, 1, 2, 3, 4, 0xFF) if t != OWN_TYPE[n]],
)
def test_wrong_type_byte_rejected(real_messages: dict[str, bytes], name: str, msg_type: int):
    with pytest.raises(DecodeError):
        DECODERS[name](real_messages[name][:1] + bytes([msg_type]) + real_messages[name][2:])


def test_peek_type(real_messages: dict[str, bytes]) -> None:
    assert peek_type(real_messages["client_hello"]) is MessageType.CLIENT_HELLO
    assert peek_type(real_messages["server_hello"]) is MessageType.SERVER_HELLO
    assert peek_type(real_messages["client_finish"]) is MessageType.CLIENT_FINISH
    for bad in (b"", b"\x01", b"\x02\x01", b"\x01\x00", b"\x01\x04", b"\x01\xff"):
        with pytest.raises(DecodeError):
            peek_type(bad)


@pytest.mark.parametrize("value", ["text", None, 12, [1, 2], object()])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_non_bytes_input_rejected(decoder: str, value: object) -> None:
    with pytest.raises(DecodeError):
        DECODERS[decoder](value)  # type: ignore[arg-type]


# --- Lengths and counts --------------------------------------------------------------------


def test_wire_builders_produce_valid_messages() -> None:
    # The baseline every negative case below departs from by one field: if this failed, the
    # negative cases would pass for the wrong reason.
    ClientHello.decode(wire_client_hello())
    ServerHello.decode(wire_server_hello())
    ClientFinish.decode(wire_client_finish())


MAX_FIELD = 65536

CLIENT_HELLO_BOUNDS: list[tuple[str, dict[str, object], bool]] = [
    ("suites 16", {"suites": tuple(range(1, 17)), "key_shares": ((1, b"k"),)}, True),
    ("suites 17", {"suites": tuple(range(1, 18)), "key_shares": ((1, b"k"),)}, False),
    ("suite count 0", {"suites": (), "suite_count": 0, "key_shares": ()}, False),
    ("suite count > given", {"suites": (0x0101,), "suite_count": 2}, False),
    ("static ct empty", {"static_ciphertext": b""}, False),
    ("static ct max", {"static_ciphertext": b"\x01" * MAX_FIELD}, True),
    ("static ct max+1", {"static_ciphertext": b"\x01" * (MAX_FIELD + 1)}, False),
    ("share empty", {"key_shares": ((0x0101, b""),)}, False),
    ("share max", {"key_shares": ((0x0101, b"\x02" * MAX_FIELD),)}, True),
    ("share max+1", {"key_shares": ((0x0101, b"\x02" * (MAX_FIELD + 1)),)}, False),
    ("share count 0", {"key_shares": (), "share_count": 0}, False),
    (
        "share count > suite count",
        {"suites": (0x0101,), "key_shares": ((0x0101, b"a"), (0x0101, b"b")), "share_count": 2},
        False,
    ),
    ("signature empty", {"signature": b""}, False),
    ("signature max+1", {"signature": b"\x03" * (MAX_FIELD + 1)}, False),
    ("device id 64", {"device_id": "d" * 64}, True),
    ("device id 65", {"device_id": "d" * 65}, False),
    ("device id empty", {"device_id": ""}, False),
    ("server key id 65", {"server_key_id": "k" * 65}, False),
    ("nonce short", {"nonce": bytes(31)}, False),
    ("timestamp max", {"timestamp": 2**64 - 1}, True),
]


@pytest.mark.parametrize(
    ("fields", "ok"), [c[1:] for c in CLIENT_HELLO_BOUNDS], ids=[c[0] for c in CLIENT_HELLO_BOUNDS]
)
def test_client_hello_length_bounds(fields: dict[str, object], ok: bool) -> None:
    data = wire_client_hello(**fields)  # type: ignore[arg-type]
    if ok:
        assert ClientHello.decode(data).encode() == data
    else:
        with pytest.raises(DecodeError):
            ClientHello.decode(data)


SERVER_HELLO_BOUNDS: list[tuple[str, dict[str, object], bool]] = [
    ("eph ct empty", {"ephemeral_ciphertext": b""}, False),
    ("eph ct max", {"ephemeral_ciphertext": b"\x04" * MAX_FIELD}, True),
    ("eph ct max+1", {"ephemeral_ciphertext": b"\x04" * (MAX_FIELD + 1)}, False),
    ("finished 31", {"finished": b"\x05" * 31}, False),
    ("finished 32", {"finished": b"\x05" * 32}, True),
    ("finished 65", {"finished": b"\x05" * 65}, False),
    ("finished empty", {"finished": b""}, False),
    ("biscuit empty", {"biscuit": b""}, False),
    ("biscuit 1024", {"biscuit": b"\x06" * 1024}, True),
    ("biscuit 1025", {"biscuit": b"\x06" * 1025}, False),
    ("epoch seconds 0", {"epoch_seconds": 0}, False),
    ("epoch seconds max", {"epoch_seconds": 2**32 - 1}, True),
    ("session id short", {"session_id": bytes(15)}, False),
]


@pytest.mark.parametrize(
    ("fields", "ok"), [c[1:] for c in SERVER_HELLO_BOUNDS], ids=[c[0] for c in SERVER_HELLO_BOUNDS]
)
def test_server_hello_length_bounds(fields: dict[str, object], ok: bool) -> None:
    data = wire_server_hello(**fields)  # type: ignore[arg-type]
    if ok:
        assert ServerHello.decode(data).encode() == data
    else:
        with pytest.raises(DecodeError):
            ServerHello.decode(data)


CLIENT_FINISH_BOUNDS: list[tuple[str, dict[str, object], bool]] = [
    ("biscuit empty", {"biscuit": b""}, False),
    ("biscuit 1024", {"biscuit": b"\x06" * 1024}, True),
    ("biscuit 1025", {"biscuit": b"\x06" * 1025}, False),
    ("finished 31", {"finished": b"\x05" * 31}, False),
    ("finished 64", {"finished": b"\x05" * 64}, True),
    ("finished 65", {"finished": b"\x05" * 65}, False),
    ("session id long", {"session_id": bytes(17)}, False),
]


@pytest.mark.parametrize(
    ("fields", "ok"),
    [c[1:] for c in CLIENT_FINISH_BOUNDS],
    ids=[c[0] for c in CLIENT_FINISH_BOUNDS],
)
def test_client_finish_length_bounds(fields: dict[str, object], ok: bool) -> None:
    data = wire_client_finish(**fields)  # type: ignore[arg-type]
    if ok:
        assert ClientFinish.decode(data).encode() == data
    else:
        with pytest.raises(DecodeError):
            ClientFinish.decode(data)


def test_length_prefix_beyond_the_message_rejected() -> None:
    # A u32 length of 4 GiB must fail on the bound, not try to read or allocate it.
    data = wire_server_hello()
    eph_len_at = 2 + 16 + 2 + 8 + 4
    forged = data[:eph_len_at] + b"\xff\xff\xff\xff" + data[eph_len_at + 4 :]
    with pytest.raises(DecodeError):
        ServerHello.decode(forged)


# --- Suites and key shares ----------------------------------------------------------------


SHARE_CASES: list[tuple[str, tuple[int, ...], tuple[tuple[int, bytes], ...]]] = [
    ("duplicate suite", (0x0101, 0x0101), ((0x0101, b"k"),)),
    ("duplicate suite, not adjacent", (0x0101, 0x0301, 0x0101), ((0x0101, b"k"),)),
    ("share tag not offered", (0x0101,), ((0x0102, b"k"),)),
    ("one of two tags not offered", (0x0101, 0x0301), ((0x0101, b"k"), (0x0201, b"k"))),
    ("duplicate share tag", (0x0101, 0x0301), ((0x0101, b"a"), (0x0101, b"b"))),
]


@pytest.mark.parametrize(
    ("suites", "shares"), [c[1:] for c in SHARE_CASES], ids=[c[0] for c in SHARE_CASES]
)
def test_bad_offer_rejected(suites: tuple[int, ...], shares: tuple[tuple[int, bytes], ...]):
    with pytest.raises(DecodeError):
        ClientHello.decode(wire_client_hello(suites=suites, key_shares=shares))
    with pytest.raises(ValueError):
        ClientHello(
            device_id="dev-a",
            server_key_id="srv-1",
            suites=suites,
            timestamp=NOW,
            nonce=bytes(32),
            static_ciphertext=b"ct",
            key_shares=shares,
        )


# --- Identifiers ----------------------------------------------------------------------------


BAD_IDS = [
    "dev'; DROP",
    "dev'; DROP TABLE devices;--",
    "d" * 65,
    "",
    "dév",
    "дев-1",
    "dev\u200b",
    "dev\n",
    "\ndev",
    "dev id",
    "dev/1",
    "dev:1",
    "dev\x00",
    "dev%00",
    "${jndi:x}",
]


def _hello_with(**overrides: object) -> ClientHello:
    fields: dict[str, object] = {
        "device_id": "dev-a",
        "server_key_id": "srv-1",
        "suites": (0x0101,),
        "timestamp": NOW,
        "nonce": bytes(32),
        "static_ciphertext": b"ct",
        "key_shares": ((0x0101, b"k"),),
        "signature": b"sig",
    }
    fields.update(overrides)
    return ClientHello(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
@pytest.mark.parametrize("field", ["device_id", "server_key_id"])
def test_bad_identifier_rejected(field: str, bad: str) -> None:
    with pytest.raises(ValueError):
        _hello_with(**{field: bad})
    with pytest.raises(DecodeError):
        ClientHello.decode(wire_client_hello(**{field: bad.encode("utf-8")}))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [b"dev\xff", b"dev\x80", b"\xc3\xa9", b"dev\x7f"], ids=repr)
def test_identifier_with_non_ascii_bytes_rejected(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        ClientHello.decode(wire_client_hello(device_id=bad))


@pytest.mark.parametrize("good", ["a", "d" * 64, IDENT_ALPHABET[:64], "dev-1.eu_west"])
def test_good_identifier_accepted(good: str) -> None:
    msg = _hello_with(device_id=good, server_key_id=good)
    assert ClientHello.decode(msg.encode()) == msg


# --- Construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"nonce": bytes(31)},
        {"nonce": bytes(33)},
        {"timestamp": -1},
        {"timestamp": 2**64},
        {"suites": ()},
        {"suites": tuple(range(17)), "key_shares": ((0, b"k"),)},
        {"key_shares": ()},
    ],
    ids=[
        "nonce 31",
        "nonce 33",
        "timestamp -1",
        "timestamp 2^64",
        "no suites",
        "17 suites",
        "no shares",
    ],
)
def test_client_hello_construction_validates(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _hello_with(**overrides)


def _server_hello_with(**overrides: object) -> ServerHello:
    fields: dict[str, object] = {
        "session_id": bytes(16),
        "suite": 0x0101,
        "server_time": NOW,
        "epoch_seconds": 300,
        "ephemeral_ciphertext": b"ct",
    }
    fields.update(overrides)
    return ServerHello(**fields)  # type: ignore[arg-type]


def _finish_with(**overrides: object) -> ClientFinish:
    fields: dict[str, object] = {"session_id": bytes(16), "biscuit": b"b", "finished": bytes(32)}
    fields.update(overrides)
    return ClientFinish(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {"session_id": bytes(15)},
        {"session_id": bytes(17)},
        {"epoch_seconds": 0},
        {"epoch_seconds": 2**32},
    ],
    ids=["session id 15", "session id 17", "epoch 0", "epoch 2^32"],
)
def test_server_hello_construction_validates(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _server_hello_with(**overrides)


@pytest.mark.parametrize("sid", [bytes(15), bytes(17), b""], ids=len)
def test_client_finish_construction_validates(sid: bytes) -> None:
    with pytest.raises(ValueError):
        _finish_with(session_id=sid)


# (id, builder, fields that override the builder's valid defaults)
UNENCODABLE: list[tuple[str, Callable[..., object], dict[str, object]]] = [
    (
        "ClientHello suite id 2^16",
        _hello_with,
        {"suites": (0x10000,), "key_shares": ((0x10000, b"k"),)},
    ),
    ("ClientHello suite id -1", _hello_with, {"suites": (-1,), "key_shares": ((-1, b"k"),)}),
    ("ClientHello second suite id 2^16", _hello_with, {"suites": (0x0101, 0x10000)}),
    ("ClientHello empty static ciphertext", _hello_with, {"static_ciphertext": b""}),
    (
        "ClientHello static ciphertext 2^16+1 bytes",
        _hello_with,
        {"static_ciphertext": bytes(65537)},
    ),
    ("ClientHello empty key share", _hello_with, {"key_shares": ((0x0101, b""),)}),
    ("ClientHello key share 2^16+1 bytes", _hello_with, {"key_shares": ((0x0101, bytes(65537)),)}),
    ("ClientHello signature 2^16+1 bytes", _hello_with, {"signature": bytes(65537)}),
    ("ClientHello timestamp not an int", _hello_with, {"timestamp": 1.5}),
    ("ServerHello suite id 2^16", _server_hello_with, {"suite": 0x10000}),
    ("ServerHello suite id -1", _server_hello_with, {"suite": -1}),
    ("ServerHello server_time 2^64", _server_hello_with, {"server_time": 2**64}),
    ("ServerHello server_time -1", _server_hello_with, {"server_time": -1}),
    ("ServerHello empty ephemeral ciphertext", _server_hello_with, {"ephemeral_ciphertext": b""}),
    ("ServerHello finished 31 bytes", _server_hello_with, {"finished": bytes(31), "biscuit": b"b"}),
    ("ServerHello finished 65 bytes", _server_hello_with, {"finished": bytes(65), "biscuit": b"b"}),
    (
        "ServerHello biscuit 1025 bytes",
        _server_hello_with,
        {"finished": bytes(32), "biscuit": bytes(1025)},
    ),
    ("ClientFinish empty biscuit and MAC", _finish_with, {"biscuit": b"", "finished": b""}),
    ("ClientFinish biscuit 1025 bytes", _finish_with, {"biscuit": bytes(1025)}),
    ("ClientFinish MAC 31 bytes", _finish_with, {"finished": bytes(31)}),
    ("ClientFinish MAC 65 bytes", _finish_with, {"finished": bytes(65)}),
]


@pytest.mark.parametrize(
    ("build", "overrides"), [c[1:] for c in UNENCODABLE], ids=[c[0] for c in UNENCODABLE]
)
def test_construction_rejects_what_the_wire_cannot_carry(
    build: Callable[..., object], overrides: dict[str, object]
) -> None:
    # The module promises self-validating messages whose encode() and decode() are inverses:
    # a value the wire cannot carry must be refused when the message is built.
    with pytest.raises(ValueError):
        build(**overrides)


def test_unsigned_or_unfinished_messages_build_but_do_not_encode() -> None:
    # The signed part and the core are computed before the signature and the Finished MAC
    # exist, so the empty value is allowed when building; encoding it would produce bytes that
    # decode() refuses, so encode() refuses first.
    hello = _hello_with(signature=b"")
    assert hello.signed_part()
    with pytest.raises(ValueError):
        hello.encode()
    core = _server_hello_with()
    assert core.core()
    for unfinished in (
        core,
        dataclasses.replace(core, finished=bytes(32)),
        dataclasses.replace(core, biscuit=b"b"),
    ):
        with pytest.raises(ValueError):
            unfinished.encode()
    done = dataclasses.replace(core, finished=bytes(32), biscuit=b"b")
    assert ServerHello.decode(done.encode()) == done


# --- Saved state: replay windows ------------------------------------------------------------


class WindowModel:
    """The replay window as the spec states it (RFC 4303 3.4.3 with a 256-entry window)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def accepts(self, seq: int) -> bool:
        if not self.seen or seq > max(self.seen):
            return True
        return max(self.seen) - seq < 256 and seq not in self.seen


seqs = st.one_of(st.integers(0, 600), st.integers(0, 2**64 - 1), st.just(2**64 - 1))


@HYPOTHESIS
@given(st.lists(st.integers(0, 1200), max_size=120))
def test_replay_window_matches_the_model(ops: list[int]) -> None:
    window, model = ReplayWindow(), WindowModel()
    for seq in ops:
        expected = model.accepts(seq)
        try:
            window.check(seq)
            checked = True
        except ReplayDetected:
            checked = False
        assert checked == expected, seq
        try:
            window.accept(seq)
            accepted = True
        except ReplayDetected:
            accepted = False
        assert accepted == expected, seq
        if expected:
            model.seen.add(seq)


@HYPOTHESIS
@given(
    st.dictionaries(st.integers(0, 2**64 - 1), st.lists(seqs, max_size=40), max_size=4),
    st.lists(seqs, max_size=30),
)
def test_replay_windows_export_restore_round_trip(
    accepted: dict[int, list[int]], probes: list[int]
) -> None:
    windows = EpochReplayWindows()
    for epoch, numbers in accepted.items():
        for seq in numbers:
            with contextlib.suppress(ReplayDetected):
                windows.window(epoch).accept(seq)
    data = windows.export()
    restored = EpochReplayWindows.restore(data)
    assert restored.export() == data
    for epoch, numbers in accepted.items():
        for seq in [*numbers, *probes]:
            results = []
            for w in (windows.window(epoch), restored.window(epoch)):
                try:
                    w.check(seq)
                    results.append(True)
                except ReplayDetected:
                    results.append(False)
            assert results[0] == results[1], (epoch, seq)


def test_replay_windows_restore_rejects_bad_state() -> None:
    windows = EpochReplayWindows()
    windows.window(7).accept(3)
    windows.window(8).accept(300)
    data = windows.export()
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            EpochReplayWindows.restore(data[:n])
    with pytest.raises(DecodeError):
        EpochReplayWindows.restore(data + b"\x00")
    bitmap = (1).to_bytes(32, "big")
    entry = u64(7) + u64(4) + bitmap
    EpochReplayWindows.restore(u8(1) + entry)  # the baseline is valid (format 1)
    with pytest.raises(DecodeError):
        EpochReplayWindows.restore(u8(2) + entry + entry)
    entry = u64(7) + u64(3) + bitmap
    EpochReplayWindows.restore(u8(0xFF) + u16(1) + entry)  # the baseline is valid (format 2)
    for bad in (
        u8(0xFF) + u16(2) + entry + entry,  # duplicate epoch
        u8(0xFF) + u16(2) + u64(8) + u64(3) + bitmap + entry,  # epochs not ascending
        u8(0xFF) + u16(1) + u64(7) + u64(3) + bytes(32),  # highest not marked as seen
        u8(0xFF) + u16(1) + u64(7) + u64(3) + (2).to_bytes(32, "big"),
        u8(1) + u64(7) + u64(0) + bitmap,  # format 1: an empty window with bits set
        u8(1) + u64(7) + u64(4) + bytes(32),  # format 1: highest not marked as seen
    ):
        with pytest.raises(DecodeError):
            EpochReplayWindows.restore(bad)


def test_replay_windows_export_layout() -> None:
    # Format 2 (PROTOCOL.md 8.3): u8 0xFF | u16 n | n x (u64 epoch | u64 highest | 32 bitmap).
    windows = EpochReplayWindows()
    windows.accept(9, 2**64 - 1)
    windows.accept(7, 3)
    windows.accept(7, 1)
    bitmap_7 = (0b101).to_bytes(32, "big")
    bitmap_9 = (1).to_bytes(32, "big")
    assert windows.export() == (
        u8(0xFF) + u16(2) + u64(7) + u64(3) + bitmap_7 + u64(9) + u64(2**64 - 1) + bitmap_9
    )
    assert EpochReplayWindows().export() == u8(0xFF) + u16(0)


def test_replay_windows_restore_reads_format_1() -> None:
    # What earlier versions saved: u8 n | n x (u64 epoch | u64 highest+1 | 32 bitmap), with
    # empty windows (highest+1 = 0) that an unauthenticated record could add.
    bitmap = (0b101).to_bytes(32, "big")
    old = u8(2) + u64(6) + u64(0) + bytes(32) + u64(7) + u64(4) + bitmap
    restored = EpochReplayWindows.restore(old)
    assert restored.epochs() == [7]  # the empty window of epoch 6 behaves as none
    for seq, replayed in [(3, True), (2, False), (1, True), (4, False), (0, False)]:
        if replayed:
            with pytest.raises(ReplayDetected):
                restored.check(7, seq)
        else:
            restored.check(7, seq)
    restored.check(6, 0)
    expected = EpochReplayWindows()
    expected.accept(7, 1)
    expected.accept(7, 3)
    assert restored.export() == expected.export()


def test_replay_state_of_format_1_with_255_windows_is_refused_not_misread() -> None:
    # Its count byte equals the format-2 marker (PROTOCOL.md 8.3).
    bitmap = (1).to_bytes(32, "big")
    old = u8(255) + b"".join(u64(NOW // 300 + i) + u64(4) + bitmap for i in range(255))
    with pytest.raises(DecodeError):
        EpochReplayWindows.restore(old)


def test_checking_a_replay_window_creates_none() -> None:
    windows = EpochReplayWindows()
    windows.check(5, 0)
    assert windows.epochs() == []
    windows.accept(5, 0)
    assert windows.epochs() == [5]
    with pytest.raises(ReplayDetected):
        windows.check(5, 0)
    with pytest.raises(ReplayDetected):
        windows.accept(5, 0)


# --- Saved state: epoch key schedule ------------------------------------------------------


KDF = crypto.kdf("HKDF-SHA3-512")


@HYPOTHESIS
@given(
    secret=st.binary(min_size=32, max_size=32),
    session_id=st.binary(min_size=16, max_size=16),
    grace=st.integers(0, 4),
    start=st.integers(0, 2**40),
    steps=st.integers(0, 7),
)
def test_epoch_schedule_export_restore_round_trip(
    secret: bytes, session_id: bytes, grace: int, start: int, steps: int
) -> None:
    sched = EpochKeySchedule.start(KDF, secret, session_id, start, grace)
    sched.advance_to(start + steps)
    data = sched.export()
    restored = EpochKeySchedule.restore(KDF, session_id, data)
    assert restored.export() == data
    assert restored.grace == grace
    assert restored.retained() == sched.retained()
    assert len(sched.retained()) == min(grace, steps) + 1
    for epoch in [*sched.retained(), sched.newest + 2]:
        for direction in (0, 1):
            assert restored.derive("encryption", direction, epoch) == sched.derive(
                "encryption", direction, epoch
            )
            assert restored.derive_iv("fl-update", direction, epoch) == sched.derive_iv(
                "fl-update", direction, epoch
            )


def _schedule_state(grace: int, epochs: list[int]) -> bytes:
    return u8(grace) + u8(len(epochs)) + b"".join(u64(e) + bytes([e % 251]) * 32 for e in epochs)


@pytest.mark.parametrize(
    ("grace", "epochs"),
    [(1, []), (0, [5, 6]), (1, [5, 7]), (2, [5, 5, 6]), (2, [5, 7, 8])],
    ids=["no keys", "more keys than grace allows", "gap", "duplicate", "gap of three"],
)
def test_epoch_schedule_restore_rejects_bad_state(grace: int, epochs: list[int]) -> None:
    with pytest.raises(DecodeError):
        EpochKeySchedule.restore(KDF, bytes(16), _schedule_state(grace, epochs))


def test_epoch_schedule_restore_rejects_truncation_and_trailing_bytes() -> None:
    data = _schedule_state(1, [5, 6])
    EpochKeySchedule.restore(KDF, bytes(16), data)  # the baseline is valid
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            EpochKeySchedule.restore(KDF, bytes(16), data[:n])
    with pytest.raises(DecodeError):
        EpochKeySchedule.restore(KDF, bytes(16), data + b"\x00")


def test_epoch_schedule_export_layout() -> None:
    sched = EpochKeySchedule.start(KDF, bytes(32), bytes(16), 41, grace=1)
    sched.advance_to(42)
    data = sched.export()
    grace, n = struct.unpack_from(">BB", data)
    assert (grace, n) == (1, 2)
    assert [struct.unpack_from(">Q", data, 2 + 40 * i)[0] for i in range(n)] == [41, 42]
    assert len(data) == 2 + 40 * n


def test_dataclass_equality_is_over_all_fields() -> None:
    # The round-trip tests compare whole messages; make sure equality sees the secret-ish fields
    # that are hidden from repr.
    msg = _hello_with()
    assert msg != dataclasses.replace(msg, signature=b"other")
    assert msg != dataclasses.replace(msg, nonce=b"\x01" * 32)
