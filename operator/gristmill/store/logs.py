"""Job logs: appended in chunks while a job runs, read back (and followed) by seq."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg

from gristmill.store import queries


async def append(conn: psycopg.AsyncConnection, chunks: Sequence[tuple[uuid.UUID, str]]) -> None:
    if chunks:
        await conn.execute(
            queries.APPEND_LOGS,
            [[job_id for job_id, _ in chunks], [text.replace("\x00", "") for _, text in chunks]],
        )


async def read(
    conn: psycopg.AsyncConnection, job_id: uuid.UUID, after_seq: int = 0, limit: int = 1000
) -> list[tuple[int, str]]:
    cur = await conn.execute(queries.READ_LOGS, [job_id, after_seq, limit])
    return list(await cur.fetchall())
