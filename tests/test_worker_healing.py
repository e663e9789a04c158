"""A worker heals itself: database restarts, SIGTERM with every slot busy, a loop that dies,
and a liveness probe that tells a stalled worker from a busy one. Real worker processes,
and a PostgreSQL of the test's own that it restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import psycopg
import pytest
from flowkit import apply_yaml_at
from test_worker import SCRIPTS, start_worker

from gristmill.store import queue
from gristmill.store import scripts as script_store
from gristmill.worker.liveness import Liveness


@pytest.fixture
async def restartable(private_postgres):
    await apply_yaml_at(private_postgres[1], SCRIPTS)
    return private_postgres


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def submit(url: str, name: str, job_input: dict) -> uuid.UUID:
    """Enqueue a run on a connection of its own (a restart breaks long-lived ones)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        version, _ = await script_store.get(db, "default", name)
        async with db.transaction():
            (job_id,) = await queue.enqueue(db, [queue.NewJob(
                namespace="default", tag="python", input=job_input, script_name=name,
                script_hash=version)])
    return job_id


async def job(url: str, job_id: uuid.UUID) -> dict:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        return await queue.get_job(db, job_id)


async def wait_status(url: str, job_id: uuid.UUID, statuses: tuple[str, ...],
                      timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with_status = await job(url, job_id)
        if with_status["status"] in statuses:
            return with_status
        assert time.monotonic() < deadline, f"job {job_id} still {with_status['status']}"
        await asyncio.sleep(0.1)


async def health(port: int) -> tuple[int, dict]:
    def get() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
    return await asyncio.to_thread(get)


async def wait_health(port: int, status: int, saying: str = "", timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ConnectionError, urllib.error.URLError):  # not listening yet
            code, body = await health(port)
            if code == status and saying in json.dumps(body):
                return body
        assert time.monotonic() < deadline, f"/healthz never answered {status}"
        await asyncio.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


async def test_worker_serves_again_after_database_restarts(restartable):
    server, url = restartable
    port = free_port()
    worker = start_worker(url, "--health-port", str(port), "--stall-after", "3")
    try:
        await wait_health(port, 200)
        for restart in range(2):
            during = await submit(url, "nap", {"seconds": 2, "label": f"through restart {restart}"})
            await wait_status(url, during, ("running",))
            await asyncio.to_thread(server.restart)
            # The job that ran through the restart is recorded once the database is back...
            done = await wait_status(url, during, ("succeeded", "failed"))
            assert done["status"] == "succeeded" and done["attempts"] == 1
            # ...and new work is claimed, through a pool and a LISTEN that reconnected.
            after = await submit(url, "quick", {"x": 21})
            assert (await wait_status(url, after, ("succeeded", "failed")))["result"] == 42
        await wait_health(port, 200)

        # Down for longer than --stall-after: the probe says why; back up: live again.
        await asyncio.to_thread(server.stop)
        stalled = await wait_health(port, 503, saying="no successful claim")
        assert stalled["status"] == "stalled"
        await asyncio.to_thread(server.start)
        await wait_health(port, 200)
        last = await submit(url, "quick", {"x": 1})
        assert (await wait_status(url, last, ("succeeded", "failed")))["result"] == 2
        assert worker.poll() is None  # nobody restarted it
    finally:
        stop(worker)


async def test_sigterm_with_every_slot_busy_hands_back_within_the_grace_period(
        restartable):
    _, url = restartable
    worker = start_worker(url, "--grace-period", "2")  # concurrency 2
    long_jobs = [await submit(url, "nap", {"seconds": 120, "label": str(i)}) for i in range(2)]
    for job_id in long_jobs:
        await wait_status(url, job_id, ("running",))
    worker.send_signal(signal.SIGTERM)
    # Long before the jobs would end: the worker does not wait for a free slot to stop.
    assert await asyncio.to_thread(worker.wait, 20) == 0
    for job_id in long_jobs:
        handed_back = await job(url, job_id)
        assert handed_back["status"] == "queued" and handed_back["attempts"] == 0


async def test_a_loop_that_dies_stops_the_worker_loudly_and_hands_back(restartable):
    _, url = restartable
    worker = start_worker(url, stderr=subprocess.PIPE, text=True)
    try:
        running = await submit(url, "nap", {"seconds": 120, "label": "victim"})
        await wait_status(url, running, ("running",))
        # A bug, as far as the worker can tell: log lines can no longer be written.
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
            await db.execute("DROP TABLE job_logs")
        code = await asyncio.to_thread(worker.wait, 30)
        stderr = worker.stderr.read()
    finally:
        stop(worker)
    assert code == 1
    assert "worker loop 'logs' died" in stderr and "UndefinedTable" in stderr
    handed_back = await job(url, running)
    assert handed_back["status"] == "queued" and handed_back["attempts"] == 0


def test_liveness_tells_a_stalled_worker_from_a_busy_one():
    now = [0.0]
    liveness = Liveness(stall_after=60, clock=lambda: now[0])
    liveness.listening(True)
    now[0] = 100.0
    liveness.ok("heartbeat")
    liveness.failed("claim", psycopg.OperationalError("connection refused"))
    assert liveness.problems() == [
        "no successful claim for 100s (last error: OperationalError: connection refused)"]
    # Every slot busy for an hour is not a stall: no claim is due.
    liveness.claiming = False
    assert liveness.problems() == []
    # Outcomes that wait to be written are.
    liveness.oldest_unfinished = 10.0
    assert liveness.problems() == ["finished jobs not written to the database for 90s"]
    liveness.oldest_unfinished = None
    liveness.listening(False)  # the LISTEN connection went down at t=100
    now[0] = 170.0
    liveness.ok("heartbeat")
    assert liveness.problems() == ["no successful listen for 70s"]
