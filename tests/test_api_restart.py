"""A database restart costs at most a retried request: `gristmill api` against a
PostgreSQL of its own, restarted twice under a stream of requests, answers every
request with a success or a 503 (never a 500), serves again within seconds of the
database coming back, and keeps following logs (its LISTEN made again), with nothing
restarted by the test but the database."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import aiohttp
import psycopg
import pytest

from gristmill.store import logs
from gristmill.store.migrate import migrate_url
from tests import apikit
from tests.apikit import api_process, apply_examples
from tests.pgkit import embedded_postgres

OUTAGE_S = 8.0  # longer than the API's 5 s of retries: some requests must get a 503


@pytest.fixture
def own_postgres():
    with embedded_postgres("restart") as server:
        yield server


class Traffic:
    """Clients that keep calling the API and record every answer."""

    def __init__(self, url: str):
        self.url = url
        self.answers: list[tuple[float, str, int | str]] = []
        self.bad_503s: list[str] = []

    async def _one(self, session: aiohttp.ClientSession, method: str, path: str,
                   body: dict | None = None) -> dict | None:
        try:
            async with session.request(method, self.url + path, json=body) as response:
                answer = await response.json()
                self.answers.append((time.monotonic(), path.split("/")[3], response.status))
                if response.status == 503 and not (
                        "Retry-After" in response.headers and "database" in answer["error"]):
                    self.bad_503s.append(str(answer))
                return answer if response.status < 300 else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.answers.append((time.monotonic(), path, f"no answer: {exc!r}"))
            return None

    async def run(self, stop: asyncio.Event) -> None:
        async with apikit.session(timeout=aiohttp.ClientTimeout(total=30)) as session:
            while not stop.is_set():
                run = await self._one(session, "POST",
                                      "/api/v1/namespaces/default/scripts/hello/runs",
                                      {"input": {"name": "restart"}})
                if run:
                    await self._one(session, "GET", f"/api/v1/runs/{run['id']}")
                await self._one(session, "GET", "/api/v1/scripts")
                await asyncio.sleep(0.02)

    def successes_after(self, moment: float) -> list[float]:
        return [t for t, _, status in self.answers if t > moment and status in (200, 201)]


async def until(predicate, timeout: float) -> float:
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.timeout(180)
async def test_requests_ride_out_two_database_restarts(own_postgres, tmp_path):
    url = own_postgres.url()
    await migrate_url(url)
    await apply_examples(url)
    # Followers get nothing but notifications: a log after the restarts proves LISTEN is back.
    log_path = tmp_path / "api.log"
    with api_process(url, "--follow-fallback-interval", "3600", log_path=log_path) as (
            api, process):
        async with apikit.session() as session:
            async def ready() -> bool:
                try:
                    async with session.get(f"{api}/readyz") as response:
                        return (await response.json())["notifications"] == "listening"
                except aiohttp.ClientError:
                    return False
            await until(ready, 10)
            async with session.post(f"{api}/api/v1/namespaces/default/scripts/hello/runs",
                                    json={}) as response:
                followed = uuid.UUID((await response.json())["id"])
            follower = await session.get(f"{api}/api/v1/runs/{followed}/logs?follow=1")
            assert follower.status == 200

            traffic, stop = Traffic(api), asyncio.Event()
            clients = [asyncio.create_task(traffic.run(stop)) for _ in range(3)]
            await asyncio.sleep(1)

            # 1: a quick restart, as `pg_ctl restart` does: every pooled connection goes stale.
            await asyncio.to_thread(own_postgres.stop)
            await asyncio.to_thread(own_postgres.start)
            back = time.monotonic()
            await until(lambda: asyncio.sleep(0, bool(traffic.successes_after(back + 0.5))), 10)

            # 2: down for longer than the API retries, then back.
            await asyncio.to_thread(own_postgres.stop)
            down = time.monotonic()
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(own_postgres.start)
            back = time.monotonic()
            recovered = await until(
                lambda: asyncio.sleep(0, bool(traffic.successes_after(back))), 10)
            await asyncio.sleep(1)
            stop.set()
            await asyncio.gather(*clients)

            await until(ready, 10)
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await logs.append(conn, [(followed, "after two restarts\n")])
            async with asyncio.timeout(10):
                assert await follower.content.readline() == b"after two restarts\n"
            follower.close()
            assert process.poll() is None  # the same API process throughout

    statuses = Counter(status for _, _, status in traffic.answers)
    assert set(statuses) <= {200, 201, 503}, statuses
    assert not traffic.bad_503s, traffic.bad_503s[:3]
    during_outage = [status for t, _, status in traffic.answers if down < t < back]
    assert 503 in during_outage, statuses  # the outage was long enough to show
    assert statuses[200] + statuses[201] > 50, statuses
    api_log = log_path.read_text()
    assert "Traceback" not in api_log and "unexpected error" not in api_log, api_log[-3000:]
    print(f"answers {dict(statuses)}; serving again {recovered:.2f} s after the database")
