"""No database needed: URLs, argument checks, migration files and the public API."""

from __future__ import annotations

import re
import sqlite3
from importlib import resources
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qflare.store
from qflare.errors import Conflict, NotFound, StoreError, StoreUnavailable
from qflare.store import (
    InvalidIdentifier,
    InvalidInput,
    PostgresStore,
    SqliteStore,
    store_for_url,
)
from qflare.store import validate as v
from qflare.store.postgres import map_error as pg_map_error
from qflare.store.schema import load_migrations, split_statements


def test_sqlite_urls() -> None:
    absolute = store_for_url("sqlite:////var/lib/qflare/qflare.db")
    assert isinstance(absolute, SqliteStore)
    assert absolute.path == Path("/var/lib/qflare/qflare.db")
    relative = store_for_url("sqlite:///data/qflare.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == Path("data/qflare.db")


def test_postgres_urls_strip_qflare_options() -> None:
    store = store_for_url(
        "postgresql://app:s3cret@db.example:6543/prod?schema=tenant_x&role=&sslmode=require"
    )
    assert isinstance(store, PostgresStore)
    assert (store.schema, store.role) == ("tenant_x", None)
    assert store._dsn == "postgresql://app:s3cret@db.example:6543/prod?sslmode=require"
    assert "s3cret" not in repr(store)
    default = store_for_url("postgres://db/prod")
    assert isinstance(default, PostgresStore)
    assert (default.schema, default.role) == ("qflare", "qflare_app")


@pytest.mark.parametrize(
    "url",
    [
        "mysql://db/x",
        "sqlite://relative.db",
        "sqlite:///",
        "postgresql://db/x?schema=Bad-Name",
        "postgresql://db/x?schema=a;drop",
        "postgresql://db/x?role=a b",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(InvalidInput):
        store_for_url(url)


_IDENT = re.compile(r"[A-Za-z0-9._-]{1,64}")


@given(st.text(max_size=80))
def test_identifier_rule(value: str) -> None:
    if _IDENT.fullmatch(value):
        assert v.identifier(value, "id") == value
    else:
        with pytest.raises(InvalidIdentifier):
            v.identifier(value, "id")


@given(st.binary(max_size=40))
def test_blob_bounds(value: bytes) -> None:
    if 16 <= len(value) <= 32:
        assert v.blob(value, "b", min_len=16, max_len=32) == value
    else:
        with pytest.raises(InvalidInput):
            v.blob(value, "b", min_len=16, max_len=32)


def test_both_dialects_define_the_same_schema() -> None:
    def shape(dialect: str) -> tuple[list[tuple[int, str]], set[str], set[str]]:
        migrations = load_migrations(dialect)
        text = "\n".join(m.sql for m in migrations)
        tables = set(re.findall(r"CREATE TABLE (\w+)", text))
        indexes = set(re.findall(r"CREATE (?:UNIQUE )?INDEX (\w+)", text))
        return [(m.version, m.name) for m in migrations], tables, indexes

    assert shape("sqlite") == shape("postgres")
    versions, tables, _ = shape("sqlite")
    assert versions == [
        (1, "initial"),
        (2, "hot_paths"),
        (3, "handshake_paths"),
        (4, "handshake_finish"),
    ]
    assert len(tables) == 10


def test_migration_files_ship_with_the_package() -> None:
    for dialect in ("sqlite", "postgres"):
        folder = resources.files("qflare.store") / "migrations" / dialect
        assert (folder / "0001_initial.sql").is_file()
        assert (folder / "0002_hot_paths.sql").is_file()
        assert (folder / "0003_handshake_paths.sql").is_file()
        assert (folder / "0004_handshake_finish.sql").is_file()


def test_split_statements_keeps_trigger_bodies_whole() -> None:
    script = (
        "-- comment\nCREATE TABLE t (a INTEGER);\n"
        "CREATE TRIGGER x BEFORE DELETE ON t\nBEGIN\n    SELECT RAISE(ABORT, 'no');\nEND;\n"
    )
    statements = split_statements(script, sqlite3.complete_statement)
    assert len(statements) == 2
    assert statements[1].endswith("END;")


def test_public_api_is_explicit() -> None:
    exported = qflare.store.__all__
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(qflare.store, name), name
    # Every public class and function defined in the package is exported.
    defined = {
        name
        for name, obj in vars(qflare.store).items()
        if not name.startswith("_")
        and getattr(obj, "__module__", "").startswith("qflare.store.")
        and (isinstance(obj, type) or callable(obj))
    }
    assert defined <= set(exported), defined - set(exported)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (asyncpg.UniqueViolationError("dup"), Conflict),
        (asyncpg.ForeignKeyViolationError("fk"), NotFound),
        (asyncpg.CheckViolationError("check"), InvalidInput),
        (asyncpg.exceptions.DataError("bad argument"), InvalidInput),
        (asyncpg.InsufficientPrivilegeError("rls"), StoreError),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), StoreUnavailable),
        (asyncpg.exceptions.TooManyConnectionsError("full"), StoreUnavailable),
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), StoreUnavailable),
        (ConnectionRefusedError(), StoreUnavailable),
        (TimeoutError(), StoreUnavailable),
    ],
)
def test_postgres_errors_map_to_store_errors(exc: Exception, expected: type) -> None:
    mapped = pg_map_error(exc)
    assert type(mapped) is expected
    # The server's message text (which can quote a value) is not passed on.
    assert not str(exc) or str(exc) not in str(mapped)


def test_non_database_errors_are_not_mapped() -> None:
    assert pg_map_error(KeyError("x")) is None
