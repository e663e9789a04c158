"""What log followers cost the API and the database.

    python bench/log_followers.py [--followers 200 1000] [--tree PATH]

`gristmill api` (from --tree, default this checkout: pass another checkout's path to
compare) serves N clients following the log of one run that stays queued. Measured
over 10 s each: the API process's CPU and the database's commits per second while they
are connected and idle, then again after every client has disconnected; and, with
them connected, how long one log append takes to reach all N. The database runs
with its default (durable) settings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psycopg
from common import percentile, throwaway_postgres

from gristmill.dev.manifests import apply_manifests
from gristmill.store import logs

ROOT = Path(__file__).resolve().parent.parent
WINDOW_S = 10.0
TOKEN = "bench-local-token-0123456789"  # the API takes one local token (--authentication token)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATS_FLUSH_S = 11.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def commits(conn: psycopg.AsyncConnection) -> int:
    cur = await conn.execute(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    return (await cur.fetchone())[0]


async def measure(pid: int, conn: psycopg.AsyncConnection) -> tuple[float, float]:
    """(API CPU %, database commits/s) over WINDOW_S."""
    cpu, done = cpu_seconds(pid), await commits(conn)
    await asyncio.sleep(WINDOW_S)
    return (100 * (cpu_seconds(pid) - cpu) / WINDOW_S,
            (await commits(conn) - done) / WINDOW_S)


async def bench(url: str, api: str, pid: int, followers: int) -> dict[str, float]:
    async with aiohttp.ClientSession(headers=AUTH) as session, \
            await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        async with session.post(f"{api}/api/v1/namespaces/default/scripts/hello/runs",
                                json={}) as response:
            run_id = (await response.json())["id"]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, headers=AUTH) as clients:
            streams = [await clients.get(f"{api}/api/v1/runs/{run_id}/logs?follow=1")
                       for _ in range(followers)]
            await asyncio.sleep(2)
            start = time.monotonic()
            await logs.append(conn, [(run_id, "one line\n")])

            async def line_reached(stream) -> float:
                await stream.content.readline()
                return time.monotonic() - start
            latencies = await asyncio.gather(*(line_reached(s) for s in streams))
            # Backends report their commits to pg_stat_database within 10 s of going idle.
            await asyncio.sleep(STATS_FLUSH_S)
            connected = await measure(pid, conn)
            for stream in streams:
                stream.close()
        await asyncio.sleep(STATS_FLUSH_S)
        gone = await measure(pid, conn)
    return {"connected_cpu": connected[0], "connected_commits": connected[1],
            "gone_cpu": gone[0], "gone_commits": gone[1],
            "fanout_p50_ms": 1000 * percentile(latencies, 50),
            "fanout_max_ms": 1000 * max(latencies)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--followers", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the checkout whose API to run (default: this one)")
    args = parser.parse_args()
    for n in args.followers:
        async with throwaway_postgres() as (_, url):
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await apply_manifests(conn, [ROOT / "examples" / "hello.yaml"])
            port = 18000 + n % 1000
            env = {**os.environ, "PYTHONPATH": str(args.tree / "operator"),
                   "GRISTMILL_LOG_LEVEL": "WARNING"}
            token_file = Path(tempfile.mkdtemp(prefix="gristmill-bench-")) / "api-token"
            token_file.write_text(TOKEN)
            api = subprocess.Popen(
                [sys.executable, "-m", "gristmill.cli", "api", "--database-url", url,
                 "--host", "127.0.0.1", "--port", str(port), "--authentication", "token",
                 "--token-file", str(token_file)], env=env)
            try:
                await asyncio.sleep(3)
                result = await bench(url, f"http://127.0.0.1:{port}", api.pid, n)
            finally:
                api.terminate()
                try:
                    api.wait(timeout=10)
                except subprocess.TimeoutExpired:  # an API whose followers never leave
                    api.kill()
                    api.wait()
        print(f"{n} followers ({args.tree}): connected: API CPU {result['connected_cpu']:.1f} %, "
              f"{result['connected_commits']:.0f} commits/s; disconnected: API CPU "
              f"{result['gone_cpu']:.1f} %, {result['gone_commits']:.0f} commits/s; one "
              f"append reaches all in p50 {result['fanout_p50_ms']:.0f} ms, max "
              f"{result['fanout_max_ms']:.0f} ms", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
