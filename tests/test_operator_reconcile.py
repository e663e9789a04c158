"""The operator's logic without kopf: Scripts and Flows reconciled into a real database,
and the worker Deployment built from a WorkerGroup."""

from __future__ import annotations

import pytest
import yaml
from kubernetes_validate import validate as k8s_validate
from kubernetes_validate.utils import latest_version

from gristmill.operator.deployment import worker_deployment
from gristmill.operator.reconcile import forget, reconcile_flow, reconcile_script
from gristmill.spec import WorkerGroup
from gristmill.store import scripts as script_store


def body(kind: str, name: str, spec: dict, generation: int = 1, namespace: str = "team-a"
         ) -> dict:
    return {"apiVersion": "gristmill.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "generation": generation,
                         "uid": "1234", "resourceVersion": "7"},
            "spec": spec}


SCRIPT = {"language": "python", "code": "def main(x: int = 1):\n    return x\n"}


async def test_script_ready_stored_and_versioned(db):
    done = await reconcile_script(db, body("Script", "double", SCRIPT))
    assert done.ready
    (ready,) = done.status["conditions"]
    assert ready["type"] == "Ready" and ready["status"] == "True"
    assert ready["observedGeneration"] == 1
    assert done.status["inputSchema"]["properties"]["x"] == {"type": "integer", "default": 1}
    assert done.event[1] == "Stored"
    version, _ = await script_store.get(db, "team-a", "double")
    assert version == done.status["version"]
    again = await reconcile_script(db, {**body("Script", "double", SCRIPT), "status": done.status})
    assert again.event is None  # idempotent: nothing new, no Event
    assert again.status["conditions"][0]["lastTransitionTime"] == ready["lastTransitionTime"]


async def test_broken_script_is_not_ready_with_the_line_and_fixing_it_heals(db):
    broken = await reconcile_script(db, body("Script", "s", {"language": "python",
                                                             "code": "def main(:\n"}, 2))
    assert not broken.ready
    (condition,) = broken.status["conditions"]
    assert condition["reason"] == "Invalid"
    assert "spec.code: Python syntax error at line 1" in condition["message"]
    assert broken.event[0] == "Warning"
    assert await script_store.get(db, "team-a", "s") is None
    fixed = await reconcile_script(db, body("Script", "s", SCRIPT, 3))
    assert fixed.ready


async def test_flow_waits_for_its_scripts_then_turns_ready(db):
    flow = {"steps": [{"id": "a", "script": "double", "input": {"x": "2"}}]}
    waiting = await reconcile_flow(db, body("Flow", "f", flow))
    assert not waiting.ready
    assert waiting.status["conditions"][0]["reason"] == "MissingReference"
    assert "Script 'double' does not exist in namespace 'team-a'" in waiting.event[2]
    await reconcile_script(db, body("Script", "double", SCRIPT))
    ready = await reconcile_flow(db, body("Flow", "f", flow))
    assert ready.ready and ready.status["steps"] == 1
    bad = await reconcile_flow(db, body("Flow", "g", {"steps": [
        {"id": "a", "script": "double", "input": {"x": "results.zzz"}}]}))
    assert "refers to unknown step 'zzz'" in bad.status["conditions"][0]["message"]


async def test_namespaces_are_tenants(db):
    from gristmill.flows import engine

    await reconcile_script(db, body("Script", "double", SCRIPT))
    flow = {"steps": [{"id": "a", "script": "double"}]}
    # team-b cannot use team-a's Script, and cannot run it either.
    other = await reconcile_flow(db, body("Flow", "f", flow, namespace="team-b"))
    assert not other.ready
    assert "Script 'double' does not exist in namespace 'team-b'" in \
        other.status["conditions"][0]["message"]
    assert await script_store.get(db, "team-b", "double") is None
    assert (await reconcile_flow(db, body("Flow", "f", flow))).ready
    with pytest.raises(engine.FlowError, match="Flow team-b/f not found"):
        async with db.transaction():
            await engine.submit_flow_run(db, "team-b", "f", {})


async def test_deleting_a_script_stops_new_runs_only(db):
    await reconcile_script(db, body("Script", "double", SCRIPT))
    assert await forget(db, "Script", "team-a", "double")
    assert await script_store.get(db, "team-a", "double") is None


@pytest.mark.parametrize("version", ["1.29.0", latest_version()])
def test_worker_deployment_is_a_valid_deployment(version):
    group = WorkerGroup.model_validate(yaml.safe_load("""
        apiVersion: gristmill.io/v1alpha1
        kind: WorkerGroup
        metadata: {name: gpu, namespace: ml}
        spec:
          tags: [gpu, cuda]
          concurrency: 2
          replicas: 3
          resources: {limits: {nvidia.com/gpu: "1", memory: 8Gi}}
          nodeSelector: {accelerator: a100}
          tolerations: [{key: gpu, operator: Exists, effect: NoSchedule}]
          env: [{name: CUDA_VISIBLE_DEVICES, value: "0"}]
          priorityClassName: batch
          terminationGracePeriodSeconds: 120
    """))
    deployment = worker_deployment(group, "gristmill-database", replicas=5)
    k8s_validate(deployment, version, strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:5] == ["worker", "--tags", "gpu,cuda", "--concurrency", "2"]
    # Stops with time to hand back jobs before the kubelet's SIGKILL; probed for progress.
    assert container["args"][5:9] == ["--grace-period", "110", "--health-port", "8081"]
    # The process executor in a pod of its own user namespace, with an unmasked /proc (the
    # least that runs its jobs: tests/test_sandbox_in_runc.py); network jobs share the
    # pod's network, as a pod has no /dev/net/tun.
    assert container["args"][9:] == ["--job-network", "pod"]
    pod_spec = deployment["spec"]["template"]["spec"]
    assert pod_spec["hostUsers"] is False
    assert container["securityContext"]["procMount"] == "Unmasked"
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["ports"] == [{"name": "health", "containerPort": 8081}]
    assert deployment["spec"]["replicas"] == 5
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "gristmill-database",
                                                                "key": "url"}


# ---- Dispatcher mode: each WorkerGroup's token and the Deployment that reads it --------------

def _group(tags: list[str], executor: str = "process") -> tuple[WorkerGroup, dict]:
    body = {"apiVersion": "gristmill.io/v1alpha1", "kind": "WorkerGroup",
            "metadata": {"name": "gpu", "namespace": "ml", "uid": "6f1c-uid",
                         "creationTimestamp": "2026-12-01T10:00:00Z"},
            "spec": {"tags": tags, "executor": executor}}
    return WorkerGroup.model_validate(body), body["metadata"]


def _dispatcher(*keys: str):
    from gristmill.operator.worker_tokens import dispatcher_from_env

    return dispatcher_from_env({"GRISTMILL_DISPATCHER_URL": "http://gristmill-api.gm.svc:8080",
                                "GRISTMILL_WORKER_TOKEN_KEYS": ",".join(keys)})


def _token_of(secret: dict) -> str:
    import base64

    return base64.b64decode(secret["data"]["token"]).decode()


def test_a_worker_groups_secret_holds_a_token_of_its_namespace_name_tags_and_uid():
    from gristmill.dispatch import tokens
    from gristmill.operator.deployment import worker_token_secret as token_secret
    from gristmill.operator.worker_tokens import token_is_current, worker_token

    key = tokens.new_key()
    dispatcher = _dispatcher(key)
    group, meta = _group(["gpu", "cuda"])
    secret = token_secret(group, worker_token(dispatcher, group, meta))
    k8s_validate(secret, latest_version(), strict=True)
    assert secret["metadata"]["name"] == "gristmill-worker-gpu"
    assert secret["metadata"]["namespace"] == "ml"
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"token"}
    # Labelled as the operator's own: its admission policy lets it write no other Secret.
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gristmill-operator"
    assert secret["metadata"]["labels"]["app.kubernetes.io/name"] == "gristmill-worker"
    grant = tokens.verify(tokens.parse_keys(key), _token_of(secret))
    assert (grant.namespace, grant.group, grant.tags, grant.group_uid) == (
        "ml", "gpu", ("gpu", "cuda"), "6f1c-uid")
    assert grant.worker_prefix == "ml/gpu/"
    assert token_is_current(dispatcher, _token_of(secret), group, "6f1c-uid")
    assert not token_is_current(dispatcher, _token_of(secret), group, "another-uid")
    assert not token_is_current(_dispatcher(tokens.new_key()), _token_of(secret), group,
                                "6f1c-uid")
    # The keys never show, not even in a repr.
    assert key not in repr(dispatcher)


def test_a_token_is_reissued_only_when_the_tags_uid_or_signing_key_change():
    from gristmill.dispatch import tokens
    from gristmill.operator.deployment import worker_token_secret as token_secret
    from gristmill.operator.worker_tokens import token_is_current, worker_token

    key, other = tokens.new_key(), tokens.new_key()
    dispatcher = _dispatcher(key)
    group, meta = _group(["gpu", "cuda"])
    first = token_secret(group, worker_token(dispatcher, group, meta))
    # Nothing changed: the very same Secret (its apply writes nothing), at any later time.
    assert token_secret(group, worker_token(dispatcher, group, dict(meta))) == first
    assert token_secret(group, worker_token(_dispatcher(key, other), group, meta)) == first

    retagged, _ = _group(["gpu"])
    again = _token_of(token_secret(retagged, worker_token(dispatcher, retagged, meta)))
    assert again != _token_of(first)
    assert tokens.verify(tokens.parse_keys(key), again).tags == ("gpu",)
    assert not token_is_current(dispatcher, _token_of(first), retagged, "6f1c-uid")

    recreated = worker_token(dispatcher, group, {**meta, "uid": "a-new-uid"})
    assert recreated != _token_of(first)
    # A new key put first (rotation): signed with it, and the API still takes the old one.
    rotated = worker_token(_dispatcher(other, key), group, meta)
    assert rotated != _token_of(first)
    assert tokens.verify(tokens.parse_keys(other), rotated).group == "gpu"
    assert tokens.verify(tokens.parse_keys(f"{other},{key}"), _token_of(first)).group == "gpu"


@pytest.mark.parametrize("executor", ["process", "pod"])
def test_dispatched_workers_get_the_server_and_token_and_no_database(executor):
    from gristmill.dispatch import tokens
    from gristmill.operator.deployment import TOKEN_SHA256, DispatchedWorkers
    from gristmill.operator.worker_tokens import token_sha256, worker_token

    dispatcher = _dispatcher(tokens.new_key())
    group, meta = _group(["gpu"], executor)
    token = worker_token(dispatcher, group, meta)
    dispatched = DispatchedWorkers(server=dispatcher.url, token_sha256=token_sha256(token))
    deployment = worker_deployment(group, "gristmill-database", dispatched=dispatched)
    k8s_validate(deployment, latest_version(), strict=True)
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert "GRISTMILL_DATABASE_URL" not in env
    assert "gristmill-database" not in yaml.safe_dump(deployment)
    assert env["GRISTMILL_SERVER"] == {"name": "GRISTMILL_SERVER",
                                       "value": "http://gristmill-api.gm.svc:8080"}
    assert env["GRISTMILL_WORKER_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "gristmill-worker-gpu", "key": "token"}}
    assert token not in yaml.safe_dump(deployment)  # only its hash, which rolls the pods
    assert template["metadata"]["annotations"][TOKEN_SHA256] == token_sha256(token)
    # The same arguments as a direct worker: the CLI reads the two variables.
    direct = worker_deployment(group, "gristmill-database")
    assert container["args"] == direct["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--server" not in container["args"]
    if executor == "pod":
        assert {"GRISTMILL_JOB_IMAGE", "GRISTMILL_POD_NAME"} <= set(env)
    else:
        assert template["metadata"]["annotations"][
            "container.apparmor.security.beta.kubernetes.io/worker"] == "unconfined"


def test_without_dispatcher_settings_workers_connect_to_the_database_as_before():
    from gristmill.operator.worker_tokens import dispatcher_from_env

    assert dispatcher_from_env({}) is None
    assert dispatcher_from_env({"GRISTMILL_DISPATCHER_URL": "",
                                "GRISTMILL_WORKER_TOKEN_KEYS": " "}) is None
    group, _ = _group(["gpu"])
    deployment = worker_deployment(group, "gristmill-database")
    assert deployment == worker_deployment(group, "gristmill-database", dispatched=None)
    template = deployment["spec"]["template"]
    (env,) = template["spec"]["containers"][0]["env"]
    assert env == {"name": "GRISTMILL_DATABASE_URL", "valueFrom": {"secretKeyRef": {
        "name": "gristmill-database", "key": "url"}}}
    assert "gristmill.io/worker-token-sha256" not in template["metadata"]["annotations"]
    pods, _ = _group(["gpu"], "pod")
    assert "annotations" not in worker_deployment(pods, "gristmill-database")["spec"][
        "template"]["metadata"]


@pytest.mark.parametrize("environ, message", [
    ({"GRISTMILL_DISPATCHER_URL": "http://api:8080"}, "GRISTMILL_WORKER_TOKEN_KEYS is not"),
    ({"GRISTMILL_WORKER_TOKEN_KEYS": "x" * 44}, "GRISTMILL_DISPATCHER_URL is not"),
    ({"GRISTMILL_DISPATCHER_URL": "gristmill-api:8080",
      "GRISTMILL_WORKER_TOKEN_KEYS": "x" * 44}, "http(s) URL"),
    ({"GRISTMILL_DISPATCHER_URL": "http://api:8080", "GRISTMILL_WORKER_TOKEN_KEYS": "c2hvcnQ"},
     "needs at least 32"),
])
def test_half_a_dispatcher_setting_is_refused_with_what_to_set(environ, message):
    from gristmill.operator.worker_tokens import dispatcher_from_env

    with pytest.raises(ValueError, match=None) as refused:
        dispatcher_from_env(environ)
    assert message in str(refused.value)
