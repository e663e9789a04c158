"""What the operator does with a Script or Flow, as plain functions (no kopf here).

Each takes the object as the API server sends it and returns the status to
write, so that a kopf handler is a one-line call and the logic is testable
against a real database without Kubernetes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import psycopg
from pydantic import ValidationError

from gristmill.flows.apply import apply_flow, flow_problems
from gristmill.spec import Flow, Script
from gristmill.spec.manifests import pydantic_errors
from gristmill.spec.status import MAX_MESSAGE_LENGTH
from gristmill.store import flows as flow_store
from gristmill.store import scripts as script_store


@dataclass
class Reconciled:
    """The status to write, and an Event to post when something changed."""

    status: dict[str, Any]
    ready: bool
    event: tuple[str, str, str] | None = None  # (type Normal|Warning, reason, message)
    extra: dict[str, Any] = field(default_factory=dict)


def now() -> str:
    """A Kubernetes timestamp (lastTransitionTime, lastScaleTime, Events)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition_message(message: str) -> str:
    """`message`, cut to what a condition holds: the API server refuses a longer one, and
    the status would then never be written."""
    if len(message) <= MAX_MESSAGE_LENGTH:
        return message
    tail = f"... ({len(message):,} characters)"
    return message[:MAX_MESSAGE_LENGTH - len(tail)] + tail


def condition(kind: str, status: str, reason: str, message: str, generation: int | None,
              previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A condition of `kind`; lastTransitionTime moves only when its status changes."""
    before = next((c for c in previous or [] if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now()
    return {"type": kind, "status": status, "reason": reason,
            "message": condition_message(message), "lastTransitionTime": since,
            "observedGeneration": generation}


def ready_condition(ready: bool, reason: str, message: str, generation: int | None,
                    previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A `Ready` condition."""
    return condition("Ready", "True" if ready else "False", reason, message, generation,
                     previous)


def manifest(body: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": dict(body.get("metadata") or {}), "spec": body.get("spec")}


def invalid_message(exc: ValidationError, model, body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    errors = pydantic_errors(exc, model, "", body.get("kind", ""), meta.get("name"))
    return "; ".join(f"{e.field + ': ' if e.field else ''}{e.reason}" for e in errors)


def _not_ready(reason: str, message: str, generation: int | None,
               previous: list[dict[str, Any]] | None) -> Reconciled:
    return Reconciled({"conditions": [ready_condition(False, reason, message, generation,
                                                      previous)],
                       "observedGeneration": generation}, False, ("Warning", reason, message))


def _stored(version: str, moved: bool, generation: int | None,
            previous: list[dict[str, Any]] | None, **extra: Any) -> Reconciled:
    message = f"version {version[:12]} stored"
    status = {"conditions": [ready_condition(True, "Stored", message, generation, previous)],
              "observedGeneration": generation, "version": version,
              "shortVersion": version[:12], **extra}
    return Reconciled(status, True, ("Normal", "Stored", message) if moved else None)


async def reconcile_script(conn: psycopg.AsyncConnection, body: dict[str, Any]) -> Reconciled:
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    previous = (body.get("status") or {}).get("conditions")
    try:
        script = Script.model_validate(manifest(body))
    except ValidationError as exc:
        return _not_ready("Invalid", invalid_message(exc, Script, body), generation, previous)
    async with conn.transaction():
        version, moved = await script_store.apply(conn, script)
    return _stored(version, moved, generation, previous, tag=script.spec.effective_tag,
                   inputSchema=script.spec.input_schema())


async def reconcile_flow(conn: psycopg.AsyncConnection, body: dict[str, Any]) -> Reconciled:
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    previous = (body.get("status") or {}).get("conditions")

    try:
        flow = Flow.model_validate(manifest(body))
    except ValidationError as exc:
        return _not_ready("Invalid", invalid_message(exc, Flow, body), generation, previous)
    problems = await flow_problems(conn, flow)
    if problems:
        return _not_ready("MissingReference", "; ".join(problems), generation, previous)
    async with conn.transaction():
        version, moved = await apply_flow(conn, flow)
    return _stored(version, moved, generation, previous,
                   steps=sum(1 for _ in flow.spec.all_steps()))


async def forget(conn: psycopg.AsyncConnection, kind: str, namespace: str, name: str) -> bool:
    """A deleted Script or Flow takes no new runs; runs in flight keep their versions."""
    store = script_store if kind == "Script" else flow_store
    async with conn.transaction():
        return await store.delete(conn, namespace, name)
