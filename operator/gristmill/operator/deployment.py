"""The Deployment of a WorkerGroup's workers, built from its spec (a pure function)."""

from __future__ import annotations

from typing import Any

from gristmill.spec import WorkerGroup

LABEL_GROUP = "gristmill.io/worker-group"


def deployment_name(group_name: str) -> str:
    return f"gristmill-workers-{group_name}"[:63].rstrip("-")


def selector_labels(group_name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "gristmill-worker", LABEL_GROUP: group_name}


def worker_deployment(group: WorkerGroup, database_secret: str, replicas: int | None = None
                      ) -> dict[str, Any]:
    """The Deployment running `gristmill worker` for the group's tags.

    The database URL comes from a Secret (key `url`), never from the spec. The
    process executor needs user namespaces inside the container: the pod runs
    with an Unconfined seccomp profile and no privilege escalation; every job
    then drops to a uid of its own with no capabilities (see sandbox/process.py).
    """
    spec = group.spec
    name = group.metadata.name
    labels = selector_labels(name)
    env = [{"name": "GRISTMILL_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": database_secret, "key": "url"}}}]
    env += [{"name": var.name, "value": var.value} for var in spec.env]
    container: dict[str, Any] = {
        "name": "worker",
        "image": spec.image,
        "args": ["worker", "--tags", ",".join(spec.tags), "--concurrency",
                 str(spec.concurrency), "--grace-period",
                 str(max(spec.terminationGracePeriodSeconds - 5, 1))],
        "env": env,
        "resources": spec.resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "seccompProfile": {"type": "Unconfined"},  # bubblewrap needs user namespaces
        },
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": spec.terminationGracePeriodSeconds,
        "automountServiceAccountToken": spec.executor == "pod",
    }
    for key in ("nodeSelector", "tolerations", "affinity"):
        if getattr(spec, key):
            pod_spec[key] = getattr(spec, key)
    if spec.serviceAccountName:
        pod_spec["serviceAccountName"] = spec.serviceAccountName
    if spec.priorityClassName:
        pod_spec["priorityClassName"] = spec.priorityClassName
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name),
            "namespace": group.metadata.namespace,
            "labels": {**labels, "app.kubernetes.io/part-of": "gristmill",
                       "app.kubernetes.io/managed-by": "gristmill-operator"},
        },
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
