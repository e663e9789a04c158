"""A worker's link to the API's dispatcher: one WebSocket, no database credentials.

Why a WebSocket rather than HTTP long-polls: a worker holds a claim open while it sends
outcomes and logs, and the API pushes cancellations the moment they are asked for. With
long-polls that takes two connections per worker (or outcomes waiting for the poll to
return) and cancellations wait for the next poll; one WebSocket carries all of it both
ways, through a Kubernetes Service or an ingress like any HTTP request, and a ping every
few seconds tells each side when the other vanished.

The connection is made again whenever it breaks (the API restarted, a replica went
away): requests in flight fail with LinkDown, which the worker's loops retry, and the
worker says which jobs it still runs so that the API hands back any it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from gristmill import values
from gristmill.dispatch import protocol
from gristmill.store import connections, queue
from gristmill.worker.links import Identity, LinkDown, OnCancel
from gristmill.worker.liveness import Liveness

log = logging.getLogger("gristmill.worker")

CONNECT_PATH = "/api/v1/workers/connect"
CLAIM_WAIT_S = 20.0  # under the liveness probe's stall time: a held claim is a live one
REQUEST_TIMEOUT_S = 30.0
MAX_SEND_BYTES = 8 * 1024 * 1024  # outcomes and logs are split into frames of this size


class LinkRefused(RuntimeError):
    """The API refused a request for a reason retrying cannot fix (a bug, or a worker of
    another version): the worker stops loudly."""


def _batches(items: Sequence[Any], size_of: Callable[[Any], int],
             max_count: int = protocol.MAX_BATCH) -> list[list[Any]]:
    """`items` in order, cut into batches of at most `max_count` and about MAX_SEND_BYTES."""
    batches: list[list[Any]] = [[]]
    size = 0
    for item in items:
        item_size = size_of(item)
        if batches[-1] and (len(batches[-1]) >= max_count or size + item_size > MAX_SEND_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += item_size
    return [batch for batch in batches if batch]


class DispatcherLink:
    def __init__(self, identity: Identity, server: str, token: str, liveness: Liveness,
                 on_cancel: OnCancel, running: Callable[[], list[uuid.UUID]],
                 claim_wait: float = CLAIM_WAIT_S):
        self.identity = identity
        self.worker_id = identity.worker_id  # the API's name for it, after the first hello
        self.url = server.rstrip("/") + CONNECT_PATH
        self.token = token
        self.liveness = liveness
        self.on_cancel = on_cancel
        self.running = running
        self.claim_wait = claim_wait
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0

    async def open(self) -> None:
        self._http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"})

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._http is not None:
            await self._http.close()

    def loops(self) -> dict[str, Awaitable[None]]:
        return {"connection": self._connection_loop()}

    # ---- the connection ------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        backoff = connections.Backoff(cap=10)
        while True:
            try:
                async with self._http.ws_connect(
                        self.url, heartbeat=10.0, max_msg_size=0,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5.0)) as ws:
                    self._ws = ws
                    reader = asyncio.create_task(self._read(ws), name="dispatch-read")
                    try:
                        await self._hello()
                        backoff.reset()
                        self.liveness.listening(True)
                        self._connected.set()
                        await reader
                    finally:
                        reader.cancel()
                        with contextlib.suppress(BaseException):
                            await reader
                    problem: BaseException | str = f"closed ({ws.close_code})"
            except aiohttp.WSServerHandshakeError as exc:
                problem = exc
                if exc.status in (401, 403):
                    problem = (f"the API refused this worker's token ({exc.status}): check "
                               f"the Secret gristmill-worker-<group> and the API's keys")
            except (TimeoutError, aiohttp.ClientError, OSError, LinkDown) as exc:
                problem = exc
            self._connected.clear()
            self._ws = None
            self.liveness.listening(False)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(LinkDown("the connection to the API broke"))
            self._pending.clear()
            delay = backoff.next_delay()
            self.liveness.failed("listen", RuntimeError(str(problem)))
            log.error("connection to the dispatcher at %s lost (%s); reconnecting in %.1fs",
                      self.url, problem, delay)
            await asyncio.sleep(delay)

    async def _hello(self) -> None:
        answer = await self._send({"op": "hello", "worker": self.identity.worker_id,
                                   "hostname": socket.gethostname(),
                                   "concurrency": self.identity.concurrency,
                                   "running": [str(job_id) for job_id in self.running()]},
                                  connected=False)
        self.worker_id = answer["worker"]

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            if frame.get("op") == "cancel":
                for job_id in frame.get("jobs", []):
                    self.on_cancel(uuid.UUID(job_id))
                continue
            future = self._pending.pop(frame.get("id"), None)
            if future is None or future.done():
                if frame.get("error"):
                    log.error("the dispatcher says: %s", frame["error"])
                continue
            if "error" in frame:
                error_type = LinkDown if frame.get("retry") else LinkRefused
                future.set_exception(error_type(f"the API: {frame['error']}"))
            else:
                future.set_result(frame.get("ok") or {})

    async def _send(self, request: dict[str, Any], connected: bool = True,
                    timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        if connected:
            try:
                await asyncio.wait_for(self._connected.wait(), timeout)
            except TimeoutError:
                raise LinkDown("not connected to the API") from None
        ws = self._ws
        if ws is None or ws.closed:
            raise LinkDown("not connected to the API")
        self._next_id += 1
        request_id = self._next_id
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await ws.send_str(values.dumps({"id": request_id, **request}))
            return await asyncio.wait_for(future, timeout)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise LinkDown(f"sending to the API failed: {exc}") from None
        except TimeoutError:
            raise LinkDown(f"the API did not answer within {timeout:g}s") from None
        finally:
            self._pending.pop(request_id, None)

    # ---- what the worker asks ------------------------------------------------------------

    async def register(self, running: Sequence[uuid.UUID] = ()) -> None:
        """Registered by the hello of each connection: wait for one."""
        try:
            await asyncio.wait_for(self._connected.wait(), REQUEST_TIMEOUT_S)
        except TimeoutError:
            raise LinkDown(f"cannot reach the API at {self.url}") from None

    async def claim(self, limit: int) -> tuple[list[queue.ClaimedJob], float | None]:
        answer = await self._send({"op": "claim", "limit": min(limit, protocol.MAX_CLAIM),
                                   "wait": self.claim_wait},
                                  timeout=self.claim_wait + REQUEST_TIMEOUT_S)
        # The API held the claim until something was due: ask again at once.
        return [protocol.job_from_wire(job) for job in answer["jobs"]], 0.0

    async def wait_for_work(self, seconds: float | None, stopping: asyncio.Event) -> None:
        if seconds:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), seconds)

    def wake(self) -> None:
        """Nothing to do: the API learns when retries are due."""

    async def script_specs(self, versions: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        specs: dict[str, dict[str, Any] | None] = {}
        for batch in _batches(sorted(versions), len):
            answer = await self._send({"op": "specs", "versions": batch})
            specs.update(answer["specs"])
        return specs

    async def finish(self, batch: list[queue.Outcome]) -> list[queue.EndedJob]:
        ended: list[queue.EndedJob] = []
        wires = [protocol.outcome_to_wire(outcome) for outcome in batch]
        for part in _batches(wires, lambda wire: len(values.dumps(wire))):
            answer = await self._send({"op": "finish", "outcomes": part})
            ended += [queue.EndedJob(uuid.UUID(job_id), status)
                      for job_id, status in answer["ended"]]
        return ended

    async def append_logs(self, chunks: list[tuple[uuid.UUID, str]]) -> None:
        pieces = [[str(job_id), text] for job_id, text in chunks]
        for part in _batches(pieces, lambda piece: len(piece[1]) * 2 + 40):
            await self._send({"op": "logs", "chunks": part})

    async def heartbeat(self) -> list[uuid.UUID]:
        # The API renews the leases of its connected workers itself and pushes
        # cancellations; this only proves the link carries requests.
        await self._send({"op": "beat"})
        return []

    async def hand_back(self, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        returned: list[uuid.UUID] = []
        for part in _batches([str(job_id) for job_id in job_ids], lambda _: 40):
            answer = await self._send({"op": "hand_back", "jobs": part})
            returned += [uuid.UUID(job_id) for job_id in answer["returned"]]
        return returned

    async def deregister(self) -> None:
        await self._send({"op": "bye"}, timeout=5.0)
