"""The job queue: enqueue, claim, finish, retry, cancel, reap, hand back.

Every function takes an open async connection and runs in the caller's
transaction, so a caller (the flow engine, later) can add its own writes to
the same commit. Notifications are sent with the enqueue and reach listeners
when that transaction commits.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from gristmill import values
from gristmill.store import connections, ids, notifications, queries

log = logging.getLogger("gristmill.store")

JOBS_CHANNEL = "gristmill_jobs"
CANCEL_CHANNEL = "gristmill_cancel"


@dataclass
class NewJob:
    namespace: str
    tag: str
    kind: str = "script"
    input: dict[str, Any] = field(default_factory=dict)
    script_name: str | None = None
    script_hash: str | None = None
    priority: int = 0
    max_attempts: int = 1
    scheduled_for: dt.datetime | None = None
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    flow_run_id: uuid.UUID | None = None
    step_path: str | None = None
    retry_policy: dict[str, Any] | None = None  # overrides the Script's (flow steps)
    timeout_s: float | None = None  # overrides the Script's (flow steps)
    labels: dict[str, str] = field(default_factory=dict)  # a submitted run's, for listing
    id: uuid.UUID = field(default_factory=ids.new_id)


@dataclass(frozen=True)
class ClaimedJob:
    id: uuid.UUID
    namespace: str
    kind: str
    script_name: str | None
    script_hash: str | None
    tag: str
    priority: int
    input: dict[str, Any]
    attempt: int
    max_attempts: int
    created_at: dt.datetime
    scheduled_for: dt.datetime
    started_at: dt.datetime
    flow_run_id: uuid.UUID | None = None
    step_path: str | None = None
    retry_policy: dict[str, Any] | None = None
    timeout_s: float | None = None
    input_problem: str | None = None  # why `input` could not be read; the job cannot run


def _claimed(row: dict[str, Any]) -> ClaimedJob:
    try:
        job_input, problem = values.loads(row["input"], "input"), None
    except values.ValueProblem as exc:
        job_input, problem = {}, exc.message
    return ClaimedJob(
        id=row["id"], namespace=row["namespace"], kind=row["kind"],
        script_name=row["script_name"], script_hash=row["script_hash"], tag=row["tag"],
        priority=row["priority"], input=job_input, attempt=row["attempt"],
        max_attempts=row["max_attempts"], created_at=row["created_at"],
        scheduled_for=row["scheduled_for"], started_at=row["started_at"],
        flow_run_id=row["flow_run_id"], step_path=row["step_path"],
        retry_policy=row["retry_policy"], timeout_s=row["timeout_s"], input_problem=problem,
    )


@dataclass(frozen=True)
class EndedJob:
    """A job that left the queue (or was requeued, status "requeued"), for the flow engine."""

    id: uuid.UUID
    status: str  # requeued | succeeded | failed | cancelled
    flow_run_id: uuid.UUID | None = None
    step_path: str | None = None
    kind: str | None = None
    input: dict[str, Any] | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    attempts: int | None = None


def statuses(ended: Sequence[EndedJob]) -> dict[uuid.UUID, str]:
    return {job.id: job.status for job in ended}


async def _ended(cur: psycopg.AsyncCursor) -> list[EndedJob]:
    return [EndedJob(*row) for row in await cur.fetchall()]


async def _notify_ended(conn: psycopg.AsyncConnection, jobs: Sequence[EndedJob]) -> None:
    """Tell log followers (the API) which jobs ended: one NOTIFY per statement that ended
    any, delivered at its commit."""
    await notifications.send_ids(conn, notifications.ENDED_CHANNEL,
                                 [job.id for job in jobs if job.status != "requeued"])


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the worker reports it."""

    job_id: uuid.UUID
    attempt: int
    status: str  # succeeded | failed | cancelled
    result: Any = None
    error: dict[str, Any] | None = None
    retry_delay: float | None = None  # seconds; set when a failed attempt should be retried


async def listen(conn: psycopg.AsyncConnection) -> None:
    """Subscribe `conn` to wake-ups (payload: a tag, or '*') and cancellations (a job id)."""
    await conn.execute(queries.LISTEN_JOBS)
    await conn.execute(queries.LISTEN_CANCEL)


class VersionMoved(Exception):
    """enqueue(only_current_versions=True) inserted nothing: a Script's current version is
    no longer the one its jobs pin (an apply moved it, or the Script was deleted)."""


_ENQUEUE = {False: queries.ENQUEUE.format(guard=""),
            True: queries.ENQUEUE.format(guard=queries.ENQUEUE_ONLY_CURRENT)}


async def listen_forever(url: str, on_note: Callable[[psycopg.Notify], None],
                         on_up: Callable[[], None], on_down: Callable[[BaseException], None],
                         who: str) -> None:
    """Wake-ups and cancellations for as long as the caller runs, over one connection made
    again whenever it breaks: `on_up` each time LISTEN is in force (what was sent while
    away is lost: catch up then), `on_down` when it broke."""
    backoff = connections.Backoff(cap=10)
    while True:
        try:
            async with await connections.connect(url) as conn:
                await listen(conn)
                backoff.reset()
                on_up()
                async for note in conn.notifies():
                    on_note(note)
        except connections.TRANSIENT_ERRORS as exc:
            on_down(exc)
            delay = backoff.next_delay()
            log.error("%s: LISTEN connection lost (%s); reconnecting in %.1fs", who, exc, delay)
            await asyncio.sleep(delay)


async def enqueue(conn: psycopg.AsyncConnection, jobs: Sequence[NewJob],
                  only_current_versions: bool = False) -> list[uuid.UUID]:
    """Insert jobs and wake the workers of their tags at commit (those of delayed jobs
    too: they learn when to claim next), in one statement.

    `only_current_versions`: insert the jobs only if each pins its Script's current
    version (`script_hash`), else insert none and raise VersionMoved (jobs of one Script
    are all inserted or none: one statement sees one version)."""
    if not jobs:
        return []
    now = dt.datetime.now(dt.UTC)
    cur = await conn.execute(
        _ENQUEUE[only_current_versions],
        [
            [j.id for j in jobs],
            [j.namespace for j in jobs],
            [j.kind for j in jobs],
            [j.script_name for j in jobs],
            [j.script_hash for j in jobs],
            [j.tag for j in jobs],
            [j.priority for j in jobs],
            [Jsonb(j.input) for j in jobs],
            [j.scheduled_for or now for j in jobs],
            [j.max_attempts for j in jobs],
            [j.concurrency_key for j in jobs],
            [j.concurrency_limit for j in jobs],
            [j.flow_run_id for j in jobs],
            [j.step_path for j in jobs],
            [Jsonb(j.retry_policy) if j.retry_policy else None for j in jobs],
            [j.timeout_s for j in jobs],
            [Jsonb(j.labels) for j in jobs],
        ],
    )
    inserted, _ = await cur.fetchone()
    if inserted != len(jobs):
        if only_current_versions and inserted == 0:
            raise VersionMoved()
        # Only a guard of several Scripts' versions can do this; refuse rather than queue part.
        raise RuntimeError(f"enqueue inserted {inserted} of {len(jobs)} jobs")
    return [j.id for j in jobs]


async def claim(
    conn: psycopg.AsyncConnection, worker_id: str, tags: Sequence[str], limit: int
) -> list[ClaimedJob]:
    """Lease up to `limit` due jobs of `tags` to `worker_id` (commit to make it stick)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(queries.CLAIM, [worker_id, list(tags), limit])
    return [_claimed(row) for row in await cur.fetchall()]


async def claim_for(
    conn: psycopg.AsyncConnection, grants: Sequence[tuple[str, int]], tags: Sequence[str]
) -> dict[str, list[ClaimedJob]]:
    """Lease due jobs of `tags` to several workers in one statement: up to `limit` to each
    (worker id, limit) of `grants`, the first the first jobs; each job to one worker."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(queries.CLAIM_FOR, [[worker for worker, _ in grants],
                                          [limit for _, limit in grants], list(tags)])
    claimed: dict[str, list[ClaimedJob]] = {}
    for row in await cur.fetchall():
        claimed.setdefault(row["worker_id"], []).append(_claimed(row))
    return claimed


async def next_due(conn: psycopg.AsyncConnection, tags: Sequence[str]) -> float | None:
    """Seconds until the next queued job of `tags` is due (at most 0 if one is), or None
    when none is queued."""
    if "*" in tags:
        cur = await conn.execute(queries.NEXT_DUE_ANY_TAG)
    else:
        cur = await conn.execute(queries.NEXT_DUE, [list(tags)])
    (seconds,) = await cur.fetchone()
    return seconds


async def finish(
    conn: psycopg.AsyncConnection, worker_id: str, outcomes: Sequence[Outcome]
) -> list[EndedJob]:
    """Record outcomes; return the jobs they ended or requeued.

    Outcomes for jobs this worker no longer holds (reaped, cancelled while
    queued) are ignored and absent from the result.
    """
    if not outcomes:
        return []
    # Never a prepared statement: PostgreSQL would switch it to a generic plan after five
    # runs, one blind to how many outcomes the arrays hold (a nested loop over every
    # running job). Unprepared, each run is planned for its own arrays.
    cur = await conn.execute(
        queries.FINISH,
        {
            "worker": worker_id,
            "ids": [o.job_id for o in outcomes],
            "attempts": [o.attempt for o in outcomes],
            "statuses": [o.status for o in outcomes],
            "results": [Jsonb(o.result) if o.result is not None else None for o in outcomes],
            "errors": [Jsonb(o.error) if o.error is not None else None for o in outcomes],
            "retry_delays": [o.retry_delay for o in outcomes],
        },
        prepare=False,
    )
    ended = await _ended(cur)
    await _notify_ended(conn, ended)
    return ended


async def hand_back(
    conn: psycopg.AsyncConnection, worker_id: str, job_ids: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    """Return unfinished jobs to the queue without spending an attempt."""
    if not job_ids:
        return []
    cur = await conn.execute(queries.HAND_BACK, [worker_id, list(job_ids)])
    rows = await cur.fetchall()
    if rows:
        await conn.execute(queries.NOTIFY_JOBS, [sorted({tag for _, tag in rows})])
    return [job_id for job_id, _ in rows]


async def hand_back_all_but(
    conn: psycopg.AsyncConnection, worker_id: str, running: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    """Return the jobs leased to `worker_id` other than those it says it `running` (a
    worker that reconnected after claimed jobs were lost on the way to it)."""
    cur = await conn.execute(queries.HAND_BACK_ALL_BUT, [worker_id, list(running)])
    rows = await cur.fetchall()
    if rows:
        await conn.execute(queries.NOTIFY_JOBS, [sorted({tag for _, tag in rows})])
    return [job_id for job_id, _ in rows]


async def reap(conn: psycopg.AsyncConnection, lease: dt.timedelta) -> list[EndedJob]:
    """Requeue (or fail, after the last attempt) the jobs of workers that went silent."""
    error = {
        "kind": "worker_lost",
        "message": f"the worker running this job stopped heartbeating for over "
                   f"{lease.total_seconds():g}s (killed, evicted or out of memory)",
    }
    cur = await conn.execute(queries.REAP, {"lease": lease, "error": Jsonb(error)})
    reaped = await _ended(cur)
    await _notify_ended(conn, reaped)
    if any(job.status == "requeued" for job in reaped):
        # The requeued jobs' tags are not at hand here; a broadcast wake is cheap and rare.
        await conn.execute("SELECT pg_notify(%s, '*')", [JOBS_CHANNEL])
    return reaped


@dataclass(frozen=True)
class Cancellation:
    ended: list[EndedJob]  # queued jobs, cancelled at once
    signalled: list[uuid.UUID]  # running jobs, whose workers were asked to stop them


async def cancel(
    conn: psycopg.AsyncConnection, job_ids: Sequence[uuid.UUID], reason: str
) -> Cancellation:
    """Cancel jobs: queued ones end at once, running ones are signalled to their workers
    (which report them cancelled when the process is gone)."""
    error = {"kind": "cancelled", "message": reason}
    cur = await conn.execute(queries.CANCEL_QUEUED, {"ids": list(job_ids), "error": Jsonb(error)})
    ended = await _ended(cur)
    await _notify_ended(conn, ended)
    cur = await conn.execute(queries.CANCEL_RUNNING, [list(job_ids)])
    signalled = [row[0] for row in await cur.fetchall()]
    for job_id in signalled:
        await conn.execute(queries.NOTIFY_CANCEL, [str(job_id)])
    return Cancellation(ended, signalled)


async def active_jobs_of_flow_run(
    conn: psycopg.AsyncConnection, run_id: uuid.UUID
) -> list[tuple[uuid.UUID, str | None]]:
    """(job id, step path) of the run's queued and running jobs (timers have no path)."""
    cur = await conn.execute(queries.ACTIVE_JOBS_OF_FLOW_RUN, [run_id])
    return list(await cur.fetchall())


async def get_job(conn: psycopg.AsyncConnection, job_id: uuid.UUID) -> dict[str, Any] | None:
    """A job as a dict, from the queue if it is active, else from history."""
    cur = conn.cursor(row_factory=dict_row)
    for query in (queries.GET_ACTIVE_JOB, queries.GET_FINISHED_JOB):
        await cur.execute(query, [job_id])
        row = await cur.fetchone()
        if row:
            try:
                row["input"] = values.loads(row["input"], "input")
            except values.ValueProblem:
                row["input"] = None  # shown as absent; the job itself says why it failed
            return row
    return None


async def queue_depth(conn: psycopg.AsyncConnection) -> dict[str, dict[str, float]]:
    """Per tag: due queued jobs, running jobs and the age of the oldest due job."""
    cur = await conn.execute(queries.QUEUE_DEPTH_BY_TAG)
    return {
        tag: {"queued": queued, "running": running, "oldest_queued_s": float(oldest or 0)}
        for tag, queued, running, oldest in await cur.fetchall()
    }
