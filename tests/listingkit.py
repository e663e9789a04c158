"""Helpers for the listing and audit tests: an API in this process whose callers a test can
name, and runs made and finished through the real queue."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

from gristmill.api import identity
from gristmill.api.app import create_app
from gristmill.store import queue, workers
from tests.apikit import free_port, session, settings

USER_HEADER = "X-Test-User"  # "name" or "name:group1,group2"; only this test app reads it


@web.middleware
async def _caller_from_header(request: web.Request, handler):
    """After authentication (the local token): a test names the caller it stands for."""
    named = request.headers.get(USER_HEADER)
    if named:
        username, _, groups = named.partition(":")
        request[identity.CALLER] = identity.Caller(
            username=username, groups=tuple(g for g in groups.split(",") if g),
            source=request.remote or "")
    return await handler(request)


@dataclass
class Api:
    url: str
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, params: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        async with self.session.request(
                method, self.url + path, data=data, params=params,
                headers={"Content-Type": "application/json", **(headers or {})}) as response:
            return response.status, await response.json()

    async def ok(self, method: str, path: str, body: Any = None, params: Any = None,
                 headers: dict[str, str] | None = None) -> Any:
        status, answer = await self.call(method, path, body, params, headers)
        assert status < 300, (status, answer)
        return answer

    async def submit(self, name: str, body: dict | None = None, namespace: str = "default",
                     kind: str = "scripts", headers: dict[str, str] | None = None) -> str:
        answer = await self.ok("POST", f"/api/v1/namespaces/{namespace}/{kind}/{name}/runs",
                               body or {}, headers=headers)
        return answer["id"]

    async def runs(self, namespace: str = "default", **params: Any) -> dict[str, Any]:
        return await self.ok("GET", f"/api/v1/namespaces/{namespace}/runs",
                             params=_query(params))

    async def audit(self, namespace: str = "default", **params: Any) -> dict[str, Any]:
        return await self.ok("GET", f"/api/v1/namespaces/{namespace}/audit",
                             params=_query(params))


def _query(params: dict[str, Any]) -> list[tuple[str, str]]:
    """Keyword filters as query pairs; a list value repeats its parameter."""
    pairs = []
    for key, value in params.items():
        for one in value if isinstance(value, list) else [value]:
            pairs.append((key, str(one)))
    return pairs


@contextlib.asynccontextmanager
async def api_with_callers(database_url: str) -> AsyncIterator[Api]:
    app = create_app(settings(database_url))
    app.middlewares.append(_caller_from_header)  # runs after the authentication middleware
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with session() as client:
            yield Api(f"http://127.0.0.1:{port}", client)
    finally:
        await runner.cleanup()


async def finish_jobs(db: psycopg.AsyncConnection, outcomes: dict[str, str]) -> None:
    """End the given queued jobs (id -> succeeded | failed) as a worker would; every other
    job claimed on the way is handed back untouched."""
    await workers.register(db, "listing-test-worker", ["*"], 1000)
    async with db.transaction():
        claimed = await queue.claim(db, "listing-test-worker", ["*"], 1000)
        mine = [job for job in claimed if str(job.id) in outcomes]
        assert len(mine) == len(outcomes), "a job to finish was not queued"
        await queue.finish(db, "listing-test-worker", [
            queue.Outcome(job.id, job.attempt, outcomes[str(job.id)],
                          error={"kind": "test", "message": "x"}
                          if outcomes[str(job.id)] == "failed" else None)
            for job in mine])
        await queue.hand_back(db, "listing-test-worker",
                              [job.id for job in claimed if str(job.id) not in outcomes])


async def copy_definitions(db: psycopg.AsyncConnection, namespace: str) -> None:
    """The Scripts and Flows of `default` applied in `namespace` too."""
    await db.execute("INSERT INTO scripts (namespace, name, hash) "
                     "SELECT %s, name, hash FROM scripts WHERE namespace = 'default'",
                     [namespace])
    await db.execute("INSERT INTO flows (namespace, name, hash) "
                     "SELECT %s, name, hash FROM flows WHERE namespace = 'default'",
                     [namespace])
