"""Job logs: appended in chunks while a job runs, read back (and followed) by seq."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg

from gristmill.store import notifications, queries
from gristmill.values import clean_text


async def append(conn: psycopg.AsyncConnection, chunks: Sequence[tuple[uuid.UUID, str]],
                 worker_id: str | None = None) -> None:
    """Store chunks and, at the same commit, wake the followers of their jobs (one NOTIFY
    on notifications.LOGS_CHANNEL per batch, whatever its size). With `worker_id`, only
    the chunks of jobs that worker runs are stored."""
    if not chunks:
        return
    ids = [job_id for job_id, _ in chunks]
    texts = [clean_text(text) for _, text in chunks]
    payloads = notifications.id_payloads(ids)
    if worker_id is None:
        await conn.execute(queries.APPEND_LOGS, [ids, texts, notifications.LOGS_CHANNEL,
                                                 payloads])
    else:
        await conn.execute(queries.APPEND_LOGS_OF_WORKER,
                           [ids, texts, worker_id, notifications.LOGS_CHANNEL, payloads])


async def read(
    conn: psycopg.AsyncConnection, job_id: uuid.UUID, after_seq: int = 0, limit: int = 1000
) -> list[tuple[int, str]]:
    cur = await conn.execute(queries.READ_LOGS, [job_id, after_seq, limit])
    return list(await cur.fetchall())


async def read_followed(
    conn: psycopg.AsyncConnection, job_id: uuid.UUID, after_seq: int, limit: int = 1000
) -> tuple[str | None, list[tuple[int, str]]]:
    """The job's status (None if unknown) and its chunks after `after_seq`, read in one
    snapshot: a status that says the job ended comes with all of its log."""
    cur = await conn.execute(queries.READ_FOLLOWED_LOG,
                             {"id": job_id, "after": after_seq, "limit": limit})
    rows = await cur.fetchall()
    status = rows[0][0] if rows else None
    return status, [(seq, chunk) for _, seq, chunk in rows if seq is not None]
