"""Recording how attempts ended: the one way outcomes reach the queue, whether a worker on
the database writes them or the API writes them for the workers connected to it.

An outcome the database cannot hold fails its job, saying why; a batch that fails for a
reason other than the database being away is finished one outcome at a time, so one bad
outcome never holds up the others; and a job whose flow cannot advance fails its run
rather than staying running for ever.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import psycopg
import psycopg_pool

from gristmill import values
from gristmill.flows import engine as flow_engine
from gristmill.sandbox.base import JobOutcome, failure
from gristmill.store import connections, queue

log = logging.getLogger("gristmill.worker")

MAX_ERROR_TEXT = 4000
MAX_TRACEBACK_TEXT = 64 * 1024
MAX_ERROR_JSON = 128 * 1024


def storable_outcome(outcome: JobOutcome) -> JobOutcome:
    """The outcome, unless the database cannot hold it: a result it cannot store makes the
    job fail saying why; an error is cleaned (errors are shown, never computed on)."""
    if outcome.ok:
        try:
            values.check_json(outcome.result, "result")
        except values.ValueProblem as problem:
            return failure("result", f"the job returned a value that cannot be stored: "
                                     f"{problem.message}")
        return outcome
    return JobOutcome(ok=False, error=storable_error(outcome.error))


def storable_error(error: Any) -> dict[str, Any]:
    """An error as stored and shown: JSON the database holds, of a bounded size."""
    if not isinstance(error, dict):
        error = {"kind": "unknown", "message": str(error) if error else "the job failed"}
    try:
        values.check_json(error, "error")
        if len(values.dumps(error)) <= MAX_ERROR_JSON:
            return error
    except values.ValueProblem:
        pass
    kept: dict[str, Any] = {
        "kind": values.clean_text(str(error.get("kind", "unknown")))[:40],
        "message": values.clean_text(str(error.get("message", "the job failed")))[:MAX_ERROR_TEXT],
    }
    if "traceback" in error:
        kept["traceback"] = values.clean_text(str(error["traceback"]))[:MAX_TRACEBACK_TEXT]
    return kept


async def _finish_together(pool: psycopg_pool.AsyncConnectionPool, worker_id: str,
                           batch: list[queue.Outcome]) -> list[queue.EndedJob]:
    """Record outcomes and advance their flows, in one commit."""
    async with pool.connection() as conn, conn.transaction():
        ended = await queue.finish(conn, worker_id, batch)
        await flow_engine.on_jobs_ended(conn, ended)
    return ended


async def finish(pool: psycopg_pool.AsyncConnectionPool, worker_id: str,
                 batch: list[queue.Outcome]) -> list[queue.EndedJob]:
    """Finish `worker_id`'s batch; the jobs it ended or requeued (those the worker no longer
    held are absent). Raises only connections.TRANSIENT_ERRORS: the caller retries."""
    try:
        return await _finish_together(pool, worker_id, batch)
    except connections.TRANSIENT_ERRORS:
        raise
    except Exception:
        if len(batch) > 1:
            log.exception("finishing %d jobs together failed; finishing them one by one",
                          len(batch))
    ended: list[queue.EndedJob] = []
    for outcome in batch:
        ended += await _finish_alone(pool, worker_id, outcome)
    return ended


async def _finish_alone(pool: psycopg_pool.AsyncConnectionPool, worker_id: str,
                        outcome: queue.Outcome) -> list[queue.EndedJob]:
    try:
        return await _finish_together(pool, worker_id, [outcome])
    except connections.TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        log.exception("job %s: its outcome could not be recorded; failing the job",
                      outcome.job_id)
        reason = values.clean_text(f"{type(exc).__name__}: {exc}")[:MAX_ERROR_TEXT]
    failed = queue.Outcome(outcome.job_id, outcome.attempt, "failed", error={
        "kind": "internal",
        "message": f"Gristmill could not record this job's outcome ({reason}); the job "
                   f"failed instead. Please report this with the worker's log."})
    try:
        return await _finish_together(pool, worker_id, [failed])
    except connections.TRANSIENT_ERRORS:
        raise
    except Exception:
        # Not even a plain failure can be recorded: advancing its flow run fails.
        log.exception("job %s: its flow run cannot advance; failing the run", outcome.job_id)
    async with pool.connection() as conn, conn.transaction():
        ended = await queue.finish(conn, worker_id, [failed])
        await flow_engine.fail_stuck_runs(conn, ended, failed.error)
    return ended


async def reap_lost(conn: psycopg.AsyncConnection, lease: dt.timedelta) -> list[queue.EndedJob]:
    """Requeue or fail the jobs of workers silent for over `lease`, and advance their flows,
    in one commit (whoever reaps: a worker on the database, or the API)."""
    async with conn.transaction():
        reaped = await queue.reap(conn, lease)
        await flow_engine.on_jobs_ended(conn, reaped)
    if reaped:
        log.warning("reaped jobs of lost workers: %s", [job.id for job in reaped])
    return reaped
