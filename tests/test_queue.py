"""The queue against a real PostgreSQL: claims, priorities, delays, retries, cancel, reaping."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg

from gristmill.store import queue, workers

NS = "default"


def noop(i: int = 0, **kw) -> queue.NewJob:
    return queue.NewJob(namespace=kw.pop("namespace", NS), tag=kw.pop("tag", "python"),
                        kind="noop", input={"i": i}, **kw)


async def claim(db, worker: str, limit: int, tags=("python",)) -> list[queue.ClaimedJob]:
    async with db.transaction():
        return await queue.claim(db, worker, list(tags), limit)


async def test_concurrent_claims_take_every_job_exactly_once(database_url, db):
    await queue.enqueue(db, [noop(i) for i in range(2000)])
    seen: list = []

    async def drain(name: str):
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await workers.register(conn, name, ["python"], 10)
            while True:
                async with conn.transaction():
                    got = await queue.claim(conn, name, ["python"], 25)
                if not got:
                    return
                seen.extend(j.id for j in got)
                async with conn.transaction():
                    done = await queue.finish(conn, name, [
                        queue.Outcome(j.id, j.attempt, "succeeded", result=j.input) for j in got])
                assert len(done) == len(got)

    await asyncio.gather(*(drain(f"w{i}") for i in range(6)))
    assert len(seen) == 2000 and len(set(seen)) == 2000
    cur = await db.execute("SELECT count(*), count(DISTINCT id) FROM job_history")
    assert await cur.fetchone() == (2000, 2000)
    assert await (await db.execute("SELECT count(*) FROM jobs")).fetchone() == (0,)


async def test_claim_order_follows_priority(db):
    await workers.register(db, "w", ["python"], 1)
    ids = {}
    for name, prio in [("low", -5), ("a", 0), ("b", 0), ("high", 10)]:
        ids[name] = (await queue.enqueue(db, [noop(priority=prio)]))[0]
    taken = [(await claim(db, "w", 1))[0].id for _ in range(4)]
    assert taken == [ids["high"], ids["a"], ids["b"], ids["low"]]


async def test_namespaces_share_claims_fairly(db):
    """A burst in one namespace does not starve another: each queue (tag, namespace) gets
    an equal share of a claim, the shares left unused go to the busier queues, and
    priority still orders the jobs inside a namespace."""
    await workers.register(db, "w", ["python"], 10)
    flood = [noop(i, namespace="team-a") for i in range(500)]
    await queue.enqueue(db, flood)
    trickle = [queue.NewJob(namespace="team-b", tag="python", kind="noop", priority=p)
               for p in (0, 5, 1, 4, 2, 3)]
    await queue.enqueue(db, trickle)

    first = await claim(db, "w", 10)  # a share of 5 each
    assert sorted(j.priority for j in first if j.namespace == "team-b") == [1, 2, 3, 4, 5]
    assert {j.id for j in first if j.namespace == "team-a"} == {j.id for j in flood[:5]}
    # team-b's last job and what it leaves of the share go to team-a.
    second = await claim(db, "w", 10)
    assert [j.priority for j in second if j.namespace == "team-b"] == [0]
    assert {j.id for j in second if j.namespace == "team-a"} == {j.id for j in flood[5:14]}

    await queue.enqueue(db, [queue.NewJob(namespace="team-c", tag="python", kind="noop")
                             for _ in range(4)])
    second = await claim(db, "w", 8)
    assert sorted(j.namespace for j in second) == ["team-a"] * 4 + ["team-c"] * 4
    # One queue alone gets the whole claim.
    assert [j.namespace for j in await claim(db, "w", 50)] == ["team-a"] * 50


async def test_tags_route_jobs(db):
    await queue.enqueue(db, [noop(tag="gpu"), noop(tag="python")])
    got = await claim(db, "w", 10, tags=("gpu",))
    assert [j.tag for j in got] == ["gpu"]
    everything = await claim(db, "w2", 10, tags=("*",))
    assert [j.tag for j in everything] == ["python"]


async def test_delayed_jobs_wait_until_due(db):
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    await queue.enqueue(db, [noop(scheduled_for=later)])
    assert await claim(db, "w", 10) == []
    await asyncio.sleep(1.6)
    assert len(await claim(db, "w", 10)) == 1


async def test_failed_attempt_is_retried_after_backoff_then_fails_for_good(db):
    await workers.register(db, "w", ["python"], 1)
    (job_id,) = await queue.enqueue(db, [noop(max_attempts=2)])
    (job,) = await claim(db, "w", 1)
    error = {"kind": "exception", "message": "boom"}
    async with db.transaction():
        status = await queue.finish(db, "w", [queue.Outcome(job.id, 1, "failed", error=error,
                                                            retry_delay=0.5)])
    assert queue.statuses(status) == {job_id: "requeued"}
    assert await claim(db, "w", 1) == []  # backing off
    await asyncio.sleep(0.6)
    (again,) = await claim(db, "w", 1)
    assert again.attempt == 2
    async with db.transaction():
        await queue.finish(db, "w", [queue.Outcome(job.id, 2, "failed", error=error)])
    final = await queue.get_job(db, job_id)
    assert final["status"] == "failed" and final["attempts"] == 2 and final["error"] == error


async def test_outcome_of_a_stale_attempt_is_ignored(db):
    await workers.register(db, "w", ["python"], 1)
    (job_id,) = await queue.enqueue(db, [noop(max_attempts=3)])
    await claim(db, "w", 1)
    # The worker is presumed dead, the job goes to another worker...
    reaped = await queue.reap(db, dt.timedelta(seconds=-1))
    assert queue.statuses(reaped) == {job_id: "requeued"}
    await workers.register(db, "w2", ["python"], 1)
    (job,) = await claim(db, "w2", 1)
    # ...and the zombie's late report changes nothing.
    async with db.transaction():
        assert await queue.finish(db, "w", [queue.Outcome(job_id, 1, "succeeded", result=1)]) == []
    async with db.transaction():
        ended = await queue.finish(db, "w2", [queue.Outcome(job_id, 2, "succeeded", result=2)])
    assert queue.statuses(ended) == {job_id: "succeeded"}
    assert (await queue.get_job(db, job_id))["result"] == 2


async def test_reaper_requeues_then_fails_after_last_attempt(db):
    await workers.register(db, "dead", ["python"], 1)
    (job_id,) = await queue.enqueue(db, [noop(max_attempts=1)])
    await claim(db, "dead", 1)
    await db.execute("UPDATE workers SET heartbeat_at = now() - interval '1 minute'")
    assert queue.statuses(await queue.reap(db, dt.timedelta(seconds=30))) == {job_id: "failed"}
    final = await queue.get_job(db, job_id)
    assert final["status"] == "failed" and final["error"]["kind"] == "worker_lost"


async def test_reaper_leaves_live_workers_alone(db):
    await workers.register(db, "alive", ["python"], 1)
    await queue.enqueue(db, [noop()])
    await claim(db, "alive", 1)
    assert await queue.reap(db, dt.timedelta(seconds=30)) == []


async def test_cancel_queued_and_running(db):
    await workers.register(db, "w", ["python"], 1)
    queued_id, running_id = await queue.enqueue(db, [noop(1, priority=-1), noop(2)])
    (running,) = await claim(db, "w", 1)
    assert running.id == running_id
    async with db.transaction():
        cancellation = await queue.cancel(db, [queued_id, running_id], "test")
    assert queue.statuses(cancellation.ended) == {queued_id: "cancelled"}
    assert cancellation.signalled == [running_id]
    assert (await queue.get_job(db, queued_id))["status"] == "cancelled"
    assert await workers.heartbeat(db, "w") == workers.Heartbeat(True, frozenset({running_id}))
    # A failure reported while cancelling ends as cancelled, with no retry.
    async with db.transaction():
        status = await queue.finish(db, "w", [queue.Outcome(
            running_id, 1, "failed", error={"kind": "cancelled", "message": "x"}, retry_delay=1)])
    assert queue.statuses(status) == {running_id: "cancelled"}
    async with db.transaction():
        assert await queue.cancel(db, [running_id], "again") == queue.Cancellation([], [])


async def test_hand_back_does_not_spend_an_attempt(db):
    await workers.register(db, "w", ["python"], 1)
    (job_id,) = await queue.enqueue(db, [noop()])
    await claim(db, "w", 1)
    assert await queue.hand_back(db, "w", [job_id]) == [job_id]
    (again,) = await claim(db, "w", 1)
    assert again.attempt == 1


async def test_concurrency_limit_per_key(db):
    await workers.register(db, "w", ["python"], 10)
    limited = [noop(i, concurrency_key="script:default/slow", concurrency_limit=2) for i in range(5)]
    free = [noop(10 + i) for i in range(3)]
    await queue.enqueue(db, limited + free)
    first = await claim(db, "w", 10)
    assert sum(1 for j in first if j.input["i"] < 10) == 2
    assert sum(1 for j in first if j.input["i"] >= 10) == 3
    assert await claim(db, "w", 10) == []  # the other three wait for a slot
    done = [j for j in first if j.input["i"] < 10][:1]
    async with db.transaction():
        await queue.finish(db, "w", [queue.Outcome(j.id, j.attempt, "succeeded") for j in done])
    await asyncio.sleep(0.3)  # deferred jobs were pushed back 250 ms
    assert len(await claim(db, "w", 10)) == 1


async def test_queue_depth_counts_due_jobs_per_tag(db):
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    await queue.enqueue(db, [noop(), noop(), noop(scheduled_for=later), noop(tag="bash")])
    await claim(db, "w", 1)
    depth = await queue.queue_depth(db)
    assert depth["python"]["queued"] == 1 and depth["python"]["running"] == 1
    assert depth["bash"]["queued"] == 1


async def test_notify_wakes_listeners_once_per_batch(database_url, db):
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await listener.execute(f"LISTEN {queue.JOBS_CHANNEL}")
        async with db.transaction():
            await queue.enqueue(db, [noop(i) for i in range(50)] + [noop(tag="bash")])
        notes = []
        gen = listener.notifies(timeout=0.5)
        async for note in gen:
            notes.append(note.payload)
        assert sorted(notes) == ["bash", "python"]
