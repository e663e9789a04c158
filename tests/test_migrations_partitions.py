"""Migrations (idempotent, concurrent) and history partitions (rollover, retention)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import psycopg

from gristmill.store import maintenance, queue, workers
from gristmill.store.migrate import available_migrations, migrate, migrate_url


async def test_migrations_run_twice_and_concurrently(empty_database_url):
    results = await asyncio.gather(*(migrate_url(empty_database_url) for _ in range(4)))
    applied = [m.version for batch in results for m in batch]
    assert sorted(applied) == [m.version for m in available_migrations()]  # each exactly once
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        assert await migrate(conn) == []
        cur = await conn.execute("SELECT count(*) FROM schema_migrations")
        assert (await cur.fetchone())[0] == len(available_migrations())


async def _partition_of(db, job_id: uuid.UUID) -> str:
    cur = await db.execute("SELECT tableoid::regclass::text FROM job_history WHERE id = %s", [job_id])
    return (await cur.fetchone())[0]


async def test_finished_jobs_land_in_their_day_partition(db):
    await workers.register(db, "w", ["python"], 1)
    (job_id,) = await queue.enqueue(db, [queue.NewJob(namespace="default", tag="python", kind="noop")])
    async with db.transaction():
        (job,) = await queue.claim(db, "w", ["python"], 1)
        await queue.finish(db, "w", [queue.Outcome(job.id, job.attempt, "succeeded")])
    today = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
    assert await _partition_of(db, job_id) == f"job_history_p{today}"


async def test_rollover_creates_partitions_ahead_and_retention_drops_old_ones(db):
    created = await maintenance.ensure_partitions(db, days_ahead=10)
    assert created == 2 * 3  # days 8..10 ahead were new, for both tables
    assert await maintenance.ensure_partitions(db, days_ahead=10) == 0
    # A row finished 9 days from now goes to that day's partition, not the default one.
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=9)
    job_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO job_history (id, namespace, kind, tag, priority, status, input, attempts,"
        " created_at, finished_at) VALUES (%s, 'default', 'noop', 'python', 0, 'succeeded', '{}',"
        " 1, now(), %s)", [job_id, future])
    assert await _partition_of(db, job_id) == f"job_history_p{future:%Y%m%d}"
    # Ten days later, with seven days of retention, everything up to two days ahead goes.
    dropped = await maintenance.drop_expired_partitions(
        db, dt.timedelta(days=7), now=dt.datetime.now(dt.UTC) + dt.timedelta(days=10))
    today = dt.datetime.now(dt.UTC).date()
    expected_days = [today + dt.timedelta(days=d) for d in range(-1, 3)]
    assert dropped == [f"job_history_p{d:%Y%m%d}" for d in expected_days] + [
        f"job_logs_p{d:%Y%m%d}" for d in expected_days]
    assert await _partition_of(db, job_id) == f"job_history_p{future:%Y%m%d}"  # kept
