"""The dispatcher's protocol: JSON text frames over one WebSocket per worker.

A worker sends requests, {"id": N, "op": ..., ...}, and gets one answer for each,
{"id": N, "ok": {...}} or {"id": N, "error": "..."}, in any order; the API also pushes
{"op": "cancel", "jobs": [...]} when someone cancels a job the worker runs.

    hello     {worker, hostname, concurrency, running} -> {worker, tags, lease_s}
    claim     {limit, wait}                       -> {jobs: [...]}   (held up to `wait` s)
    specs     {versions: [...]}                   -> {specs: {version: spec | null}}
    finish    {outcomes: [...]}                   -> {ended: [[job, status], ...]}
    logs      {chunks: [[job, text], ...]}        -> {}
    hand_back {jobs: [...]}                       -> {returned: [...]}
    beat      {}                                  -> {cancel: [...]}
    bye       {}                                  -> {}

Everything a worker sends is checked here (a worker, or a job that escaped its sandbox,
is not trusted): a message that does not fit gets an error answer naming what is
wrong, and the connection goes on.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gristmill.store import queue

MAX_CLAIM = 1000
MAX_WAIT_S = 60.0
MAX_BATCH = 1000
MAX_RETRY_DELAY_S = 7 * 86400.0
MAX_FRAME_BYTES = 32 * 1024 * 1024  # a batch of outcomes with results of up to 1 MiB each

WorkerName = Annotated[str, Field(min_length=1, max_length=120,
                                  pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0, le=2**53)


class Hello(_Message):
    op: Literal["hello"]
    worker: WorkerName
    hostname: str = Field(default="", max_length=253)
    concurrency: int = Field(ge=1, le=100_000)
    running: list[uuid.UUID] = Field(default_factory=list, max_length=100_000)  # reconnecting


class Claim(_Message):
    op: Literal["claim"]
    limit: int = Field(ge=1, le=MAX_CLAIM)
    wait: float = Field(default=MAX_WAIT_S, ge=0, le=MAX_WAIT_S)


class Specs(_Message):
    op: Literal["specs"]
    versions: list[Annotated[str, Field(pattern=r"^[0-9a-f]{1,128}$")]] = Field(
        max_length=MAX_BATCH)


class WireOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job: uuid.UUID
    attempt: int = Field(ge=0, le=2**31 - 1)
    status: Literal["succeeded", "failed", "cancelled"]
    result: Any = None
    error: dict[str, Any] | None = None
    retry_delay: float | None = Field(default=None, ge=0, le=MAX_RETRY_DELAY_S)

    @field_validator("retry_delay")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value


class Finish(_Message):
    op: Literal["finish"]
    outcomes: list[WireOutcome] = Field(min_length=1, max_length=MAX_BATCH)


class Logs(_Message):
    op: Literal["logs"]
    chunks: list[tuple[uuid.UUID, str]] = Field(min_length=1, max_length=MAX_BATCH)


class HandBack(_Message):
    op: Literal["hand_back"]
    jobs: list[uuid.UUID] = Field(min_length=1, max_length=MAX_BATCH)


class Beat(_Message):
    op: Literal["beat"]


class Bye(_Message):
    op: Literal["bye"]


REQUESTS: dict[str, type[_Message]] = {
    "hello": Hello, "claim": Claim, "specs": Specs, "finish": Finish, "logs": Logs,
    "hand_back": HandBack, "beat": Beat, "bye": Bye,
}


class BadMessage(Exception):
    def __init__(self, request_id: int | None, message: str):
        super().__init__(message)
        self.request_id = request_id
        self.message = message


def parse_request(value: Any) -> _Message:
    """A worker's request, checked; BadMessage saying what is wrong otherwise."""
    if not isinstance(value, dict):
        raise BadMessage(None, "a request is a JSON object with an `id` and an `op`")
    request_id = value.get("id") if isinstance(value.get("id"), int) else None
    model = REQUESTS.get(value.get("op")) if isinstance(value.get("op"), str) else None
    if model is None:
        raise BadMessage(request_id, f"unknown op {str(value.get('op'))[:40]!r}; one of "
                                     f"{', '.join(REQUESTS)}")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise BadMessage(request_id, f"{value['op']}: {where}: {first['msg']}") from None


def outcome_of(wire: WireOutcome) -> queue.Outcome:
    return queue.Outcome(wire.job, wire.attempt, wire.status, result=wire.result,
                         error=wire.error, retry_delay=wire.retry_delay)


def outcome_to_wire(outcome: queue.Outcome) -> dict[str, Any]:
    wire: dict[str, Any] = {"job": str(outcome.job_id), "attempt": outcome.attempt,
                            "status": outcome.status}
    if outcome.result is not None:
        wire["result"] = outcome.result
    if outcome.error is not None:
        wire["error"] = outcome.error
    if outcome.retry_delay is not None:
        wire["retry_delay"] = outcome.retry_delay
    return wire


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_to_wire(job: queue.ClaimedJob) -> dict[str, Any]:
    return {
        "id": str(job.id), "namespace": job.namespace, "kind": job.kind,
        "script_name": job.script_name, "script_hash": job.script_hash, "tag": job.tag,
        "priority": job.priority, "input": job.input, "attempt": job.attempt,
        "max_attempts": job.max_attempts, "created_at": _iso(job.created_at),
        "scheduled_for": _iso(job.scheduled_for), "started_at": _iso(job.started_at),
        "flow_run_id": str(job.flow_run_id) if job.flow_run_id else None,
        "step_path": job.step_path, "retry_policy": job.retry_policy,
        "timeout_s": job.timeout_s, "input_problem": job.input_problem,
    }


def job_from_wire(wire: dict[str, Any]) -> queue.ClaimedJob:
    def when(key: str) -> dt.datetime:
        return dt.datetime.fromisoformat(wire[key])

    return queue.ClaimedJob(
        id=uuid.UUID(wire["id"]), namespace=wire["namespace"], kind=wire["kind"],
        script_name=wire["script_name"], script_hash=wire["script_hash"], tag=wire["tag"],
        priority=wire["priority"], input=wire["input"], attempt=wire["attempt"],
        max_attempts=wire["max_attempts"], created_at=when("created_at"),
        scheduled_for=when("scheduled_for"), started_at=when("started_at"),
        flow_run_id=uuid.UUID(wire["flow_run_id"]) if wire["flow_run_id"] else None,
        step_path=wire["step_path"], retry_policy=wire["retry_policy"],
        timeout_s=wire["timeout_s"], input_problem=wire["input_problem"],
    )
