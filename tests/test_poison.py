"""Poison next to healthy jobs: a value that the database, JSON or Python cannot hold fails
its own job, with a message that says what and how to fix it, and never the claim or the
finish of the jobs around it."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
from flowkit import FINAL, apply_yaml, running_workers, script, start_flow, wait_run
from psycopg.types.json import Jsonb
from test_worker import start_worker

from gristmill.store import queue
from gristmill.store import scripts as script_store

POISON = {
    "nan": 'def main():\n    return float("nan")\n',
    "infinity": 'def main():\n    return {"x": [1, float("inf")]}\n',
    "nul": 'def main():\n    return "a\\x00b"\n',
    "surrogate": 'def main():\n    return "\\ud800"\n',
    "deep": "def main():\n    x = []\n    for _ in range(200):\n        x = [x]\n    return x\n",
    "huge-int": "def main():\n    return 7 ** 2000\n",
    "nul-error": 'def main():\n    raise ValueError("bad\\x00news \\ud800")\n',
}
BASH_NAN = """
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: bash-nan}
spec:
  language: bash
  code: |
    echo NaN
"""
HEALTHY = script("double", "def main(x: int = 1):\n    return x * 2\n")


async def enqueue(db: psycopg.AsyncConnection, name: str, job_input: dict | None = None,
                  tag: str = "python") -> uuid.UUID:
    version, _ = await script_store.get(db, "default", name)
    async with db.transaction():
        (job_id,) = await queue.enqueue(db, [queue.NewJob(
            namespace="default", tag=tag, input=job_input or {}, script_name=name,
            script_hash=version)])
    return job_id


async def wait_all(db: psycopg.AsyncConnection, ids: list[uuid.UUID], timeout: float = 90
                   ) -> dict[uuid.UUID, dict]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        jobs = {job_id: await queue.get_job(db, job_id) for job_id in ids}
        if all(job["status"] in FINAL for job in jobs.values()):
            return jobs
        pending = [str(i) for i, job in jobs.items() if job["status"] not in FINAL]
        assert asyncio.get_running_loop().time() < deadline, f"still running: {pending}"
        await asyncio.sleep(0.1)


async def test_results_the_database_cannot_hold_fail_only_their_own_jobs(db, database_url):
    await apply_yaml(db, "".join(script(name, code) for name, code in POISON.items())
                     + BASH_NAN + HEALTHY)
    async with running_workers(database_url, concurrency=4):
        ids = {}
        for round_ in range(2):  # so that poison and healthy outcomes share finish batches
            for name in POISON:
                ids[f"{name}-{round_}"] = await enqueue(db, name)
            ids[f"bash-nan-{round_}"] = await enqueue(db, "bash-nan", tag="bash")
            for x in range(3):
                ids[f"healthy-{round_}-{x}"] = await enqueue(db, "double", {"x": x})
        jobs = {label: job for label, job in zip(ids, (await wait_all(db, list(ids.values())))
                                                 .values(), strict=True)}
        after = await enqueue(db, "double", {"x": 21})  # the worker still serves
        assert (await wait_all(db, [after]))[after]["result"] == 42
    for label, job in jobs.items():
        if label.startswith("healthy"):
            assert job["status"] == "succeeded", (label, job["error"])
            continue
        assert job["status"] == "failed", (label, job["result"])
        message = job["error"]["message"]
        assert "\x00" not in message and "\ud800" not in message
        kind = label.rsplit("-", 1)[0]
        expected = {"nan": "NaN", "infinity": "Infinity", "nul": "NUL", "surrogate": "surrogate",
                    "deep": "nested more than", "huge-int": "bits", "bash-nan": "NaN",
                    "nul-error": "ValueError: bad"}[kind]
        assert expected in message, (label, message)


async def test_unreadable_input_and_unrunnable_versions_fail_only_their_jobs(db, database_url):
    await apply_yaml(db, HEALTHY)
    version, _ = await script_store.get(db, "default", "double")
    # Neither can come through the API; both could be left by another release or by hand.
    await db.execute("INSERT INTO script_versions (hash, spec) VALUES ('from-the-future', %s)",
                     [Jsonb({"language": "cobol", "code": "DISPLAY 'HI'."})])
    unreadable = uuid.uuid4()
    await db.execute(
        "INSERT INTO jobs (id, namespace, kind, script_name, script_hash, tag, input)"
        " VALUES (%s, 'default', 'script', 'double', %s, 'python',"
        "         ('{\"x\": 1' || repeat('0', 5000) || '}')::jsonb)", [unreadable, version])
    future = uuid.uuid4()
    await db.execute(
        "INSERT INTO jobs (id, namespace, kind, script_name, script_hash, tag)"
        " VALUES (%s, 'default', 'script', 'cobol', 'from-the-future', 'python')", [future])
    healthy = [await enqueue(db, "double", {"x": x}) for x in range(4)]
    async with running_workers(database_url, concurrency=4):
        jobs = await wait_all(db, [unreadable, future, *healthy])
    assert [jobs[h]["result"] for h in healthy] == [0, 2, 4, 6]
    assert jobs[unreadable]["status"] == "failed"
    assert jobs[unreadable]["error"]["kind"] == "input"
    assert "cannot be read" in jobs[unreadable]["error"]["message"]
    assert jobs[future]["status"] == "failed"
    assert "cannot be run by this worker" in jobs[future]["error"]["message"]


FLOW = script("step", "def main(x: int = 1):\n    return x + 1\n") + """
---
apiVersion: gristmill.io/v1alpha1
kind: Flow
metadata: {name: two-steps}
spec:
  steps:
    - {id: one, script: step, input: {x: "1"}}
    - {id: two, script: step, input: {x: "results.one"}}
"""


async def test_a_flow_run_that_cannot_advance_fails_and_its_neighbours_finish(db, database_url):
    await apply_yaml(db, FLOW + HEALTHY)
    doomed = await start_flow(db, "two-steps")
    cur = await db.execute("SELECT flow_hash FROM flow_runs WHERE id = %s", [doomed])
    (flow_version,) = await cur.fetchone()
    # The stored version stops validating (say, written by another release) while step one
    # is queued: advancing the run raises, in the worker that finishes step one.
    await db.execute("UPDATE flow_versions SET spec = '{\"steps\": \"not a list\"}' "
                     "WHERE hash = %s", [flow_version])
    neighbours = [await enqueue(db, "double", {"x": x}) for x in range(3)]
    worker = start_worker(database_url)  # a process of its own: nothing parsed in advance
    try:
        run = await wait_run(db, doomed, timeout=60)
        jobs = await wait_all(db, neighbours)
        later = await enqueue(db, "double", {"x": 5})
        assert (await wait_all(db, [later]))[later]["result"] == 10
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert run.status == "failed" and run.error["kind"] == "internal"
    assert "could not record this job's outcome" in run.error["message"]
    assert [job["status"] for job in jobs.values()] == ["succeeded"] * 3
