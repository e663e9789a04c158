"""Queue throughput and latency: Gristmill's real claim/finish path beside procrastinate.

    python bench/queue_throughput.py [--jobs 20000 100000 200000] [--processes 2]
                                     [--concurrency 500] [--fair-backlog 100000]

Starts a throwaway PostgreSQL (the local server binaries, default durable
settings: fsync on, synchronous_commit on), then on separate databases of it:

1. idle latency: with the workers idle, one job at a time, enqueue-to-start
   p50/p99 (LISTEN/NOTIFY wake-up);
2. bursts: for each --jobs, enqueue that many no-op jobs in batches of 1,000
   and drain them with --processes `gristmill worker` processes (the real
   worker: batched claims with SKIP LOCKED, batched completions that move jobs
   to history), one burst after the other with the same long-lived workers;
   jobs/s from the first enqueue to the last completion, and enqueue-to-start
   latency p50/p99 under that burst;
3. fair share: --fair-backlog jobs queued in one namespace, then a trickle of
   one job every 20 ms in another while the backlog drains; the trickle's
   enqueue-to-start p50/p99;
4. the first burst on procrastinate (PyPI), with the same number of worker
   processes and concurrency, against the same server; the ratio.
Needs `pip install procrastinate` for part 3 (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from common import percentile

from gristmill.dev.postgres import EmbeddedPostgres
from gristmill.store import queue
from gristmill.store.migrate import migrate_url

TAG = "bench"


def start_workers(url: str, processes: int, concurrency: int) -> list[subprocess.Popen]:
    env = {**os.environ, "GRISTMILL_LOG_LEVEL": "WARNING"}
    return [
        subprocess.Popen([sys.executable, "-m", "gristmill.cli", "worker", "--database-url", url,
                          "--tags", TAG, "--concurrency", str(concurrency)], env=env)
        for _ in range(processes)
    ]


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        w.terminate()
    for w in workers:
        w.wait(timeout=30)


async def wait_workers_registered(conn: psycopg.AsyncConnection, count: int) -> None:
    while (await (await conn.execute("SELECT count(*) FROM workers")).fetchone())[0] < count:
        await asyncio.sleep(0.1)


async def gristmill_burst(url: str, jobs: int) -> tuple[float, list[float]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        for offset in range(0, jobs, 1000):
            batch = [queue.NewJob(namespace="bench", tag=TAG, kind="noop")
                     for _ in range(min(1000, jobs - offset))]
            async with conn.transaction():
                await queue.enqueue(conn, batch)
        while True:
            done = (await (await conn.execute("SELECT count(*) FROM job_history")).fetchone())[0]
            if done >= jobs:
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        cur = await conn.execute(
            "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM job_history")
        waits = [float(r[0]) for r in await cur.fetchall()]
        await conn.execute("TRUNCATE job_history")
    return jobs / elapsed, waits


async def fair_share(url: str, backlog: int, trickle: int) -> list[float]:
    """Waits of a trickle in namespace `quiet` while `busy` has `backlog` jobs queued."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for offset in range(0, backlog, 1000):
            async with conn.transaction():
                await queue.enqueue(conn, [queue.NewJob(namespace="busy", tag=TAG, kind="noop")
                                           for _ in range(min(1000, backlog - offset))])
        for _ in range(trickle):
            async with conn.transaction():
                await queue.enqueue(conn, [queue.NewJob(namespace="quiet", tag=TAG,
                                                        kind="noop")])
            await asyncio.sleep(0.02)
        while True:
            done = (await (await conn.execute("SELECT count(*) FROM job_history")).fetchone())[0]
            if done >= backlog + trickle:
                break
            await asyncio.sleep(0.05)
        # Only the trickle's jobs that came while the backlog was still queued count.
        cur = await conn.execute(
            "SELECT extract(epoch FROM q.started_at - q.created_at) * 1000 FROM job_history q"
            " WHERE q.namespace = 'quiet' AND q.created_at < (SELECT max(started_at)"
            " FROM job_history WHERE namespace = 'busy')")
        waits = [float(r[0]) for r in await cur.fetchall()]
        await conn.execute("TRUNCATE job_history")
    return waits


async def gristmill_idle_latency(url: str, samples: int) -> list[float]:
    latencies = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for _ in range(samples):
            job = queue.NewJob(namespace="bench", tag=TAG, kind="noop")
            async with conn.transaction():
                await queue.enqueue(conn, [job])
            while True:
                cur = await conn.execute(
                    "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM job_history"
                    " WHERE id = %s", [job.id])
                row = await cur.fetchone()
                if row:
                    latencies.append(float(row[0]))
                    break
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.02)
    return latencies


# --- procrastinate -------------------------------------------------------------------------

def _procrastinate_app(url: str):
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return app, noop


def _procrastinate_worker(url: str, concurrency: int) -> None:
    app, _ = _procrastinate_app(url)

    async def run() -> None:
        async with app.open_async():
            await app.run_worker_async(concurrency=concurrency, wait=False,
                                       install_signal_handlers=False)

    asyncio.run(run())


async def procrastinate_burst(url: str, jobs: int, processes: int, concurrency: int) -> float:
    app, noop = _procrastinate_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        start = time.perf_counter()
        for offset in range(0, jobs, 1000):
            await noop.batch_defer_async(*[{} for _ in range(min(1000, jobs - offset))])
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_procrastinate_worker, args=(url, concurrency))
               for _ in range(processes)]
    for w in workers:
        w.start()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
            if (await cur.fetchone())[0] >= jobs:
                break
            await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    for w in workers:
        w.join(timeout=30)
        if w.is_alive():
            w.terminate()
    return jobs / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[20000, 100000, 200000],
                        help="burst sizes, run in turn by the same workers")
    parser.add_argument("--fair-backlog", type=int, default=100000,
                        help="jobs queued in one namespace while another trickles (0: skip)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--procrastinate-concurrency", type=int, nargs="+", default=[10, 100],
                        help="procrastinate worker concurrencies to try; the best counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gristmill-bench-", dir="/tmp") as tmp:
        server = EmbeddedPostgres(Path(tmp), durable=True)
        server.start()
        try:
            url = server.create_database("bench_gristmill")
            await migrate_url(url)
            workers = start_workers(url, args.processes, args.concurrency)
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await wait_workers_registered(conn, args.processes)
                idle = await gristmill_idle_latency(url, args.latency_samples)
                print(f"PostgreSQL {server.bin_dir.parent.name}, durable settings; "
                      f"{os.cpu_count()} cores; {args.processes} worker processes x "
                      f"concurrency {args.concurrency}")
                print(f"gristmill     idle workers: enqueue-to-start p50 "
                      f"{statistics.median(idle):.1f} ms, p99 {percentile(idle, 99):.1f} ms "
                      f"({len(idle)} jobs, one at a time)")
                rates = []
                for jobs in args.jobs:
                    rate, waits = await gristmill_burst(url, jobs)
                    rates.append(rate)
                    print(f"gristmill     burst of {jobs}: {rate:8.0f} jobs/s end to end; "
                          f"enqueue-to-start p50 {percentile(waits, 50):.0f} ms, "
                          f"p99 {percentile(waits, 99):.0f} ms", flush=True)
                if args.fair_backlog:
                    waits = await fair_share(url, args.fair_backlog, 200)
                    print(f"gristmill     fair share: {len(waits)} jobs of a quiet namespace, "
                          f"one every 20 ms while {args.fair_backlog} queued in another drain: "
                          + (f"enqueue-to-start p50 {percentile(waits, 50):.0f} ms, p99 "
                             f"{percentile(waits, 99):.0f} ms" if waits else
                             "none came before the backlog was gone: raise --fair-backlog"))
            finally:
                stop_workers(workers)
            rate, first_burst = rates[0], args.jobs[0]
            try:
                import procrastinate  # noqa: F401
            except ImportError:
                print("procrastinate not installed (pip install procrastinate): no comparison")
                return
            rates = {}  # procrastinate's, per concurrency
            for concurrency in args.procrastinate_concurrency:
                p_url = server.create_database(f"bench_procrastinate_{concurrency}")
                rates[concurrency] = await procrastinate_burst(p_url, first_burst,
                                                               args.processes, concurrency)
                print(f"procrastinate burst of {first_burst}: {rates[concurrency]:8.0f} jobs/s "
                      f"end to end ({args.processes} processes x concurrency {concurrency})")
            best = max(rates.values())
            print(f"ratio: gristmill is {rate / best:.1f}x procrastinate's best")
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
