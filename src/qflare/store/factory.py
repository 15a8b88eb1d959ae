"""From a URL to a store, and the migration entry points the CLI calls.

* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (three slashes, then the
  path: the SQLAlchemy convention, which ``Settings.store_url`` follows).
* ``postgresql://user@host:5432/db?schema=qflare&role=qflare_app``. ``schema`` (default
  ``qflare``) and ``role`` (default ``qflare_app``; empty to use the login role as it is) are
  QFLARE's own options and are removed before the URL reaches asyncpg.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from qflare.store.base import Store
from qflare.store.errors import InvalidInput
from qflare.store.postgres import APP_ROLE, DEFAULT_SCHEMA, PostgresStore
from qflare.store.schema import Migration, MigrationStatus
from qflare.store.sqlite import SqliteStore

_OWN_OPTIONS = ("schema", "role")


def store_for_url(url: str) -> Store:
    """The store a URL names, not yet opened."""
    if not isinstance(url, str):
        raise InvalidInput("store URL must be a string")
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path or "?" in path:
            raise InvalidInput("sqlite URL must be sqlite:///path/to/file.db")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        own = {k: val for k, val in query if k in _OWN_OPTIONS}
        rest = urlencode([(k, val) for k, val in query if k not in _OWN_OPTIONS])
        dsn = urlunsplit(parts._replace(query=rest))
        role = own.get("role", APP_ROLE) or None
        return PostgresStore(dsn, schema=own.get("schema", DEFAULT_SCHEMA), role=role)
    raise InvalidInput("store URL must start with sqlite:/// or postgresql://")


async def open_store(url: str, *, migrate: bool = False) -> Store:
    """Open the store at ``url``; with ``migrate``, apply pending migrations first.

    Refuses (``SchemaNotCurrent``) a database whose schema is behind or ahead of this code.
    """
    store = store_for_url(url)
    if migrate:
        await _migrate(store, datetime.now(UTC))
    await store.open()
    return store


async def _migrate(store: Store, now: datetime) -> list[Migration]:
    migrator = store.migrator()
    try:
        return await migrator.apply_pending(now)
    finally:
        await migrator.close()


async def migrate(target: Store | str, *, now: datetime | None = None) -> list[Migration]:
    """Apply pending migrations (``qflare db migrate``); return the ones applied now."""
    store = store_for_url(target) if isinstance(target, str) else target
    return await _migrate(store, now or datetime.now(UTC))


async def status(target: Store | str) -> MigrationStatus:
    """Applied and pending migrations (``qflare db status``); changes nothing."""
    store = store_for_url(target) if isinstance(target, str) else target
    migrator = store.migrator()
    try:
        return await migrator.status()
    finally:
        await migrator.close()
