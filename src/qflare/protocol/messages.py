"""The three handshake messages and their canonical encoding (docs/PROTOCOL.md section 5).

Each message is a frozen dataclass that validates itself: building one with a value the wire
cannot carry, or that ``decode`` would reject, raises ``ValueError``. ``encode()`` and
``decode()`` are exact inverses; ``decode`` rejects trailing bytes, wrong lengths, unknown
versions and unknown message types with ``DecodeError``. An unsigned ClientHello and a
ServerHello without its Finished MAC and biscuit can be built (for ``signed_part()`` and
``core()``) but not encoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from qflare.errors import DecodeError
from qflare.protocol.codec import (
    PROTOCOL_VERSION,
    Reader,
    Writer,
    check_identifier,
)

NONCE_SIZE: Final = 32
SESSION_ID_SIZE: Final = 16
MAX_SUITES: Final = 16
# Largest field we accept: a Classic McEliece public key is ~1 MB, but it is never sent in a
# handshake; HQC-256 shares are ~14 kB. 64 kB bounds memory per message.
MAX_FIELD: Final = 65536
MIN_MAC: Final = 32
MAX_MAC: Final = 64
MAX_BISCUIT: Final = 1024
# ServerHello core up to the ephemeral ciphertext: version, type, session id, suite,
# server_time, epoch_seconds, ciphertext length.
_SERVER_HELLO_CORE: Final = struct.Struct(f">BB{SESSION_ID_SIZE}sHQII")


class MessageType(IntEnum):
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    CLIENT_FINISH = 3


def _header(w: Writer, kind: MessageType) -> Writer:
    return w.u8(PROTOCOL_VERSION).u8(kind)


def _read_header(r: Reader, kind: MessageType) -> None:
    version = r.u8()
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"unknown protocol version {version}")
    got = r.u8()
    if got != kind:
        raise DecodeError(f"expected message type {int(kind)}, got {got}")


def _is_u16(value: int) -> bool:
    return isinstance(value, int) and 0 <= value <= 0xFFFF


def _is_u64(value: int) -> bool:
    return isinstance(value, int) and 0 <= value < 2**64


def _check_field(value: bytes, what: str, min_len: int, max_len: int) -> None:
    """The same bounds ``decode`` enforces, so a built message always encodes and decodes."""
    if not isinstance(value, bytes):
        raise ValueError(f"{what} must be bytes")
    if not min_len <= len(value) <= max_len:
        raise ValueError(f"{what} length {len(value)} outside {min_len}..{max_len}")


def peek_type(data: bytes) -> MessageType:
    if len(data) < 2 or data[0] != PROTOCOL_VERSION:
        raise DecodeError("not a QFLARE v1 message")
    try:
        return MessageType(data[1])
    except ValueError:
        raise DecodeError(f"unknown message type {data[1]}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    device_id: str
    server_key_id: str
    suites: tuple[int, ...]
    timestamp: int
    nonce: bytes = field(repr=False)
    static_ciphertext: bytes = field(repr=False)
    # Ephemeral public keys, each tagged with an offered suite whose KEM it is for. One share
    # serves every offered suite with the same KEM.
    key_shares: tuple[tuple[int, bytes], ...] = field(repr=False)
    signature: bytes = field(repr=False, default=b"")

    def __post_init__(self) -> None:
        check_identifier(self.device_id, "device id")
        check_identifier(self.server_key_id, "server key id")
        suites = set(self.suites)
        if not 1 <= len(self.suites) <= MAX_SUITES or len(suites) != len(self.suites):
            raise ValueError("suites must be 1..16 distinct ids")
        if not all(_is_u16(s) for s in self.suites):
            raise ValueError("suite ids must be 0..65535")
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 32 bytes")
        if not _is_u64(self.timestamp):
            raise ValueError("timestamp out of range")
        _check_field(self.static_ciphertext, "static ciphertext", 1, MAX_FIELD)
        tags = [tag for tag, _ in self.key_shares]
        if not tags or len(set(tags)) != len(tags) or not set(tags) <= suites:
            raise ValueError("key shares must be tagged with distinct offered suites")
        for _, share in self.key_shares:
            _check_field(share, "key share", 1, MAX_FIELD)
        # Empty means "not signed yet": signed_part() works, encode() refuses.
        _check_field(self.signature, "signature", 0, MAX_FIELD)

    def signed_part(self) -> bytes:
        """Everything the device signs: the whole message up to the signature."""
        w = _header(Writer(), MessageType.CLIENT_HELLO)
        w.ident(self.device_id).ident(self.server_key_id)
        w.u8(len(self.suites))
        for suite_id in self.suites:
            w.u16(suite_id)
        w.u64(self.timestamp).fixed(self.nonce, NONCE_SIZE)
        w.opaque32(self.static_ciphertext)
        w.u8(len(self.key_shares))
        for tag, share in self.key_shares:
            w.u16(tag).opaque32(share)
        return w.getvalue()

    def encode(self) -> bytes:
        if not self.signature:
            raise ValueError("an unsigned ClientHello cannot be encoded: sign signed_part()")
        return self.signed_part() + Writer().opaque32(self.signature).getvalue()

    @classmethod
    def decode(cls, data: bytes) -> ClientHello:
        fields = _parse_client_hello(data)
        # The rules on values (distinct suites, shares tagged with offered suites) live in
        # __post_init__, once for built and decoded messages alike.
        try:
            return cls(**fields)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None


def _parse_client_hello(data: bytes) -> dict[str, Any]:
    """The fields of a ClientHello; the rules on values are ``ClientHello.__post_init__``'s."""
    r = Reader(data)
    _read_header(r, MessageType.CLIENT_HELLO)
    device_id = r.ident("device id")
    server_key_id = r.ident("server key id")
    n_suites = r.u8()
    if not 1 <= n_suites <= MAX_SUITES:
        raise DecodeError("suite count outside 1..16")
    suites = r.u16s(n_suites)
    timestamp = r.u64()
    nonce = r.fixed(NONCE_SIZE)
    static_ct = r.opaque32(min_len=1, max_len=MAX_FIELD)
    n_shares = r.u8()
    if not 1 <= n_shares <= n_suites:
        raise DecodeError("key share count outside 1..suite count")
    shares = tuple((r.u16(), r.opaque32(min_len=1, max_len=MAX_FIELD)) for _ in range(n_shares))
    signature = r.opaque32(min_len=1, max_len=MAX_FIELD)
    r.done()
    return {
        "device_id": device_id,
        "server_key_id": server_key_id,
        "suites": suites,
        "timestamp": timestamp,
        "nonce": nonce,
        "static_ciphertext": static_ct,
        "key_shares": shares,
        "signature": signature,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerHello:
    session_id: bytes
    suite: int
    server_time: int
    epoch_seconds: int
    ephemeral_ciphertext: bytes = field(repr=False)
    finished: bytes = field(repr=False, default=b"")
    # Opaque to the device and outside the transcript: its integrity is its own AEAD tag.
    biscuit: bytes = field(repr=False, default=b"")

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_SIZE:
            raise ValueError("session id must be 16 bytes")
        if not _is_u16(self.suite):
            raise ValueError("suite id must be 0..65535")
        if not _is_u64(self.server_time):
            raise ValueError("server_time out of range")
        if not 1 <= self.epoch_seconds < 2**32:
            raise ValueError("epoch_seconds out of range")
        _check_field(self.ephemeral_ciphertext, "ephemeral ciphertext", 1, MAX_FIELD)
        # Empty means "not finished yet": core() works, encode() refuses.
        if self.finished:
            _check_field(self.finished, "finished MAC", MIN_MAC, MAX_MAC)
        _check_field(self.biscuit, "biscuit", 0, MAX_BISCUIT)

    def core(self) -> bytes:
        """The transcript part that the server's Finished MAC covers."""
        # __post_init__ has checked every width, so one pack writes the fixed-size fields.
        fixed = _SERVER_HELLO_CORE.pack(
            PROTOCOL_VERSION,
            MessageType.SERVER_HELLO,
            self.session_id,
            self.suite,
            self.server_time,
            self.epoch_seconds,
            len(self.ephemeral_ciphertext),
        )
        return fixed + self.ephemeral_ciphertext

    def encode(self) -> bytes:
        if not self.finished or not self.biscuit:
            raise ValueError("a ServerHello without its Finished MAC and biscuit cannot be encoded")
        return b"".join(
            (
                self.core(),
                len(self.finished).to_bytes(1, "big"),
                self.finished,
                len(self.biscuit).to_bytes(4, "big"),
                self.biscuit,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> ServerHello:
        r = Reader(data)
        _read_header(r, MessageType.SERVER_HELLO)
        session_id = r.fixed(SESSION_ID_SIZE)
        suite = r.u16()
        server_time = r.u64()
        epoch_seconds = r.u32()
        if epoch_seconds == 0:
            raise DecodeError("epoch_seconds must be positive")
        eph_ct = r.opaque32(min_len=1, max_len=MAX_FIELD)
        finished = r.opaque8(min_len=MIN_MAC, max_len=MAX_MAC)
        biscuit = r.opaque32(min_len=1, max_len=MAX_BISCUIT)
        r.done()
        return cls(
            session_id=session_id,
            suite=suite,
            server_time=server_time,
            epoch_seconds=epoch_seconds,
            ephemeral_ciphertext=eph_ct,
            finished=finished,
            biscuit=biscuit,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientFinish:
    session_id: bytes
    biscuit: bytes = field(repr=False)
    finished: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_SIZE:
            raise ValueError("session id must be 16 bytes")
        _check_field(self.biscuit, "biscuit", 1, MAX_BISCUIT)
        _check_field(self.finished, "finished MAC", MIN_MAC, MAX_MAC)

    def encode(self) -> bytes:
        w = _header(Writer(), MessageType.CLIENT_FINISH)
        w.fixed(self.session_id, SESSION_ID_SIZE).opaque32(self.biscuit).opaque8(self.finished)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> ClientFinish:
        r = Reader(data)
        _read_header(r, MessageType.CLIENT_FINISH)
        session_id = r.fixed(SESSION_ID_SIZE)
        biscuit = r.opaque32(min_len=1, max_len=MAX_BISCUIT)
        finished = r.opaque8(min_len=MIN_MAC, max_len=MAX_MAC)
        r.done()
        return cls(session_id=session_id, biscuit=biscuit, finished=finished)
