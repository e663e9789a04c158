"""The run listing over a long history: time of a page, first and deep, with its plan.

    python bench/run_listing.py [--rows 10000000] [--namespaces 10] [--audit-rows 1000000]

Loads --rows finished jobs into `job_history` (30 days of day partitions, half of them
flow step jobs as a busy installation has, the rest top-level Script runs: 94 %
succeeded, 5 % failed, 1 % cancelled, one in ten labelled), a flow run per 20 history
rows, 20,000 queued jobs and --audit-rows audit rows, all with generate_series in SQL.
The migration's indexes are dropped for the load and rebuilt from their own definitions
after it (what a restore does), and the load and the rebuild are timed. Then each
typical listing (store/run_listing.py's own SQL, as GET /namespaces/{ns}/runs sends it)
runs 20 times after a warm-up; the table gives p50 and max, and each plan is printed
with EXPLAIN (ANALYZE, BUFFERS). "Deep" pages follow the cursor 200 pages (10,000 runs)
in, and then to a run 20 days back. PostgreSQL 15, default (durable) settings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import time
import uuid

import psycopg
from common import percentile, throwaway_postgres

from gristmill.store import audit, run_listing
from gristmill.store.audit import AuditAction
from gristmill.store.pages import Before
from gristmill.store.run_listing import RunKind, RunQuery, RunStatus

DAYS = 30
REPEATS = 20

# The history: i-th row, created i/rows of the way through the last 30 days.
LOAD_HISTORY = """
INSERT INTO job_history (id, namespace, kind, script_name, script_hash, tag, priority, status,
                         input, result, error, attempts, worker_id, created_at, started_at,
                         finished_at, flow_run_id, step_path, labels)
SELECT gen_random_uuid(), 'team-' || (k %% %(namespaces)s), 'script',
       'script-' || (k / 16 %% 50), 'h', 'python', 0,
       CASE WHEN r < 0.94 THEN 'succeeded' WHEN r < 0.99 THEN 'failed' ELSE 'cancelled' END,
       jsonb_build_object('n', i), jsonb_build_object('ok', true),
       CASE WHEN r >= 0.94 AND r < 0.99
            THEN '{"kind": "error", "message": "boom"}'::jsonb END,
       1, 'w', t, t + interval '1 second', t + interval '2 seconds',
       CASE WHEN i %% 2 = 1 THEN gen_random_uuid() END,
       CASE WHEN i %% 2 = 1 THEN 'step' END,
       CASE WHEN k / 1000 %% 10 = 0 THEN jsonb_build_object('team', 't' || (k / 10000 %% 7))
            ELSE '{}'::jsonb END
FROM (SELECT i, random() AS r, (random() * 1e9)::int AS k,
             now() - make_interval(days => %(days)s) * (1 - i::float8 / %(rows)s)
             - interval '3 seconds' AS t
      FROM generate_series(1, %(rows)s) AS i) AS g
"""

LOAD_FLOW_RUNS = """
INSERT INTO flow_runs (id, namespace, flow_name, flow_hash, status, input, pins, created_at,
                       started_at, finished_at, labels)
SELECT gen_random_uuid(), 'team-' || (i %% %(namespaces)s), 'flow-' || (i %% 10), 'h',
       CASE WHEN i %% 100 < 95 THEN 'succeeded' ELSE 'failed' END, '{}', '{}', t, t,
       t + interval '5 seconds', '{}'
FROM generate_series(1, %(rows)s / 20) AS i,
     LATERAL (SELECT now() - make_interval(days => %(days)s) * (1 - i::float8 / (%(rows)s / 20))
                     - interval '10 seconds' AS t) AS at
"""

LOAD_QUEUED = """
INSERT INTO jobs (id, namespace, kind, script_name, script_hash, tag, created_at)
SELECT gen_random_uuid(), 'team-' || (i %% %(namespaces)s), 'script', 'script-' || (i %% 50),
       'h', 'python', now() - interval '1 minute' * random()
FROM generate_series(1, 20000) AS i
"""

LOAD_AUDIT = """
INSERT INTO audit (at, namespace, username, groups, action, run_id, target, source, detail)
SELECT now() - make_interval(days => %(days)s) * (1 - i::float8 / %(audit_rows)s),
       'team-' || (i %% %(namespaces)s), 'user-' || (i %% 40) || '@example.com',
       ARRAY['team'], (ARRAY['submit', 'submit', 'submit', 'cancel', 'approve'])[1 + i %% 5],
       gen_random_uuid(), 'script-' || (i %% 50), '10.0.0.' || (i %% 200), '{}'
FROM generate_series(1, %(audit_rows)s) AS i
"""

# The indexes the load drops and rebuilds (all but primary keys and their like).
INDEXES = """
SELECT c.relname, pg_get_indexdef(c.oid) FROM pg_index x
JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
WHERE t.relname = ANY (%s) AND NOT x.indisprimary AND c.relispartition IS FALSE
"""


async def load(conn: psycopg.AsyncConnection, rows: int, namespaces: int,
               audit_rows: int) -> None:
    params = {"rows": rows, "namespaces": namespaces, "days": DAYS, "audit_rows": audit_rows}
    await conn.execute("SELECT gristmill_ensure_partitions('job_history', %s, 1)", [DAYS + 1])
    await conn.execute("SELECT gristmill_ensure_partitions('audit', %s, 1)", [DAYS + 1])
    await conn.execute("INSERT INTO script_versions (hash, spec) VALUES ('h', '{}')")
    await conn.execute("INSERT INTO flow_versions (hash, spec) VALUES ('h', '{}')")
    cur = await conn.execute(INDEXES, [["job_history", "flow_runs", "jobs", "audit"]])
    indexes = await cur.fetchall()
    for name, _ in indexes:
        await conn.execute(f'DROP INDEX "{name}"')
    await conn.execute("SET maintenance_work_mem = '512MB'")
    started = time.monotonic()
    for statement in (LOAD_HISTORY, LOAD_FLOW_RUNS, LOAD_QUEUED, LOAD_AUDIT):
        await conn.execute(statement, params)
    loaded = time.monotonic()
    for _, definition in indexes:
        # A partitioned table's index is shown ON ONLY the parent; built so, it would
        # cover none of the partitions.
        await conn.execute(definition.replace(" ON ONLY ", " ON ", 1))
    indexed = time.monotonic()
    await conn.execute("VACUUM ANALYZE")
    done = time.monotonic()
    print(f"loaded {rows:,} history rows, {rows // 20:,} flow runs, 20,000 queued jobs and "
          f"{audit_rows:,} audit rows in {loaded - started:.0f} s; {len(indexes)} indexes "
          f"rebuilt in {indexed - loaded:.0f} s; VACUUM ANALYZE {done - indexed:.0f} s")
    cur = await conn.execute(
        "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits "
        "WHERE inhparent = 'job_history'::regclass")
    print(f"job_history with its indexes: {(await cur.fetchone())[0]}")


async def timed(conn: psycopg.AsyncConnection, sql: str, params: dict) -> tuple[list[float],
                                                                               int]:
    await conn.execute(sql, params)  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        cur = await conn.execute(sql, params)
        found = len(await cur.fetchall())
        times.append((time.perf_counter() - start) * 1000)
    return times, found


async def explain(conn: psycopg.AsyncConnection, sql: str, params: dict) -> str:
    cur = await conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
    return "\n".join(row[0] for row in await cur.fetchall())


async def deep_cursor(conn: psycopg.AsyncConnection, query: RunQuery, pages: int) -> Before:
    """Follow the cursor `pages` pages in, as a client paging through would."""
    for _ in range(pages):
        found = await run_listing.list_runs(conn, query)
        query = dataclasses.replace(query, before=found[-1].position)
    return query.before


async def run(args: argparse.Namespace) -> None:
    async with throwaway_postgres("listing") as (_, url), \
            await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await load(conn, args.rows, args.namespaces, args.audit_rows)
        now = dt.datetime.now(dt.UTC)
        ns = "team-3"
        base = RunQuery(namespace=ns, limit=51)  # the API reads one more than a page
        twenty_days = Before(now - dt.timedelta(days=20), uuid.UUID(int=0))
        cases = [
            ("first page, no filter", base),
            ("status=failed", RunQuery(ns, statuses=frozenset({RunStatus.FAILED}),
                                       limit=51)),
            ("script=script-13", RunQuery(ns, kinds=frozenset({RunKind.SCRIPT}),
                                          name="script-13", limit=51)),
            ("script=script-13&status=failed", RunQuery(
                ns, kinds=frozenset({RunKind.SCRIPT}), name="script-13",
                statuses=frozenset({RunStatus.FAILED}), limit=51)),
            ("kind=flow&status=failed", RunQuery(
                ns, kinds=frozenset({RunKind.FLOW}),
                statuses=frozenset({RunStatus.FAILED}), limit=51)),
            ("since=1h", RunQuery(ns, since=now - dt.timedelta(hours=1), limit=51)),
            ("label=team=t3", RunQuery(ns, labels={"team": "t3"}, limit=51)),
            ("page 200 (cursor), no filter", RunQuery(
                ns, before=await deep_cursor(conn, base, 200), limit=51)),
            ("20 days back (cursor), no filter", RunQuery(ns, before=twenty_days,
                                                          limit=51)),
            ("20 days back, status=failed", RunQuery(
                ns, statuses=frozenset({RunStatus.FAILED}), before=twenty_days,
                limit=51)),
        ]
        audit_cases = [
            ("audit: first page", audit.AuditQuery(ns, limit=51)),
            ("audit: user + action=cancel", audit.AuditQuery(
                ns, user="user-3@example.com", actions=frozenset({AuditAction.CANCEL}),
                limit=51)),
            ("audit: 20 days back", audit.AuditQuery(
                ns, before=Before(now - dt.timedelta(days=20), 2**62), limit=51)),
        ]
        results = []
        for label, query in cases:
            sql, params = run_listing.statement(query)
            results.append((label, *await timed(conn, sql, params),
                            await explain(conn, sql, params)))
        for label, query in audit_cases:
            sql, params = audit.statement(query)
            results.append((label, *await timed(conn, sql, params),
                            await explain(conn, sql, params)))
    print(f"\n{args.rows:,} history rows, {args.namespaces} namespaces; a page of 50 in "
          f"namespace {ns}:\n")
    print("| listing | rows | p50 ms | max ms |\n| --- | --- | --- | --- |")
    for label, times, found, _ in results:
        print(f"| {label} | {min(found, 50)} | {percentile(times, 50):.2f} | "
              f"{max(times):.2f} |")
    for label, _, _, plan in results:
        print(f"\n--- {label}\n{plan}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000,
                        help="finished jobs in the history (%(default)s)")
    parser.add_argument("--namespaces", type=int, default=10,
                        help="the rows are spread over this many (%(default)s)")
    parser.add_argument("--audit-rows", type=int, default=1_000_000,
                        help="audit rows (%(default)s)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
