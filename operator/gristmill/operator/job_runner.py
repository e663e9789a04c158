"""What a WorkerGroup's workers need besides their Deployment (pure functions).

A ServiceAccount for the workers (unless the group names its own); for the pod
executor also a RoleBinding
to the `gristmill-job-runner` ClusterRole the chart ships (create, get, list,
watch and delete pods, read their logs, create the Secrets that carry jobs to
their pods: in the group's namespace only), and a NetworkPolicy that cuts every
job pod whose Script did not ask for the network off from it. The operator
binds that one ClusterRole by name (RBAC `bind` on it), so it never holds the
pod permissions it hands out.
"""

from __future__ import annotations

from typing import Any

from gristmill import labels
from gristmill.operator.deployment import job_runner_name, object_name
from gristmill.spec import WorkerGroup

JOB_RUNNER_ROLE = "gristmill-job-runner"


def _metadata(group: WorkerGroup, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": group.metadata.namespace,
            "labels": {labels.WORKER_GROUP: group.metadata.name, labels.PART_OF: "gristmill",
                       labels.MANAGED_BY: "gristmill-operator"}}


def job_runner_objects(group: WorkerGroup) -> list[dict[str, Any]]:
    name = job_runner_name(group.metadata.name)
    account = group.spec.serviceAccountName or name
    objects: list[dict[str, Any]] = []
    if not group.spec.serviceAccountName:
        # Process-executor workers too: the namespace's gristmill-script-secrets Role is
        # bound to it (secret_access.py), so they read their jobs' Secrets and no others.
        objects.append({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": _metadata(group, name)})
    if group.spec.executor != "pod":
        return objects
    objects.append({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _metadata(group, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": JOB_RUNNER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": account,
                      "namespace": group.metadata.namespace}],
    })
    objects.append(no_network_policy(group))
    return objects


def no_network_policy(group: WorkerGroup) -> dict[str, Any]:
    """Nothing in, nothing out, not even DNS (a name lookup carries data out too), for the
    group's job pods whose Script did not ask for the network. The worker sets the label
    when it creates the pod and cannot change it (the job runner may not patch pods); the
    job has no token to change it either."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        # Names longer than 63 are cut: a 44- or 45-character group would end in "-".
        "metadata": _metadata(group, object_name("gristmill-jobs", group.metadata.name,
                                                 "no-network")),
        "spec": {
            "podSelector": {"matchLabels": {labels.NAME: "gristmill-job",
                                            labels.WORKER_GROUP: group.metadata.name,
                                            labels.NETWORK: "none"}},
            "policyTypes": ["Ingress", "Egress"],  # and no rule: nothing in, nothing out
        },
    }
