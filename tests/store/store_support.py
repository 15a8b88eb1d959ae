"""Constants and helpers shared by the store tests (a module, since tests/ has no packages)."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def with_query(url: str, **params: str) -> str:
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


def schema_of(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["schema"]


def without_query(url: str) -> str:
    return url.partition("?")[0]
