"""Partition upkeep: day partitions created ahead, old ones dropped for retention."""

from __future__ import annotations

import datetime as dt

import psycopg

from gristmill.store import queries

PARTITIONED_TABLES = ("job_history", "job_logs")


async def ensure_partitions(conn: psycopg.AsyncConnection, days_ahead: int = 7) -> int:
    """Create the day partitions from yesterday to `days_ahead`; return how many were new."""
    created = 0
    for table in PARTITIONED_TABLES:
        cur = await conn.execute(queries.ENSURE_PARTITIONS, [table, 1, days_ahead])
        created += (await cur.fetchone())[0]
    return created


async def drop_expired_partitions(
    conn: psycopg.AsyncConnection, retention: dt.timedelta, now: dt.datetime | None = None
) -> list[str]:
    """Drop day partitions wholly older than `retention`; return their names."""
    now = now or dt.datetime.now(dt.UTC)
    cutoff = (now - retention).date()
    dropped = []
    for table in PARTITIONED_TABLES:
        cur = await conn.execute(queries.DROP_PARTITIONS_BEFORE, [table, cutoff])
        dropped += [row[0] for row in await cur.fetchall()]
    return dropped
