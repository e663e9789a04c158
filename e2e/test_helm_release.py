"""A Helm release of the chart on a real cluster runs Python and Bash Scripts end to end:
CRDs, operator, API, bundled PostgreSQL, the release's default WorkerGroup.

The workflow installs the release twice, once per executor (e2e/release-values.yaml:
job pods; e2e/release-values-process.yaml: confined processes in user-namespaced worker
pods), and names its namespace in GRISTMILL_E2E_RELEASE_NAMESPACE; the test reaches the
API with `kubectl port-forward`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_operator import GROUP, VERSION, _get, _ready, _wait

from gristmill.client import Client

RELEASE_NAMESPACE = os.environ.get("GRISTMILL_E2E_RELEASE_NAMESPACE")
ROOT = Path(__file__).parent.parent


@pytest.fixture
def api(k8s):
    if not RELEASE_NAMESPACE:
        pytest.skip("GRISTMILL_E2E_RELEASE_NAMESPACE is not set: `helm install` the chart "
                    "first (see .github/workflows/e2e.yaml)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forward = subprocess.Popen(["kubectl", "-n", RELEASE_NAMESPACE, "port-forward",
                                "svc/gristmill-api", f"{port}:8080"])
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return True
        except OSError:  # not forwarding yet
            return False
    try:
        _wait(healthy, timeout=60)
        yield Client(url, token=_runner_token(k8s), token_source="the e2e runner's token")
    finally:
        forward.terminate()


def _runner_token(k8s) -> str:
    """A ServiceAccount bound to the chart's gristmill-runner role in the release's
    namespace: kind's kubeconfig holds a client certificate, which the API cannot take."""
    core, rbac = k8s.CoreV1Api(), k8s.RbacAuthorizationV1Api()
    name = "e2e-runner"
    for create, body in (
            (core.create_namespaced_service_account, {"metadata": {"name": name}}),
            (rbac.create_namespaced_role_binding, {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "gristmill-runner"},
                "subjects": [{"kind": "ServiceAccount", "name": name,
                              "namespace": RELEASE_NAMESPACE}]})):
        try:
            create(RELEASE_NAMESPACE, body)
        except k8s.exceptions.ApiException as exc:
            if exc.status != 409:  # it exists from an earlier run
                raise
    answer = core.create_namespaced_service_account_token(
        name, RELEASE_NAMESPACE, {"spec": {"expirationSeconds": 3600}})
    return answer.status.token


def _create_script(k8s, script: dict) -> None:
    script["metadata"]["namespace"] = RELEASE_NAMESPACE
    k8s.CustomObjectsApi().create_namespaced_custom_object(
        GROUP, VERSION, RELEASE_NAMESPACE, "scripts", script)
    name = script["metadata"]["name"]
    _wait(lambda: _ready(_get(k8s, RELEASE_NAMESPACE, "scripts", name)) == "True", 120)


def test_a_released_gristmill_runs_a_python_script(k8s, api):
    (script,) = yaml.safe_load_all((ROOT / "examples" / "hello.yaml").read_text())
    _create_script(k8s, script)

    submitted = api.submit_script(RELEASE_NAMESPACE, "hello", {"input": {"name": "kind"}})
    started = time.monotonic()
    run = api.wait(submitted["id"], timeout=300)
    assert run["status"] == "succeeded", run
    assert "kind" in str(run["result"])
    print(f"first run on a fresh release: {time.monotonic() - started:.1f}s (pod start included)")


def test_a_released_gristmill_runs_a_bash_script(k8s, api):
    _create_script(k8s, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Script",
                         "metadata": {"name": "whoami"},
                         "spec": {"language": "bash", "code": 'echo "uid=$(id -u)"\n'}})
    run = api.wait(api.submit_script(RELEASE_NAMESPACE, "whoami", {})["id"], timeout=300)
    assert run["status"] == "succeeded", run
    assert "uid=" in api.log_tail(run["id"])
