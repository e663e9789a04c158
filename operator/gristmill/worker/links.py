"""Where a worker's jobs come from and its outcomes go: the queue itself (a worker on the
database: `gristmill dev`, benchmarks) or the API's dispatcher (WorkerGroup pods).

Both links call the same store functions (store/queue.py, worker/outcomes.py); the
dispatcher calls them on the worker's behalf. A link raises LINK_ERRORS when its far end
is away for a moment: the worker's loops retry those.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gristmill.flows import engine as flow_engine
from gristmill.store import connections, logs, queue, workers
from gristmill.store import scripts as script_store
from gristmill.worker import outcomes
from gristmill.worker.liveness import Liveness

log = logging.getLogger("gristmill.worker")

T = TypeVar("T")


class LinkDown(Exception):
    """The dispatcher cannot be reached (or cannot reach the database) right now."""


LINK_ERRORS = (*connections.TRANSIENT_ERRORS, LinkDown)

OnCancel = Callable[[uuid.UUID], None]


@dataclass(frozen=True)
class Identity:
    worker_id: str
    tags: list[str]
    concurrency: int


class QueueLink(Protocol):
    """What the worker's loops need of the queue."""

    worker_id: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    def loops(self) -> dict[str, Awaitable[None]]:
        """Background loops of the link itself, supervised with the worker's."""
        ...
    async def register(self, running: Sequence[uuid.UUID] = ()) -> None: ...
    async def claim(self, limit: int) -> tuple[list[queue.ClaimedJob], float | None]:
        """Jobs leased to this worker and, when fewer than `limit`, the seconds to wait
        before claiming again (None: until woken, or the poll interval)."""
        ...
    async def wait_for_work(self, seconds: float | None, stopping: asyncio.Event) -> None: ...
    def wake(self) -> None: ...
    async def script_specs(self, versions: Sequence[str]) -> dict[str, dict[str, Any] | None]: ...
    async def finish(self, batch: list[queue.Outcome]) -> list[queue.EndedJob]: ...
    async def append_logs(self, chunks: list[tuple[uuid.UUID, str]]) -> None: ...
    async def heartbeat(self) -> list[uuid.UUID]:
        """Renew the lease; the running jobs someone asked to cancel."""
        ...
    async def hand_back(self, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]: ...
    async def deregister(self) -> None: ...


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Until one of `events` is set (or the timeout passes)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class DirectLink:
    """A worker on the database: a pool of three connections (claims, finishes, heartbeats
    and logs) and one that LISTENs (wake-ups and cancellations). It also reaps the jobs of
    workers that went silent."""

    def __init__(self, identity: Identity, database_url: str, lease: dt.timedelta,
                 poll_interval: float, liveness: Liveness, on_cancel: OnCancel):
        self.identity = identity
        self.worker_id = identity.worker_id
        self.url = database_url
        self.lease = lease
        self.poll_interval = poll_interval
        self.liveness = liveness
        self.on_cancel = on_cancel
        self._wakeup = asyncio.Event()
        self._heartbeating_since: float | None = None
        self._pool = connections.pool(database_url, size=3, name=f"worker-{self.worker_id}")

    async def open(self) -> None:
        await self._pool.open()  # without waiting: the database may not be up yet

    async def close(self) -> None:
        await self._pool.close()

    def loops(self) -> dict[str, Awaitable[None]]:
        return {"listen": self._listen()}

    async def _db(self, work: Callable[[Any], Awaitable[T]]) -> T:
        async with self._pool.connection() as conn:
            return await work(conn)

    @property
    def _tags(self) -> list[str]:
        # Every worker on the database also completes the flow engine's timers.
        return [*self.identity.tags, flow_engine.CONTROL_TAG]

    async def register(self, running: Sequence[uuid.UUID] = ()) -> None:
        await self._db(lambda conn: workers.register(
            conn, self.worker_id, self.identity.tags, self.identity.concurrency))

    async def claim(self, limit: int) -> tuple[list[queue.ClaimedJob], float | None]:
        self._wakeup.clear()
        async with self._pool.connection() as conn:
            async with conn.transaction():
                claimed = await queue.claim(conn, self.worker_id, self._tags, limit)
            due_in = None
            if len(claimed) < limit:
                due = await queue.next_due(conn, self._tags)
                due_in = self.poll_interval if due is None else min(self.poll_interval, due)
        return claimed, due_in

    async def wait_for_work(self, seconds: float | None, stopping: asyncio.Event) -> None:
        await wait_any(self._wakeup, stopping, timeout=seconds)

    def wake(self) -> None:
        self._wakeup.set()

    async def script_specs(self, versions: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        return await self._db(lambda conn: script_store.get_versions(conn, sorted(versions)))

    async def finish(self, batch: list[queue.Outcome]) -> list[queue.EndedJob]:
        return await outcomes.finish(self._pool, self.worker_id, batch)

    async def append_logs(self, chunks: list[tuple[uuid.UUID, str]]) -> None:
        await self._db(lambda conn: logs.append(conn, chunks))

    async def hand_back(self, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        return await self._db(lambda conn: queue.hand_back(conn, self.worker_id, job_ids))

    async def deregister(self) -> None:
        await self._db(lambda conn: workers.deregister(conn, self.worker_id))

    async def heartbeat(self) -> list[uuid.UUID]:
        try:
            async with self._pool.connection() as conn:
                beat = await workers.heartbeat(conn, self.worker_id)
                if not beat.registered:
                    # Forgotten while away (a long outage): register again; jobs reaped
                    # meanwhile are no longer ours, and their outcomes will not count.
                    log.warning("worker %s was no longer registered; registering again",
                                self.worker_id)
                    await workers.register(conn, self.worker_id, self.identity.tags,
                                           self.identity.concurrency)
                now = asyncio.get_running_loop().time()
                if self._heartbeating_since is None:
                    self._heartbeating_since = now
                # Judge other workers dead only after beating for a whole lease ourselves:
                # after an outage, every live worker's last beat is old until it reconnects.
                if now - self._heartbeating_since >= self.lease.total_seconds():
                    await outcomes.reap_lost(conn, self.lease)
        except LINK_ERRORS:
            self._heartbeating_since = None
            raise
        return list(beat.cancel)

    async def _listen(self) -> None:
        """Wake-ups and cancellations, over one connection that reconnects when it breaks."""
        tags = set(self._tags)

        def on_note(note) -> None:
            if note.channel == queue.CANCEL_CHANNEL:
                with contextlib.suppress(ValueError):
                    self.on_cancel(uuid.UUID(note.payload))
            elif note.payload == "*" or "*" in tags or note.payload in tags:
                self._wakeup.set()

        def on_up() -> None:
            self.liveness.listening(True)
            self._wakeup.set()  # what was queued while we were away

        def on_down(exc: BaseException) -> None:
            self.liveness.listening(False)
            self.liveness.failed("listen", exc)

        await queue.listen_forever(self.url, on_note, on_up, on_down,
                                   f"worker {self.worker_id}")
