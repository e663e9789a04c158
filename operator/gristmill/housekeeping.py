"""Housekeeping of the runtime database, in one loop.

Each round creates the day partitions of the coming week, drops the history,
log and audit partitions older than the retention (DROP TABLE, no DELETE and no
vacuum), deletes finished flow runs past it, forgets workers gone for a day
and deletes expired idempotency keys. The API and the operator both run the loop, so it runs wherever Gristmill
runs; an advisory lock gives each round to one replica, and the others skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass, field

import psycopg
from prometheus_client import Gauge

from gristmill.store import connections, idempotency, maintenance, workers

log = logging.getLogger("gristmill.housekeeping")

DEFAULT_RETENTION = dt.timedelta(days=30)
MIN_RETENTION = dt.timedelta(days=1)  # history is kept in day partitions
PERIOD_S = 600.0
PARTITIONS_AHEAD_DAYS = 7
FORGET_WORKERS_AFTER = dt.timedelta(days=1)

OLDEST_KEPT = Gauge("gristmill_history_oldest_partition_timestamp_seconds",
                    "Start of the oldest day of job history and logs still kept")
LAST_ROUND = Gauge("gristmill_housekeeping_last_success_timestamp_seconds",
                   "When this process last finished a housekeeping round")


@dataclass
class Round:
    created: int = 0  # partitions
    dropped: list[str] = field(default_factory=list)  # partitions
    flow_runs_deleted: int = 0
    idempotency_keys_deleted: int = 0
    oldest_kept: dt.date | None = None


async def housekeep(conn: psycopg.AsyncConnection, retention: dt.timedelta,
                    now: dt.datetime | None = None) -> Round | None:
    """One round on an autocommit connection; None when another replica holds the lock."""
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - retention
    if not await maintenance.try_housekeeping_lock(conn):
        return None
    try:
        done = Round()
        done.created = await maintenance.ensure_partitions(conn, PARTITIONS_AHEAD_DAYS)
        done.dropped = await maintenance.drop_expired_partitions(conn, retention, now)
        await maintenance.purge_default_partitions(conn, cutoff)
        done.flow_runs_deleted = await maintenance.delete_expired_flow_runs(conn, cutoff)
        await workers.forget_dead(conn, FORGET_WORKERS_AFTER)
        done.idempotency_keys_deleted = await idempotency.delete_expired(conn)
        done.oldest_kept = await maintenance.oldest_history_day(conn)
    finally:
        await maintenance.release_housekeeping_lock(conn)
    if done.oldest_kept is not None:
        start = dt.datetime.combine(done.oldest_kept, dt.time(), dt.UTC)
        OLDEST_KEPT.set(start.timestamp())
    LAST_ROUND.set_to_current_time()
    return done


async def run_housekeeping(url: str, retention: dt.timedelta, stop: asyncio.Event,
                           period_s: float = PERIOD_S) -> None:
    """A round at start and every `period_s` until `stop`; a failed round is logged and
    tried again the next period, so the loop outlives any outage."""
    while not stop.is_set():
        try:
            async with await connections.connect(url) as conn:
                done = await housekeep(conn, retention)
            if done is not None and (done.dropped or done.flow_runs_deleted):
                log.info("retention %s: dropped %s, deleted %d flow runs", retention,
                         ", ".join(done.dropped) or "no partitions", done.flow_runs_deleted)
        except connections.TRANSIENT_ERRORS as exc:
            log.warning("housekeeping skipped, the database is away: %s", exc)
        except Exception:
            log.exception("housekeeping failed; trying again in %gs", period_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
