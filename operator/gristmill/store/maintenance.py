"""Partition upkeep and retention: day partitions created ahead, old ones dropped, finished
flow runs past retention deleted. The job history, the logs and the audit trail are kept
the same way and for the same time."""

from __future__ import annotations

import datetime as dt

import psycopg

from gristmill.store import queries

PARTITIONED_TABLES = ("job_history", "job_logs", "audit")


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


async def purge_default_partitions(conn: psycopg.AsyncConnection, cutoff: dt.datetime) -> None:
    await conn.execute(queries.PURGE_DEFAULT_HISTORY, [cutoff])
    await conn.execute(queries.PURGE_DEFAULT_LOGS, [cutoff])
    await conn.execute(queries.PURGE_DEFAULT_AUDIT, [cutoff])


async def delete_expired_flow_runs(conn: psycopg.AsyncConnection, cutoff: dt.datetime,
                                   batch: int = 1000) -> int:
    """Delete finished flow runs that ended before `cutoff`, a batch per statement so that
    no statement runs long; return how many top-level runs went."""
    deleted = 0
    while True:
        cur = await conn.execute(queries.DELETE_EXPIRED_FLOW_RUNS, [cutoff, batch])
        deleted += cur.rowcount
        if cur.rowcount < batch:
            return deleted


async def oldest_history_day(conn: psycopg.AsyncConnection) -> dt.date | None:
    cur = await conn.execute(queries.OLDEST_HISTORY_PARTITION)
    return (await cur.fetchone())[0]


async def try_housekeeping_lock(conn: psycopg.AsyncConnection) -> bool:
    cur = await conn.execute(queries.TRY_HOUSEKEEPING_LOCK)
    return (await cur.fetchone())[0]


async def release_housekeeping_lock(conn: psycopg.AsyncConnection) -> None:
    await conn.execute(queries.RELEASE_HOUSEKEEPING_LOCK)
