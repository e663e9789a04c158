"""The WorkerGroup custom resource: a pool of workers serving some tags."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gristmill.spec.autoscaling import Autoscaling
from gristmill.spec.meta import ObjectMeta
from gristmill.spec.script import EnvVar


class WorkerGroupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    tags: list[str] = Field(min_length=1, description="Job tags this group serves (a Script's "
                                                      "tag, by default its language).")
    executor: Literal["process", "pod"] = Field(
        "process", description="process: jobs run sandboxed inside the worker pod (needs user "
                               "namespaces); pod: each job runs as a pod of its own.")
    image: str = Field("ghcr.io/gristmill/worker:0.1.0", min_length=1,
                       description="The worker image.")
    concurrency: int = Field(4, ge=1, le=1000, description="Jobs one worker runs at once.")
    replicas: int = Field(1, ge=0, le=10000, description="Workers, when not autoscaled.")
    autoscaling: Autoscaling | None = Field(None, description="Size the group to the queued "
                                                              "and running jobs of its tags.")
    resources: dict[str, Any] = Field(default_factory=dict,
                                      description="Kubernetes resource requests and limits of a "
                                                  "worker container.")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Node labels.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list,
                                              description="Kubernetes tolerations.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Kubernetes affinity.")
    env: list[EnvVar] = Field(default_factory=list, description="Environment of the worker.")
    serviceAccountName: str | None = Field(None, description="The workers' service account.")
    priorityClassName: str | None = Field(None, description="The workers' priority class.")
    terminationGracePeriodSeconds: int = Field(
        60, ge=1, le=86400, description="Time a stopping worker has to finish its jobs before "
                                        "it hands the rest back to the queue.")


class WorkerGroup(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    apiVersion: Literal["gristmill.io/v1alpha1"] = "gristmill.io/v1alpha1"
    kind: Literal["WorkerGroup"] = "WorkerGroup"
    metadata: ObjectMeta
    spec: WorkerGroupSpec
    status: dict[str, Any] | None = Field(None, exclude=True)
