"""kopf handlers: thin, each turns an event into a call of a plain function.

Scripts and Flows are stored in Postgres (a finalizer takes a deleted one out
of new submissions); a Flow that is not Ready is re-checked on a timer, so it
turns Ready once the Script it waits for appears. A WorkerGroup owns a
Deployment (owner reference: deleting the group deletes its workers, which
drain on SIGTERM), so it has no finalizer, no kopf timer and no delete handler:
its status and autoscaling run in one loop for all groups (groups.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server
from pydantic import ValidationError

from gristmill.housekeeping import DEFAULT_RETENTION, run_housekeeping
from gristmill.kube import load_cluster_config
from gristmill.operator import reconcile
from gristmill.operator.autoscaler import Autoscaler
from gristmill.operator.deployment import (
    DispatchedWorkers,
    deployment_name,
    selector,
    worker_deployment,
    worker_disruption_budget,
    worker_network_policy,
    worker_token_secret,
)
from gristmill.operator.diffbase import SpecDigestDiffBaseStorage
from gristmill.operator.groups import GroupLoop
from gristmill.operator.job_runner import job_runner_objects
from gristmill.operator.ownership import (
    AUTOSCALER_FIELD_MANAGER,
    OPERATOR_FIELD_MANAGER,
    server_side_apply,
)
from gristmill.operator.retrying import retried_when_transient
from gristmill.operator.secret_access import declared_secrets, secrets_conditions
from gristmill.operator.secret_sync import SecretAccess
from gristmill.operator.worker_tokens import dispatcher_from_env, token_sha256, worker_token
from gristmill.spec import WorkerGroup
from gristmill.spec.workergroup import DEFAULT_WORKER_IMAGE
from gristmill.store import connections
from gristmill.store.migrate import migrate_url

log = logging.getLogger("gristmill.operator")
GROUP, VERSION = "gristmill.io", "v1alpha1"
DATABASE_SECRET = os.environ.get("GRISTMILL_DATABASE_SECRET", "gristmill-database")
WORKER_IMAGE = os.environ.get("GRISTMILL_WORKER_IMAGE") or DEFAULT_WORKER_IMAGE
RECHECK_S = float(os.environ.get("GRISTMILL_RECHECK_INTERVAL", "10"))
AUTOSCALE_S = float(os.environ.get("GRISTMILL_AUTOSCALE_INTERVAL", "5"))
METRICS_PORT = int(os.environ.get("GRISTMILL_METRICS_PORT", "0"))  # 0: no /metrics server
RETENTION = dt.timedelta(seconds=float(os.environ.get(
    "GRISTMILL_RETENTION_SECONDS", DEFAULT_RETENTION.total_seconds())))


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = "gristmill.io/cleanup"
    settings.persistence.diffbase_storage = SpecDigestDiffBaseStorage(
        prefix="kopf.zalando.org", key="last-handled-configuration")
    settings.posting.level = 20  # INFO and up become Events
    settings.watching.server_timeout = 300
    # Workers of the dispatcher (the API) with a token each, or of PostgreSQL directly.
    memo.dispatcher = dispatcher_from_env(os.environ)
    log.info("WorkerGroups' workers connect to %s", memo.dispatcher.url if memo.dispatcher
             else "PostgreSQL (no GRISTMILL_DISPATCHER_URL and GRISTMILL_WORKER_TOKEN_KEYS)")
    url = os.environ["GRISTMILL_DATABASE_URL"]
    await migrate_url(url)  # like the API and the workers: whoever starts first creates it
    memo.pool = connections.pool(url, size=4, min_size=1, name="operator")
    await memo.pool.open(wait=True, timeout=60)
    if METRICS_PORT:
        start_http_server(METRICS_PORT)
    load_cluster_config()
    namespaces = [n for n in os.environ.get("GRISTMILL_WATCH_NAMESPACES", "").split(",") if n]
    memo.secret_access = SecretAccess()
    memo.secret_access.operator_user = (os.environ.get("GRISTMILL_OPERATOR_USER")
                                        or await asyncio.to_thread(
                                            memo.secret_access.who_am_i))
    groups = GroupLoop(memo.pool, Autoscaler(period_s=AUTOSCALE_S), AUTOSCALE_S, namespaces)
    memo.stop_loops = asyncio.Event()
    stop = memo.stop_loops
    memo.loops = [supervised(groups.run(stop), "the WorkerGroup loop", stop),
                  supervised(run_housekeeping(url, RETENTION, stop), "housekeeping", stop)]


def supervised(loop: Coroutine[Any, Any, None], what: str, stop: asyncio.Event
               ) -> asyncio.Task:
    """A loop beside kopf's handlers that runs until `stop`: if it ends before, that is a
    bug, and the operator stops loudly (its Deployment restarts it) rather than limp on."""
    task = asyncio.create_task(loop, name=what)

    def ended(task: asyncio.Task) -> None:
        if stop.is_set() or task.cancelled():
            return
        log.critical("%s stopped unexpectedly; stopping the operator", what,
                     exc_info=task.exception())
        os.kill(os.getpid(), signal.SIGTERM)  # kopf's own orderly shutdown
    task.add_done_callback(ended)
    return task


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.stop_loops.set()
    await asyncio.gather(*memo.loops, return_exceptions=True)
    await memo.pool.close()


@kopf.on.probe(id="database")
async def database_reachable(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """The database's state, shown on /healthz. Never a failed probe: a database outage is
    not a reason to restart the operator, which retries (a raise would fail liveness)."""
    try:
        async with memo.pool.connection(timeout=5) as conn:
            await conn.execute("SELECT 1")
    except connections.TRANSIENT_ERRORS as exc:
        return {"reachable": False, "error": str(exc).strip()[:300]}
    return {"reachable": True}


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
    await _reconcile_script(body, patch, memo)


async def _reconcile_script(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    await _reconcile(reconcile.reconcile_script, body, patch, memo)
    await _script_secrets(body, patch, memo)


def _secrets_unsettled(status: kopf.Status, **_: Any) -> bool:
    return any(c.get("type") == "SecretsAvailable" and c.get("status") != "True"
               for c in status.get("conditions") or [])


@kopf.timer(GROUP, VERSION, "scripts", interval=RECHECK_S, initial_delay=RECHECK_S,
            when=_secrets_unsettled)
@retried_when_transient
async def script_secrets_recheck(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
                                 **_: Any) -> None:
    """A Script waiting for its Secret turns Ready once it is created (the operator does
    not watch Secrets: it may not)."""
    await _reconcile_script(body, patch, memo)


async def _script_secrets(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    """Grant the namespace's workers its Scripts' Secrets, and say in the Script's status
    whether those it cannot run without exist."""
    namespace = body["metadata"]["namespace"]
    await memo.secret_access.sync(namespace)
    conditions = list(patch.status.get("conditions") or [])
    stored = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    required = sorted(declared_secrets(body.get("spec"), required_only=True))
    if not stored or not required:
        return
    missing, unknown = await memo.secret_access.missing(namespace, required)
    patch.status["conditions"] = secrets_conditions(
        conditions, missing, unknown, namespace, body["metadata"].get("generation"),
        (body.get("status") or {}).get("conditions"))
    if missing:
        kopf.warn(body, reason="SecretNotFound", message=patch.status["conditions"][0]["message"])


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
    if body["kind"] == "Script":
        await memo.secret_access.sync(namespace)  # its Secrets leave the Role


# ---- WorkerGroups ------------------------------------------------------------------------------

def _calls_for(kind: str):
    """read, create and patch of a namespaced kind the operator owns."""
    api, suffix = {
        "Deployment": (client.AppsV1Api, "deployment"),
        "ServiceAccount": (client.CoreV1Api, "service_account"),
        "RoleBinding": (client.RbacAuthorizationV1Api, "role_binding"),
        "NetworkPolicy": (client.NetworkingV1Api, "network_policy"),
        "PodDisruptionBudget": (client.PolicyV1Api, "pod_disruption_budget"),
        "Secret": (client.CoreV1Api, "secret"),  # patch only: it may not read Secrets
    }[kind]
    instance = api()
    return (getattr(instance, f"{verb}_namespaced_{suffix}")
            for verb in ("read", "create", "patch"))


def _apply(obj: dict[str, Any], autoscaled: bool = False) -> None:
    """Server-side apply: the object becomes what the operator wants of it, and a field the
    operator stopped setting (a nodeSelector removed from the group) leaves it, which a
    strategic-merge patch would not do.

    An autoscaled Deployment's replicas belong to the autoscaler's own field manager: set
    once when the Deployment is made, never again by the operator, so a spec change can
    neither reset nor drop them.
    """
    read, _, patch = _calls_for(obj["kind"])
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    if not autoscaled:
        server_side_apply(patch, obj, OPERATOR_FIELD_MANAGER)
        return
    try:
        read(name, namespace)
        exists = True
    except ApiException as exc:
        if exc.status != 404:
            raise
        exists = False
    replicas = obj["spec"].pop("replicas", None)
    server_side_apply(patch, obj, OPERATOR_FIELD_MANAGER)
    if not exists and replicas is not None:
        server_side_apply(patch, {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                                  "metadata": {"name": name, "namespace": namespace},
                                  "spec": {"replicas": replicas}}, AUTOSCALER_FIELD_MANAGER)


def _other_conditions(conditions: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The conditions a spec change leaves alone (Scaled belongs to the group loop)."""
    return [c for c in conditions or [] if c.get("type") != "Ready"]


@kopf.on.resume(GROUP, VERSION, "workergroups")
@kopf.on.create(GROUP, VERSION, "workergroups")
@kopf.on.update(GROUP, VERSION, "workergroups", field="spec")
@retried_when_transient
async def worker_group_changed(body: kopf.Body, patch: kopf.Patch, name: str,
                               memo: kopf.Memo, **_: Any) -> None:
    generation = body["metadata"].get("generation")
    previous = (body.get("status") or {}).get("conditions")
    try:
        group = WorkerGroup.model_validate(reconcile.manifest(dict(body)))
    except ValidationError as exc:
        message = reconcile.invalid_message(exc, WorkerGroup, dict(body))
        patch.status["conditions"] = [reconcile.ready_condition(False, "Invalid", message,
                                                                generation, previous),
                                      *_other_conditions(previous)]
        kopf.warn(body, reason="Invalid", message=message)
        return
    autoscaled = group.spec.autoscaling is not None and group.spec.autoscaling.enabled
    start = group.spec.autoscaling.minReplicas if autoscaled else None
    # First: the workers run as its account, and start behind their NetworkPolicies.
    for owned in [*job_runner_objects(group), worker_network_policy(group)]:
        kopf.adopt(owned, owner=body)
        await asyncio.to_thread(_apply, owned)
    await memo.secret_access.sync(group.metadata.namespace)  # its account reads the Secrets
    dispatched = None
    dispatcher = getattr(memo, "dispatcher", None)
    if dispatcher is not None:
        # The token before the Deployment that reads it. Applied every time without reading
        # it back (the operator may not): the same group and key give the same token, and
        # a no-op apply writes nothing (worker_tokens.py).
        token = worker_token(dispatcher, group, body["metadata"])
        secret = worker_token_secret(group, token)
        kopf.adopt(secret, owner=body)
        await asyncio.to_thread(_apply, secret)
        dispatched = DispatchedWorkers(server=dispatcher.url, token_sha256=token_sha256(token))
    deployment = worker_deployment(group, DATABASE_SECRET, replicas=start,
                                   default_image=WORKER_IMAGE, dispatched=dispatched)
    kopf.adopt(deployment, owner=body)
    await asyncio.to_thread(_apply, deployment, autoscaled)
    budget = worker_disruption_budget(group)
    kopf.adopt(budget, owner=body)
    await asyncio.to_thread(_apply, budget)
    patch.status.update({
        "selector": selector(name),
        "deployment": deployment_name(name),
        "desiredReplicas": start if autoscaled else group.spec.replicas,
        "observedGeneration": generation,
        "conditions": [reconcile.ready_condition(True, "DeploymentApplied",
                                                 f"Deployment {deployment_name(name)} applied",
                                                 generation, previous),
                       *_other_conditions(previous)],
    })
