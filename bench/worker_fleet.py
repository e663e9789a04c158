"""A fleet of workers on one PostgreSQL: what each costs it, idle and busy.

    python bench/worker_fleet.py [--workers 50 200 600] [--mode dispatcher|database]
                                 [--per-process 25] [--rate 1000]

For each fleet size N: N real worker loops (gristmill.worker.loop.Worker, several per
process as separate identities, each with its own connection and token as a pod would
have) serve no-op jobs from a throwaway PostgreSQL (durable settings): through one API
process's dispatcher (`gristmill api`, what WorkerGroup pods use), or each on the
database itself (--mode database, `gristmill dev`'s workers). Then:

1. connections: PostgreSQL sessions in use by the fleet (pg_stat_activity);
2. idle: transactions per second of the idle fleet over 30 s (pg_stat_database);
3. steady load: --rate jobs/s for 20 s, enqueue-to-start p50/p99, and claims per job
   (calls of the claim function, pg_stat_user_functions);
4. fair share: 100,000 jobs queued in one namespace, a job every 20 ms in another; the
   quiet one's enqueue-to-start p99.

It ends with one JSON line per fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
from common import percentile

from gristmill.dev.postgres import EmbeddedPostgres
from gristmill.dispatch import tokens
from gristmill.store import queue
from gristmill.store.migrate import migrate_url

TAG = "fleet"


def _serve(url: str, server: str | None, token: str | None, first: int, count: int,
           stop_file: str) -> None:
    """`count` workers in this process until `stop_file` appears: of the dispatcher at
    `server` (with `token`), or on the database `url`."""
    import logging

    from gristmill.worker.loop import Worker, WorkerConfig

    logging.basicConfig(level=logging.WARNING)

    async def run() -> None:
        stop = asyncio.Event()
        fleet = [Worker(WorkerConfig(database_url=None if server else url, tags=[TAG],
                                     concurrency=4, worker_id=f"fleet-{first + i}",
                                     server=server, token=token), executor=None)
                 for i in range(count)]
        tasks = [asyncio.create_task(w.run(stop)) for w in fleet]
        while not os.path.exists(stop_file):
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


async def _scalar(conn: psycopg.AsyncConnection, sql: str, *args) -> float:
    return float((await (await conn.execute(sql, args or None)).fetchone())[0] or 0)


async def _claims(conn: psycopg.AsyncConnection) -> float:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await _scalar(conn, "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
                               " WHERE funcname IN ('gristmill_claim_jobs',"
                               " 'gristmill_claim_jobs_for')")


async def _commits(conn: psycopg.AsyncConnection) -> float:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await _scalar(conn, "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                               " WHERE datname = current_database()")


async def _waits(conn: psycopg.AsyncConnection, namespace: str) -> list[float]:
    cur = await conn.execute(
        "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM job_history"
        " WHERE namespace = %s", [namespace])
    return [float(r[0]) for r in await cur.fetchall()]


async def _drained(conn: psycopg.AsyncConnection) -> None:
    while await _scalar(conn, "SELECT count(*) FROM jobs"):
        await asyncio.sleep(0.2)


async def measure(url: str, workers: int, rate: int) -> dict:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while await _scalar(conn, "SELECT count(*) FROM workers WHERE tags = %s",
                            [TAG]) < workers:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        connections = await _scalar(
            conn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                  " AND pid <> pg_backend_pid()")

        # Idle: PostgreSQL flushes a session's counters within about 10 s of its last
        # transaction, so the window is long and starts after a settling pause.
        await asyncio.sleep(10)
        before, started = await _commits(conn), time.monotonic()
        await asyncio.sleep(30)
        await asyncio.sleep(11)  # the last counters of the window reach pg_stat_database
        idle_tx = (await _commits(conn) - before - 3) / (time.monotonic() - started - 11)

        claims_before = await _claims(conn)
        deadline, sent = time.monotonic() + 20, 0
        while time.monotonic() < deadline:
            batch = max(1, rate // 50)
            async with conn.transaction():
                await queue.enqueue(conn, [queue.NewJob(namespace="steady", tag=TAG,
                                                        kind="noop") for _ in range(batch)])
            sent += batch
            await asyncio.sleep(1 / 50)
        await _drained(conn)
        await asyncio.sleep(11)
        claims_per_job = (await _claims(conn) - claims_before) / sent
        steady = await _waits(conn, "steady")

        for _ in range(100):
            async with conn.transaction():
                await queue.enqueue(conn, [queue.NewJob(namespace="busy", tag=TAG, kind="noop")
                                           for _ in range(1000)])
        for _ in range(200):
            async with conn.transaction():
                await queue.enqueue(conn, [queue.NewJob(namespace="quiet", tag=TAG,
                                                        kind="noop")])
            await asyncio.sleep(0.02)
        await _drained(conn)
        quiet = await _waits(conn, "quiet")
    return {"workers": workers, "mode": "", "pg_connections": int(connections),
            "claims_per_job": round(claims_per_job, 2), "idle_tx_per_s": round(idle_tx, 1),
            "p50_ms": round(percentile(steady, 50), 1), "p99_ms": round(percentile(steady, 99), 1),
            "fair_p99_ms": round(percentile(quiet, 99), 1)}


def _start_api(url: str, tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """One `gristmill api` process taking workers; its URL and a worker token."""
    key = tokens.new_key()
    (tmp / "api-token").write_text("fleet-bench-local-token")
    port = 18000 + os.getpid() % 1000
    api = subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "api", "--database-url", url, "--host",
         "127.0.0.1", "--port", str(port), "--authentication", "token", "--token-file",
         str(tmp / "api-token")],
        env={**os.environ, "GRISTMILL_WORKER_TOKEN_KEYS": key, "GRISTMILL_LOG_LEVEL": "WARNING"})
    server = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{server}/healthz", timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or api.poll() is not None:
                raise RuntimeError("gristmill api did not come up") from None
            time.sleep(0.2)
    token = tokens.issue(tokens.parse_keys(key)[0],
                         tokens.WorkerGrant("default", "fleet", (TAG,)))
    return api, server, token


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[50, 200, 600])
    parser.add_argument("--mode", choices=["dispatcher", "database"], default="dispatcher")
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--rate", type=int, default=1000, help="jobs/s of the steady load")
    args = parser.parse_args()
    results = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="gristmill-fleet-", dir="/tmp") as tmp:
            server = EmbeddedPostgres(Path(tmp), durable=True, max_connections=(
                50 if args.mode == "dispatcher" else 4 * workers + 20))
            server.start()
            try:
                url = server.create_database("fleet")
                await migrate_url(url)
                with psycopg.connect(url, autocommit=True) as admin:
                    admin.execute("ALTER DATABASE fleet SET track_functions = 'pl'")
                stop_file = str(Path(tmp) / "stop")
                api, dispatcher, token = None, None, None
                if args.mode == "dispatcher":
                    api, dispatcher, token = _start_api(url, Path(tmp))
                ctx = multiprocessing.get_context("spawn")
                processes = [ctx.Process(target=_serve, args=(
                    url, dispatcher, token, first, min(args.per_process, workers - first),
                    stop_file)) for first in range(0, workers, args.per_process)]
                for process in processes:
                    process.start()
                try:
                    result = await measure(url, workers, args.rate)
                    result["mode"] = args.mode
                finally:
                    Path(stop_file).touch()
                    for process in processes:
                        process.join(timeout=60)
                        if process.is_alive():
                            process.terminate()
                    if api is not None:  # last: the workers deregister through it
                        api.terminate()
                        api.wait(timeout=30)
            finally:
                server.stop()
        print(f"{workers} workers ({args.mode}): {result['pg_connections']} PostgreSQL connections, "
              f"{result['idle_tx_per_s']} transactions/s idle, {result['claims_per_job']} "
              f"claims per job at {args.rate} jobs/s (enqueue-to-start p50 "
              f"{result['p50_ms']} ms, p99 {result['p99_ms']} ms), a quiet namespace's p99 "
              f"beside 100,000 queued: {result['fair_p99_ms']} ms", flush=True)
        results.append(result)
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
