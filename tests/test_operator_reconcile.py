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
