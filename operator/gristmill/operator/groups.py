"""One loop for every WorkerGroup: mirror its Deployment's replicas into its status and,
when it is autoscaled, size the Deployment to the queue.

This runs beside kopf's handlers, not as kopf timers: a timer makes kopf put a finalizer
on every WorkerGroup, and a WorkerGroup needs no cleanup (its Deployment goes with it by
owner reference), so deleting one must not wait for the operator. Each period costs two
list calls (groups, Deployments) and one queue query, whatever the number of groups;
a group's status is patched only when it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from gristmill import labels
from gristmill.operator import metrics, reconcile
from gristmill.operator.autoscaler import Autoscaler, deletion_costs
from gristmill.operator.deployment import deployment_name, selector
from gristmill.operator.ownership import AUTOSCALER_FIELD_MANAGER, server_side_apply
from gristmill.operator.reconcile import now as timestamp
from gristmill.operator.retrying import backoff_delay, is_transient
from gristmill.spec import WorkerGroup

log = logging.getLogger("gristmill.operator.groups")
GROUP, VERSION, PLURAL = "gristmill.io", "v1alpha1", "workergroups"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def _gone(exc: BaseException) -> bool:
    """Deleted between the list and the write (a group, a pod): nothing to do."""
    return isinstance(exc, ApiException) and exc.status == 404


def pods_refused(deployment: Any) -> str | None:
    """Why the Deployment's pods cannot be made (admission, quota), from the ReplicaFailure
    condition the Deployment controller copies from its ReplicaSet; None while they can."""
    for found in (deployment.status and deployment.status.conditions) or []:
        if found.type == "ReplicaFailure" and found.status == "True":
            return found.message or found.reason or "pods cannot be created"
    return None


def admission_conditions(conditions: list[dict[str, Any]] | None, refusal: str | None,
                         deployment: str, generation: int | None
                         ) -> list[dict[str, Any]] | None:
    """The group's conditions with Ready saying whether its pods are admitted, or None when
    nothing changes. Without this a group whose every pod is refused looks Ready."""
    ready = next((c for c in conditions or [] if c.get("type") == "Ready"), None)
    if ready is None:
        return None  # worker_group_changed has not written Ready yet
    others = [c for c in conditions or [] if c.get("type") != "Ready"]
    if refusal is not None:
        hint = (" This namespace's Pod Security level does not admit these worker pods: "
                "give the WorkerGroup `executor: pod`, or label the namespace "
                "pod-security.kubernetes.io/enforce=privileged (the process executor needs "
                "a user-namespaced pod that the baseline level refuses)."
                if "violates PodSecurity" in refusal else "")
        message = f"the workers' pods are refused: {refusal}.{hint}"
        if ready.get("reason") == "PodsRefused" and ready.get("message") == message:
            return None
        return [reconcile.ready_condition(False, "PodsRefused", message, generation,
                                          conditions), *others]
    if ready.get("reason") != "PodsRefused":
        return None
    return [reconcile.ready_condition(True, "DeploymentApplied", f"Deployment {deployment} "
                                      f"applied", generation, conditions), *others]


class GroupLoop:
    def __init__(self, pool: AsyncConnectionPool, autoscaler: Autoscaler, period_s: float,
                 namespaces: list[str] | None = None):
        self.pool, self.autoscaler, self.period_s = pool, autoscaler, period_s
        self.namespaces = namespaces or []  # empty: all of them
        self.custom = client.CustomObjectsApi()
        self.apps = client.AppsV1Api()
        self.core = client.CoreV1Api()

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            delay = self.period_s
            try:
                await self.once()
                failures = 0
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("WorkerGroup loop failed")
                else:
                    delay = backoff_delay(failures)
                    log.warning("WorkerGroup loop: %s: %s; again in %gs",
                                type(exc).__name__, exc, delay)
                failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    # ---- reading ---------------------------------------------------------------------------

    def _list_groups(self) -> list[dict[str, Any]]:
        if not self.namespaces:
            return self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        return [item for namespace in self.namespaces for item in
                self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                          PLURAL)["items"]]

    def _list_deployments(self) -> dict[tuple[str, str], Any]:
        chosen = f"{labels.NAME}=gristmill-worker"
        if not self.namespaces:
            items = self.apps.list_deployment_for_all_namespaces(label_selector=chosen).items
        else:
            items = [d for namespace in self.namespaces for d in
                     self.apps.list_namespaced_deployment(namespace, label_selector=chosen).items]
        return {(d.metadata.namespace, d.metadata.name): d for d in items}

    async def once(self) -> None:
        groups = await asyncio.to_thread(self._list_groups)
        deployments = await asyncio.to_thread(self._list_deployments)
        seen = set()
        for body in groups:
            meta = body["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            key = f"{meta['namespace']}/{meta['name']}"
            seen.add(key)
            deployment = deployments.get((meta["namespace"], deployment_name(meta["name"])))
            try:
                await self._one(key, body, deployment)
            except Exception as exc:  # one group's trouble must not starve the others
                if not is_transient(exc) and not _gone(exc):
                    log.exception("WorkerGroup %s", key)
                else:
                    log.warning("WorkerGroup %s: %s: %s", key, type(exc).__name__, exc)
        for key in set(self.autoscaler.states) - seen:  # deleted groups
            self.autoscaler.forget(key)

    # ---- one group -------------------------------------------------------------------------

    async def _one(self, key: str, body: dict[str, Any], deployment: Any) -> None:
        status = dict(body.get("status") or {})
        if deployment is None:
            return  # not made yet: worker_group_changed makes it
        counts = deployment.status  # None until the Deployment controller first reports
        wanted = {"replicas": (counts and counts.replicas) or 0,
                  "readyReplicas": (counts and counts.ready_replicas) or 0}
        admitted = admission_conditions(status.get("conditions"), pods_refused(deployment),
                                        deployment_name(body["metadata"]["name"]),
                                        body["metadata"].get("generation"))
        if admitted is not None:
            wanted["conditions"] = status["conditions"] = admitted
            ready = next(c for c in admitted if c["type"] == "Ready")
            if ready["status"] == "False":
                await asyncio.to_thread(self._event, body, ready["reason"], ready["message"],
                                        "Warning")
        autoscaling = (body.get("spec") or {}).get("autoscaling")
        if autoscaling and autoscaling.get("enabled", True):
            try:
                group = WorkerGroup.model_validate({k: body[k] for k in ("metadata", "spec")})
            except ValidationError:
                group = None  # reported by worker_group_changed
            if group is not None:
                wanted.update(await self._autoscale(key, group, body, deployment, status))
        if any(status.get(field) != value for field, value in wanted.items()):
            namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
            patch: dict[str, Any] = {"status": wanted}
            if "conditions" in wanted:
                # Conditions are replaced whole: only over the version they were read from,
                # or a Ready condition kopf wrote meanwhile would be put back stale.
                patch["metadata"] = {"resourceVersion": body["metadata"]["resourceVersion"]}
            try:
                await asyncio.to_thread(self.custom.patch_namespaced_custom_object_status,
                                        GROUP, VERSION, namespace, PLURAL, name, patch)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # Changed under us: the next period reads it anew. The Deployment is
                # already scaled; only the status lags a period.

    async def _autoscale(self, key: str, group: WorkerGroup, body: dict[str, Any],
                         deployment: Any, status: dict[str, Any]) -> dict[str, Any]:
        namespace, name = group.metadata.namespace, group.metadata.name
        current = deployment.spec.replicas or 0
        async with self.pool.connection() as conn:
            decision, demand = await self.autoscaler.decide_for(conn, key, group, current)
            if decision.replicas < current:
                # Idle workers go first: the ReplicaSet deletes the lowest cost pods.
                pods = await asyncio.to_thread(self.core.list_namespaced_pod, namespace,
                                               label_selector=selector(name))
                costs = await deletion_costs(conn, [p.metadata.name for p in pods.items])
                await asyncio.to_thread(self._mark_deletion_costs, namespace, costs)
        metrics.observe_group(namespace, name, decision.replicas, current)
        changes: dict[str, Any] = {"desiredReplicas": decision.replicas,
                                   "queuedJobs": demand.queued, "runningJobs": demand.running}
        if decision.replicas != current:
            await asyncio.to_thread(server_side_apply, self.apps.patch_namespaced_deployment, {
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": deployment_name(name), "namespace": namespace},
                "spec": {"replicas": decision.replicas}}, AUTOSCALER_FIELD_MANAGER)
            now = timestamp()
            message = f"{current} -> {decision.replicas}: {decision.message}"
            others = [c for c in status.get("conditions") or [] if c.get("type") != "Scaled"]
            changes["lastScaleTime"] = now
            changes["conditions"] = [*others, {"type": "Scaled", "status": "True",
                                               "reason": decision.reason, "message": message,
                                               "lastTransitionTime": now}]
            await asyncio.to_thread(self._event, body, decision.reason,
                                    f"{current} -> {decision.replicas} workers: "
                                    f"{decision.message}")
        return changes

    # ---- writing ---------------------------------------------------------------------------

    def _mark_deletion_costs(self, namespace: str, costs: dict[str, int]) -> None:
        for pod, running_jobs in costs.items():
            self.core.patch_namespaced_pod(pod, namespace, {"metadata": {"annotations": {
                DELETION_COST: str(running_jobs * 100)}}})

    def _event(self, body: dict[str, Any], reason: str, message: str,
               kind: str = "Normal") -> None:
        meta = body["metadata"]
        now = timestamp()
        self.core.create_namespaced_event(meta["namespace"], {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": body["apiVersion"], "kind": body["kind"],
                               "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta.get("uid")},
            "type": kind, "reason": reason, "message": message[:1024],
            "source": {"component": "gristmill-operator"},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        })
