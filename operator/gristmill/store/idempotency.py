"""Idempotency keys: the first response to a keyed submit, kept for KEY_LIFETIME so a
retry of the same request gets it back instead of starting a second run.

Use inside the transaction that does the work: `lock` the key, `find` a stored
response, else do the work and `record` its response; the commit makes the run and
the key visible together, so a crash leaves neither or both.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from gristmill.store import queries

KEY_LIFETIME = dt.timedelta(hours=24)


@dataclass(frozen=True)
class StoredResponse:
    fingerprint: str  # of the request that made it
    status: int
    body: dict[str, Any]


async def lock(conn: psycopg.AsyncConnection, namespace: str, route: str, key: str) -> bool:
    """Hold the key until the transaction ends; False when another transaction holds it
    (the same request, still being served)."""
    cur = await conn.execute(queries.LOCK_IDEMPOTENCY_KEY, [namespace, route, key])
    return (await cur.fetchone())[0]


async def find(conn: psycopg.AsyncConnection, namespace: str, route: str, key: str
               ) -> StoredResponse | None:
    """The response stored under a key younger than KEY_LIFETIME, or None."""
    cur = await conn.execute(queries.GET_IDEMPOTENCY_KEY, [namespace, route, key, KEY_LIFETIME])
    row = await cur.fetchone()
    return StoredResponse(fingerprint=row[0], status=row[1], body=row[2]) if row else None


async def lock_and_find(conn: psycopg.AsyncConnection, namespace: str, route: str, key: str
                        ) -> tuple[bool, StoredResponse | None]:
    """`lock`, then `find`: two statements (the second's snapshot is taken after the lock,
    so it sees what the key's last holder committed), sent together in a pipeline (one
    round trip). The stored response means nothing when the lock was not taken."""
    locked = await conn.execute(queries.LOCK_IDEMPOTENCY_KEY, [namespace, route, key])
    found = await conn.execute(queries.GET_IDEMPOTENCY_KEY,
                               [namespace, route, key, KEY_LIFETIME])
    (took,) = await locked.fetchone()
    row = await found.fetchone()
    stored = StoredResponse(fingerprint=row[0], status=row[1], body=row[2]) if row else None
    return took, stored


async def record(conn: psycopg.AsyncConnection, namespace: str, route: str, key: str,
                 response: StoredResponse) -> None:
    await conn.execute(queries.PUT_IDEMPOTENCY_KEY, [
        namespace, route, key, response.fingerprint, response.status, Jsonb(response.body)])


async def delete_expired(conn: psycopg.AsyncConnection,
                         lifetime: dt.timedelta = KEY_LIFETIME) -> int:
    """Delete keys older than `lifetime`; return how many (for the retention loop)."""
    cur = await conn.execute(queries.DELETE_EXPIRED_IDEMPOTENCY_KEYS, [lifetime])
    return cur.rowcount
