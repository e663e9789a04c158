"""Worker registration and heartbeats: the lease behind every claimed job."""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from gristmill.store import queries


async def register(
    conn: psycopg.AsyncConnection, worker_id: str, tags: Sequence[str], concurrency: int,
    hostname: str | None = None,
) -> None:
    """Record a worker; its hostname is its pod's name in Kubernetes (for deletion costs)."""
    await conn.execute(
        queries.REGISTER_WORKER,
        [worker_id, hostname or socket.gethostname(), os.getpid(), list(tags), concurrency],
    )


@dataclass(frozen=True)
class Heartbeat:
    registered: bool  # False: the worker's row is gone (forgotten during an outage)
    cancel: frozenset[uuid.UUID]  # its running jobs that someone asked to cancel


async def heartbeat(conn: psycopg.AsyncConnection, worker_id: str) -> Heartbeat:
    """Renew the lease on the worker's jobs."""
    cur = await conn.execute(queries.HEARTBEAT, {"worker": worker_id})
    registered, cancel = await cur.fetchone()
    return Heartbeat(registered, frozenset(cancel))


@dataclass(frozen=True)
class FleetBeat:
    registered: frozenset[str]  # the workers whose rows still exist
    cancel: dict[str, list[uuid.UUID]]  # by worker: running jobs someone asked to cancel


async def heartbeat_many(conn: psycopg.AsyncConnection, worker_ids: Sequence[str]) -> FleetBeat:
    """Renew the leases of several workers at once (those connected to one API replica)."""
    cur = await conn.execute(queries.HEARTBEAT_MANY, {"workers": list(worker_ids)})
    registered, cancel_workers, cancel_jobs = await cur.fetchone()
    cancel: dict[str, list[uuid.UUID]] = {}
    for worker_id, job_id in zip(cancel_workers, cancel_jobs, strict=True):
        cancel.setdefault(worker_id, []).append(job_id)
    return FleetBeat(frozenset(registered), cancel)


async def deregister(conn: psycopg.AsyncConnection, worker_id: str) -> None:
    await conn.execute(queries.DEREGISTER_WORKER, [worker_id])


async def forget_dead(conn: psycopg.AsyncConnection, older_than: dt.timedelta) -> None:
    await conn.execute(queries.FORGET_DEAD_WORKERS, [older_than])


async def running_jobs_by_host(conn: psycopg.AsyncConnection, hosts: Sequence[str]
                               ) -> dict[str, int]:
    cur = await conn.execute(queries.RUNNING_JOBS_BY_HOST, [list(hosts)])
    return {host: count for host, count in await cur.fetchall()}
