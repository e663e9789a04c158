"""What the kubelet reports of a job pod, read: has it started, has it ended, why is it
pending, and why did it end without an outcome (pure functions)."""

from __future__ import annotations

import re
from typing import Any

from gristmill.jobsecrets.resolve import not_found
from gristmill.sandbox.base import JobOutcome, failure

# The kubelet's words for a Secret a container's env names and cannot be had
# (kubelet_pods.go, makeEnvironmentVariables).
_SECRET_MISSING = re.compile(r'secrets? "([^"]+)" not found')
_KEY_MISSING = re.compile(r"couldn't find key (\S+) in Secret ([^/\s]+)/(\S+)")

# Waiting reasons that no amount of waiting fixes.
HOPELESS = {"InvalidImageName", "CreateContainerConfigError", "CreateContainerError",
            "ErrImageNeverPull"}


def explain_end(status: dict[str, Any], gone: bool = False) -> JobOutcome:
    """Why a job pod ended without an outcome line, from what the kubelet reported."""
    if status.get("reason") == "DeadlineExceeded":
        return failure("timeout", "the job pod passed its activeDeadlineSeconds")
    if status.get("reason") == "Evicted":
        return failure("killed", f"the job pod was evicted: {status.get('message') or ''}"
                                 f" (past resources.disk, or the node ran short)".strip())
    ended_as = terminated(status) or {}
    reason, code = ended_as.get("reason"), ended_as.get("exitCode")
    if reason == "OOMKilled":
        return failure("memory", "out of memory (OOMKilled): raise spec.resources.memory")
    if code is not None and code > 128:
        return failure("killed", f"the job pod was killed (exit code {code}, {reason})")
    if gone and not ended_as:
        return failure("killed", "the job pod was deleted before it ended (from outside, or "
                                 "with its worker pod)")
    return failure("exit", f"the job pod exited with code {code} ({reason}) before "
                           f"reporting an outcome")


def config_problem(why: str, namespace: str) -> str | None:
    """What to do about a CreateContainerConfigError that names a job's Secret."""
    if not why.startswith("CreateContainerConfigError"):
        return None
    if found := _KEY_MISSING.search(why):
        key, secret_namespace, name = found.groups()
        return (f"Secret {secret_namespace}/{name} has no key {key}: add it or mark the "
                f"reference optional")
    if found := _SECRET_MISSING.search(why):
        return not_found(namespace, found[1])
    return None


def pending_reason(status: dict[str, Any]) -> str | None:
    """Why a pod pends, if the kubelet or the scheduler said (ContainerCreating says nothing)."""
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating"):
            return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason')}: {condition.get('message', '')}".rstrip(": ")
    return None


def started(status: dict[str, Any]) -> bool:
    """Whether the container runs or ran: its log can be read."""
    if status.get("phase") in ("Running", "Succeeded", "Failed"):
        return True
    return any({"running", "terminated"} & set(container.get("state") or {})
               for container in status.get("containerStatuses") or [])


def ended(status: dict[str, Any]) -> bool:
    return terminated(status) is not None or status.get("phase") in ("Succeeded", "Failed")


def terminated(status: dict[str, Any]) -> dict[str, Any] | None:
    """The container's terminated state, once it has ended."""
    for container in status.get("containerStatuses") or []:
        if ended_as := (container.get("state") or {}).get("terminated"):
            return ended_as
    return None
