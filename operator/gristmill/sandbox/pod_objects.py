"""The Kubernetes objects of one pod-executor job: its pod and the Secret that carries the job
to it (pure functions; the tests validate them, the pod against PSS restricted)."""

from __future__ import annotations

import base64
import math
import secrets
from typing import Any

from gristmill import labels
from gristmill.sandbox.base import JobRequest
from gristmill.sandbox.pod_job import (
    PAYLOAD_DIR,
    PAYLOAD_KEY,
    SECRET_ENV_PREFIX,
    secret_env_from_prefix,
)

JOB_UID = 65532  # the distroless "nonroot" uid: any image works, root-owned or not


def job_pod(request: JobRequest, image: str, start_timeout_s: float, worker: str,
            worker_uid: str, group: str | None = None, owner: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """The pod of one job. Its Secret, of the same name, is made by `job_secret` once the pod
    exists (it names the pod as its owner)."""
    limits = request.limits
    resources = {"cpu": f"{max(1, math.ceil(limits.cpu_cores * 1000))}m",
                 "memory": str(limits.memory_bytes)}
    # Unique per attempt: a retry must not wait for the last attempt's pod to go.
    name = f"gristmill-job-{request.job_id[:8]}-{secrets.token_hex(4)}"
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {labels.NAME: "gristmill-job", labels.PART_OF: "gristmill",
                   labels.JOB_ID: request.job_id, labels.WORKER: worker[:63],
                   labels.WORKER_UID: worker_uid,
                   labels.NETWORK: "allowed" if request.network else "none"},
    }
    if group:
        metadata["labels"][labels.WORKER_GROUP] = group
    if owner:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", **owner,
                                        "blockOwnerDeletion": False}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "restartPolicy": "Never",
            # A backstop only: the worker deletes the pod when the job's timeout passes.
            "activeDeadlineSeconds": math.ceil(limits.timeout_s + start_timeout_s),
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": JOB_UID, "runAsGroup": JOB_UID,
                "fsGroup": JOB_UID, "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "job",
                "image": image,
                "command": ["python", "-m", "gristmill.sandbox.pod_job",
                            f"{PAYLOAD_DIR}/{PAYLOAD_KEY}"],
                "workingDir": "/work",
                "resources": {"requests": resources, "limits": resources},
                "securityContext": {
                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                **secret_references(request),
                "volumeMounts": [{"name": "work", "mountPath": "/work"},
                                 {"name": "tmp", "mountPath": "/tmp"},
                                 {"name": "job", "mountPath": PAYLOAD_DIR, "readOnly": True}],
            }],
            "volumes": [
                # spec.resources.disk, for each (the kubelet evicts a pod past it).
                {"name": "work", "emptyDir": {"sizeLimit": str(limits.disk_bytes)}},
                {"name": "tmp", "emptyDir": {"sizeLimit": str(limits.disk_bytes)}},
                # Readable by the job's group (fsGroup) only. The kubelet retries the mount
                # until the Secret exists: it is created right after the pod.
                {"name": "job", "secret": {"secretName": name, "defaultMode": 0o440}},
            ],
        },
    }


def secret_references(request: JobRequest) -> dict[str, Any]:
    """The container's `env` and `envFrom` that name the job's Secrets: the kubelet reads
    them (the worker never does), under names of the job runner's own, which hands them to
    the job under the names the Script gave (pod_job.secret_environment)."""
    refs: dict[str, Any] = {}
    if request.secret_env:
        refs["env"] = [{"name": SECRET_ENV_PREFIX + ref.env_name, "valueFrom": {"secretKeyRef": {
            "name": ref.secret, "key": ref.key, "optional": ref.optional}}}
            for ref in request.secret_env]
    if request.secret_env_from:
        refs["envFrom"] = [{"secretRef": {"name": source.secret, "optional": source.optional},
                            "prefix": secret_env_from_prefix(index) + source.prefix}
                           for index, source in enumerate(request.secret_env_from)]
    return refs


def job_secret(pod: dict[str, Any], pod_uid: str, payload: bytes) -> dict[str, Any]:
    """The Secret that carries a job to its pod; owned by the pod, so that it goes with it
    (garbage collection), and immutable, so that the kubelet need not watch it."""
    meta = pod["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": {
            "name": meta["name"],
            "labels": {key: meta["labels"][key] for key in (
                labels.NAME, labels.PART_OF, labels.JOB_ID, labels.WORKER_UID)},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                 "uid": pod_uid, "blockOwnerDeletion": False}],
        },
        "data": {PAYLOAD_KEY: base64.b64encode(payload).decode()},
    }
