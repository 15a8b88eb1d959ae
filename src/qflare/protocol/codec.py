"""Canonical binary encoding (docs/PROTOCOL.md section 2).

Integers are big-endian and fixed-width. Variable-length byte strings carry a length prefix
whose width is part of the field's definition. A reader accepts exactly one encoding of each
value: any leftover byte, short field or out-of-range length is a ``DecodeError``. That matters
because these bytes are signed and MACed: two encodings of one message would let an attacker
change the bytes without changing the meaning, or the reverse.
"""

from __future__ import annotations

import re
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


class Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError("message must be bytes")
        self._data = bytes(data)
        self._pos = 0

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise DecodeError("message truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def opaque8(self, *, min_len: int = 0, max_len: int = 0xFF) -> bytes:
        return self._bounded(self.u8(), min_len, max_len)

    def opaque32(self, *, min_len: int = 0, max_len: int) -> bytes:
        return self._bounded(self.u32(), min_len, max_len)

    def _bounded(self, n: int, min_len: int, max_len: int) -> bytes:
        if not min_len <= n <= max_len:
            raise DecodeError(f"field length {n} outside {min_len}..{max_len}")
        return self._take(n)

    def ident(self, what: str) -> str:
        raw = self.opaque8(min_len=1, max_len=64)
        if not _IDENT.fullmatch(raw):
            raise DecodeError(f"{what} has characters outside [A-Za-z0-9._-]")
        return raw.decode("ascii")

    @property
    def position(self) -> int:
        return self._pos

    def done(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError(f"{len(self._data) - self._pos} trailing bytes")
