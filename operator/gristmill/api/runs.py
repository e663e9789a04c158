"""Submitting Script runs and presenting runs: the API's logic, free of HTTP."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from gristmill.spec import InputError, ScriptSpec, check_input
from gristmill.store import queue
from gristmill.store import scripts as script_store


class RunError(Exception):
    """A request a person can fix; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ScriptVersion:
    version: str
    spec: ScriptSpec
    input_schema: dict[str, Any]


class ScriptCatalog:
    """Parsed Script versions by hash: a version never changes, so it is parsed once."""

    def __init__(self) -> None:
        self._versions: dict[str, ScriptVersion] = {}

    async def current(self, conn: psycopg.AsyncConnection, namespace: str, name: str) -> ScriptVersion:
        found = await script_store.get(conn, namespace, name)
        if found is None:
            raise RunError(404, f"Script {namespace}/{name} not found: apply its manifest "
                                f"(gristmill dev loads it from the paths you give it)")
        version, stored_spec = found
        if version not in self._versions:
            spec = ScriptSpec.model_validate(stored_spec)
            self._versions[version] = ScriptVersion(version, spec, spec.input_schema())
        return self._versions[version]


def _parse_when(body: dict[str, Any]) -> dt.datetime | None:
    if "scheduledFor" in body:
        try:
            when = dt.datetime.fromisoformat(str(body["scheduledFor"]))
        except ValueError as exc:
            raise RunError(400, "scheduledFor must be an ISO 8601 time such as "
                                "2026-11-25T10:00:00Z") from exc
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return None


async def submit_script_run(
    conn: psycopg.AsyncConnection, catalog: ScriptCatalog, namespace: str, name: str,
    body: dict[str, Any],
) -> dict[str, Any]:
    unknown = set(body) - {"input", "priority", "scheduledFor"}
    if unknown:
        raise RunError(400, f"unknown field(s) {', '.join(sorted(unknown))} in the request; "
                            f"expected input, priority, scheduledFor")
    script = await catalog.current(conn, namespace, name)
    job_input = body.get("input", {})
    try:
        check_input(script.input_schema, job_input)
    except InputError as exc:
        raise RunError(400, f"input does not match Script {namespace}/{name}: {exc}") from exc
    priority = body.get("priority", script.spec.priority)
    if not isinstance(priority, int) or not -100 <= priority <= 100:
        raise RunError(400, "priority must be an integer from -100 to 100")
    limit = script.spec.concurrencyLimit
    job = queue.NewJob(
        namespace=namespace, tag=script.spec.effective_tag, kind="script", input=job_input,
        script_name=name, script_hash=script.version, priority=priority,
        max_attempts=script.spec.retries + 1, scheduled_for=_parse_when(body),
        concurrency_key=f"script:{namespace}/{name}" if limit else None,
        concurrency_limit=limit,
    )
    async with conn.transaction():
        await queue.enqueue(conn, [job])
    return {"id": str(job.id), "status": "queued"}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def present_run(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON shape of a run, as the API and `gristmill get run` show it."""
    started, finished = row["started_at"], row["finished_at"]
    return {
        "id": str(row["id"]),
        "namespace": row["namespace"],
        "kind": row["kind"],
        "script": row["script_name"],
        "version": row["script_hash"],
        "tag": row["tag"],
        "priority": row["priority"],
        "status": row["status"],
        "input": row["input"],
        "result": row["result"],
        "error": row["error"],
        "attempts": row["attempts"],
        "maxAttempts": row["max_attempts"],
        "worker": row["worker_id"],
        "createdAt": _iso(row["created_at"]),
        "scheduledFor": _iso(row["scheduled_for"]),
        "startedAt": _iso(started),
        "finishedAt": _iso(finished),
        "durationMs": round((finished - started).total_seconds() * 1000, 1)
        if started and finished else None,
    }


def parse_run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError as exc:
        raise RunError(400, f"{text!r} is not a run id (a UUID such as "
                            f"3f2b8c4e-1d2a-4b6e-9f10-2a3b4c5d6e7f)") from exc


async def get_run(conn: psycopg.AsyncConnection, run_id: uuid.UUID) -> dict[str, Any]:
    row = await queue.get_job(conn, run_id)
    if row is None:
        raise RunError(404, f"run {run_id} not found")
    return present_run(row)
