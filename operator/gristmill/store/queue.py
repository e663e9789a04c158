"""The job queue: enqueue, claim, finish, retry, cancel, reap, hand back.

Every function takes an open async connection and runs in the caller's
transaction, so a caller (the flow engine, later) can add its own writes to
the same commit. Notifications are sent with the enqueue and reach listeners
when that transaction commits.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from gristmill.store import queries

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
    id: uuid.UUID = field(default_factory=uuid.uuid4)


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


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the worker reports it."""

    job_id: uuid.UUID
    attempt: int
    status: str  # succeeded | failed | cancelled
    result: Any = None
    error: dict[str, Any] | None = None
    retry_delay: float | None = None  # seconds; set when a failed attempt should be retried


async def enqueue(conn: psycopg.AsyncConnection, jobs: Sequence[NewJob]) -> list[uuid.UUID]:
    """Insert jobs in one statement and wake the workers of their tags at commit."""
    if not jobs:
        return []
    now = dt.datetime.now(dt.UTC)
    await conn.execute(
        queries.ENQUEUE,
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
        ],
    )
    due_tags = sorted({j.tag for j in jobs if j.scheduled_for is None or j.scheduled_for <= now})
    if due_tags:
        await conn.execute(queries.NOTIFY_JOBS, [due_tags])
    return [j.id for j in jobs]


async def claim(
    conn: psycopg.AsyncConnection, worker_id: str, tags: Sequence[str], limit: int
) -> list[ClaimedJob]:
    """Lease up to `limit` due jobs of `tags` to `worker_id` (commit to make it stick)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(queries.CLAIM, [worker_id, list(tags), limit])
    return [
        ClaimedJob(
            id=row["id"], namespace=row["namespace"], kind=row["kind"],
            script_name=row["script_name"], script_hash=row["script_hash"], tag=row["tag"],
            priority=row["priority"], input=row["input"], attempt=row["attempt"],
            max_attempts=row["max_attempts"], created_at=row["created_at"],
            scheduled_for=row["scheduled_for"], started_at=row["started_at"],
        )
        for row in await cur.fetchall()
    ]


async def finish(
    conn: psycopg.AsyncConnection, worker_id: str, outcomes: Sequence[Outcome]
) -> dict[uuid.UUID, str]:
    """Record outcomes; return each applied job's new status (requeued or final).

    Outcomes for jobs this worker no longer holds (reaped, cancelled while
    queued) are ignored and absent from the result.
    """
    if not outcomes:
        return {}
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
    )
    return {row[0]: row[1] for row in await cur.fetchall()}


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


async def reap(conn: psycopg.AsyncConnection, lease: dt.timedelta) -> dict[uuid.UUID, str]:
    """Requeue (or fail, after the last attempt) the jobs of workers that went silent."""
    error = {
        "kind": "worker_lost",
        "message": f"the worker running this job stopped heartbeating for over "
                   f"{lease.total_seconds():g}s (killed, evicted or out of memory)",
    }
    cur = await conn.execute(queries.REAP, {"lease": lease, "error": Jsonb(error)})
    reaped = {row[0]: row[1] for row in await cur.fetchall()}
    if any(status == "requeued" for status in reaped.values()):
        # The requeued jobs' tags are not at hand here; a broadcast wake is cheap and rare.
        await conn.execute("SELECT pg_notify(%s, '*')", [JOBS_CHANNEL])
    return reaped


async def cancel(conn: psycopg.AsyncConnection, job_id: uuid.UUID, reason: str) -> str | None:
    """Cancel a job: a queued one ends at once, a running one is signalled to its worker.

    Returns "cancelled", "cancelling", or None when the job is not active.
    """
    error = {"kind": "cancelled", "message": reason}
    cur = await conn.execute(queries.CANCEL_QUEUED, {"id": job_id, "error": Jsonb(error)})
    if await cur.fetchone():
        return "cancelled"
    cur = await conn.execute(queries.CANCEL_RUNNING, [job_id])
    if await cur.fetchone():
        await conn.execute(queries.NOTIFY_CANCEL, [str(job_id)])
        return "cancelling"
    return None


async def get_job(conn: psycopg.AsyncConnection, job_id: uuid.UUID) -> dict[str, Any] | None:
    """A job as a dict, from the queue if it is active, else from history."""
    cur = conn.cursor(row_factory=dict_row)
    for query in (queries.GET_ACTIVE_JOB, queries.GET_FINISHED_JOB):
        await cur.execute(query, [job_id])
        row = await cur.fetchone()
        if row:
            return row
    return None


async def queue_depth(conn: psycopg.AsyncConnection) -> dict[str, dict[str, float]]:
    """Per tag: due queued jobs, running jobs and the age of the oldest due job."""
    cur = await conn.execute(queries.QUEUE_DEPTH_BY_TAG)
    return {
        tag: {"queued": queued, "running": running, "oldest_queued_s": float(oldest or 0)}
        for tag, queued, running, oldest in await cur.fetchall()
    }
