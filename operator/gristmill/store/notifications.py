"""LISTEN/NOTIFY channels that carry job ids, and the payloads that fit them.

A NOTIFY payload holds at most 8000 bytes, so a list of ids is cut into as many
payloads as it needs (about 215 UUIDs each), all sent in one statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

import psycopg
from psycopg import sql

from gristmill.store import queries

# Job ids whose log grew (store/logs.append) and job ids that ended (store/queue).
LOGS_CHANNEL = "gristmill_job_logs"
ENDED_CHANNEL = "gristmill_jobs_ended"

MAX_PAYLOAD_BYTES = 7999  # PostgreSQL's limit is 8000, its terminating NUL included


def id_payloads(ids: Iterable[uuid.UUID]) -> list[str]:
    """Comma-separated ids, as few payloads as fit under the limit, without duplicates."""
    payloads: list[str] = []
    current: list[str] = []
    size = 0
    for text in dict.fromkeys(str(i) for i in ids):
        if current and size + 1 + len(text) > MAX_PAYLOAD_BYTES:
            payloads.append(",".join(current))
            current, size = [], 0
        size += len(text) + (1 if current else 0)
        current.append(text)
    if current:
        payloads.append(",".join(current))
    return payloads


def parse_ids(payload: str) -> list[uuid.UUID]:
    ids = []
    for part in payload.split(","):
        try:
            ids.append(uuid.UUID(part))
        except ValueError:
            continue  # a payload of another sender's making: nothing to wake
    return ids


async def send_ids(conn: psycopg.AsyncConnection, channel: str, ids: Sequence[uuid.UUID]
                   ) -> None:
    """Notify `channel` of `ids` at commit (one statement, whatever their number)."""
    payloads = id_payloads(ids)
    if payloads:
        await conn.execute(queries.NOTIFY_IDS, [channel, payloads])


async def listen(conn: psycopg.AsyncConnection, channels: Sequence[str]) -> None:
    for channel in channels:
        await conn.execute(sql.SQL(queries.LISTEN).format(sql.Identifier(channel)))


async def ping(conn: psycopg.AsyncConnection) -> None:
    """A round trip, to find out that a quiet listening connection is dead."""
    await conn.execute(queries.PING)
