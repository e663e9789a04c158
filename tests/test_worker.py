"""Real `gristmill worker` processes against a real queue: crashes, draining, timeouts, logs."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import uuid

import pytest
from flowkit import apply_yaml, running_workers, script

from gristmill.store import logs, queue
from gristmill.store import scripts as script_store

SCRIPTS = (
    script("nap", """
        import time

        def main(seconds: float = 1.0, label: str = ""):
            print("starting", label, flush=True)
            time.sleep(seconds)
            return label
    """, retries=2)
    + script("quick", "def main(x: int = 1):\n    return x * 2\n", timeout="1s")
    + script("spin", "def main():\n    while True:\n        pass\n", timeout="1s")
    + script("flaky", """
        import os

        def main():
            if os.environ["GRISTMILL_ATTEMPT"] == "1":
                raise RuntimeError("first attempt fails")
            return "second attempt"
    """, retries=1)
)


@pytest.fixture
async def scripts_db(db):
    await apply_yaml(db, SCRIPTS)
    return db


def start_worker(database_url: str, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "worker", "--database-url", database_url,
         "--tags", "python", "--concurrency", "2", "--lease", "2", "--poll-interval", "0.2",
         *extra],
        env={**os.environ, "GRISTMILL_LOG_LEVEL": "WARNING"}, **popen)


async def submit(db, name: str, job_input: dict) -> uuid.UUID:
    version, _ = await script_store.get(db, "default", name)
    spec = await script_store.get_versions(db, [version])
    retries = spec[version].get("retries", 0)
    (job_id,) = await queue.enqueue(db, [queue.NewJob(
        namespace="default", tag="python", input=job_input, script_name=name,
        script_hash=version, max_attempts=retries + 1)])
    return job_id


async def wait_status(db, job_id: uuid.UUID, statuses: tuple[str, ...], timeout: float = 30):
    for _ in range(int(timeout / 0.1)):
        job = await queue.get_job(db, job_id)
        if job["status"] in statuses:
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']}")


async def test_an_idle_worker_sleeps_until_the_next_job_is_due(scripts_db, database_url):
    """No polling (the default poll is 30 s): a delayed job and a retry's backoff start on
    time because the worker, idle, sleeps until the next queued job is due."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "worker", "--database-url", database_url,
         "--tags", "python", "--concurrency", "2"],
        env={**os.environ, "GRISTMILL_LOG_LEVEL": "WARNING"})
    try:
        version, _ = await script_store.get(scripts_db, "default", "quick")
        await asyncio.sleep(2)  # the worker is up and idle
        due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
        (delayed,) = await queue.enqueue(scripts_db, [queue.NewJob(
            namespace="default", tag="python", input={"x": 2}, script_name="quick",
            script_hash=version, scheduled_for=due)])
        done = await wait_status(scripts_db, delayed, ("succeeded",), timeout=10)
        assert due <= done["started_at"] < due + dt.timedelta(seconds=2)

        retried = await submit(scripts_db, "flaky", {})
        done = await wait_status(scripts_db, retried, ("succeeded",), timeout=15)
        assert done["attempts"] == 2 and done["result"] == "second attempt"
    finally:
        worker.terminate()
        worker.wait(timeout=30)


async def test_killed_worker_loses_no_job_and_runs_it_once(scripts_db, database_url):
    doomed = start_worker(database_url)
    survivor = None
    try:
        job_id = await submit(scripts_db, "nap", {"seconds": 3, "label": "once"})
        running = await wait_status(scripts_db, job_id, ("running",))
        await asyncio.sleep(0.5)  # well inside the job
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        survivor = start_worker(database_url)
        done = await wait_status(scripts_db, job_id, ("succeeded", "failed"), timeout=40)
    finally:
        for process in (doomed, survivor):
            if process and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
    assert done["status"] == "succeeded" and done["result"] == "once"
    assert done["attempts"] == 2 and done["worker_id"] != running["worker_id"]
    cur = await scripts_db.execute("SELECT count(*) FROM job_history WHERE id = %s", [job_id])
    assert (await cur.fetchone())[0] == 1


async def test_sigterm_finishes_short_jobs_and_hands_back_long_ones(scripts_db, database_url):
    worker = start_worker(database_url, "--grace-period", "2")
    short = await submit(scripts_db, "nap", {"seconds": 1, "label": "short"})
    long = await submit(scripts_db, "nap", {"seconds": 60, "label": "long"})
    await wait_status(scripts_db, short, ("running",))
    await wait_status(scripts_db, long, ("running",))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert (await queue.get_job(scripts_db, short))["status"] == "succeeded"
    handed_back = await queue.get_job(scripts_db, long)
    assert handed_back["status"] == "queued" and handed_back["attempts"] == 0
    cur = await scripts_db.execute("SELECT count(*) FROM workers")
    assert (await cur.fetchone())[0] == 0  # deregistered


async def test_timeout_cancel_and_logs_through_the_worker(scripts_db, database_url):
    async with running_workers(database_url, concurrency=3):
        spin = await submit(scripts_db, "spin", {})
        nap = await submit(scripts_db, "nap", {"seconds": 30, "label": "cancel me"})
        await wait_status(scripts_db, nap, ("running",))
        # The log reaches Postgres while the job still runs.
        for _ in range(50):
            chunks = await logs.read(scripts_db, nap)
            if any("starting cancel me" in text for _, text in chunks):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no log while running")
        async with scripts_db.transaction():
            cancellation = await queue.cancel(scripts_db, [nap], "test")
        assert cancellation.signalled == [nap]
        cancelled = await wait_status(scripts_db, nap, ("cancelled", "failed", "succeeded"))
        timed_out = await wait_status(scripts_db, spin, ("failed", "succeeded"), timeout=60)
        quick = await submit(scripts_db, "quick", {"x": 21})
        after = await wait_status(scripts_db, quick, ("succeeded", "failed"))
    assert cancelled["status"] == "cancelled"
    assert timed_out["status"] == "failed" and timed_out["error"]["kind"] == "timeout"
    assert after["result"] == 42  # the worker keeps serving


async def test_a_scripts_disk_reaches_its_jobs(db, database_url):
    write = """
        def main(mib: int):
            with open("/tmp/fill", "wb") as f:
                f.write(b"x" * (mib << 20))
            return mib
    """
    await apply_yaml(db, script("small-disk", write, resources="{disk: 16Mi}")
                     + script("default-disk", write))
    async with running_workers(database_url):
        small = await submit(db, "small-disk", {"mib": 32})
        default = await submit(db, "default-disk", {"mib": 32})
        refused = await wait_status(db, small, ("succeeded", "failed"))
        written = await wait_status(db, default, ("succeeded", "failed"))
    assert refused["status"] == "failed" and "No space left" in refused["error"]["message"]
    assert written["result"] == 32
