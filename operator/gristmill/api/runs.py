"""Submitting and presenting runs (Script runs are jobs, Flow runs are flow runs): the API's
logic, free of HTTP."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Sequence
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


class CurrentVersions:
    """The version each Script was last seen at, in this process: a guess that saves
    reading the Script on every submit, never trusted. The enqueue that uses it inserts
    only while it is still the Script's current version, checked in its own statement
    (queue.enqueue(only_current_versions=True)), so a submit after an apply never queues
    the replaced version."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._hashes: dict[tuple[str, str], str] = {}

    def get(self, namespace: str, name: str) -> str | None:
        return self._hashes.get((namespace, name))

    def remember(self, namespace: str, name: str, version: str) -> None:
        if len(self._hashes) >= self.size and (namespace, name) not in self._hashes:
            self._hashes.pop(next(iter(self._hashes)))  # the oldest remembered
        self._hashes[(namespace, name)] = version

    def forget(self, namespace: str, name: str) -> None:
        self._hashes.pop((namespace, name), None)


RecordRuns = Callable[[list[uuid.UUID]], Awaitable[None]]


async def _current_script(conn: psycopg.AsyncConnection, namespace: str, name: str,
                          versions: CurrentVersions | None) -> catalog.ScriptVersion:
    found = await script_store.get(conn, namespace, name)
    if found is None:
        if versions is not None:
            versions.forget(namespace, name)
        raise RunError(404, f"Script {namespace}/{name} not found: apply its manifest "
                            f"(gristmill dev loads it from the paths you give it)")
    script = catalog.script_version(*found)
    if versions is not None:
        versions.remember(namespace, name, script.version)
    return script


def _script_jobs(namespace: str, name: str, script: catalog.ScriptVersion,
                 requests: Sequence[SubmitRequest], ids: Sequence[uuid.UUID] | None,
                 batch: bool) -> list[queue.NewJob]:
    limit = script.spec.concurrencyLimit
    jobs = []
    for index, request in enumerate(requests):
        try:
            check_input(script.input_schema, request.input)
        except InputError as exc:
            where = f"runs[{index}]: " if batch else ""
            raise RunError(400, f"{where}input does not match Script {namespace}/{name}: "
                                f"{exc}") from exc
        jobs.append(queue.NewJob(
            namespace=namespace, tag=script.spec.effective_tag, kind="script",
            input=request.input, script_name=name, script_hash=script.version,
            priority=script.spec.priority if request.priority is None else request.priority,
            max_attempts=script.spec.retries + 1, scheduled_for=request.scheduled_for,
            concurrency_key=f"script:{namespace}/{name}" if limit else None,
            concurrency_limit=limit, labels=request.labels,
            **({"id": ids[index]} if ids else {}),
        ))
    return jobs


async def submit_script_runs(conn: psycopg.AsyncConnection, namespace: str, name: str,
                             requests: Sequence[SubmitRequest],
                             versions: CurrentVersions | None = None,
                             record: RecordRuns | None = None, batch: bool = False
                             ) -> list[dict[str, Any]]:
    """Queue runs of a Script, in the caller's transaction: every input is checked first,
    then one statement inserts them all (and wakes the workers).

    `record(ids)` (the audit rows) is called before the insert, so that in a pipeline
    (Database.write(pipeline=True)) its statements travel with the insert. `batch`: name
    the entry at fault in an error (runs[7]: ...)."""
    remembered = versions.get(namespace, name) if versions is not None else None
    script = catalog.cached_script_version(remembered) if remembered else None
    jobs = None
    if script is not None:
        try:
            jobs = _script_jobs(namespace, name, script, requests, None, batch)
        except RunError:
            remembered = None  # the current version may take what the remembered one refuses
    if jobs is None:
        script = await _current_script(conn, namespace, name, versions)
        remembered = None
        jobs = _script_jobs(namespace, name, script, requests, None, batch)
    if record is not None:
        await record([job.id for job in jobs])
    try:
        # A remembered version is checked in the insert itself; one just read is the
        # current one already (as current as a read before the insert can be).
        await queue.enqueue(conn, jobs, only_current_versions=remembered is not None)
    except queue.VersionMoved:
        # Applied (or deleted) since: read it, check the inputs again, queue the same ids.
        script = await _current_script(conn, namespace, name, versions)
        jobs = _script_jobs(namespace, name, script, requests, [j.id for j in jobs], batch)
        await queue.enqueue(conn, jobs)
    return [{"id": str(job.id), "kind": "script", "status": "queued"} for job in jobs]


async def submit_script_run(conn: psycopg.AsyncConnection, namespace: str, name: str,
                            request: SubmitRequest, versions: CurrentVersions | None = None,
                            record: RecordRuns | None = None) -> dict[str, Any]:
    (run,) = await submit_script_runs(conn, namespace, name, [request], versions, record)
    return run


async def submit_flow_runs(conn: psycopg.AsyncConnection, namespace: str, name: str,
                           requests: Sequence[SubmitRequest],
                           versions: CurrentVersions | None = None,
                           record: RecordRuns | None = None, batch: bool = False
                           ) -> list[dict[str, Any]]:
    """Start runs of a Flow, in the caller's transaction; `record(ids)` after them."""
    made = []
    for index, request in enumerate(requests):
        try:
            run = await flow_engine.submit_flow_run(conn, namespace, name, request.input,
                                                    request.priority, request.submitted_by,
                                                    request.labels)
        except flow_engine.FlowError as exc:
            if not batch or exc.status == 404:
                raise
            raise RunError(exc.status, f"runs[{index}]: {exc.message}") from exc
        made.append(run)
    if record is not None:
        await record([run.id for run in made])
    return [{"id": str(run.id), "kind": "flow", "status": run.status} for run in made]


async def submit_flow_run(conn: psycopg.AsyncConnection, namespace: str, name: str,
                          request: SubmitRequest, versions: CurrentVersions | None = None,
                          record: RecordRuns | None = None) -> dict[str, Any]:
    (run,) = await submit_flow_runs(conn, namespace, name, [request], versions, record)
    return run


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
