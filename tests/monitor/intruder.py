"""Someone who edits the audit table behind QFLARE's back, for the tamper tests.

On PostgreSQL that is the superuser (the test cluster's ``postgres``): it disables the
append-only trigger with ``ALTER TABLE ... DISABLE TRIGGER``, as only a superuser or the owner
can, and enables it again afterwards. On SQLite it is whoever can write the database file: it
opens the file with the ``sqlite3`` module and drops the two append-only triggers (the schema
comment says as much: anyone holding the file can rewrite it).

Times are handled as microseconds since the epoch on both backends.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from qflare.monitor.audit import micros

COLUMNS = ("idx", "ts", "kind", "payload", "leaf_hash")
_FAR = 1_000_000_000  # shifting through a range no real index reaches avoids key clashes


def from_micros(value: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)


class Intruder:
    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.sqlite = database_url.startswith("sqlite:")
        self._db: sqlite3.Connection | None = None
        self._pg: Any = None

    async def __aenter__(self) -> Self:
        if self.sqlite:
            self._db = sqlite3.connect(urlsplit(self.url).path, isolation_level=None)
            self._db.execute("DROP TRIGGER IF EXISTS audit_entries_no_update")
            self._db.execute("DROP TRIGGER IF EXISTS audit_entries_no_delete")
        else:
            parts = urlsplit(self.url)
            schema = parse_qs(parts.query)["schema"][0]
            base = urlunsplit(parts._replace(query=""))
            self._pg = await asyncpg.connect(base, server_settings={"search_path": schema})
            await self._pg.execute(
                "ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_no_change"
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._db is not None:
            self._db.close()
        if self._pg is not None:
            await self._pg.execute(
                "ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_no_change"
            )
            await self._pg.close()

    async def _run(self, sql: str, *args: Any) -> None:
        if self._db is not None:
            self._db.execute(sql.replace("$", "?"), args)
        else:
            await self._pg.execute(sql, *args)

    def _ts(self, value: int) -> Any:
        return value if self.sqlite else from_micros(value)

    async def rows(self) -> list[dict[str, Any]]:
        sql = "SELECT idx, ts, kind, payload, leaf_hash FROM audit_entries ORDER BY idx"
        if self._db is not None:
            found = [dict(zip(COLUMNS, r, strict=True)) for r in self._db.execute(sql)]
        else:
            found = [dict(r) for r in await self._pg.fetch(sql)]
            for row in found:
                row["ts"] = micros(row["ts"])
        for row in found:
            row["payload"], row["leaf_hash"] = bytes(row["payload"]), bytes(row["leaf_hash"])
        return found

    async def update(self, idx: int, **columns: Any) -> None:
        for name, given in columns.items():
            assert name in COLUMNS
            value = self._ts(given) if name == "ts" else given
            await self._run(f"UPDATE audit_entries SET {name} = $1 WHERE idx = $2", value, idx)

    async def delete(self, idx: int) -> None:
        await self._run("DELETE FROM audit_entries WHERE idx = $1", idx)

    async def shift(self, first: int, by: int) -> None:
        """Move every row from index ``first`` on by ``by`` places."""
        await self._run("UPDATE audit_entries SET idx = idx + $1 WHERE idx >= $2", _FAR, first)
        await self._run("UPDATE audit_entries SET idx = idx - $1 WHERE idx >= $2", _FAR - by, _FAR)

    async def insert(self, idx: int, ts: int, kind: str, payload: bytes, leaf: bytes) -> None:
        await self._run(
            "INSERT INTO audit_entries (idx, ts, kind, payload, leaf_hash) "
            "VALUES ($1, $2, $3, $4, $5)",
            idx,
            self._ts(ts),
            kind,
            payload,
            leaf,
        )

    async def deny_appends(self) -> None:
        """Make every INSERT into the audit table fail, as a full disk or a lost grant would."""
        if self._db is not None:
            self._db.execute(
                "CREATE TRIGGER deny_audit BEFORE INSERT ON audit_entries "
                "BEGIN SELECT RAISE(ABORT, 'audit denied'); END"
            )
        else:
            await self._pg.execute(
                "CREATE FUNCTION deny_audit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'audit denied'; END $$"
            )
            await self._pg.execute(
                "CREATE TRIGGER deny_audit BEFORE INSERT ON audit_entries "
                "FOR EACH ROW EXECUTE FUNCTION deny_audit()"
            )

    async def allow_appends(self) -> None:
        if self._db is not None:
            self._db.execute("DROP TRIGGER deny_audit")
        else:
            await self._pg.execute("DROP TRIGGER deny_audit ON audit_entries")
            await self._pg.execute("DROP FUNCTION deny_audit()")
