"""The Deployment of a WorkerGroup's workers, built from its spec (a pure function)."""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from typing import Any

from gristmill import labels
from gristmill.spec import WorkerGroup
from gristmill.spec.workergroup import DEFAULT_WORKER_IMAGE

HEALTH_PORT = 8081
TOKEN_SHA256 = "gristmill.io/worker-token-sha256"  # pod template: a new token rolls the pods


def object_name(*parts: str) -> str:
    """A name of the parts joined by "-", cut to the 63 characters Kubernetes allows a
    label-like name, never ending with the "-" a cut may leave (the API server refuses it)."""
    return "-".join(parts)[:63].rstrip("-")


def deployment_name(group_name: str) -> str:
    return object_name("gristmill-workers", group_name)


def token_secret_name(group_name: str) -> str:
    """The Secret (key `token`) of the group's worker token, in dispatcher mode."""
    return object_name("gristmill-worker", group_name)


@dataclass(frozen=True)
class DispatchedWorkers:
    """Workers that get their jobs from the dispatcher (the API) at `server`, showing the
    token of their group's Secret, instead of connecting to PostgreSQL."""

    server: str
    token_sha256: str  # of the token the Secret holds: a re-issued one rolls the pods


def job_runner_name(group_name: str) -> str:
    """The service account of a group's workers (and a pod-executor group's RoleBinding)."""
    return deployment_name(group_name)


def selector_labels(group_name: str) -> dict[str, str]:
    return {labels.NAME: "gristmill-worker", labels.WORKER_GROUP: group_name}


def selector(group_name: str) -> str:
    """The workers' label selector, as kubectl and the scale subresource write it."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(group_name).items())


def _field(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


# A process-executor worker makes a user, mount and pid namespace and a new /proc for
# every job (sandbox/command.py), which a container allows only (measured in runc with
# containerd 2.4's defaults, tests/test_sandbox_in_runc.py):
# - in a pod of its own user namespace (hostUsers: false), where it is root over its own
#   65536 ids only, and its jobs take uids from them, unique on the node;
# - with procMount Unmasked: under the runtime's masked /proc paths no /proc can be
#   mounted (Kubernetes allows Unmasked with hostUsers: false only);
# - with seccomp Unconfined: RuntimeDefault refuses unshare and mount, and still refuses
#   pivot_root when CAP_SYS_ADMIN is added (the jobs keep a filter of their own);
# - unconfined by AppArmor (the annotation below): the runtime's profile denies mounts.
# It keeps only the capabilities it uses: chown, chmod and remove its jobs' files, set
# their uid and drop their capabilities, kill what they leave.
PROCESS_WORKER_SECURITY = {"allowPrivilegeEscalation": False,
                           "procMount": "Unmasked",
                           "capabilities": {"drop": ["ALL"],
                                            "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER",
                                                    "SETUID", "SETGID", "SETPCAP", "KILL"]},
                           "seccompProfile": {"type": "Unconfined"}}
# A pod has no /dev/net/tun for pasta: network jobs share the worker pod's own network
# (the worker refuses where it is not a pod's own, and says so in the job's log).
PROCESS_WORKER_ARGS = ["--job-network", "pod"]
# A pod-executor worker only talks to Postgres and the API server: PSS restricted.
POD_WORKER_SECURITY = {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                       "runAsUser": 65532, "capabilities": {"drop": ["ALL"]},
                       "seccompProfile": {"type": "RuntimeDefault"}}


def worker_deployment(group: WorkerGroup, database_secret: str, replicas: int | None = None,
                      default_image: str = DEFAULT_WORKER_IMAGE,
                      dispatched: DispatchedWorkers | None = None) -> dict[str, Any]:
    """The Deployment running `gristmill worker` for the group's tags.

    The database URL comes from a Secret (key `url`), never from the spec; `dispatched`
    workers get none, only the dispatcher's URL (GRISTMILL_SERVER) and their group's token
    (GRISTMILL_WORKER_TOKEN, from the Secret `gristmill-worker-<group>`). A
    pod-executor worker learns its own pod (the owner of its job pods) and the
    job image from its environment, and runs as the group's service account.
    """
    spec = group.spec
    name = group.metadata.name
    image = spec.image or default_image  # default: the operator's own (--worker-image)
    pod_labels = selector_labels(name)
    pods = spec.executor == "pod"
    if dispatched is None:
        env = [{"name": "GRISTMILL_DATABASE_URL",
                "valueFrom": {"secretKeyRef": {"name": database_secret, "key": "url"}}}]
    else:
        env = [{"name": "GRISTMILL_SERVER", "value": dispatched.server},
               {"name": "GRISTMILL_WORKER_TOKEN", "valueFrom": {"secretKeyRef": {
                   "name": token_secret_name(name), "key": "token"}}}]
    # The worker's own grace period ends early enough to hand back what still runs and
    # write its last outcomes before the kubelet's SIGKILL.
    args = ["worker", "--tags", ",".join(spec.tags), "--concurrency", str(spec.concurrency),
            "--grace-period", str(max(spec.terminationGracePeriodSeconds - 10,
                                      spec.terminationGracePeriodSeconds // 2, 1)),
            "--health-port", str(HEALTH_PORT)]
    if pods:
        args += ["--executor", "pod"]
        env += [{"name": "GRISTMILL_JOB_IMAGE", "value": image},
                {"name": "GRISTMILL_WORKER_GROUP", "value": name},
                {"name": "GRISTMILL_POD_NAME", **_field("metadata.name")},
                {"name": "GRISTMILL_POD_UID", **_field("metadata.uid")},
                {"name": "GRISTMILL_POD_NAMESPACE", **_field("metadata.namespace")}]
    else:
        args += PROCESS_WORKER_ARGS
    env += [{"name": var.name, "value": var.value} for var in spec.env]
    container: dict[str, Any] = {
        "name": "worker",
        "image": image,
        "args": args,
        "env": env,
        "resources": spec.resources,
        # A copy: the Deployment is the caller's to change, the module's constant is not.
        "securityContext": copy.deepcopy(POD_WORKER_SECURITY if pods
                                         else PROCESS_WORKER_SECURITY),
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
        # Fails when claiming, finishing or heartbeating has not succeeded for a minute
        # (the worker's --stall-after), so a worker that cannot heal itself is restarted.
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"},
                          "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": spec.terminationGracePeriodSeconds,
        # Process-executor workers too: they read their jobs' Secrets with it (the sandbox
        # binds only system directories, so jobs never see the token).
        "automountServiceAccountToken": True,
        "serviceAccountName": spec.serviceAccountName or job_runner_name(name),
    }
    if pods:
        pod_spec["securityContext"] = {"runAsNonRoot": True,
                                       "seccompProfile": {"type": "RuntimeDefault"}}
    else:
        pod_spec["hostUsers"] = False
    template_metadata: dict[str, Any] = {"labels": pod_labels}
    if not pods:
        # AppArmor's container profile forbids the mounts bubblewrap makes (Ubuntu nodes);
        # the annotation works on every version the CRDs support (1.29 has no field).
        template_metadata["annotations"] = {
            "container.apparmor.security.beta.kubernetes.io/worker": "unconfined"}
    if dispatched is not None:
        template_metadata.setdefault("annotations", {})[TOKEN_SHA256] = dispatched.token_sha256
    for key in ("nodeSelector", "tolerations", "affinity"):
        if getattr(spec, key):
            pod_spec[key] = getattr(spec, key)
    if spec.priorityClassName:
        pod_spec["priorityClassName"] = spec.priorityClassName
    if spec.imagePullSecrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.imagePullSecrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name),
            "namespace": group.metadata.namespace,
            "labels": {**pod_labels, labels.PART_OF: "gristmill",
                       labels.MANAGED_BY: "gristmill-operator"},
        },
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": pod_labels},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": template_metadata, "spec": pod_spec},
        },
    }


def _workers_object_metadata(group: WorkerGroup) -> dict[str, Any]:
    """Metadata of an object about the group's workers, named as their Deployment (another
    kind, so no clash) and labelled as the operator's own: its admission policy lets it
    change only objects with that label (charts/gristmill/files/rbac.yaml)."""
    name = group.metadata.name
    return {"name": deployment_name(name), "namespace": group.metadata.namespace,
            "labels": {**selector_labels(name), labels.PART_OF: "gristmill",
                       labels.MANAGED_BY: "gristmill-operator"}}


def worker_disruption_budget(group: WorkerGroup) -> dict[str, Any]:
    """A PodDisruptionBudget for the group's workers: a node drain takes at most a quarter of
    them at a time (at least one), so a group keeps serving while its nodes are replaced;
    each evicted worker drains its jobs on SIGTERM."""
    name = group.metadata.name
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _workers_object_metadata(group),
        "spec": {"maxUnavailable": "25%", "selector": {"matchLabels": selector_labels(name)}},
    }


def worker_network_policy(group: WorkerGroup) -> dict[str, Any]:
    """A NetworkPolicy that lets into the group's worker pods only connections to their
    health port (the kubelet's probe would pass anyway: traffic from a pod's own node is
    never cut).

    A worker serves nothing else, but a process-executor job with `sandbox.network` shares
    its pod's network (--job-network pod) and could listen on any port: nothing reaches it.
    Egress stays open on purpose: a worker must reach its database (bundled or anywhere),
    DNS and, under the pod executor, the API server, and network jobs inside a process
    worker reach what the Script asked for; an allow-list here would be one a cluster
    operator cannot know. Policies add up: a NetworkPolicy of the user's that selects these
    pods (a mesh sidecar's port, say) opens more without editing this one.
    """
    name = group.metadata.name
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _workers_object_metadata(group),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": HEALTH_PORT, "protocol": "TCP"}]}],
        },
    }


def worker_token_secret(group: WorkerGroup, token: str) -> dict[str, Any]:
    """The Secret `gristmill-worker-<group>` that holds the group's worker token (key
    `token`), in dispatcher mode; labelled as the operator's own: the admission policy
    gristmill-operator-secret-writes lets it write no other Secret."""
    metadata = _workers_object_metadata(group)
    metadata["name"] = token_secret_name(group.metadata.name)
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque",
            "data": {"token": base64.b64encode(token.encode()).decode()}}
