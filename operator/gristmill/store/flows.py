"""Flow versions, flow runs, their step instances and forEach iterations."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from gristmill.spec import Flow
from gristmill.store import queries


def _json(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


# --- versions ------------------------------------------------------------------------------

async def apply(conn: psycopg.AsyncConnection, flow: Flow) -> tuple[str, bool]:
    """Store a validated Flow manifest; return (version, whether the name moved)."""
    version = flow.spec.content_hash()
    await conn.execute(queries.PUT_FLOW_VERSION,
                       [version, Jsonb(flow.spec.model_dump(mode="json", by_alias=True))])
    cur = await conn.execute(queries.PUT_FLOW,
                             [flow.metadata.namespace, flow.metadata.name, version])
    return version, cur.rowcount > 0


async def delete(conn: psycopg.AsyncConnection, namespace: str, name: str) -> bool:
    cur = await conn.execute(queries.DELETE_FLOW, [namespace, name])
    return cur.rowcount > 0


async def get(
    conn: psycopg.AsyncConnection, namespace: str, name: str
) -> tuple[str, dict[str, Any]] | None:
    cur = await conn.execute(queries.GET_FLOW, [namespace, name])
    return await cur.fetchone()


async def get_version(conn: psycopg.AsyncConnection, version: str) -> dict[str, Any] | None:
    cur = await conn.execute(queries.GET_FLOW_VERSION, [version])
    row = await cur.fetchone()
    return row[0] if row else None


async def list_all(conn: psycopg.AsyncConnection, namespace: str | None = None) -> list[tuple]:
    cur = await conn.execute(queries.LIST_FLOWS, {"namespace": namespace})
    return list(await cur.fetchall())


# --- runs ----------------------------------------------------------------------------------

@dataclass
class FlowRun:
    id: uuid.UUID
    namespace: str
    flow_name: str
    flow_hash: str
    status: str
    input: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    priority: int
    pins: dict[str, dict[str, str]]
    parent_run_id: uuid.UUID | None
    parent_path: str | None
    restarted_from: uuid.UUID | None
    failure_handled: bool
    created_at: Any
    started_at: Any
    finished_at: Any
    submitted_by: str | None = None  # the authenticated username that started it
    labels: dict[str, str] = field(default_factory=dict)


async def insert_run(conn: psycopg.AsyncConnection, run: FlowRun) -> None:
    await conn.execute(queries.INSERT_FLOW_RUN, {
        "id": run.id, "namespace": run.namespace, "flow_name": run.flow_name,
        "flow_hash": run.flow_hash, "status": run.status, "input": Jsonb(run.input),
        "priority": run.priority, "pins": Jsonb(run.pins), "parent_run_id": run.parent_run_id,
        "parent_path": run.parent_path, "restarted_from": run.restarted_from,
        "submitted_by": run.submitted_by,
        "labels": Jsonb(run.labels),
    })


async def get_run(conn: psycopg.AsyncConnection, run_id: uuid.UUID, lock: bool = False
                  ) -> FlowRun | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(queries.LOCK_FLOW_RUN if lock else queries.GET_FLOW_RUN, [run_id])
    row = await cur.fetchone()
    return FlowRun(**row) if row else None


async def run_namespace(conn: psycopg.AsyncConnection, run_id: uuid.UUID) -> str | None:
    """The namespace of a run of either kind (a job or a flow run), or None if unknown."""
    cur = await conn.execute(queries.RUN_NAMESPACE, {"id": run_id})
    row = await cur.fetchone()
    return row[0] if row else None


async def running_count(conn: psycopg.AsyncConnection, namespace: str, name: str) -> int:
    cur = await conn.execute(queries.COUNT_RUNNING_FLOW_RUNS, [namespace, name])
    return (await cur.fetchone())[0]


async def next_waiting_run(conn: psycopg.AsyncConnection, namespace: str, name: str
                           ) -> uuid.UUID | None:
    cur = await conn.execute(queries.NEXT_WAITING_FLOW_RUN, [namespace, name])
    row = await cur.fetchone()
    return row[0] if row else None


async def mark_started(conn: psycopg.AsyncConnection, run_id: uuid.UUID) -> None:
    await conn.execute(queries.START_FLOW_RUN, [run_id])


async def mark_finished(conn: psycopg.AsyncConnection, run_id: uuid.UUID, status: str,
                        result: Any, error: dict[str, Any] | None) -> None:
    await conn.execute(queries.FINISH_FLOW_RUN, [status, _json(result), _json(error), run_id])


async def mark_failure_handled(conn: psycopg.AsyncConnection, run_id: uuid.UUID,
                               error: dict[str, Any]) -> None:
    await conn.execute(queries.MARK_FAILURE_HANDLED, [Jsonb(error), run_id])


async def active_children(conn: psycopg.AsyncConnection, run_id: uuid.UUID) -> list[uuid.UUID]:
    cur = await conn.execute(queries.ACTIVE_CHILD_RUNS, [run_id])
    return [row[0] for row in await cur.fetchall()]


# --- step instances ------------------------------------------------------------------------

@dataclass
class StepRow:
    path: str
    step_id: str
    status: str
    result: Any = None
    error: dict[str, Any] | None = None
    job_id: uuid.UUID | None = None
    child_run_id: uuid.UUID | None = None
    state: dict[str, Any] | None = None


async def save_step(conn: psycopg.AsyncConnection, run_id: uuid.UUID, row: StepRow) -> None:
    await conn.execute(queries.SAVE_STEP, {
        "run_id": run_id, "path": row.path, "step_id": row.step_id, "status": row.status,
        "result": _json(row.result), "error": _json(row.error), "job_id": row.job_id,
        "child_run_id": row.child_run_id, "state": Jsonb(row.state or {}),
    })


async def get_steps(conn: psycopg.AsyncConnection, run_id: uuid.UUID, paths: Sequence[str]
                    ) -> dict[str, StepRow]:
    cur = await conn.execute(queries.GET_STEPS, [run_id, list(paths)])
    return {row[0]: StepRow(*row) for row in await cur.fetchall()}


async def run_steps(conn: psycopg.AsyncConnection, run_id: uuid.UUID) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(queries.RUN_STEPS, [run_id])
    return list(await cur.fetchall())


async def copy_steps(conn: psycopg.AsyncConnection, to_run: uuid.UUID, from_run: uuid.UUID,
                     paths: Sequence[str]) -> None:
    await conn.execute(queries.COPY_STEPS, [to_run, from_run, list(paths)])


# --- forEach iterations --------------------------------------------------------------------

async def insert_iterations(conn: psycopg.AsyncConnection, run_id: uuid.UUID, path: str,
                            items: Sequence[Any]) -> None:
    await conn.execute(queries.INSERT_ITERATIONS, [run_id, path, [Jsonb(i) for i in items]])


async def iteration_item(conn: psycopg.AsyncConnection, run_id: uuid.UUID, path: str,
                         index: int) -> Any:
    cur = await conn.execute(queries.GET_ITERATION_ITEM, [run_id, path, index])
    return (await cur.fetchone())[0]


async def set_iteration_result(conn: psycopg.AsyncConnection, run_id: uuid.UUID, path: str,
                               index: int, result: Any) -> None:
    await conn.execute(queries.SET_ITERATION_RESULT, [_json(result), run_id, path, index])


async def iteration_results(conn: psycopg.AsyncConnection, run_id: uuid.UUID, path: str
                            ) -> list[Any]:
    cur = await conn.execute(queries.ITERATION_RESULTS, [run_id, path])
    return [row[0] for row in await cur.fetchall()]
