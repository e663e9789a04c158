"""The run listing: a namespace's top-level runs (Script runs queued, running and finished,
Flow runs of no parent), filtered and a keyset page at a time, newest first.

A Script run lives in `jobs` while queued or running and in `job_history` once finished;
a Flow run lives in `flow_runs` all its life. A flow's step jobs and sub-flow runs are
parts of their run (GET /runs/{id} shows them as its steps), not runs of their own here.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from gristmill.store import pages, queries


class RunKind(enum.StrEnum):
    SCRIPT = "script"
    FLOW = "flow"


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


LIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})  # Script runs still in `jobs`
FINISHED = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})


@dataclass(frozen=True)
class RunQuery:
    namespace: str
    kinds: frozenset[RunKind] = frozenset(RunKind)
    name: str | None = None  # of the Script or Flow (then `kinds` is that one kind)
    statuses: frozenset[RunStatus] = frozenset(RunStatus)
    since: dt.datetime | None = None  # created at or after
    until: dt.datetime | None = None  # created before
    labels: dict[str, str] = field(default_factory=dict)  # every one of them
    before: pages.Before | None = None
    limit: int = 50


@dataclass(frozen=True)
class RunSummary:
    kind: RunKind
    id: uuid.UUID
    namespace: str
    name: str | None
    status: RunStatus
    labels: dict[str, str]
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def position(self) -> pages.Before:
        return pages.Before(self.created_at, self.id)


@dataclass(frozen=True)
class RunRef:
    """What the audit row of a change to a run names: its kind, namespace and definition."""

    kind: RunKind
    namespace: str
    name: str | None


_BOUNDS = {"since": queries.LIST_RUNS_WHERE_SINCE, "until": queries.LIST_RUNS_WHERE_UNTIL,
           "before": queries.LIST_RUNS_WHERE_BEFORE}


def _ordered(statuses: frozenset[RunStatus]) -> list[str]:
    return sorted(str(s) for s in statuses)


def statement(query: RunQuery) -> tuple[str, dict[str, Any]]:
    """The SQL and parameters of one page (also what the benchmark EXPLAINs)."""
    params: dict[str, Any] = {"namespace": query.namespace, "limit": query.limit}
    common = pages.bounds(query.since, query.until, query.before, _BOUNDS, params)
    if query.labels:
        common.append(queries.LIST_RUNS_WHERE_LABELS)
        params["labels"] = Jsonb(query.labels)
    if query.name is not None:
        params["name"] = query.name
    branches = []
    for status in _ordered(query.statuses):
        params[f"status_{status}"] = status
    if RunKind.SCRIPT in query.kinds:
        scripts = common + ([queries.LIST_RUNS_WHERE_SCRIPT] if query.name is not None else [])
        if query.statuses & LIVE:
            params["live_statuses"] = _ordered(query.statuses & LIVE)
            branches.append(pages.compose(queries.LIST_RUNS_LIVE_SCRIPTS, scripts))
        branches += [pages.compose(
            queries.LIST_RUNS_FINISHED_SCRIPTS, scripts, status=f"status_{status}",
            finished_since=queries.LIST_RUNS_FINISHED_SINCE if query.since else "")
            for status in _ordered(query.statuses & FINISHED)]
    if RunKind.FLOW in query.kinds:
        flows = common + ([queries.LIST_RUNS_WHERE_FLOW] if query.name is not None else [])
        branches += [pages.compose(queries.LIST_RUNS_FLOWS, flows, status=f"status_{status}")
                     for status in _ordered(query.statuses)]
    if not branches:  # e.g. Script runs of no status at all: nothing can match
        return "SELECT NULL WHERE false", {}
    union = "\nUNION ALL\n".join(f"({branch})" for branch in branches)
    return queries.LIST_RUNS.format(branches=union), params


async def list_runs(conn: psycopg.AsyncConnection, query: RunQuery) -> list[RunSummary]:
    sql, params = statement(query)
    if not params:
        return []
    cur = await conn.execute(sql, params)
    return [RunSummary(RunKind(kind), run_id, namespace, name, RunStatus(status), labels,
                       created, started, finished)
            for kind, run_id, namespace, name, status, labels, created, started, finished
            in await cur.fetchall()]


async def locate_run(conn: psycopg.AsyncConnection, run_id: uuid.UUID) -> RunRef | None:
    cur = await conn.execute(queries.LOCATE_RUN, {"id": run_id})
    row = await cur.fetchone()
    return RunRef(RunKind(row[0]), row[1], row[2]) if row else None
