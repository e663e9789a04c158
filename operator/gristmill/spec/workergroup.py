"""The WorkerGroup custom resource: a pool of workers serving some tags."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from gristmill import __version__
from gristmill.spec.autoscaling import Autoscaling
from gristmill.spec.base import KubernetesModel
from gristmill.spec.meta import ObjectMeta
from gristmill.spec.script import EnvVar
from gristmill.spec.status import WorkerGroupStatus

# What a WorkerGroup without spec.image runs when the operator is not told otherwise
# (`gristmill operator --worker-image`; the chart passes the image it installs).
DEFAULT_WORKER_IMAGE = f"ghcr.io/gristmill/worker:{__version__}"
# Its Deployment, ServiceAccount and RoleBinding are gristmill-workers-<name>: 18 + 45 = 63,
# the most a Kubernetes name may have. Longer names were cut, so two groups shared one.
MAX_NAME_LENGTH = 45
NAME_TOO_LONG = (f"at most {MAX_NAME_LENGTH} characters for a WorkerGroup (its Deployment "
                 f"gristmill-workers-<name> must fit in 63)")


class LocalObjectReference(KubernetesModel):
    name: str = Field(min_length=1, max_length=253, description="The Secret's name.")


class WorkerGroupMeta(ObjectMeta):
    @field_validator("name")
    @classmethod
    def _fits_its_deployment(cls, name: str) -> str:
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(NAME_TOO_LONG)
        return name


class WorkerGroupSpec(KubernetesModel):
    tags: list[str] = Field(min_length=1, description="Job tags this group serves (a Script's "
                                                      "tag, by default its language).")
    executor: Literal["process", "pod"] = Field(
        "process", description="process: jobs run sandboxed inside the worker pod (needs user "
                               "namespaces); pod: each job runs as a pod of its own.")
    image: str | None = Field(None, min_length=1,
                              description="The worker image (pod executor: the job pods' "
                                          "too). Default: the image the operator was "
                                          "installed with (its --worker-image).")
    imagePullSecrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets in the group's namespace to pull the "
                                          "image with.")
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


class WorkerGroup(KubernetesModel):
    apiVersion: Literal["gristmill.io/v1alpha1"] = "gristmill.io/v1alpha1"
    kind: Literal["WorkerGroup"] = "WorkerGroup"
    metadata: WorkerGroupMeta
    spec: WorkerGroupSpec
    status: WorkerGroupStatus | None = Field(None, exclude=True)
