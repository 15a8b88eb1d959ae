"""Canonical binary encoding (docs/PROTOCOL.md section 2).

Integers are big-endian and fixed-width. Variable-length byte strings carry a length prefix
whose width is part of the field's definition. A reader accepts exactly one encoding of each
value: any leftover byte, short field or out-of-range length is a ``DecodeError``. That matters
because these bytes are signed and MACed: two encodings of one message would let an attacker
change the bytes without changing the meaning, or the reverse.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from qflare.errors import DecodeError

PROTOCOL_VERSION: Final = 1

# Identifiers travel in signed messages and end up in logs and SQL parameters: a narrow
# alphabet keeps them printable and unambiguous.
_IDENT = re.compile(rb"[A-Za-z0-9._-]{1,64}")


def check_identifier(value: str, what: str) -> str:
    if not isinstance(value, str) or not _IDENT.fullmatch(value.encode("ascii", "replace")):
        raise ValueError(f"{what} must be 1..64 characters of [A-Za-z0-9._-]")
    return value


def ident_from_bytes(raw: bytes, what: str) -> str:
    """An identifier read off the wire (its length already checked to be 1..64)."""
    if not _IDENT.fullmatch(raw):
        raise DecodeError(f"{what} has characters outside [A-Za-z0-9._-]")
    return raw.decode("ascii")


class Writer:
    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(value.to_bytes(1, "big"))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(value.to_bytes(2, "big"))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(value.to_bytes(4, "big"))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(value.to_bytes(8, "big"))
        return self

    def fixed(self, data: bytes, size: int) -> Writer:
        if len(data) != size:
            raise ValueError(f"field must be {size} bytes, got {len(data)}")
        self._parts.append(bytes(data))
        return self

    def opaque8(self, data: bytes) -> Writer:
        if len(data) > 0xFF:
            raise ValueError("opaque8 field longer than 255 bytes")
        self._parts.append(len(data).to_bytes(1, "big") + data)
        return self

    def opaque32(self, data: bytes) -> Writer:
        self._parts.append(len(data).to_bytes(4, "big") + data)
        return self

    def ident(self, value: str) -> Writer:
        return self.opaque8(value.encode("ascii"))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


_U16: Final = struct.Struct(">H").unpack_from
_U32: Final = struct.Struct(">I").unpack_from
_U64: Final = struct.Struct(">Q").unpack_from


class Reader:
    """Reads one canonical message front to back; any short field is a ``DecodeError``.

    The methods are written out flat (no helper calls per field): decoding a ClientHello is on
    the server's critical path.
    """

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError("message must be bytes")
        self._data = bytes(data)
        self._end = len(self._data)
        self._pos = 0

    def _take(self, n: int) -> bytes:
        start = self._pos
        end = start + n
        if end > self._end:
            raise DecodeError("message truncated")
        self._pos = end
        return self._data[start:end]

    def u8(self) -> int:
        pos = self._pos
        if pos >= self._end:
            raise DecodeError("message truncated")
        self._pos = pos + 1
        return self._data[pos]

    def u16(self) -> int:
        pos = self._pos
        if pos + 2 > self._end:
            raise DecodeError("message truncated")
        self._pos = pos + 2
        value: int = _U16(self._data, pos)[0]
        return value

    def u16s(self, count: int) -> tuple[int, ...]:
        """``count`` consecutive u16 values."""
        pos = self._pos
        if pos + 2 * count > self._end:
            raise DecodeError("message truncated")
        self._pos = pos + 2 * count
        values: tuple[int, ...] = struct.unpack_from(f">{count}H", self._data, pos)
        return values

    def u32(self) -> int:
        pos = self._pos
        if pos + 4 > self._end:
            raise DecodeError("message truncated")
        self._pos = pos + 4
        value: int = _U32(self._data, pos)[0]
        return value

    def u64(self) -> int:
        pos = self._pos
        if pos + 8 > self._end:
            raise DecodeError("message truncated")
        self._pos = pos + 8
        value: int = _U64(self._data, pos)[0]
        return value

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def opaque8(self, *, min_len: int = 0, max_len: int = 0xFF) -> bytes:
        pos = self._pos
        if pos >= self._end:
            raise DecodeError("message truncated")
        n = self._data[pos]
        return self._bounded(pos + 1, n, min_len, max_len)

    def opaque32(self, *, min_len: int = 0, max_len: int) -> bytes:
        pos = self._pos
        if pos + 4 > self._end:
            raise DecodeError("message truncated")
        n: int = _U32(self._data, pos)[0]
        return self._bounded(pos + 4, n, min_len, max_len)

    def _bounded(self, start: int, n: int, min_len: int, max_len: int) -> bytes:
        """The ``n`` bytes at ``start``, after a length prefix that ends there."""
        if not min_len <= n <= max_len:
            raise DecodeError(f"field length {n} outside {min_len}..{max_len}")
        end = start + n
        if end > self._end:
            raise DecodeError("message truncated")
        self._pos = end
        return self._data[start:end]

    def ident(self, what: str) -> str:
        pos = self._pos
        if pos >= self._end:
            raise DecodeError("message truncated")
        return ident_from_bytes(self._bounded(pos + 1, self._data[pos], 1, 64), what)

    @property
    def position(self) -> int:
        return self._pos

    def done(self) -> None:
        if self._pos != self._end:
            raise DecodeError(f"{self._end - self._pos} trailing bytes")
