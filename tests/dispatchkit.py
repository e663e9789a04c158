"""Helpers for dispatcher tests: an API that takes workers, worker tokens, workers of the
dispatcher, and a raw WebSocket client that speaks the protocol by hand."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from typing import Any

import aiohttp

from gristmill.dispatch import tokens
from gristmill.dispatch.hub import DispatchSettings
from gristmill.sandbox.process import ProcessExecutor
from gristmill.worker.dispatch_link import CONNECT_PATH
from gristmill.worker.loop import Worker, WorkerConfig
from tests import apikit

KEY_TEXT = tokens.new_key()
KEYS = tuple(tokens.parse_keys(KEY_TEXT))


def token(tags: tuple[str, ...] = ("python", "bash"), namespace: str = "default",
          group: str = "workers", key: bytes = KEYS[0]) -> str:
    return tokens.issue(key, tokens.WorkerGrant(namespace, group, tags))


def api_settings(database_url: str, lease_s: float = 30.0):
    return apikit.settings(database_url, dispatch=DispatchSettings(
        token_keys=KEYS, lease=dt.timedelta(seconds=lease_s), ping_interval_s=1.0))


def worker(server: str, tags: tuple[str, ...] = ("python", "bash"), concurrency: int = 2,
           worker_token: str | None = None, executor=None, **config: Any) -> Worker:
    return Worker(WorkerConfig(None, list(tags), concurrency=concurrency, server=server,
                               token=worker_token or token(tags), grace_period=5, **config),
                  executor or ProcessExecutor())


@contextlib.asynccontextmanager
async def api_app(settings) -> Any:
    """The API app on a loopback port; yields (its URL, the app), e.g. for its dispatcher."""
    from aiohttp import web

    from gristmill.api.app import create_app
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = apikit.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running(*workers: Worker):
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        yield workers
    finally:
        stop.set()
        await asyncio.gather(*tasks)


class RawWorker:
    """A worker speaking the protocol by hand (as a hostile or broken one might)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.next_id = 0
        self.pushed: list[dict[str, Any]] = []

    async def send_raw(self, data: str) -> None:
        await self.ws.send_str(data)

    async def receive(self, timeout: float = 10) -> dict[str, Any]:
        message = await self.ws.receive(timeout=timeout)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        return json.loads(message.data)

    async def answer_to(self, request_id: int | None, timeout: float = 10) -> dict[str, Any]:
        while True:
            frame = await self.receive(timeout)
            if frame.get("op") == "cancel":
                self.pushed.append(frame)
                continue
            if frame.get("id") == request_id:
                return frame

    async def request(self, op: str, timeout: float = 10, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "op": op, **fields}))
        return await self.answer_to(self.next_id, timeout)


@contextlib.asynccontextmanager
async def raw_worker(server: str, worker_token: str, hello: dict[str, Any] | None = None):
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with aiohttp.ClientSession(headers=headers) as s, \
            s.ws_connect(server + CONNECT_PATH) as ws:
        raw = RawWorker(ws)
        if hello is not None:
            answer = await raw.request("hello", **hello)
            assert "ok" in answer, answer
        yield raw
