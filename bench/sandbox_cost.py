"""What running a job in the sandbox costs.

    python bench/sandbox_cost.py [--jobs 100]

1. executor only: a trivial Python job (def main(): return 1) run by the
   bubblewrap ProcessExecutor, and by a plain subprocess running the same
   wrapper (PlainExecutor, no isolation): p50/p99 and the difference; the
   same job with `sandbox.network: true` (its own network namespace, pasta).
   The kinds take turns job by job, so that a busy machine slows them alike;
2. end to end: the same job submitted to the queue one at a time with one
   idle worker (LISTEN/NOTIFY wake-up, claim, sandbox, completion), p50/p99
   from enqueue to the result committed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import psycopg
from common import percentile, throwaway_postgres

from gristmill.sandbox.base import JobRequest
from gristmill.sandbox.plain import PlainExecutor
from gristmill.sandbox.process import ProcessExecutor, network_problem
from gristmill.spec import load_manifest_text
from gristmill.store import queue
from gristmill.store import scripts as script_store
from gristmill.worker.loop import Worker, WorkerConfig

CODE = "def main():\n    return 1\n"
MANIFEST = f"""
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {{name: trivial}}
spec:
  language: python
  code: |
    {CODE.replace(chr(10), chr(10) + '    ')}
"""


async def time_executors(kinds: dict[str, tuple[object, bool]], jobs: int
                         ) -> dict[str, list[float]]:
    """Per kind (an executor, and whether the job asks for the network), one timing per job,
    the kinds taking turns."""
    timings: dict[str, list[float]] = {name: [] for name in kinds}
    for i in range(jobs):
        for name, (executor, network) in kinds.items():
            request = JobRequest(job_id=f"bench{i:08d}", language="python", code=CODE,
                                 input={}, network=network)
            started = time.perf_counter()
            outcome = await executor.run(request, lambda _: None, asyncio.Event())
            timings[name].append((time.perf_counter() - started) * 1000)
            assert outcome.ok, outcome.error
    return timings


async def end_to_end(url: str, jobs: int) -> list[float]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        (script,) = load_manifest_text(MANIFEST).resources
        version, _ = await script_store.apply(conn, script)
        stop = asyncio.Event()
        worker = Worker(WorkerConfig(url, ["python"], concurrency=1), ProcessExecutor())
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(1)
        timings = []
        for _ in range(jobs):
            job = queue.NewJob(namespace="default", tag="python", script_name="trivial",
                               script_hash=version)
            async with conn.transaction():
                await queue.enqueue(conn, [job])
            while True:
                cur = await conn.execute(
                    "SELECT extract(epoch FROM finished_at - created_at) * 1000 FROM job_history"
                    " WHERE id = %s", [job.id])
                row = await cur.fetchone()
                if row:
                    timings.append(float(row[0]))
                    break
                await asyncio.sleep(0.001)
        stop.set()
        await task
        return timings


def line(name: str, timings: list[float]) -> str:
    return (f"{name:<34} p50 {statistics.median(timings):6.1f} ms   "
            f"p99 {percentile(timings, 99):6.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    args = parser.parse_args()
    sandbox = ProcessExecutor()
    kinds = {"plain": (PlainExecutor(), False), "sandbox": (sandbox, False)}
    problem = network_problem()
    if problem is None:
        kinds["network"] = (sandbox, True)
    timings = await time_executors(kinds, args.jobs)
    plain, sandboxed = timings["plain"], timings["sandbox"]
    print(line("plain subprocess (no isolation)", plain))
    print(line("bubblewrap sandbox", sandboxed))
    print(f"{'sandbox overhead':<34} p50 "
          f"{statistics.median(sandboxed) - statistics.median(plain):6.1f} ms")
    if "network" in timings:
        print(line("sandbox, network: true", timings["network"]))
    else:
        print(f"network: true not measured: {problem}")
    async with throwaway_postgres(f"bench_{uuid.uuid4().hex[:6]}") as (_, url):
        print(line("submit to result, one idle worker", await end_to_end(url, args.jobs)))


if __name__ == "__main__":
    asyncio.run(main())
