"""Child process for the crash-safety test: writes in a loop until it is killed.

Each line on stdout names something whose transaction has committed (the line is written only
after the store call returned). Each iteration makes changes that must be all-or-nothing:

* ``enrolled <device>``: token redeemed + device created + key version 1, one transaction;
* ``rotated <key>``: the old kem-static key demoted and the new one inserted, one transaction;
* ``audit <idx>``: one append at the next dense index;
* ``session <version>``: an optimistic update that sets ``messages_sent = version``.

The parent SIGKILLs this process mid-loop and then checks that every reported row is there and
that no transaction is visible in part.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta

from qflare.store import KeyPurpose, SessionCounters, open_store

TENANT = "crash"
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(url: str, start: int) -> None:
    store = await open_store(url)
    session_id = b"S" * 16
    current = await store.get_session(TENANT, session_id)
    version = current.version
    i = start
    while True:
        digest = i.to_bytes(4, "big") * 8
        await store.create_token(
            TENANT, token_id=f"t{i}", token_hash=digest, now=NOW, expires_at=NOW + timedelta(1)
        )
        await store.enroll_device(
            TENANT,
            digest,
            now=NOW,
            device_id=f"dev-{i}",
            algorithm="ML-DSA-44",
            public_key=b"pk-%d" % i,
        )
        report(f"enrolled dev-{i}")
        await store.rotate_server_key(
            TENANT,
            key_id=f"k{i}",
            purpose=KeyPurpose.KEM_STATIC,
            algorithm="ML-KEM-1024+X25519",
            public_key=b"pub-%d" % i,
            encrypted_private=b"sealed-%d" % i,
            now=NOW,
            previous_retire_after=NOW + timedelta(days=7),
        )
        report(f"rotated k{i}")
        entry = await store.append_audit(ts=NOW, kind="test", payload=b"%d" % i, leaf_hash=digest)
        report(f"audit {entry.idx}")
        updated = await store.update_session(
            TENANT,
            session_id,
            expected_version=version,
            now=NOW,
            epoch=i,
            counters=SessionCounters(messages_sent=version + 1),
        )
        version = updated.version
        report(f"session {version}")
        i += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
