"""Submitting and presenting runs (Script runs are jobs, Flow runs are flow runs): the API's
logic, free of HTTP."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from gristmill.flows import catalog
from gristmill.flows import engine as flow_engine
from gristmill.flows.plan import FlowPlan, parse_path, step_path
from gristmill.spec import InputError, check_input
from gristmill.store import flows as flow_store
from gristmill.store import queue
from gristmill.store import scripts as script_store


class RunError(Exception):
    """A request a person can fix; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class SubmitRequest:
    """A checked request to start a run."""

    input: dict[str, Any]
    priority: int | None = None  # None: the Script's or Flow's own
    scheduled_for: dt.datetime | None = None
    submitted_by: str | None = None  # the authenticated username
    labels: dict[str, str] = field(default_factory=dict)


async def submit_script_run(conn: psycopg.AsyncConnection, namespace: str, name: str,
                            request: SubmitRequest) -> dict[str, Any]:
    found = await script_store.get(conn, namespace, name)
    if found is None:
        raise RunError(404, f"Script {namespace}/{name} not found: apply its manifest "
                            f"(gristmill dev loads it from the paths you give it)")
    script = catalog.script_version(*found)
    try:
        check_input(script.input_schema, request.input)
    except InputError as exc:
        raise RunError(400, f"input does not match Script {namespace}/{name}: {exc}") from exc
    limit = script.spec.concurrencyLimit
    job = queue.NewJob(
        namespace=namespace, tag=script.spec.effective_tag, kind="script", input=request.input,
        script_name=name, script_hash=script.version,
        priority=script.spec.priority if request.priority is None else request.priority,
        max_attempts=script.spec.retries + 1, scheduled_for=request.scheduled_for,
        concurrency_key=f"script:{namespace}/{name}" if limit else None,
        concurrency_limit=limit, labels=request.labels,
    )
    async with conn.transaction():
        await queue.enqueue(conn, [job])
    return {"id": str(job.id), "kind": "script", "status": "queued"}


async def submit_flow_run(conn: psycopg.AsyncConnection, namespace: str, name: str,
                          request: SubmitRequest) -> dict[str, Any]:
    async with conn.transaction():
        run = await flow_engine.submit_flow_run(conn, namespace, name, request.input,
                                                request.priority, request.submitted_by,
                                                request.labels)
    return {"id": str(run.id), "kind": "flow", "status": run.status}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _duration_ms(started: dt.datetime | None, finished: dt.datetime | None) -> float | None:
    return round((finished - started).total_seconds() * 1000, 1) if started and finished else None


def present_job(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON shape of a Script run, as the API and `gristmill get run` show it."""
    return {
        "id": str(row["id"]),
        "kind": "script",
        "namespace": row["namespace"],
        "script": row["script_name"],
        "version": row["script_hash"],
        "tag": row["tag"],
        "priority": row["priority"],
        "status": row["status"],
        "labels": row["labels"],
        "input": row["input"],
        "result": row["result"],
        "error": row["error"],
        "attempts": row["attempts"],
        "maxAttempts": row["max_attempts"],
        "worker": row["worker_id"],
        "createdAt": _iso(row["created_at"]),
        "scheduledFor": _iso(row["scheduled_for"]),
        "startedAt": _iso(row["started_at"]),
        "finishedAt": _iso(row["finished_at"]),
        "durationMs": _duration_ms(row["started_at"], row["finished_at"]),
    }


def _step_tree(plan: FlowPlan, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step instances nested under the container instance they ran in."""
    nodes: dict[str, dict[str, Any]] = {}
    top: list[dict[str, Any]] = []
    for row in rows:
        node = {
            "id": row["step_id"], "path": row["path"], "status": row["status"],
            "result": row["result"], "error": row["error"], "attempts": row["attempts"],
            "job": str(row["job_id"]) if row["job_id"] else None,
            "childRun": str(row["child_run_id"]) if row["child_run_id"] else None,
            "approvedBy": (row["approval"] or {}).get("by"),
            "startedAt": _iso(row["started_at"]), "finishedAt": _iso(row["finished_at"]),
            "durationMs": _duration_ms(row["started_at"], row["finished_at"]),
            "steps": [],
        }
        nodes[row["path"]] = node
    for row in rows:
        step_id, indices = parse_path(row["path"])
        parent = plan.steps[step_id].parent if step_id in plan.steps else None
        if parent is None:
            top.append(nodes[row["path"]])
            continue
        parent_path = step_path(parent, plan.container_indices(step_id, indices))
        nodes.get(parent_path, {"steps": top})["steps"].append(nodes[row["path"]])
    return top


async def present_flow_run(conn: psycopg.AsyncConnection, run: flow_store.FlowRun
                           ) -> dict[str, Any]:
    plan = await catalog.load_flow_plan(conn, run.flow_hash)
    return {
        "id": str(run.id),
        "kind": "flow",
        "namespace": run.namespace,
        "flow": run.flow_name,
        "version": run.flow_hash,
        "priority": run.priority,
        "status": run.status,
        "labels": run.labels,
        "input": run.input,
        "result": run.result,
        "error": run.error,
        "parentRun": str(run.parent_run_id) if run.parent_run_id else None,
        "restartedFrom": str(run.restarted_from) if run.restarted_from else None,
        "createdAt": _iso(run.created_at),
        "startedAt": _iso(run.started_at),
        "finishedAt": _iso(run.finished_at),
        "durationMs": _duration_ms(run.started_at, run.finished_at),
        "steps": _step_tree(plan, await flow_store.run_steps(conn, run.id)),
    }


async def get_run(conn: psycopg.AsyncConnection, run_id: uuid.UUID) -> dict[str, Any]:
    row = await queue.get_job(conn, run_id)
    if row is not None:
        return present_job(row)
    run = await flow_store.get_run(conn, run_id)
    if run is not None:
        return await present_flow_run(conn, run)
    raise RunError(404, f"run {run_id} not found")


async def cancel_run(conn: psycopg.AsyncConnection, run_id: uuid.UUID) -> str:
    async with conn.transaction():
        if await flow_store.get_run(conn, run_id) is not None:
            return await flow_engine.cancel_run(conn, run_id, "cancelled by request")
        cancellation = await queue.cancel(conn, [run_id], "cancelled by request")
        await flow_engine.on_jobs_ended(conn, cancellation.ended)
    if cancellation.ended:
        return "cancelled"
    if cancellation.signalled:
        return "cancelling"
    run = await get_run(conn, run_id)  # 404 if unknown
    raise RunError(409, f"run {run_id} already ended ({run['status']}); nothing to cancel")


def job_ids_of(run: dict[str, Any]) -> list[str]:
    """The jobs of a run in the order they started (a Script run is its own job)."""
    if run["kind"] == "script":
        return [run["id"]]
    ids = []

    def walk(steps: list[dict[str, Any]]) -> None:
        for step in steps:
            if step["job"]:
                ids.append(step["job"])
            walk(step["steps"])
    walk(run["steps"])
    return ids
