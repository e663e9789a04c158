"""`status` of each kind, as the operator writes it: the CRDs' status schemas come from here.

Conditions are Kubernetes' own metav1.Condition, a list keyed by `type` (a map-list,
so a server-side apply can own one condition without replacing the others). kopf
keeps its handler progress in `status.kopf`, which stays free-form.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema

from gristmill.spec.base import KubernetesModel

MAX_MESSAGE_LENGTH = 32768  # metav1.Condition's; a longer message makes the API server refuse
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                      r"(Z|[+-][0-9]{2}:[0-9]{2})", re.ASCII)


def _timestamp(text: str) -> str:
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"{text!r} is not an RFC 3339 time such as 2026-01-31T12:00:00Z")
    dt.datetime.fromisoformat(text)  # a real date: no month 13
    return text


Timestamp = Annotated[str, AfterValidator(_timestamp),
                      WithJsonSchema({"type": "string", "format": "date-time"})]
VERSION_PATTERN = r"^[0-9a-f]{64}$"


class Condition(KubernetesModel):
    """One aspect of the object's state (Kubernetes' metav1.Condition)."""

    type: str = Field(max_length=316, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]"
                                              r"([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9]"
                                              r"[-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
                      description="Ready: the object is in use; Scaled (WorkerGroups): the "
                                  "last change of replicas.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    observedGeneration: int | None = Field(None, ge=0, description="The metadata.generation "
                                                                   "this condition is about.")
    lastTransitionTime: Timestamp = Field(description="When status last changed.")
    reason: str = Field(min_length=1, max_length=1024,
                        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                        description="Why, in one CamelCase word (Stored, Invalid, ...).")
    message: str = Field(max_length=MAX_MESSAGE_LENGTH, description="Why, for people.")


_MAP_LIST = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class _Status(KubernetesModel):
    conditions: list[Condition] | None = Field(
        None, json_schema_extra=_MAP_LIST, description="Ready, with a reason and a message; "
                                                       "one entry per type.")
    observedGeneration: int | None = Field(None, ge=0, description="The metadata.generation "
                                                                   "the operator last acted on.")
    kopf: dict[str, Any] | None = Field(None, description="The operator framework's own "
                                                          "bookkeeping (handler progress).")


class _Versioned(_Status):
    version: str | None = Field(None, pattern=VERSION_PATTERN,
                                description="sha256 of the spec: the version runs pin.")
    shortVersion: str | None = Field(None, pattern=r"^[0-9a-f]{12}$",
                                     description="The version's first 12 characters.")


class ScriptStatus(_Versioned):
    tag: str | None = Field(None, description="The tag its runs are queued under.")
    inputSchema: dict[str, Any] | None = Field(None, description="JSON Schema of the input "
                                                                 "(given or inferred).")


class FlowStatus(_Versioned):
    steps: int | None = Field(None, ge=0, description="Steps in the Flow, nested ones and "
                                                      "onFailure included.")


class WorkerGroupStatus(_Status):
    deployment: str | None = Field(None, description="The Deployment of the workers.")
    selector: str | None = Field(None, description="The workers' label selector (the scale "
                                                   "subresource's).")
    replicas: int | None = Field(None, ge=0, description="Worker pods, as the Deployment "
                                                         "counts them.")
    readyReplicas: int | None = Field(None, ge=0, description="Worker pods ready.")
    desiredReplicas: int | None = Field(None, ge=0, description="Workers the operator asked "
                                                                "for.")
    queuedJobs: int | None = Field(None, ge=0, description="Autoscaling: due queued jobs of "
                                                           "the group's share of its tags.")
    runningJobs: int | None = Field(None, ge=0, description="Autoscaling: running jobs of "
                                                            "the group's share of its tags.")
    lastScaleTime: Timestamp | None = Field(None, description="Autoscaling: when replicas "
                                                              "last changed.")
