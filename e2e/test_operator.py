"""The operator's scenarios on a real cluster (the emulator tests' twins, plus what the
emulator cannot do: garbage collection through owner references)."""

from __future__ import annotations

import time

GROUP, VERSION = "gristmill.io", "v1alpha1"


def _create(k8s, namespace: str, plural: str, kind: str, name: str, spec: dict) -> dict:
    return k8s.CustomObjectsApi().create_namespaced_custom_object(
        GROUP, VERSION, namespace, plural,
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name},
         "spec": spec})


def _get(k8s, namespace: str, plural: str, name: str) -> dict:
    return k8s.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                               plural, name)


def _ready(obj: dict) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition["type"] == "Ready":
            return condition["status"]
    return None


def _wait(check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError("timed out")


def test_script_broken_then_fixed(k8s, namespace):
    _create(k8s, namespace, "scripts", "Script", "hello",
            {"language": "python", "code": "def main(:\n"})
    broken = _wait(lambda: (o := _get(k8s, namespace, "scripts", "hello"))
                   and _ready(o) == "False" and o)
    assert "syntax error at line 1" in broken["status"]["conditions"][0]["message"]
    k8s.CustomObjectsApi().patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "scripts", "hello",
        {"spec": {"code": "def main(name: str = 'x'):\n    return name\n"}})
    fixed = _wait(lambda: (o := _get(k8s, namespace, "scripts", "hello"))
                  and _ready(o) == "True" and o)
    assert fixed["status"]["inputSchema"]["properties"]["name"]["type"] == "string"


def test_flow_turns_ready_when_its_script_appears(k8s, namespace):
    _create(k8s, namespace, "flows", "Flow", "pipeline",
            {"steps": [{"id": "a", "script": "later"}]})
    _wait(lambda: _ready(_get(k8s, namespace, "flows", "pipeline")) == "False")
    _create(k8s, namespace, "scripts", "Script", "later",
            {"language": "bash", "code": "echo 1"})
    _wait(lambda: _ready(_get(k8s, namespace, "flows", "pipeline")) == "True")


def test_worker_group_owns_its_deployment(k8s, namespace):
    group = _create(k8s, namespace, "workergroups", "WorkerGroup", "default",
                    {"tags": ["python"], "replicas": 0})
    apps = k8s.AppsV1Api()

    def deployment():
        try:
            return apps.read_namespaced_deployment("gristmill-workers-default", namespace)
        except k8s.exceptions.ApiException:
            return None
    owned = _wait(deployment)
    assert owned.metadata.owner_references[0].uid == group["metadata"]["uid"]
    k8s.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, namespace,
                                                           "workergroups", "default")
    _wait(lambda: deployment() is None, timeout=120)  # garbage-collected with its owner


def test_a_restarted_operator_duplicates_nothing(k8s, namespace, operator):
    _create(k8s, namespace, "scripts", "Script", "hello",
            {"language": "python", "code": "def main():\n    return 1\n"})
    _create(k8s, namespace, "workergroups", "WorkerGroup", "default",
            {"tags": ["python"], "replicas": 0})
    _wait(lambda: _ready(_get(k8s, namespace, "scripts", "hello")) == "True")
    _wait(lambda: _ready(_get(k8s, namespace, "workergroups", "default")) == "True")
    time.sleep(5)  # the group loop's first status

    def snapshot():
        objects = [_get(k8s, namespace, plural, name)
                   for plural, name in (("scripts", "hello"), ("workergroups", "default"))]
        deployments = k8s.AppsV1Api().list_namespaced_deployment(namespace).items
        events = k8s.CoreV1Api().list_namespaced_event(namespace).items
        return ([(o["spec"], o.get("status")) for o in objects],
                [(d.metadata.name, d.metadata.uid, d.spec.replicas) for d in deployments],
                sorted((e.reason, e.involved_object.name, e.count) for e in events
                       if e.source.component != "deployment-controller"))
    before = snapshot()
    operator.restart()
    time.sleep(10)  # a full re-listing, a recheck and a group loop period or two
    assert snapshot() == before
