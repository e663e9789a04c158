"""kopf handlers: thin, each turns an event into a call of a plain function.

Scripts and Flows are stored in Postgres (a finalizer takes a deleted one out
of new submissions); a Flow that is not Ready is re-checked on a timer, so it
turns Ready once the Script it waits for appears. A WorkerGroup owns a
Deployment (owner reference: deleting the group deletes its workers, which
drain on SIGTERM); no finalizer is needed there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from gristmill.operator import metrics, reconcile
from gristmill.operator.autoscaler import Autoscaler, deletion_costs
from gristmill.operator.deployment import deployment_name, selector, worker_deployment
from gristmill.operator.job_runner import job_runner_objects
from gristmill.operator.retrying import retried_when_transient
from gristmill.spec import WorkerGroup
from gristmill.store.migrate import migrate_url

GROUP, VERSION = "gristmill.io", "v1alpha1"
DATABASE_SECRET = os.environ.get("GRISTMILL_DATABASE_SECRET", "gristmill-database")
RECHECK_S = float(os.environ.get("GRISTMILL_RECHECK_INTERVAL", "10"))
AUTOSCALE_S = float(os.environ.get("GRISTMILL_AUTOSCALE_INTERVAL", "5"))
METRICS_PORT = int(os.environ.get("GRISTMILL_METRICS_PORT", "0"))  # 0: no /metrics server
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = "gristmill.io/cleanup"
    settings.posting.level = 20  # INFO and up become Events
    settings.watching.server_timeout = 300
    url = os.environ["GRISTMILL_DATABASE_URL"]
    await migrate_url(url)  # like the API and the workers: whoever starts first creates it
    memo.pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False,
                                    kwargs={"autocommit": True})
    await memo.pool.open(wait=True, timeout=60)
    memo.autoscaler = Autoscaler(period_s=AUTOSCALE_S)
    if METRICS_PORT:
        start_http_server(METRICS_PORT)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # Read KUBECONFIG now: the client library only reads it when first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.pool.close()


@kopf.on.probe(id="database")
async def database_reachable(memo: kopf.Memo, **_: Any) -> bool:
    async with memo.pool.connection(timeout=5) as conn:
        await conn.execute("SELECT 1")
    return True


async def _reconcile(reconciler, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    async with memo.pool.connection() as conn:
        result = await reconciler(conn, dict(body))
    patch.status.update(result.status)
    if result.event:
        kind, reason, message = result.event
        kopf.event(body, type=kind, reason=reason, message=message)


def _not_ready(status: kopf.Status, **_: Any) -> bool:
    conditions = status.get("conditions") or []
    return not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


# ---- Scripts and Flows --------------------------------------------------------------------

@kopf.on.resume(GROUP, VERSION, "scripts")
@kopf.on.create(GROUP, VERSION, "scripts")
@kopf.on.update(GROUP, VERSION, "scripts", field="spec")
@retried_when_transient
async def script_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile(reconcile.reconcile_script, body, patch, memo)


@kopf.on.resume(GROUP, VERSION, "flows")
@kopf.on.create(GROUP, VERSION, "flows")
@kopf.on.update(GROUP, VERSION, "flows", field="spec")
@retried_when_transient
async def flow_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile(reconcile.reconcile_flow, body, patch, memo)


@kopf.timer(GROUP, VERSION, "flows", interval=RECHECK_S, initial_delay=RECHECK_S,
            when=lambda status, **_: _not_ready(status))
@retried_when_transient
async def flow_recheck(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """A Flow waiting for a Script (or sub-flow) turns Ready without being touched."""
    await _reconcile(reconcile.reconcile_flow, body, patch, memo)


@kopf.on.delete(GROUP, VERSION, "scripts")
@kopf.on.delete(GROUP, VERSION, "flows")
@retried_when_transient
async def definition_deleted(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                             **_: Any) -> None:
    async with memo.pool.connection() as conn:
        await reconcile.forget(conn, body["kind"], namespace, name)


# ---- WorkerGroups ------------------------------------------------------------------------------

def _calls_for(kind: str):
    """read, create and patch of a namespaced kind the operator owns."""
    api, suffix = {
        "Deployment": (client.AppsV1Api, "deployment"),
        "ServiceAccount": (client.CoreV1Api, "service_account"),
        "RoleBinding": (client.RbacAuthorizationV1Api, "role_binding"),
        "NetworkPolicy": (client.NetworkingV1Api, "network_policy"),
    }[kind]
    instance = api()
    return (getattr(instance, f"{verb}_namespaced_{suffix}")
            for verb in ("read", "create", "patch"))


def _apply(obj: dict[str, Any], autoscaled: bool = False) -> None:
    """Create the object, or patch it back in line with what the operator wants."""
    read, create, patch = _calls_for(obj["kind"])
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        read(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        create(namespace, obj)
        return
    if autoscaled:  # the autoscaler owns replicas now; a spec change must not reset them
        obj["spec"].pop("replicas", None)
    patch(name, namespace, obj)


@kopf.on.resume(GROUP, VERSION, "workergroups")
@kopf.on.create(GROUP, VERSION, "workergroups")
@kopf.on.update(GROUP, VERSION, "workergroups", field="spec")
@retried_when_transient
async def worker_group_changed(body: kopf.Body, patch: kopf.Patch, name: str,
                               **_: Any) -> None:
    generation = body["metadata"].get("generation")
    previous = (body.get("status") or {}).get("conditions")
    try:
        group = WorkerGroup.model_validate(reconcile.manifest(dict(body)))
    except ValidationError as exc:
        message = reconcile.invalid_message(exc, WorkerGroup, dict(body))
        patch.status["conditions"] = [reconcile.ready_condition(False, "Invalid", message,
                                                                generation, previous)]
        kopf.warn(body, reason="Invalid", message=message)
        return
    autoscaled = group.spec.autoscaling is not None and group.spec.autoscaling.enabled
    start = group.spec.autoscaling.minReplicas if autoscaled else None
    for owned in job_runner_objects(group):  # first: the workers run as its account
        kopf.adopt(owned, owner=body)
        await asyncio.to_thread(_apply, owned)
    deployment = worker_deployment(group, DATABASE_SECRET, replicas=start)
    kopf.adopt(deployment, owner=body)
    await asyncio.to_thread(_apply, deployment, autoscaled)
    patch.status.update({
        "selector": selector(name),
        "deployment": deployment_name(name),
        "desiredReplicas": start if autoscaled else group.spec.replicas,
        "observedGeneration": generation,
        "conditions": [reconcile.ready_condition(True, "DeploymentApplied",
                                                 f"Deployment {deployment_name(name)} applied",
                                                 generation, previous)],
    })


@kopf.timer(GROUP, VERSION, "workergroups", interval=RECHECK_S)
@retried_when_transient
async def worker_group_status(body: kopf.Body, patch: kopf.Patch, namespace: str, name: str,
                              **_: Any) -> None:
    """Mirror the Deployment's replica counts into the group's status (and scale subresource)."""
    apps = client.AppsV1Api()
    try:
        deployment = await asyncio.to_thread(apps.read_namespaced_deployment_status,
                                             deployment_name(name), namespace)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    status = deployment.status  # None until the Deployment controller first reports
    patch.status["replicas"] = (status and status.replicas) or 0
    patch.status["readyReplicas"] = (status and status.ready_replicas) or 0


def _autoscaled(spec: kopf.Spec, **_: Any) -> bool:
    autoscaling = spec.get("autoscaling")
    return bool(autoscaling) and autoscaling.get("enabled", True)


def _mark_deletion_costs(namespace: str, name: str, costs: dict[str, int]) -> None:
    core = client.CoreV1Api()
    for pod, running_jobs in costs.items():
        core.patch_namespaced_pod(pod, namespace, {"metadata": {"annotations": {
            DELETION_COST: str(running_jobs * 100)}}})


def _scale(namespace: str, name: str, replicas: int) -> None:
    client.AppsV1Api().patch_namespaced_deployment(
        deployment_name(name), namespace, {"spec": {"replicas": replicas}})


@kopf.timer(GROUP, VERSION, "workergroups", interval=AUTOSCALE_S, when=_autoscaled)
@retried_when_transient
async def autoscale(body: kopf.Body, patch: kopf.Patch, namespace: str, name: str,
                    memo: kopf.Memo, **_: Any) -> None:
    """Size the group's Deployment to the queued and running jobs of its tags."""
    try:
        group = WorkerGroup.model_validate(reconcile.manifest(dict(body)))
    except ValidationError:
        return  # reported by worker_group_changed
    try:
        deployment = await asyncio.to_thread(client.AppsV1Api().read_namespaced_deployment,
                                             deployment_name(name), namespace)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    current = deployment.spec.replicas or 0
    async with memo.pool.connection() as conn:
        decision, demand = await memo.autoscaler.decide_for(conn, f"{namespace}/{name}",
                                                            group, current)
        if decision.replicas < current:
            # Idle workers go first: the ReplicaSet deletes the lowest cost pods.
            pods = await asyncio.to_thread(
                client.CoreV1Api().list_namespaced_pod, namespace,
                label_selector=selector(name))
            costs = await deletion_costs(conn, [p.metadata.name for p in pods.items])
            await asyncio.to_thread(_mark_deletion_costs, namespace, name, costs)
    metrics.observe_group(namespace, name, decision.replicas, current)
    patch.status.update({"desiredReplicas": decision.replicas, "queuedJobs": demand.queued,
                         "runningJobs": demand.running})
    if decision.replicas != current:
        await asyncio.to_thread(_scale, namespace, name, decision.replicas)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch.status["lastScaleTime"] = now
        scaled = {"type": "Scaled", "status": "True", "reason": decision.reason,
                  "message": f"{current} -> {decision.replicas}: {decision.message}",
                  "lastTransitionTime": now}
        others = [c for c in (body.get("status") or {}).get("conditions") or []
                  if c.get("type") != "Scaled"]
        patch.status["conditions"] = [*others, scaled]
        kopf.info(body, reason=decision.reason,
                  message=f"{current} -> {decision.replicas} workers: {decision.message}")


@kopf.on.delete(GROUP, VERSION, "workergroups", optional=True)
async def worker_group_deleted(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.autoscaler.forget(f"{namespace}/{name}")
