"""What belongs to the API server, tried on a real one: the CRDs it creates and serves, the
custom resources it accepts and refuses with its own messages, a pod's log through
`pods/log`, and garbage collection by owner reference."""

from __future__ import annotations

import json

import pytest
from clusterkit import kubectl, wait_for


def test_the_api_server_serves_the_crds_and_explains_them(crds):
    # The CRD's OpenAPI is published a moment after it is Established.
    explained = wait_for("kubectl explain", lambda: kubectl(
        crds, "explain", "script.spec.resources", check=False).stdout)
    assert "maxProcesses" in explained and "Memory limit of one run" in explained
    served = kubectl(crds, "api-resources", "--api-group=gristmill.io", "-o", "name").stdout
    assert set(served.split()) == {"scripts.gristmill.io", "flows.gristmill.io",
                                   "workergroups.gristmill.io"}


GOOD = """
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: hello}
spec:
  language: python
  code: |
    def main(name: str = "world"):
        return f"hello {name}"
"""


@pytest.mark.parametrize("spec, refusal", [
    ({"language": "cobol", "code": "x"}, 'spec.language: Unsupported value: "cobol"'),
    ({"language": "python"}, "spec.code: Required value"),
    ({"language": "python", "code": "x", "tag": "Not A Tag"}, "spec.tag: Invalid value"),
    ({"language": "python", "code": "x", "retries": 101},
     "spec.retries: Invalid value: 101: spec.retries in body should be less than or equal to 100"),
])
def test_bad_custom_resources_are_refused_by_the_api_server(crds, spec, refusal):
    kubectl(crds, "apply", "-f", "-", input=GOOD)
    bad = {"apiVersion": "gristmill.io/v1alpha1", "kind": "Script",
           "metadata": {"name": "bad"}, "spec": spec}
    result = kubectl(crds, "apply", "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0 and refusal in result.stderr, result.stderr


def test_a_pods_log_comes_through_the_api_server(cluster):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "log-me"},
           "spec": {"restartPolicy": "Never", "containers": [{
               "name": "main", "image": "ghcr.io/gristmill/worker",
               "command": ["python", "-c", "import os; print('hello from', os.uname().nodename)"]}]}}
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(pod))
    wait_for("the pod to succeed", lambda: kubectl(
        cluster, "get", "pod", "log-me", "-o", "jsonpath={.status.phase}").stdout == "Succeeded")
    assert kubectl(cluster, "logs", "log-me").stdout == "hello from log-me\n"
    kubectl(cluster, "delete", "pod", "log-me", "--wait=true", "--timeout=30s")


def test_garbage_collection_follows_owner_references(crds):
    kubectl(crds, "apply", "-f", "-", input=GOOD.replace("name: hello", "name: owner"))
    owner = json.loads(kubectl(crds, "get", "script", "owner", "-o", "json").stdout)
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "owned", "ownerReferences": [{
            "apiVersion": "gristmill.io/v1alpha1", "kind": "Script", "name": "owner",
            "uid": owner["metadata"]["uid"]}]}}
    kubectl(crds, "apply", "-f", "-", input=json.dumps(child))
    kubectl(crds, "delete", "script", "owner", "--wait=true", "--timeout=30s")
    wait_for("the owned ConfigMap to be collected", lambda: kubectl(
        crds, "get", "configmap", "owned", check=False).returncode != 0)


def test_the_api_server_agrees_with_the_models_on_every_quantity_and_duration(crds):
    """The table the models and the offline CRD check are held to (crd_cases.py), put to
    the real API server: every value of every int-or-string field, as a dry-run create."""
    import crd_cases

    cp = crds.control_plane
    disagreements = []
    for field in crd_cases.FIELDS:
        for value, accepted in [*field.values, (None, True)]:
            verdict, message = crd_cases.api_server_verdict(cp.url, cp.admin_token, field, value)
            if verdict != field.expected(value, accepted):
                disagreements.append(f"{field.id} = {value!r}: server "
                                     f"{'accepted' if verdict else 'refused'} {message[:200]}")
    assert not disagreements, "\n".join(disagreements)
