"""Crash safety: workers killed with SIGKILL at random while 50 flows with branches and loops
run. Every flow must finish with the right result, every step completed exactly once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys

from flowkit import FINAL, apply_yaml, script, start_flow

from gristmill.store import flows as flow_store

FLOWS = 50
MANIFESTS = (
    script("double", """
        import time

        def main(x: int) -> int:
            time.sleep(0.05)
            return 2 * x
    """, retries=10, retryBackoff="{initialDelay: 100ms, maxDelay: 1s}")
    + script("total", "def main(values: list) -> int:\n    return sum(values)\n", retries=10,
             retryBackoff="{initialDelay: 100ms, maxDelay: 1s}")
    + """---
apiVersion: gristmill.io/v1alpha1
kind: Flow
metadata: {name: crashy}
spec:
  input: {type: object, properties: {n: {type: integer}}, required: [n]}
  steps:
    - {id: start, script: double, input: {x: flow_input.n}}
    - id: parity
      branchOne:
        branches:
          - when: "flow_input.n % 2 == 0"
            steps: [{id: even, script: double, input: {x: results.start}}]
        default: [{id: odd, script: double, input: {x: "results.start + 1"}}]
    - id: each
      forEach: "[1, 2, 3, 4]"
      parallelism: 2
      steps:
        - {id: scale, script: double, input: {x: "iter.value * flow_input.n"}}
    - {id: sum, script: total, input: {values: results.each}}
  output: "[results.parity, results.sum]"
"""
)


def expected(n: int) -> list[int]:
    start = 2 * n
    parity = 2 * start if n % 2 == 0 else 2 * (start + 1)
    return [parity, sum(2 * i * n for i in (1, 2, 3, 4))]


def start_worker(database_url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "worker", "--database-url", database_url,
         "--tags", "python", "--concurrency", "4", "--lease", "2", "--poll-interval", "0.2"],
        env={**os.environ, "GRISTMILL_LOG_LEVEL": "ERROR"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


async def test_flows_survive_workers_killed_at_random(db, database_url):
    await apply_yaml(db, MANIFESTS)
    rng = random.Random(7)
    workers = [start_worker(database_url) for _ in range(3)]
    kills = 0
    try:
        runs = {await start_flow(db, "crashy", {"n": n}): n for n in range(FLOWS)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 180
        killing_until = loop.time() + 20
        while loop.time() < deadline:
            statuses = [(await flow_store.get_run(db, run_id)).status for run_id in runs]
            if all(status in FINAL for status in statuses):
                break
            if loop.time() < killing_until:
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                kills += 1
                workers[victim] = start_worker(database_url)
            await asyncio.sleep(rng.uniform(0.5, 1.5))
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=60)
    assert kills >= 5
    expected_paths = {"start", "sum", *(f"scale[{i}]" for i in range(4))}
    for run_id, n in runs.items():
        run = await flow_store.get_run(db, run_id)
        assert run.status == "succeeded", (n, run.error)
        assert run.result == expected(n)
        cur = await db.execute(
            "SELECT step_path, count(*) FROM job_history WHERE flow_run_id = %s"
            " AND kind = 'script' AND status = 'succeeded' GROUP BY step_path", [run_id])
        completed = dict(await cur.fetchall())
        branch = "even" if n % 2 == 0 else "odd"
        assert completed == {path: 1 for path in expected_paths | {branch}}, (n, completed)
    # The kills really hit running jobs: some attempts were lost and run again.
    cur = await db.execute("SELECT count(*) FROM job_history WHERE attempts > 1")
    assert (await cur.fetchone())[0] > 0
