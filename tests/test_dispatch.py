"""The dispatcher: workers without database credentials get their jobs from the API over a
WebSocket. Real PostgreSQL, the real API app, real worker loops with the process
sandbox, and a worker that speaks the protocol by hand where the point is what a broken
or hostile one can do."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import aiohttp
import psycopg
import pytest
from flowkit import apply_yaml_at, script
from test_worker_healing import submit, wait_status

from gristmill.api.app import DISPATCHER
from gristmill.store import queue
from gristmill.store import scripts as script_store
from gristmill.worker.dispatch_link import CONNECT_PATH
from tests import apikit, dispatchkit

SCRIPTS = script("echo", """
    def main(n: int = 0):
        print("line", n)
        return {"n": n}
""") + script("nap", """
    import time

    def main(s: float = 2.0):
        time.sleep(s)
        return {"slept": s}
""")
FLOW = """
---
apiVersion: gristmill.io/v1alpha1
kind: Flow
metadata: {name: pause-then-echo}
spec:
  steps:
    - {id: first, script: echo, input: {n: "1"}}
    - {id: echo, script: echo, input: {n: "7"}, sleep: 0.3s}
"""


@pytest.fixture
async def url(database_url):
    await apply_yaml_at(database_url, SCRIPTS + FLOW)
    return database_url


async def history(url: str, job_id: uuid.UUID) -> dict:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        return await queue.get_job(db, job_id)


async def count(url: str, sql: str, *args) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        cur = await db.execute(sql, args)
        return (await cur.fetchone())[0]


async def final_run(http: aiohttp.ClientSession, api: str, run_id: str, timeout: float
                    ) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{api}/api/v1/runs/{run_id}") as response:
            run = await response.json()
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.1)


async def test_a_worker_without_database_credentials_runs_scripts_and_flows(url):
    async with apikit.api_in_process(dispatchkit.api_settings(url)) as api, \
            dispatchkit.running(dispatchkit.worker(api)), apikit.session() as http:
        job_id = await submit(url, "echo", {"n": 3})
        done = await wait_status(url, job_id, ("succeeded", "failed"))
        assert done["status"] == "succeeded" and done["result"] == {"n": 3}
        # Leased under a name the API gives it: its group's namespace and name first.
        assert done["worker_id"].startswith("default/workers/")
        async with http.get(f"{api}/api/v1/runs/{job_id}/logs") as response:
            assert "line 3" in await response.text()
        # A flow whose first step is a timer: completed by the API, no worker slot taken.
        async with http.post(f"{api}/api/v1/namespaces/default/flows/pause-then-echo/runs",
                             json={"input": {}}) as response:
            run_id = (await response.json())["id"]
        run = await final_run(http, api, run_id, timeout=30)
        assert run["status"] == "succeeded", run


async def test_tokens_are_checked_and_scope_the_tags_a_worker_serves(url):
    async with apikit.api_in_process(dispatchkit.api_settings(url)) as api:
        async with aiohttp.ClientSession() as http:
            for headers, words in [
                ({}, "credentials"),
                ({"Authorization": "Bearer not-a-worker-token"}, "not a Gristmill worker token"),
                ({"Authorization": "Bearer " + dispatchkit.token(
                    key=b"k" * 32)}, "signature does not match"),
                ({"Authorization": f"Bearer {apikit.TOKEN}"}, "not a Gristmill worker token"),
            ]:
                async with http.get(api + CONNECT_PATH, headers=headers) as response:
                    assert response.status == 401
                    assert words in (await response.json())["error"]
        # A worker whose token names only bash never gets a python job.
        job_id = await submit(url, "echo", {"n": 1})
        bash_token = dispatchkit.token(("bash",), group="shell")
        async with dispatchkit.raw_worker(api, bash_token, {
                "worker": "w1", "concurrency": 4}) as raw:
            answer = await raw.request("claim", limit=4, wait=1.0)
            assert answer == {"id": raw.next_id, "ok": {"jobs": []}}
        assert (await history(url, job_id))["status"] == "queued"
        async with dispatchkit.running(dispatchkit.worker(api, ("python",))):
            assert (await wait_status(url, job_id, ("succeeded",)))["status"] == "succeeded"


async def test_a_hostile_worker_gets_errors_and_cannot_touch_other_workers_jobs(url):
    async with apikit.api_in_process(dispatchkit.api_settings(url)) as api:
        victim_job = await submit(url, "echo", {"n": 1})
        async with dispatchkit.raw_worker(api, dispatchkit.token(group="one"), {
                "worker": "honest", "concurrency": 1}) as honest:
            claimed = (await honest.request("claim", limit=1, wait=5))["ok"]["jobs"]
            assert [job["id"] for job in claimed] == [str(victim_job)]
            attempt = claimed[0]["attempt"]
            async with dispatchkit.raw_worker(api, dispatchkit.token(group="two")) as evil:
                assert "hello first" in (await evil.request("claim", limit=1))["error"]
                await evil.request("hello", worker="honest", concurrency=1)  # its own "honest"
                for frame in ["{", "[]", '{"id": 1, "op": "claim", "limit": 1e999}',
                              '{"id": 2, "op": "nope"}', '{"id": 3, "op": "claim", "limit": 0}',
                              '{"id": 4, "op": "logs", "chunks": [["x\\u0000", "y"]]}',
                              '[' * 5000]:
                    await evil.send_raw(frame)
                    assert "error" in await evil.receive()
                await evil.ws.send_bytes(b"\x00\x01")
                assert "JSON text" in (await evil.receive())["error"]
                # Outcomes and logs for a job leased to another worker change nothing.
                answer = await evil.request("finish", outcomes=[{
                    "job": str(victim_job), "attempt": attempt, "status": "failed",
                    "error": {"kind": "exception", "message": "forged"}}])
                assert answer["ok"] == {"ended": []}
                await evil.request("logs", chunks=[[str(victim_job), "forged line\n"]])
                answer = await evil.request("hand_back", jobs=[str(victim_job)])
                assert answer["ok"] == {"returned": []}
                # Still served after all that.
                assert (await evil.request("beat"))["ok"] == {"registered": True}
            assert (await history(url, victim_job))["status"] == "running"
            await honest.request("finish", outcomes=[{
                "job": str(victim_job), "attempt": attempt, "status": "succeeded",
                "result": {"n": 1}}])
        done = await history(url, victim_job)
        assert done["status"] == "succeeded" and done["result"] == {"n": 1}
        assert await count(url, "SELECT count(*) FROM job_logs WHERE chunk LIKE 'forged%%'") == 0


async def test_claimed_jobs_a_worker_lost_go_back_when_it_reconnects(url):
    async with apikit.api_in_process(dispatchkit.api_settings(url)) as api:
        first, second = await submit(url, "echo", {"n": 1}), await submit(url, "echo", {"n": 2})
        hello = {"worker": "flaky", "concurrency": 2}
        async with dispatchkit.raw_worker(api, dispatchkit.token(), hello) as raw:
            claimed = (await raw.request("claim", limit=2, wait=5))["ok"]["jobs"]
            assert {job["id"] for job in claimed} == {str(first), str(second)}
        # Back, still running `first`; `second` never arrived (say).
        async with dispatchkit.raw_worker(api, dispatchkit.token(), {
                **hello, "running": [str(first)]}):
            assert (await history(url, first))["status"] == "running"
            lost = await history(url, second)
            assert lost["status"] == "queued" and lost["attempts"] == 0  # no attempt spent


async def test_jobs_of_a_worker_that_vanished_are_reaped_by_the_api(url):
    async with apikit.api_in_process(dispatchkit.api_settings(url, lease_s=1.5)) as api:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
            version, _ = await script_store.get(db, "default", "echo")
            (job_id,) = await queue.enqueue(db, [queue.NewJob(
                "default", "python", input={"n": 5}, script_name="echo", script_hash=version,
                max_attempts=3)])
        async with dispatchkit.raw_worker(api, dispatchkit.token(), {
                "worker": "doomed", "concurrency": 1}) as raw:
            claimed = (await raw.request("claim", limit=1, wait=5))["ok"]["jobs"]
            assert claimed[0]["id"] == str(job_id)
        # Gone for good: after a lease without it, the job is queued again and runs.
        async with dispatchkit.running(dispatchkit.worker(api, lease=dt.timedelta(seconds=1.5))):
            done = await wait_status(url, job_id, ("succeeded",), timeout=30)
        assert done["attempts"] == 2


async def test_a_worker_rides_out_a_restart_of_the_api(url):
    settings = dispatchkit.api_settings(url)
    port = apikit.free_port()

    async def serve():
        from aiohttp import web

        from gristmill.api.app import create_app
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    api = f"http://127.0.0.1:{port}"
    runner = await serve()
    worker = dispatchkit.worker(api)
    async with dispatchkit.running(worker):
        job_id = await submit(url, "nap", {"s": 2.0})
        await wait_status(url, job_id, ("running",))
        await runner.cleanup()  # the API goes away while the job runs
        await asyncio.sleep(0.5)
        runner = await serve()
        try:
            done = await wait_status(url, job_id, ("succeeded", "failed"), timeout=30)
            assert done["status"] == "succeeded" and done["attempts"] == 1
            # And it serves on.
            after = await submit(url, "echo", {"n": 9})
            assert (await wait_status(url, after, ("succeeded",)))["result"] == {"n": 9}
        finally:
            await runner.cleanup()


async def test_two_api_replicas_share_the_queue_each_job_once(url, db):
    async with apikit.api_in_process(dispatchkit.api_settings(url)) as one, \
            apikit.api_in_process(dispatchkit.api_settings(url)) as two:
        workers = [dispatchkit.worker(api, concurrency=4, worker_token=dispatchkit.token())
                   for api in (one, two, one, two)]
        async with dispatchkit.running(*workers):
            async with db.transaction():
                ids = await queue.enqueue(db, [queue.NewJob("default", "python", kind="noop",
                                                            input={"n": n})
                                               for n in range(400)])
            deadline = time.monotonic() + 60
            while await count(url, "SELECT count(*) FROM jobs") > 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        cur = await db.execute("SELECT count(*), max(attempts), count(DISTINCT worker_id) "
                               "FROM job_history WHERE id = ANY (%s)", [ids])
        finished, attempts, by = await cur.fetchone()
        assert (finished, attempts) == (400, 1)
        assert by >= 2  # both replicas handed out jobs


async def test_a_cancel_reaches_the_worker_running_the_job(url):
    async with apikit.api_in_process(dispatchkit.api_settings(url)) as api, \
            dispatchkit.running(dispatchkit.worker(api)), apikit.session() as http:
        job_id = await submit(url, "nap", {"s": 60})
        await wait_status(url, job_id, ("running",))
        started = time.monotonic()
        async with http.post(f"{api}/api/v1/runs/{job_id}/cancel") as response:
            assert response.status in (200, 202), await response.text()
        done = await wait_status(url, job_id, ("cancelled",), timeout=20)
        assert done["status"] == "cancelled" and time.monotonic() - started < 10


async def test_a_job_wakes_one_claim_not_the_fleet(url, db):
    async with dispatchkit.api_app(dispatchkit.api_settings(url)) as (api, app):
        workers = [dispatchkit.worker(api, concurrency=1) for _ in range(8)]
        async with dispatchkit.running(*workers):
            await asyncio.sleep(1.0)  # all eight waiting
            dispatcher = app[DISPATCHER]
            before = dispatcher.claims
            for n in range(20):
                async with db.transaction():
                    await queue.enqueue(db, [queue.NewJob("default", "python", kind="noop",
                                                          input={"n": n})])
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 30
            while await count(url, "SELECT count(*) FROM jobs") > 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            claims = dispatcher.claims - before
        # One claim statement per notification at most (fewer when they coalesce), however
        # many workers wait: 8 waiting workers do not make 8 claims per job.
        assert claims <= 20 * 1.2 + 2, claims


async def test_the_examples_flow_with_retries_and_a_fan_out_runs_through_the_dispatcher(
        database_url):
    await apikit.apply_examples(database_url)
    async with apikit.api_in_process(dispatchkit.api_settings(database_url)) as api, \
            dispatchkit.running(dispatchkit.worker(api, concurrency=4)), \
            apikit.session() as http:
        async with http.post(f"{api}/api/v1/namespaces/default/flows/process-orders/runs",
                             json={"input": {"batch": "b-1"}}) as response:
            run_id = (await response.json())["id"]
        run = await final_run(http, api, run_id, timeout=60)
        assert run["status"] == "succeeded", run
