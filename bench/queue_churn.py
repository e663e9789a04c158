"""Vacuum and bloat of the hot `jobs` table under a sustained load.

    python bench/queue_churn.py [--rate 5000] [--duration 600] [--processes 2]
                                [--concurrency 500] [--interval 10]
                                [--server-set NAME=VALUE ...] [--table-set NAME=VALUE ...]

Starts a throwaway PostgreSQL (the local server binaries, durable settings: fsync on,
synchronous_commit on; autovacuum_naptime 10s, as `gristmill dev` and the chart's bundled
database run it) and migrates it, so `jobs` has the storage parameters of migration 0007.
Then:

- --processes worker processes, each one real worker loop
  (gristmill.worker.loop.Worker, the loop `gristmill worker` runs; concurrency
  --concurrency, as bench/queue_throughput.py runs it) serving no-op jobs. In each,
  gristmill.store.queue.claim is wrapped to time every claim call (the store call:
  the claim function's statement, not its commit) and to read each claimed job's
  enqueue-to-start wait (started_at - created_at, both the server's clock);
- one connection enqueues no-op jobs at a steady --rate (jobs/s, paced against the
  clock: a driver that falls behind its schedule says so, as `lag`) for --duration s;
- every --interval s a sample: the achieved enqueue and completion rates, the backlog
  (queued, running), pg_stat_user_tables of `jobs` (live and dead tuples, the share of
  updates that were HOT in the interval, autovacuums), the size of `jobs` (heap and
  all), of its indexes and of the finished-jobs history (`job_history`, every
  partition), the oldest open transaction (what holds vacuum back), WAL written and
  checkpoints, the machine's load average (the enqueuer, the workers and the server
  share its cores), and the claim call's and enqueue-to-start p50/p99 over the interval.

--server-set and --table-set are for experiments (say autovacuum_vacuum_cost_limit=2000,
or fillfactor=100 over the migration's): the defaults measure the schema as migrated on
the server as Gristmill starts it (ALTER SYSTEM cannot undo its command-line settings).

It prints one line per sample, then the peaks (dead tuples, `jobs` size, index size,
history size), first-minute against last-minute claim p99, whether the workers kept up,
and ends with one JSON line (the summary and every sample).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue as stdqueue
import tempfile
import time
from pathlib import Path

import psycopg
import psycopg.sql
from common import percentile

from gristmill.dev.postgres import EmbeddedPostgres
from gristmill.store import queue
from gristmill.store.migrate import migrate_url

TAG = "churn"
TICK_S = 0.01  # the enqueuer's pacing step
SHIP_S = 0.5  # how often a worker process sends its timings to the sampler
MB = 1024 * 1024


# --- workers (separate processes) ------------------------------------------------------

def _serve(url: str, index: int, concurrency: int, stop_file: str,
           timings: multiprocessing.Queue) -> None:
    """One real worker loop with a timed claim, until `stop_file` appears."""
    import logging

    from gristmill.store import queue as store_queue
    from gristmill.worker.loop import Worker, WorkerConfig

    logging.basicConfig(level=logging.WARNING)
    real_claim = store_queue.claim
    claims: list[tuple[float, int]] = []  # (ms, jobs claimed)
    waits: list[float] = []  # enqueue-to-start, ms

    async def timed_claim(conn, worker_id, tags, limit):
        start = time.perf_counter()
        jobs = await real_claim(conn, worker_id, tags, limit)
        claims.append(((time.perf_counter() - start) * 1000, len(jobs)))
        waits.extend((j.started_at - j.created_at).total_seconds() * 1000 for j in jobs)
        return jobs

    # The worker loop calls queue.claim through the module: this is the call it makes.
    store_queue.claim = timed_claim

    def ship() -> None:
        if claims or waits:
            timings.put((list(claims), list(waits)))
            claims.clear()
            waits.clear()

    async def run() -> None:
        stop = asyncio.Event()
        worker = Worker(WorkerConfig(database_url=url, tags=[TAG], concurrency=concurrency,
                                     worker_id=f"churn-{index}"), executor=None)
        task = asyncio.create_task(worker.run(stop))
        while not os.path.exists(stop_file) and not task.done():
            await asyncio.sleep(SHIP_S)
            ship()
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        ship()

    asyncio.run(run())


# --- load --------------------------------------------------------------------------------

class Driver:
    """Enqueues at `rate` jobs/s against the clock, in batches of what is due."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.sent = 0
        self.lag = 0  # jobs behind the schedule at the last step
        self.started = 0.0

    async def run(self, url: str, duration: float) -> None:
        cap = max(1, self.rate // 10)  # after a stall, catch up in steps of 100 ms of load
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            self.started = time.monotonic()
            while (elapsed := time.monotonic() - self.started) < duration:
                due = int(self.rate * elapsed) - self.sent
                if due > 0:
                    batch = min(due, cap)
                    async with conn.transaction():
                        await queue.enqueue(conn, [queue.NewJob(namespace="churn", tag=TAG,
                                                                kind="noop")
                                                   for _ in range(batch)])
                    self.sent += batch
                self.lag = max(0, int(self.rate * (time.monotonic() - self.started)) - self.sent)
                await asyncio.sleep(TICK_S)


# --- sampling ----------------------------------------------------------------------------

STATS = """
SELECT n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del,
       autovacuum_count, autoanalyze_count,
       extract(epoch FROM now() - last_autovacuum)::float8
FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass
"""
SIZES = """
SELECT pg_relation_size('jobs'), pg_total_relation_size('jobs'),
       (SELECT coalesce(sum(pg_relation_size(indexrelid)), 0)::bigint FROM pg_index
        WHERE indrelid = 'jobs'::regclass),
       (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint
        FROM pg_partition_tree('job_history') WHERE isleaf)
"""
INDEX_SIZES = """
SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index
WHERE indrelid = 'jobs'::regclass ORDER BY 1
"""
BACKLOG = """
SELECT count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running')
FROM jobs
"""
# The oldest transaction open in this database besides ours: its snapshot is the horizon
# below which vacuum cannot remove dead rows.
OLDEST_XACT = """
SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8 FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
"""
# WAL written and checkpoints so far: a checkpoint (every max_wal_size of WAL) brings full
# page writes and a burst of writes, which a claim's latency can show without any bloat.
WAL = """
SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, checkpoints_timed + checkpoints_req
FROM pg_stat_bgwriter
"""
SETTINGS = """
SELECT name, setting || coalesce(unit, '') FROM pg_settings
WHERE name IN ('server_version', 'fsync', 'synchronous_commit', 'full_page_writes',
               'shared_buffers', 'autovacuum', 'autovacuum_naptime',
               'autovacuum_max_workers', 'autovacuum_vacuum_threshold',
               'autovacuum_vacuum_cost_limit', 'vacuum_cost_limit', 'maintenance_work_mem',
               'max_wal_size', 'checkpoint_timeout')
ORDER BY name
"""


async def _row(conn: psycopg.AsyncConnection, sql: str) -> tuple:
    return await (await conn.execute(sql)).fetchone()


def _drain(timings: multiprocessing.Queue, claims: list, waits: list) -> None:
    while True:
        try:
            more_claims, more_waits = timings.get_nowait()
        except stdqueue.Empty:
            return
        claims.extend(more_claims)
        waits.extend(more_waits)


def _pcts(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(percentile(values, 50), 2), round(percentile(values, 99), 2)


def _fmt(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


HEADER = (f"{'t_s':>5} {'enq/s':>6} {'done/s':>6} {'queued':>7} {'run':>5} {'lag':>6} "
          f"{'live':>7} {'dead':>7} {'hot%':>5} {'heapMB':>7} {'jobsMB':>7} {'idxMB':>6} "
          f"{'histMB':>7} {'avac':>4} {'avac_ago':>8} {'oldxact':>7} {'walMB/s':>7} {'ckpt':>4} "
          f"{'load':>5} "
          f"{'claims':>6} {'perclm':>6} {'clm50':>6} {'clm99':>7} {'e2s50':>7} {'e2s99':>7}")


def _line(s: dict) -> str:
    return (f"{s['t_s']:5.0f} {s['enqueued_per_s']:6.0f} {s['completed_per_s']:6.0f} "
            f"{s['queued']:7d} {s['running']:5d} {s['driver_lag']:6d} "
            f"{s['n_live_tup']:7d} {s['n_dead_tup']:7d} {_fmt(s['hot_pct'], 5)} "
            f"{s['jobs_heap_bytes'] / MB:7.1f} {s['jobs_total_bytes'] / MB:7.1f} "
            f"{s['jobs_index_bytes'] / MB:6.1f} {s['history_bytes'] / MB:7.0f} "
            f"{s['autovacuum_count']:4d} {_fmt(s['last_autovacuum_ago_s'], 8, 0)} "
            f"{s['oldest_xact_s']:7.1f} {s['wal_mb_per_s']:7.1f} {s['checkpoints']:4d} "
            f"{s['load_avg_1m']:5.2f} {s['claims']:6d} {_fmt(s['jobs_per_claim'], 6)} "
            f"{_fmt(s['claim_p50_ms'], 6)} {_fmt(s['claim_p99_ms'], 7)} "
            f"{_fmt(s['wait_p50_ms'], 7)} {_fmt(s['wait_p99_ms'], 7)}")


async def sample_loop(url: str, driver: Driver, timings: multiprocessing.Queue,
                      interval: float, until: asyncio.Event) -> tuple[list[dict], list, list]:
    """A sample every `interval` s until `until` is set; the samples and every claim's
    (t, ms) and every wait's (t, ms), t the sample's time."""
    samples: list[dict] = []
    all_claims: list[tuple[float, float]] = []
    all_waits: list[tuple[float, float]] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        previous = await _row(conn, STATS)
        prev_wal, first_checkpoints = await _row(conn, WAL)
        prev_t, prev_sent, prev_done = 0.0, 0, 0
        claims: list[tuple[float, int]] = []
        waits: list[float] = []
        _drain(timings, [], [])  # before the load: the workers' first idle claims
        next_at = driver.started + interval
        while True:
            try:
                await asyncio.wait_for(until.wait(), max(0.0, next_at - time.monotonic()))
                if time.monotonic() < next_at - interval / 2:
                    break  # stopped early in the interval: no sample of half a window
            except TimeoutError:
                pass
            next_at += interval
            _drain(timings, claims, waits)
            t = time.monotonic() - driver.started
            sent = driver.sent
            queued, running = await _row(conn, BACKLOG)
            stats = await _row(conn, STATS)
            heap, total, index, history = await _row(conn, SIZES)
            (oldest_xact,) = await _row(conn, OLDEST_XACT)
            wal, checkpoints = await _row(conn, WAL)
            done = sent - queued - running
            upd = stats[3] - previous[3]
            hot = stats[4] - previous[4]
            claim_ms = [ms for ms, _ in claims]
            claim_p50, claim_p99 = _pcts(claim_ms)
            wait_p50, wait_p99 = _pcts(waits)
            span = t - prev_t
            sample = {
                "t_s": round(t, 1),
                "enqueued_per_s": round((sent - prev_sent) / span),
                "completed_per_s": round((done - prev_done) / span),
                "queued": queued, "running": running, "driver_lag": driver.lag,
                "n_live_tup": stats[0], "n_dead_tup": stats[1],
                "updates": upd, "hot_updates": hot,
                "hot_pct": round(100 * hot / upd, 1) if upd else None,
                "autovacuum_count": stats[6], "autoanalyze_count": stats[7],
                "last_autovacuum_ago_s": None if stats[8] is None else round(stats[8], 1),
                "jobs_heap_bytes": heap, "jobs_total_bytes": total, "jobs_index_bytes": index,
                "history_bytes": history, "oldest_xact_s": round(oldest_xact, 1),
                "wal_mb_per_s": round(float(wal - prev_wal) / MB / span, 1),
                "checkpoints": checkpoints - first_checkpoints,
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "claims": len(claims),
                "jobs_per_claim": round(sum(n for _, n in claims) / len(claims), 1)
                if claims else None,
                "claim_p50_ms": claim_p50, "claim_p99_ms": claim_p99,
                "wait_p50_ms": wait_p50, "wait_p99_ms": wait_p99,
            }
            samples.append(sample)
            print(_line(sample), flush=True)
            all_claims.extend((t, ms) for ms in claim_ms)
            all_waits.extend((t, ms) for ms in waits)
            previous, prev_t, prev_sent, prev_done, prev_wal = stats, t, sent, done, wal
            claims, waits = [], []
            if until.is_set():
                break
    return samples, all_claims, all_waits


def _window(points: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [ms for t, ms in points if start < t <= end]


def summarise(samples: list[dict], claims: list, waits: list, args: argparse.Namespace,
              index_peaks: dict[str, int], drained_s: float | None) -> dict:
    duration = samples[-1]["t_s"]
    minute = min(60.0, duration)
    first_claims = _window(claims, 0, minute)
    last_claims = _window(claims, duration - minute, duration)
    first_waits = _window(waits, 0, minute)
    last_waits = _window(waits, duration - minute, duration)
    peak = {key: max(s[key] for s in samples)
            for key in ("n_dead_tup", "jobs_heap_bytes", "jobs_total_bytes",
                        "jobs_index_bytes", "history_bytes", "queued", "oldest_xact_s")}
    third = max(1, len(samples) // 3)
    early, late = samples[:len(samples) - third], samples[len(samples) - third:]
    # Bounded: the last third of the run grows no higher than the peaks before it (with
    # 20% slack). A run too short for autovacuum to pass a few times cannot tell.
    bounded = {key: max(s[key] for s in late) <= 1.2 * max(s[key] for s in early)
               for key in ("n_dead_tup", "jobs_total_bytes")} if len(samples) >= 3 else None
    sent = sum(s["enqueued_per_s"] for s in samples) / len(samples)
    completed = sum(s["completed_per_s"] for s in samples) / len(samples)
    upd = sum(s["updates"] for s in samples)
    hot = sum(s["hot_updates"] for s in samples)
    return {
        "rate": args.rate, "duration_s": duration, "processes": args.processes,
        "concurrency": args.concurrency,
        "achieved_enqueue_per_s": round(sent), "achieved_completed_per_s": round(completed),
        "max_driver_lag": max(s["driver_lag"] for s in samples),
        "max_queued": peak["queued"], "final_queued": samples[-1]["queued"],
        "drained_after_s": drained_s,
        # The workers kept up: the backlog never reached a second of load. The enqueuer kept
        # the rate: never a second of load behind its schedule (else the machine, not the
        # queue, set the rate: see load_avg_1m).
        "workers_kept_up": peak["queued"] < args.rate,
        "enqueuer_kept_rate": max(s["driver_lag"] for s in samples) < args.rate,
        "max_load_avg_1m": max(s["load_avg_1m"] for s in samples),
        "checkpoints": samples[-1]["checkpoints"],
        "wal_mb_per_s": round(sum(s["wal_mb_per_s"] for s in samples) / len(samples), 1),
        "peak_dead_tup": peak["n_dead_tup"],
        "peak_jobs_heap_mb": round(peak["jobs_heap_bytes"] / MB, 1),
        "peak_jobs_total_mb": round(peak["jobs_total_bytes"] / MB, 1),
        "peak_jobs_index_mb": round(peak["jobs_index_bytes"] / MB, 1),
        "peak_index_mb": {name: round(size / MB, 2) for name, size in index_peaks.items()},
        "final_history_mb": round(samples[-1]["history_bytes"] / MB, 1),
        "peak_oldest_xact_s": peak["oldest_xact_s"],
        "autovacuums": samples[-1]["autovacuum_count"],
        "hot_pct": round(100 * hot / upd, 1) if upd else None,
        "bounded": bounded,
        "first_minute_claim_p50_ms": _pcts(first_claims)[0],
        "first_minute_claim_p99_ms": _pcts(first_claims)[1],
        "last_minute_claim_p50_ms": _pcts(last_claims)[0],
        "last_minute_claim_p99_ms": _pcts(last_claims)[1],
        "first_minute_wait_p99_ms": _pcts(first_waits)[1],
        "last_minute_wait_p99_ms": _pcts(last_waits)[1],
        "claim_p99_ms_all": _pcts([ms for _, ms in claims])[1],
        "wait_p50_ms_all": _pcts([ms for _, ms in waits])[0],
        "wait_p99_ms_all": _pcts([ms for _, ms in waits])[1],
    }


async def index_sizes(conn: psycopg.AsyncConnection) -> dict[str, int]:
    return dict(await (await conn.execute(INDEX_SIZES)).fetchall())


async def run(url: str, args: argparse.Namespace, timings: multiprocessing.Queue) -> dict:
    driver = Driver(args.rate)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while (await _row(conn, "SELECT count(*) FROM workers"))[0] < args.processes:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        settings = dict(await (await conn.execute(SETTINGS)).fetchall())
        (options,) = await _row(conn, "SELECT reloptions FROM pg_class WHERE oid = 'jobs'::regclass")
        print(f"PostgreSQL {settings.get('server_version')}, durable settings (fsync "
              f"{settings.get('fsync')}, synchronous_commit {settings.get('synchronous_commit')}, "
              f"full_page_writes {settings.get('full_page_writes')}); {os.cpu_count()} cores; "
              f"{args.processes} worker processes x concurrency {args.concurrency}; "
              f"{args.rate} jobs/s for {args.duration:g} s")
        print("server: " + ", ".join(f"{k} {v}" for k, v in settings.items()
                                     if k not in ("server_version", "fsync",
                                                  "synchronous_commit", "full_page_writes")))
        print(f"jobs: {', '.join(options or [])}")
        print("columns: rates per s over the interval; queued/run: backlog; lag: enqueuer "
              "behind its schedule; live/dead: pg_stat_user_tables; hot%: HOT share of the "
              "interval's updates; MB: jobs heap, jobs with indexes and TOAST, jobs' indexes, "
              "job_history (all partitions); avac: autovacuums of jobs so far, avac_ago: s "
              "since the last; oldxact: oldest open transaction, s; walMB/s: WAL written; ckpt: "
              "checkpoints so far; load: the machine's 1-minute load average; claims: claim calls, "
              "perclm: jobs per claim; clm: claim call ms; e2s: enqueue-to-start ms")
        print(HEADER, flush=True)
        until = asyncio.Event()
        index_peaks: dict[str, int] = {}

        async def watch_indexes() -> None:
            while not until.is_set():
                for name, size in (await index_sizes(conn)).items():
                    index_peaks[name] = max(size, index_peaks.get(name, 0))
                await asyncio.sleep(args.interval / 2)

        load = asyncio.create_task(driver.run(url, args.duration))
        while not driver.started:
            await asyncio.sleep(0.001)
        sampler = asyncio.create_task(sample_loop(url, driver, timings, args.interval, until))
        watcher = asyncio.create_task(watch_indexes())
        await load
        until.set()
        samples, claims, waits = await sampler
        await watcher
        # What the workers still had to do when the load stopped.
        stopped, drained_s = time.monotonic(), None
        while time.monotonic() - stopped < 60:
            if not (await _row(conn, "SELECT count(*) FROM jobs"))[0]:
                drained_s = round(time.monotonic() - stopped, 1)
                break
            await asyncio.sleep(0.1)
    summary = summarise(samples, claims, waits, args, index_peaks, drained_s)
    summary["settings"] = settings
    summary["jobs_reloptions"] = options
    return {"summary": summary, "samples": samples}


def report(result: dict) -> None:
    s = result["summary"]
    print(f"load: {s['achieved_enqueue_per_s']} jobs/s enqueued, "
          f"{s['achieved_completed_per_s']} completed (asked {s['rate']}); backlog at most "
          f"{s['max_queued']} queued, {s['final_queued']} at the end, drained "
          + (f"{s['drained_after_s']} s after the load stopped" if s["drained_after_s"]
             is not None else "not within 60 s")
          + f"; enqueuer at most {s['max_driver_lag']} jobs behind its schedule ("
          + ("kept the rate" if s["enqueuer_kept_rate"] else "did NOT keep the rate")
          + "); " + ("the workers kept up" if s["workers_kept_up"] else
                     "the workers did NOT keep up")
          + f"; {s['wal_mb_per_s']} MB/s of WAL, {s['checkpoints']} checkpoints; 1-minute "
          f"load average at most {s['max_load_avg_1m']} on {os.cpu_count()} cores")
    print(f"peaks: {s['peak_dead_tup']} dead tuples; jobs {s['peak_jobs_total_mb']} MB "
          f"(heap {s['peak_jobs_heap_mb']} MB, indexes {s['peak_jobs_index_mb']} MB: "
          + ", ".join(f"{k} {v}" for k, v in s["peak_index_mb"].items())
          + f"); job_history {s['final_history_mb']} MB at the end; oldest open transaction "
          f"{s['peak_oldest_xact_s']} s; {s['autovacuums']} autovacuums of jobs; HOT "
          f"{s['hot_pct']}% of updates")
    if s["duration_s"] <= 60:
        print("(a run of a minute or less: its first and last minute are the same window)")
    print(f"claim call p50/p99: first minute {s['first_minute_claim_p50_ms']} / "
          f"{s['first_minute_claim_p99_ms']} ms, last minute {s['last_minute_claim_p50_ms']} / "
          f"{s['last_minute_claim_p99_ms']} ms; enqueue-to-start p99 first minute "
          f"{s['first_minute_wait_p99_ms']} ms, last minute {s['last_minute_wait_p99_ms']} ms; "
          f"whole run p50 {s['wait_p50_ms_all']} ms, p99 {s['wait_p99_ms_all']} ms")
    if s["bounded"] is not None:
        print("bounded (last third of the run within 1.2x of the peak before it): "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in s["bounded"].items()))
    print(json.dumps(result, default=str))


async def experiment(url: str, args: argparse.Namespace) -> None:
    """The settings of --server-set and --table-set, before the workers start."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for item in args.server_set:
            name, _, value = item.partition("=")
            await conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
        if args.server_set:
            await conn.execute("SELECT pg_reload_conf()")
            await asyncio.sleep(0.5)
        for item in args.table_set:
            name, _, value = item.partition("=")
            await conn.execute(psycopg.sql.SQL("ALTER TABLE jobs SET ({} = {})").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=5000, help="jobs enqueued per second")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=500, help="per worker process")
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples")
    parser.add_argument("--server-set", action="append", default=[], metavar="NAME=VALUE",
                        help="experiment: a server setting (ALTER SYSTEM, reloaded), e.g. "
                             "autovacuum_naptime=10s; repeatable")
    parser.add_argument("--table-set", action="append", default=[], metavar="NAME=VALUE",
                        help="experiment: a storage parameter of jobs over the migration's "
                             "(ALTER TABLE jobs SET), e.g. fillfactor=100; repeatable")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gristmill-churn-", dir="/tmp") as tmp:
        server = EmbeddedPostgres(Path(tmp), durable=True)
        server.start()
        try:
            url = server.create_database("churn")
            await migrate_url(url)
            await experiment(url, args)
            stop_file = str(Path(tmp) / "stop")
            ctx = multiprocessing.get_context("spawn")
            timings = ctx.Queue()
            processes = [ctx.Process(target=_serve, args=(url, i, args.concurrency, stop_file,
                                                          timings))
                         for i in range(args.processes)]
            for process in processes:
                process.start()
            try:
                result = await run(url, args, timings)
            finally:
                Path(stop_file).touch()
                deadline = time.monotonic() + 60
                for process in processes:
                    while process.is_alive() and time.monotonic() < deadline:
                        _drain(timings, [], [])  # a full pipe would keep a process alive
                        process.join(timeout=0.2)
                    if process.is_alive():
                        process.terminate()
        finally:
            server.stop()
    report(result)


if __name__ == "__main__":
    asyncio.run(main())
