"""The dispatcher: the API's side of `gristmill worker --server`.

Workers connect over one WebSocket each (dispatch/protocol.py) and hold no database
credentials. The API replica they reach claims jobs on their behalf: every worker
waiting on the same tags is one *lane*, and a lane claims for all its waiting workers in
one statement (gristmill_claim_jobs_for), each job leased to exactly one of them under
its own worker id, so the lease fencing (worker id and attempt) is the same as for a
worker on the database. A notification wakes a lane once, never the fleet; a lane with
nothing due sleeps until the next delayed job is due. The replica renews the leases of
all its workers in one statement every third of a lease, pushes cancellations to the
worker running the job, completes flow timers itself (they run no code and take no
worker slot), and reaps the jobs of workers that went silent, as a worker on the
database does. Any number of replicas share the queue through SKIP LOCKED.

A worker that reconnects (the replica restarted, the network broke) says which jobs it
still runs; the others leased to it (a claim answered into a broken connection) go back
to the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from gristmill import values
from gristmill.dispatch import protocol
from gristmill.dispatch.tokens import WorkerGrant
from gristmill.flows import engine as flow_engine
from gristmill.store import connections, logs, queue, workers
from gristmill.store import scripts as script_store
from gristmill.worker import outcomes

log = logging.getLogger("gristmill.dispatch")

MAX_IN_FLIGHT = 64  # requests of one worker being answered at once
# Jobs one claim statement leases, over all the lane's waiting workers: a short statement
# lets a quiet namespace's next job in soon while another's backlog drains.
MAX_CLAIM_STATEMENT = 250
CONTROL_BATCH = 200
SAFETY_CLAIM_S = 30.0  # an idle lane claims this often at most, when workers come to wait
MIN_CLAIM_GAP_S = 0.05  # a due job another replica holds locked: do not spin on it
SEND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DispatchSettings:
    token_keys: tuple[bytes, ...] = ()  # none: no worker may connect (all use the database)
    lease: dt.timedelta = dt.timedelta(seconds=30)
    pool_size: int = 4
    ping_interval_s: float = 10.0  # WebSocket pings: a vanished worker is noticed by then


@dataclass(eq=False)
class _Waiter:
    """A worker's claim, held until jobs come or its wait ends."""

    session: Session
    limit: int
    deadline: float
    answer: asyncio.Future[list[queue.ClaimedJob]]


@dataclass(eq=False)
class Session:
    """One connected worker."""

    grant: WorkerGrant
    ws: web.WebSocketResponse | None  # None: the dispatcher's own (flow timers)
    worker_id: str = ""
    hostname: str = ""
    concurrency: int = 1
    closed: bool = False
    waiter: _Waiter | None = None
    cancels_sent: set[uuid.UUID] = field(default_factory=set)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(sorted(self.grant.tags))

    async def send(self, message: dict[str, Any]) -> None:
        if self.ws is None:
            raise ConnectionResetError("not a connection")
        async with self.send_lock:
            await asyncio.wait_for(self.ws.send_str(values.dumps(message)), SEND_TIMEOUT_S)


@dataclass(eq=False)
class _Lane:
    """The workers waiting on one set of tags, and when to claim for them."""

    tags: tuple[str, ...]
    waiters: list[_Waiter] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    due_at: float | None = None  # monotonic time the next queued job is due
    # False after a claim found less than it asked for, until a notification or due_at:
    # a worker that comes back to wait then waits, costing the database nothing.
    maybe_due: bool = True
    last_claim: float = 0.0
    task: asyncio.Task | None = None

    def nudge(self) -> None:
        """Jobs may be due (a notification, a requeued retry): claim for the waiting."""
        self.maybe_due = True
        self.wake.set()


class Dispatcher:
    def __init__(self, settings: DispatchSettings, database_url: str):
        self.settings = settings
        self.url = database_url
        self.pool = connections.pool(database_url, size=settings.pool_size, min_size=1,
                                     name="gristmill-dispatch")
        self.id = f"dispatcher-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.sessions: dict[str, Session] = {}
        self._lanes: dict[tuple[str, ...], _Lane] = {}
        self._tasks: list[asyncio.Task] = []
        self._beat_now = asyncio.Event()
        self.listening = asyncio.Event()
        self.claims = 0  # claim statements run (for benchmarks and metrics)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.token_keys)

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.open(wait=False)
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "listen": self._listen, "heartbeat": self._heartbeat, "control": self._control}
        self._tasks = [asyncio.create_task(self._supervised(name, loop), name=f"dispatch-{name}")
                       for name, loop in loops.items()]

    async def close_sessions(self) -> None:
        """Tell connected workers the API is going away (they reconnect, to another replica
        or to this one restarted)."""
        for session in list(self.sessions.values()):
            if session.ws is None:
                continue
            with contextlib.suppress(Exception):
                await session.ws.close(code=1012, message=b"the API is restarting")

    async def stop(self) -> None:
        await self.close_sessions()
        tasks = self._tasks + [lane.task for lane in self._lanes.values() if lane.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with self.pool.connection(timeout=2) as conn:
                await workers.deregister(conn, self.id)
        await self.pool.close()

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop for ever: one that dies of a bug is logged loudly and started again."""
        backoff = connections.Backoff(first=1.0, cap=30.0)
        while True:
            try:
                await loop()
                log.critical("dispatcher loop %r returned; starting it again", name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.critical("dispatcher loop %r died; starting it again", name, exc_info=True)
            await asyncio.sleep(backoff.next_delay())

    async def _db(self, work: Callable[[Any], Awaitable[Any]], transaction: bool = False) -> Any:
        async with self.pool.connection() as conn:
            if not transaction:
                return await work(conn)
            async with conn.transaction():
                return await work(conn)

    # ---- one worker's connection ---------------------------------------------------------

    async def serve(self, request: web.Request, grant: WorkerGrant) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=self.settings.ping_interval_s,
                                   max_msg_size=protocol.MAX_FRAME_BYTES)
        await ws.prepare(request)
        session = Session(grant, ws)
        in_flight: set[asyncio.Task] = set()
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    if message.type == WSMsgType.BINARY:
                        await self._refuse(session, None, "send JSON text frames")
                    continue
                try:
                    request_ = protocol.parse_request(values.loads(message.data, "message"))
                except values.ValueProblem as problem:
                    await self._refuse(session, None, problem.message)
                    continue
                except protocol.BadMessage as bad:
                    await self._refuse(session, bad.request_id, bad.message)
                    continue
                if isinstance(request_, protocol.Hello):
                    await self._answer(session, request_.id, self._hello(session, request_))
                    continue
                if not session.worker_id:
                    await self._refuse(session, request_.id, "say hello first")
                    continue
                if len(in_flight) >= MAX_IN_FLIGHT:
                    await self._refuse(session, request_.id, f"more than {MAX_IN_FLIGHT} "
                                                             f"requests at once")
                    continue
                task = asyncio.create_task(
                    self._answer_claim(session, request_)
                    if isinstance(request_, protocol.Claim)
                    else self._answer(session, request_.id, self._handle(session, request_)))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            session.closed = True
            self._drop_waiter(session)
            for task in in_flight:
                task.cancel()
            if self.sessions.get(session.worker_id) is session:
                del self.sessions[session.worker_id]
        return ws

    async def _refuse(self, session: Session, request_id: int | None, message: str) -> None:
        with contextlib.suppress(Exception):
            await session.send({"id": request_id, "error": message})

    async def _answer(self, session: Session, request_id: int, work: Awaitable[Any]) -> None:
        try:
            answer: dict[str, Any] = {"id": request_id, "ok": await work}
        except connections.TRANSIENT_ERRORS as exc:
            answer = {"id": request_id, "error": f"the database is unavailable ({exc})",
                      "retry": True}
        except _Refused as refused:
            answer = {"id": request_id, "error": refused.message}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("worker %s: a request failed", session.worker_id)
            answer = {"id": request_id, "error": f"the API failed: {exc}", "retry": True}
        with contextlib.suppress(Exception):
            await session.send(answer)

    async def _answer_claim(self, session: Session, claim: protocol.Claim) -> None:
        """A claim's answer: jobs that cannot be handed over (the connection broke) go back
        to the queue at once, not when the lease runs out."""
        jobs = await self._wait_for_jobs(session, claim.limit, claim.wait)
        try:
            await session.send({"id": claim.id, "ok": {
                "jobs": [protocol.job_to_wire(job) for job in jobs]}})
        except Exception as exc:
            if jobs:
                log.warning("worker %s: %d claimed jobs could not be sent (%s); handing them "
                            "back", session.worker_id, len(jobs), exc)
                await self._hand_back_unsent(session.worker_id, [job.id for job in jobs])

    async def _hand_back_unsent(self, worker_id: str, job_ids: list[uuid.UUID]) -> None:
        try:
            await self._db(lambda conn: queue.hand_back(conn, worker_id, job_ids))
        except connections.TRANSIENT_ERRORS as exc:
            log.error("handing back jobs of %s failed (%s); they return when its lease "
                      "runs out or it reconnects", worker_id, exc)

    async def _hello(self, session: Session, hello: protocol.Hello) -> dict[str, Any]:
        if session.worker_id:
            raise _Refused("hello once per connection")
        worker_id = f"{session.grant.worker_prefix}{hello.worker}"
        session.worker_id, session.hostname = worker_id, hello.hostname or hello.worker
        session.concurrency = hello.concurrency
        await self._db(lambda conn: workers.register(
            conn, worker_id, session.tags, hello.concurrency, session.hostname))
        older = self.sessions.get(worker_id)
        self.sessions[worker_id] = session
        if older is not None and older is not session and older.ws is not None:
            self._drop_waiter(older)
            with contextlib.suppress(Exception):
                await older.ws.close(code=1008, message=b"replaced by a newer connection")
        # Jobs leased to this worker that it does not run (answered into a broken
        # connection) go back to the queue.
        returned = await self._db(lambda conn: queue.hand_back_all_but(
            conn, worker_id, hello.running), transaction=True)
        if returned:
            log.warning("worker %s reconnected without %d of its jobs; handed them back",
                        worker_id, len(returned))
        return {"worker": worker_id, "tags": list(session.tags),
                "lease_s": self.settings.lease.total_seconds()}

    async def _handle(self, session: Session, request: Any) -> dict[str, Any]:
        worker_id = session.worker_id
        if isinstance(request, protocol.Specs):
            specs = await self._db(lambda conn: script_store.get_versions(
                conn, sorted(set(request.versions))))
            return {"specs": {version: specs.get(version) for version in request.versions}}
        if isinstance(request, protocol.Finish):
            batch = [protocol.outcome_of(wire) for wire in request.outcomes]
            batch = [dataclasses.replace(o, error=outcomes.storable_error(o.error))
                     if o.status != "succeeded" else o for o in batch]
            ended = await outcomes.finish(self.pool, worker_id, batch)
            if any(job.status == "requeued" for job in ended):
                self._learn_when_due(session.tags)  # a retry, due after its backoff
            return {"ended": [[str(job.id), job.status] for job in ended]}
        if isinstance(request, protocol.Logs):
            await self._db(lambda conn: logs.append(conn, request.chunks, worker_id=worker_id))
            return {}
        if isinstance(request, protocol.HandBack):
            returned = await self._db(lambda conn: queue.hand_back(conn, worker_id,
                                                                   request.jobs))
            return {"returned": [str(job_id) for job_id in returned]}
        if isinstance(request, protocol.Beat):
            return {"registered": True}
        if isinstance(request, protocol.Bye):
            self._drop_waiter(session)
            await self._db(lambda conn: workers.deregister(conn, worker_id))
            return {}
        raise _Refused(f"unknown request {type(request).__name__}")

    # ---- claiming ------------------------------------------------------------------------

    def _lane(self, tags: tuple[str, ...]) -> _Lane:
        lane = self._lanes.get(tags)
        if lane is None:
            lane = self._lanes[tags] = _Lane(tags)
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._supervised(
                f"lane {','.join(tags)}", lambda: self._claim_loop(lane)),
                name=f"dispatch-lane-{','.join(tags)}")
        return lane

    async def _wait_for_jobs(self, session: Session, limit: int, wait: float,
                             tags: tuple[str, ...] | None = None) -> list[queue.ClaimedJob]:
        """Up to `limit` jobs leased to the session's worker, as soon as any is due, or none
        after `wait` seconds."""
        self._drop_waiter(session)  # one claim at a time: a newer one replaces it
        lane = self._lane(tags or session.tags)
        waiter = _Waiter(session, limit, time.monotonic() + wait,
                         asyncio.get_running_loop().create_future())
        session.waiter = waiter
        lane.waiters.append(waiter)
        # Also after a while without a claim: should a notification have been lost.
        if lane.maybe_due or time.monotonic() - lane.last_claim > SAFETY_CLAIM_S:
            lane.wake.set()
        try:
            return await waiter.answer
        finally:
            if session.waiter is waiter:
                session.waiter = None

    def _learn_when_due(self, tags: tuple[str, ...]) -> None:
        """A job of the lane was requeued for later (no notification says so): claim once to
        learn when it is due."""
        lane = self._lanes.get(tags)
        if lane is not None:
            lane.nudge()

    def _drop_waiter(self, session: Session) -> None:
        waiter = session.waiter
        if waiter is not None and not waiter.answer.done():
            waiter.answer.set_result([])
        session.waiter = None

    async def _claim_loop(self, lane: _Lane) -> None:
        backoff = connections.Backoff()
        while True:
            now = time.monotonic()
            for waiter in lane.waiters:
                if waiter.deadline <= now and not waiter.answer.done():
                    waiter.answer.set_result([])
            lane.waiters = [w for w in lane.waiters if not w.answer.done()]
            if not lane.waiters:
                # Nobody waiting: sleep until someone is.
                lane.wake.clear()
                await lane.wake.wait()
                continue
            claim_now = lane.wake.is_set() or (lane.due_at is not None and lane.due_at <= now)
            if not claim_now:
                wake_at = min([w.deadline for w in lane.waiters]
                              + ([lane.due_at] if lane.due_at is not None else []))
                timeout = max(0.0, wake_at - now)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(lane.wake.wait(), timeout)
                continue
            lane.wake.clear()
            lane.due_at = None
            try:
                more = await self._claim_for(lane)
            except connections.TRANSIENT_ERRORS as exc:
                log.error("claiming for the workers of %s failed, retrying: %s",
                          ",".join(lane.tags), exc)
                await asyncio.sleep(backoff.next_delay())
                lane.nudge()
                continue
            backoff.reset()
            if more:
                lane.wake.set()

    async def _claim_for(self, lane: _Lane) -> bool:
        """One claim statement for the lane's waiting workers; True if they got all they
        asked for (so more may be due), else the lane sleeps until the next job is due."""
        grants, total, chosen = [], 0, []
        for waiter in lane.waiters:
            if total + waiter.limit > MAX_CLAIM_STATEMENT and grants:
                break
            grants.append((waiter.session.worker_id, waiter.limit))
            chosen.append(waiter)
            total += waiter.limit

        async def claim(conn):
            claimed = await queue.claim_for(conn, grants, lane.tags)
            filled = sum(len(jobs) for jobs in claimed.values()) == total
            return claimed, filled, None if filled else await queue.next_due(conn, lane.tags)

        self.claims += 1
        claimed, filled, due_in = await self._db(claim, transaction=True)
        abandoned: dict[str, list[uuid.UUID]] = {}
        for waiter in chosen:
            jobs = claimed.get(waiter.session.worker_id, [])
            if not jobs:
                continue
            if waiter.answer.done() or waiter.session.closed:
                abandoned[waiter.session.worker_id] = [job.id for job in jobs]
            else:
                waiter.answer.set_result(jobs)
        for worker_id, job_ids in abandoned.items():  # the worker left while we claimed
            await self._hand_back_unsent(worker_id, job_ids)
        # A wake-up during the claim (a notification) may have brought more.
        lane.maybe_due = filled or lane.wake.is_set()
        lane.last_claim = time.monotonic()
        if due_in is not None:
            lane.due_at = time.monotonic() + max(due_in, MIN_CLAIM_GAP_S)
        return filled

    # ---- flow timers ---------------------------------------------------------------------

    async def _control(self) -> None:
        """Complete due flow timers (and no-op jobs of the control tag): no code runs."""
        control = Session(WorkerGrant("", "", (flow_engine.CONTROL_TAG,)), ws=None)
        control.worker_id = self.id
        await self._db(lambda conn: workers.register(
            conn, self.id, [flow_engine.CONTROL_TAG], CONTROL_BATCH))
        backoff = connections.Backoff()
        while True:
            jobs = await self._wait_for_jobs(control, CONTROL_BATCH, protocol.MAX_WAIT_S,
                                             tags=(flow_engine.CONTROL_TAG,))
            done = [queue.Outcome(job.id, job.attempt, "succeeded", result=job.input)
                    for job in jobs]
            while done:
                try:
                    await outcomes.finish(self.pool, self.id, done)
                    break
                except connections.TRANSIENT_ERRORS as exc:
                    log.error("completing flow timers failed, retrying: %s", exc)
                    await asyncio.sleep(backoff.next_delay())
            backoff.reset()

    # ---- leases, cancellations, reaping ----------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.settings.lease.total_seconds() / 3
        beating_since: float | None = None
        while True:
            try:
                await self._beat()
                now = time.monotonic()
                beating_since = beating_since or now
                # As a worker on the database: judge others lost only after a whole lease of
                # our own beats (after an outage, every live worker's beat is old).
                if now - beating_since >= self.settings.lease.total_seconds():
                    await self._db(lambda conn: outcomes.reap_lost(conn, self.settings.lease))
            except connections.TRANSIENT_ERRORS as exc:
                beating_since = None
                log.error("renewing the leases of connected workers failed: %s", exc)
            self._beat_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), interval)

    async def _beat(self) -> None:
        sessions = {s.worker_id: s for s in self.sessions.values() if s.worker_id}
        beat = await self._db(lambda conn: workers.heartbeat_many(conn, [*sessions, self.id]))
        for worker_id in [*sessions, self.id]:
            if worker_id not in beat.registered:
                # Forgotten while the database was away: registered again (its reaped jobs
                # are no longer its own, and their outcomes will not count).
                await self._register_again(worker_id, sessions.get(worker_id))
        for worker_id, job_ids in beat.cancel.items():
            session = sessions.get(worker_id)
            new = [job_id for job_id in job_ids if session and job_id not in session.cancels_sent]
            if session and new:
                session.cancels_sent.update(new)
                with contextlib.suppress(Exception):
                    await session.send({"op": "cancel", "jobs": [str(job_id) for job_id in new]})

    async def _register_again(self, worker_id: str, session: Session | None) -> None:
        tags = session.tags if session else (flow_engine.CONTROL_TAG,)
        concurrency = session.concurrency if session else CONTROL_BATCH
        hostname = session.hostname if session else None
        await self._db(lambda conn: workers.register(conn, worker_id, tags, concurrency,
                                                     hostname))

    async def _listen(self) -> None:
        """Wake-ups (a tag's lane claims once) and cancellations (leases renewed at once,
        which finds the jobs to cancel), over one connection that reconnects."""

        def on_note(note) -> None:
            if note.channel == queue.CANCEL_CHANNEL:
                self._beat_now.set()
                return
            for lane in self._lanes.values():
                if note.payload == "*" or "*" in lane.tags or note.payload in lane.tags:
                    lane.nudge()

        def on_up() -> None:
            self.listening.set()
            for lane in self._lanes.values():  # what was queued while we were away
                lane.nudge()

        await queue.listen_forever(self.url, on_note, on_up,
                                   lambda exc: self.listening.clear(), "dispatcher")


class _Refused(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
