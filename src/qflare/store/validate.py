"""Argument checks every backend runs before it touches SQL.

Checking at the boundary means a bad call fails the same way on SQLite and PostgreSQL, with a
typed error, before a transaction starts: nothing half-written, and no driver error text (which
can quote the value) reaching a log. Size limits keep one request from writing megabytes of
attacker-chosen text into a row.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, TypeVar

from qflare.store.errors import InvalidIdentifier, InvalidInput
from qflare.store.models import JsonObject

_IDENT: Final = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
INT64_MAX: Final = 2**63 - 1
MAX_NAME: Final = 256
MAX_TEXT: Final = 4096
# Classic McEliece public keys are about 1 MB; nothing the store holds is legitimately larger.
MAX_BLOB: Final = 2 * 1024 * 1024
MAX_DETAIL: Final = 64 * 1024

E = TypeVar("E", bound=StrEnum)


def identifier(value: object, what: str) -> str:
    # The same rule as the wire codec: ids end up in URLs, log lines and file names.
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise InvalidIdentifier(f"{what} must be 1..64 characters of [A-Za-z0-9._-]")
    return value


def optional_identifier(value: object, what: str) -> str | None:
    return None if value is None else identifier(value, what)


def text(value: object, what: str, max_len: int = MAX_NAME, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    if not (0 if allow_empty else 1) <= len(value) <= max_len:
        raise InvalidInput(f"{what} must be {0 if allow_empty else 1}..{max_len} characters")
    # NUL is refused by PostgreSQL text but stored by SQLite: refuse it here so both agree.
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL")
    return value


def optional_text(value: object, what: str, max_len: int = MAX_NAME) -> str | None:
    return None if value is None else text(value, what, max_len)


def blob(value: object, what: str, *, min_len: int = 1, max_len: int = MAX_BLOB) -> bytes:
    # bytes only: a str here is a caller that forgot to encode (or decrypt) something.
    if type(value) is not bytes:
        raise InvalidInput(f"{what} must be bytes")
    if not min_len <= len(value) <= max_len:
        raise InvalidInput(f"{what} must be {min_len}..{max_len} bytes")
    return value


def optional_blob(value: object, what: str, *, min_len: int = 1) -> bytes | None:
    return None if value is None else blob(value, what, min_len=min_len)


def integer(value: object, what: str, lo: int = 0, hi: int = INT64_MAX) -> int:
    # bool is an int subclass; True as a version number is a bug, not a 1.
    if type(value) is not int:
        raise InvalidInput(f"{what} must be an integer")
    if not lo <= value <= hi:
        raise InvalidInput(f"{what} must be in {lo}..{hi}")
    return value


def optional_integer(value: object, what: str, lo: int = 0, hi: int = INT64_MAX) -> int | None:
    return None if value is None else integer(value, what, lo, hi)


def timestamp(value: object, what: str) -> datetime:
    # A naive datetime means "local time somewhere": refuse it rather than guess the zone.
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidInput(f"{what} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def optional_timestamp(value: object, what: str) -> datetime | None:
    return None if value is None else timestamp(value, what)


def member(enum: type[E], value: object, what: str) -> E:
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum(value)
        except ValueError:
            pass
    raise InvalidInput(f"{what} must be one of {', '.join(m.value for m in enum)}")


def optional_member(enum: type[E], value: object, what: str) -> E | None:
    return None if value is None else member(enum, value, what)


def limit(value: object, what: str = "limit") -> int:
    return integer(value, what, 1, 10_000)


def json_object(value: object, what: str) -> str:
    """The canonical JSON text of a mapping, checked for size."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    try:
        encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} must hold only JSON values") from None
    if len(encoded) > MAX_DETAIL or "\\u0000" in encoded:
        raise InvalidInput(f"{what} must be at most {MAX_DETAIL} bytes of JSON without NUL")
    return encoded


def parse_json_object(encoded: str) -> JsonObject:
    loaded = json.loads(encoded)
    if not isinstance(loaded, dict):  # only this module writes the column
        raise InvalidInput("stored detail is not a JSON object")
    return loaded


def scopes(value: object) -> tuple[str, ...]:
    # Stored as one space-separated string (as OAuth does), so each scope must be an identifier.
    if isinstance(value, str) or not isinstance(value, list | tuple | frozenset | set):
        raise InvalidInput("scopes must be a collection of strings")
    checked = sorted({identifier(s, "scope") for s in value})
    if len(checked) > 64:
        raise InvalidInput("at most 64 scopes")
    return tuple(checked)
