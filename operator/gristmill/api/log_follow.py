"""Following a job's log: woken by notifications, not by polling per follower.

One LISTEN connection per API process (JobWatch) hears which jobs' logs grew and which
jobs ended, and wakes the followers of those jobs. A waiting follower holds no
database connection and costs nothing; it reads only when woken, when the slow
fallback poll comes round (for notifications lost while the listening connection was
down) or when its client may have gone, which it checks without the database. When
the listening connection breaks it is made again, and every follower is woken then,
since notifications sent in between are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import psycopg
from aiohttp import web
from prometheus_client import Counter, Gauge

from gristmill.api.database import Database, DatabaseUnavailable
from gristmill.store import logs, notifications

log = logging.getLogger("gristmill.api")

FINAL_STATUSES = {"succeeded", "failed", "cancelled"}
CLIENT_CHECK_S = 1.0  # how soon a follower whose client left notices, without the database
READ_BATCH = 1000

FOLLOWERS = Gauge("gristmill_api_log_followers", "Log followers connected to this API process")
FOLLOW_READS = Counter("gristmill_api_log_follow_reads_total",
                       "Database reads made for log followers")


class JobWatch:
    """The process's LISTEN connection and the followers waiting on each job."""

    def __init__(self, url: str):
        self.url = url
        self._waiting: dict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)
        self.listening = asyncio.Event()  # set while LISTEN is in force
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="job-watch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.asynccontextmanager
    async def watch(self, job_id: uuid.UUID) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the job's log grows or the job ends."""
        event = asyncio.Event()
        self._waiting[job_id].add(event)
        try:
            yield event
        finally:
            waiting = self._waiting.get(job_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[job_id]

    def _wake(self, job_ids: list[uuid.UUID]) -> None:
        for job_id in job_ids:
            for event in self._waiting.get(job_id, ()):
                event.set()

    def _wake_all(self) -> None:
        for events in self._waiting.values():
            for event in events:
                event.set()

    async def _listen_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, connect_timeout=5) as conn:
                    await notifications.listen(
                        conn, [notifications.LOGS_CHANNEL, notifications.ENDED_CHANNEL])
                    self.listening.set()
                    self._wake_all()  # whatever was sent while we were not listening
                    delay = 0.1
                    while True:
                        async for note in conn.notifies(timeout=10):
                            self._wake(notifications.parse_ids(note.payload))
                        await notifications.ping(conn)  # a quiet connection may be dead
            except asyncio.CancelledError:
                raise
            except psycopg.Error as exc:
                log.warning("log notifications: %s; listening again in %.1f s",
                            str(exc).strip() or type(exc).__name__, delay)
            except Exception:  # a bug: say so loudly, and keep followers served
                log.exception("log notifications failed; listening again in %.1f s", delay)
            self.listening.clear()
            self._wake_all()  # followers fall back to reading until we are back
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _wait(event: asyncio.Event, request: web.Request, fallback_s: float) -> bool:
    """Wait for a wake-up or the fallback poll; False if the client went away first."""
    remaining = fallback_s * random.uniform(0.8, 1.2)  # followers' polls stay spread out
    while remaining > 0:
        step = min(CLIENT_CHECK_S, remaining)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), step)
        if client_gone(request):
            return False
        if event.is_set():
            return True
        remaining -= step
    return True


async def stream_job_log(request: web.Request, response: web.StreamResponse, db: Database,
                         watch: JobWatch, job_id: uuid.UUID, after: int, follow: bool,
                         fallback_s: float) -> None:
    """Write the job's log after seq `after`; with `follow`, until the job ends or the
    client leaves."""

    async def read(conn: psycopg.AsyncConnection) -> tuple[str | None, list[tuple[int, str]]]:
        return await logs.read_followed(conn, job_id, after, READ_BATCH)

    FOLLOWERS.inc()
    try:
        async with watch.watch(job_id) as woken:
            while True:
                woken.clear()
                FOLLOW_READS.inc()
                try:
                    status, entries = await db.read(read)
                except DatabaseUnavailable:
                    if not follow:
                        raise
                    status, entries = None, []  # keep following: it comes back
                for seq, chunk in entries:
                    await response.write(chunk.encode())
                    after = seq
                if len(entries) == READ_BATCH:
                    continue
                if not follow or status in FINAL_STATUSES:
                    return
                if not await _wait(woken, request, fallback_s):
                    return
    finally:
        FOLLOWERS.dec()

