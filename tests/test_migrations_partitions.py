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
    tables = maintenance.PARTITIONED_TABLES
    assert tables == ("job_history", "job_logs", "audit")
    assert created == len(tables) * 3  # days 8..10 ahead were new, for every table
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
    assert dropped == [f"{table}_p{d:%Y%m%d}" for table in tables for d in expected_days]
    assert await _partition_of(db, job_id) == f"job_history_p{future:%Y%m%d}"  # kept


async def _finished_flow_run(db, finished_at: dt.datetime, parent: uuid.UUID | None = None
                             ) -> uuid.UUID:
    run_id = uuid.uuid4()
    await db.execute("INSERT INTO flow_versions (hash, spec) VALUES ('v', '{}') "
                     "ON CONFLICT DO NOTHING")
    await db.execute(
        "INSERT INTO flow_runs (id, namespace, flow_name, flow_hash, status, input, pins,"
        " parent_run_id, finished_at) VALUES (%s, 'default', 'f', 'v', 'succeeded', '{}', '{}',"
        " %s, %s)", [run_id, parent, finished_at])
    await db.execute("INSERT INTO flow_steps (run_id, path, step_id, status) "
                     "VALUES (%s, 'a', 'a', 'succeeded')", [run_id])
    return run_id


async def _exists(db, table: str, run_id: uuid.UUID) -> bool:
    column = "run_id" if table == "flow_steps" else "id"
    cur = await db.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", [run_id])
    return (await cur.fetchone())[0] > 0


async def test_housekeeping_keeps_the_retention_and_one_replica_works_at_a_time(
        db, database_url):
    from gristmill.housekeeping import OLDEST_KEPT, housekeep

    now = dt.datetime.now(dt.UTC)
    await db.execute("SELECT gristmill_ensure_partitions('job_history', 40, 0)")
    old_run = await _finished_flow_run(db, now - dt.timedelta(days=35))
    old_child = await _finished_flow_run(db, now - dt.timedelta(days=35), parent=old_run)
    recent_run = await _finished_flow_run(db, now - dt.timedelta(days=2))
    restarted = uuid.uuid4()  # a recent restart of the old run outlives it
    await db.execute(
        "INSERT INTO flow_runs (id, namespace, flow_name, flow_hash, status, input, pins,"
        " restarted_from) VALUES (%s, 'default', 'f', 'v', 'running', '{}', '{}', %s)",
        [restarted, old_run])

    # While another replica holds the lock, a round is skipped, not raced.
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as other:
        cur = await other.execute("SELECT pg_try_advisory_lock(x'6772686B'::int)")
        assert (await cur.fetchone())[0]
        assert await housekeep(db, dt.timedelta(days=30), now) is None
        await other.execute("SELECT pg_advisory_unlock(x'6772686B'::int)")
    done = await housekeep(db, dt.timedelta(days=30), now)

    cutoff = (now - dt.timedelta(days=30)).date()
    dropped_days = {dt.datetime.strptime(name[-8:], "%Y%m%d").date() for name in done.dropped}
    assert min(dropped_days) == (now - dt.timedelta(days=40)).date()
    assert max(dropped_days) == cutoff - dt.timedelta(days=1)
    assert done.oldest_kept == cutoff  # the day the cutoff falls in is kept whole
    assert OLDEST_KEPT._value.get() == dt.datetime.combine(cutoff, dt.time(),
                                                           dt.UTC).timestamp()
    assert done.flow_runs_deleted == 1
    assert done.idempotency_keys_deleted == 0  # their own expiry is tested with the API
    for run_id in (old_run, old_child):
        assert not await _exists(db, "flow_runs", run_id)
        assert not await _exists(db, "flow_steps", run_id)
    assert await _exists(db, "flow_runs", recent_run)
    cur = await db.execute("SELECT restarted_from FROM flow_runs WHERE id = %s", [restarted])
    assert (await cur.fetchone())[0] is None
    # Partitions for the coming week exist whatever the workers do.
    week = (now + dt.timedelta(days=7)).date()
    cur = await db.execute("SELECT to_regclass(%s)", [f"job_history_p{week:%Y%m%d}"])
    assert (await cur.fetchone())[0] is not None
