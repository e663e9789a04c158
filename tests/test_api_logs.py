"""Following logs: woken by notifications (one LISTEN per API process), ended by the job's
end or the client's leaving; a follower that left costs nothing."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import psycopg
import pytest
from prometheus_client import REGISTRY

from gristmill.store import logs, notifications, queue
from tests import apikit
from tests.apikit import api_in_process, apply_examples


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def submit(session: aiohttp.ClientSession, url: str) -> uuid.UUID:
    async with session.post(f"{url}/api/v1/namespaces/default/scripts/hello/runs",
                            json={"input": {}}) as response:
        assert response.status == 201
        return uuid.UUID((await response.json())["id"])


async def until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


async def listening(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/readyz") as response:
        return (await response.json())["notifications"] == "listening"


async def test_a_follower_is_woken_by_notifications_and_ends_with_the_job(database_url, db):
    await apply_examples(database_url)
    # No fallback poll to speak of: only notifications can deliver the log and the end.
    settings = apikit.settings(database_url, follow_fallback_s=3600)
    async with api_in_process(settings) as url, apikit.session() as session:
        await until(lambda: listening(session, url))
        job_id = await submit(session, url)
        async with session.get(f"{url}/api/v1/runs/{job_id}/logs",
                               params={"follow": "1"}) as response:
            assert response.status == 200
            await logs.append(db, [(job_id, "first line\n")])
            async with asyncio.timeout(10):
                assert await response.content.readline() == b"first line\n"
            async with db.transaction():
                (claimed,) = await queue.claim(db, "w1", ["python"], 1)
            await logs.append(db, [(job_id, "last line\n")])
            async with db.transaction():
                await queue.finish(db, "w1", [queue.Outcome(job_id, claimed.attempt,
                                                            "succeeded", result=1)])
            async with asyncio.timeout(10):
                assert await response.content.read() == b"last line\n"  # then the end


async def test_followers_whose_clients_leave_stop_reading(database_url):
    await apply_examples(database_url)
    # A short fallback poll, so that a follower left behind would show in the read count.
    settings = apikit.settings(database_url, follow_fallback_s=0.2)
    async with api_in_process(settings) as url, apikit.session() as session:
        job_id = await submit(session, url)
        before = sample("gristmill_api_log_followers")
        clients = [apikit.session() for _ in range(20)]
        responses = [await client.get(f"{url}/api/v1/runs/{job_id}/logs?follow=true")
                     for client in clients]
        assert all(response.status == 200 for response in responses)

        async def followers(n: int) -> bool:
            return sample("gristmill_api_log_followers") - before == n
        await until(lambda: followers(20))
        reads = sample("gristmill_api_log_follow_reads_total")
        await asyncio.sleep(1)
        assert sample("gristmill_api_log_follow_reads_total") > reads + 20  # they poll
        for response, client in zip(responses, clients, strict=True):
            response.close()
            await client.close()
        await until(lambda: followers(0))  # each noticed without the database
        reads = sample("gristmill_api_log_follow_reads_total")
        await asyncio.sleep(1.5)
        assert sample("gristmill_api_log_follow_reads_total") == reads


async def test_log_notifications_carry_every_job_id_within_the_payload_limit(db, database_url):
    job_ids = [uuid.uuid4() for _ in range(500)]
    payloads = notifications.id_payloads(job_ids)
    assert len(payloads) == 3 and all(len(p.encode()) <= 7999 for p in payloads)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await notifications.listen(listener, [notifications.LOGS_CHANNEL])
        await logs.append(db, [(job_id, f"line of {job_id}\n") for job_id in job_ids]
                          + [(job_ids[0], "twice\n")])
        heard = [note async for note in listener.notifies(timeout=2)]
    assert len(heard) == 3  # one statement, as few payloads as fit
    assert sorted(i for note in heard for i in notifications.parse_ids(note.payload)) == sorted(
        job_ids)
    assert [chunk for _, chunk in await logs.read(db, job_ids[0])] == [
        f"line of {job_ids[0]}\n", "twice\n"]


async def test_ended_jobs_are_notified_once_per_statement(db, database_url):
    ids = await queue.enqueue(db, [queue.NewJob(namespace="default", tag="t", max_attempts=2)
                                   for _ in range(4)])
    async with db.transaction():
        claimed = {job.id: job for job in await queue.claim(db, "w1", ["t"], 3)}
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await notifications.listen(listener, [notifications.ENDED_CHANNEL])
        done, retried, failed = list(claimed)
        async with db.transaction():
            await queue.finish(db, "w1", [
                queue.Outcome(done, 1, "succeeded", result={"ok": True}),
                queue.Outcome(retried, 1, "failed", error={"message": "again"}, retry_delay=0),
                queue.Outcome(failed, 1, "cancelled"),
            ])
        (queued,) = set(ids) - set(claimed)
        async with db.transaction():
            await queue.cancel(db, [queued], "not needed")
        heard = [note async for note in listener.notifies(timeout=1)]
    assert [sorted(notifications.parse_ids(n.payload)) for n in heard] == [
        sorted([done, failed]), [queued]]  # the requeued attempt has not ended


@pytest.mark.parametrize("follow", ["0", "1"])
async def test_a_finished_runs_log_is_read_whole(database_url, db, follow):
    await apply_examples(database_url)
    async with api_in_process(apikit.settings(database_url)) as url, \
            apikit.session() as session:
        job_id = await submit(session, url)
        await logs.append(db, [(job_id, f"{i}\n") for i in range(2500)])
        async with db.transaction():
            (claimed,) = await queue.claim(db, "w1", ["python"], 1)
            await queue.finish(db, "w1", [queue.Outcome(job_id, claimed.attempt, "failed")])
        async with session.get(f"{url}/api/v1/runs/{job_id}/logs?follow={follow}") as response:
            text = await response.text()
        assert text == "".join(f"{i}\n" for i in range(2500))
        async with session.get(f"{url}/api/v1/runs/{job_id}/logs?after=0") as response:
            assert response.status == 200
        async with session.get(f"{url}/api/v1/runs/{uuid.uuid4()}/logs") as response:
            assert response.status == 404 and "not found" in json.loads(await response.read())[
                "error"]
