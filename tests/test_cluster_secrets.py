"""Secrets for jobs on a real API server, with the operator under exactly
charts/gristmill/files/rbac.yaml and its own ServiceAccount's token.

A process-executor job gets the Secret its Script declares, read by its worker through
the Role the operator keeps; the worker's own token cannot read any other Secret. A
pod-executor job gets it through the kubelet (the test node). Values are masked in logs
and results; a missing Secret makes the Script not Ready and its runs fail saying so.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
import uuid

import psycopg
import pytest
from clusterkit import apply, condition, get, kubectl, wait_for
from test_cluster_operator import RunningOperator

from gristmill.store import logs, queue
from gristmill.store import scripts as script_store

pytestmark = pytest.mark.timeout(300)  # pods start as processes: slower than a unit test
NAMESPACE = "secrets-a"
PASSWORD = "correct-horse-battery-staple"
OTHER = "a-value-no-script-declares"
CODE = """import hashlib, os

def main():
    value = os.environ.get("DB_PASSWORD", "")
    print("the password is", value, flush=True)
    return {"password": value, "user": os.environ.get("DB_user"),
            "sha256": hashlib.sha256(value.encode()).hexdigest(),
            "optional": os.environ.get("MAYBE", "absent")}
"""


@pytest.fixture(scope="module")
def operator(crds, tmp_path_factory):
    before = os.environ.get("GRISTMILL_RECHECK_INTERVAL")
    os.environ["GRISTMILL_RECHECK_INTERVAL"] = "2"  # a created Secret is seen within 2 s
    try:
        running = RunningOperator(crds, tmp_path_factory.mktemp("operator"))
    finally:
        if before is None:
            os.environ.pop("GRISTMILL_RECHECK_INTERVAL")
        else:
            os.environ["GRISTMILL_RECHECK_INTERVAL"] = before
    crds.control_plane.ensure_namespace(NAMESPACE)
    for name, data in (("gristmill-database", {"url": running.pod_url}),
                       ("db-creds", {"password": PASSWORD, "user": "app"}),
                       ("other", {"password": OTHER})):
        apply(crds, {"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": name, "namespace": NAMESPACE},
                     "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    yield running
    kubectl(crds, "delete", "namespace", NAMESPACE, "--wait=false")
    running.stop(crds)
    print(running.log.read_text()[-5000:])  # shown when a test of this module failed


def script(name: str, tag: str, secret: str = "db-creds") -> dict:
    return {"apiVersion": "gristmill.io/v1alpha1", "kind": "Script",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"language": "python", "code": CODE, "tag": tag, "env": [
                {"name": "DB_PASSWORD",
                 "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}},
                {"name": "MAYBE", "valueFrom": {"secretKeyRef": {
                    "name": "not-there", "key": "x", "optional": True}}}],
                "envFrom": [{"secretRef": {"name": secret}, "prefix": "DB_"}]}}


def start_workers(cluster, name: str, tag: str, executor: str) -> None:
    apply(cluster, {"apiVersion": "gristmill.io/v1alpha1", "kind": "WorkerGroup",
                    "metadata": {"name": name, "namespace": NAMESPACE},
                    "spec": {"tags": [tag], "replicas": 1, "executor": executor}})
    wait_for(f"a ready {executor} worker of {name}", lambda: (get(
        cluster, "deployment", f"gristmill-workers-{name}", "-n", NAMESPACE) or {}).get(
        "status", {}).get("readyReplicas") == 1, timeout=90)


def script_condition(cluster, name: str, kind: str, status: str) -> dict:
    return wait_for(f"Script {name} {kind}={status}", lambda: (
        lambda c: c if c.get("status") == status else None)(
        condition(get(cluster, "script", name, "-n", NAMESPACE), kind)), timeout=60)


async def _run(operator, name: str, tag: str) -> tuple[dict, str]:
    """Run the Script once; its job and its whole log."""
    async with await psycopg.AsyncConnection.connect(operator.url, autocommit=True) as db:
        version, _ = await script_store.get(db, NAMESPACE, name)
        async with db.transaction():
            (job_id,) = await queue.enqueue(db, [queue.NewJob(
                namespace=NAMESPACE, tag=tag, script_name=name, script_hash=version)])
        deadline = time.monotonic() + 120
        while (job := await queue.get_job(db, job_id))["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {job['status']}"
            await asyncio.sleep(0.3)
        text = "".join(chunk for _, chunk in await logs.read(db, job_id))
        return job, text


def assert_got_the_secret_masked(job: dict, log_text: str) -> None:
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["sha256"] == hashlib.sha256(PASSWORD.encode()).hexdigest()  # the right one
    assert result["password"] == "***" and result["user"] == "app"  # "app": too short to mask
    assert result["optional"] == "absent"
    assert "the password is ***" in log_text and PASSWORD not in log_text


def test_a_process_job_reads_its_declared_secret_and_its_worker_no_other(operator, crds):
    apply(crds, script("proc-reader", "secrets-proc"))
    script_condition(crds, "proc-reader", "SecretsAvailable", "True")
    # The operator's Role names exactly what Scripts declare, never all Secrets.
    role = wait_for("the Role", lambda: get(crds, "role", "gristmill-script-secrets",
                                            "-n", NAMESPACE))
    (rule,) = role["rules"]
    assert rule["verbs"] == ["get"] and rule["resources"] == ["secrets"]
    assert rule["resourceNames"] == ["db-creds", "not-there"]
    # The operator's escalate and bind on that Role name give no more: the chart's
    # admission policy refuses other rules, and subjects from other namespaces.
    as_operator = ("apply", "--server-side", "--force-conflicts",
                   "--field-manager=gristmill-operator", "-f", "-")  # as it writes: a PATCH
    widened = kubectl(crds, *as_operator, kubeconfig=operator.kubeconfig, check=False,
                      input=json.dumps({
                          "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                          "metadata": {"name": "gristmill-script-secrets",
                                       "namespace": NAMESPACE},
                          "rules": [{"apiGroups": [""], "resources": ["pods"],
                                     "verbs": ["*"]}]}))
    assert widened.returncode != 0 and "may only allow `get` on named Secrets" in \
        widened.stderr, widened.stderr
    sneaky = kubectl(crds, *as_operator, kubeconfig=operator.kubeconfig, check=False,
                     input=json.dumps({
                         "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         # Labelled as the operator's own, so that this policy (not
                         # gristmill-operator-owned-writes) is the one that refuses it.
                         "metadata": {"name": "sneaky", "namespace": NAMESPACE, "labels": {
                             "app.kubernetes.io/managed-by": "gristmill-operator"}},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                     "name": "gristmill-script-secrets"},
                         "subjects": [{"kind": "ServiceAccount", "name": "default",
                                       "namespace": "team-a"}]}))
    assert sneaky.returncode != 0 and "only ServiceAccounts of its own namespace" in \
        sneaky.stderr, sneaky.stderr
    start_workers(crds, "proc", "secrets-proc", "process")
    job, log_text = asyncio.run(_run(operator, "proc-reader", "secrets-proc"))
    assert_got_the_secret_masked(job, log_text)

    # The workers' own token: the declared Secret, and nothing else.
    token = crds.control_plane.service_account_token(NAMESPACE, "gristmill-workers-proc")
    as_worker = crds.control_plane.kubeconfig(token, f"worker-{uuid.uuid4().hex[:6]}")
    allowed = kubectl(crds, "get", "secret", "db-creds", "-n", NAMESPACE, "-o", "json",
                      kubeconfig=as_worker)
    assert json.loads(allowed.stdout)["metadata"]["name"] == "db-creds"
    for refused in (["get", "secret", "other"], ["get", "secrets"],
                    ["get", "secret", "gristmill-database"]):
        answer = kubectl(crds, *refused, "-n", NAMESPACE, kubeconfig=as_worker, check=False)
        assert answer.returncode != 0 and "forbidden" in answer.stderr.lower(), answer

    # No Script declares a Secret any more: the Role goes (resourceNames: [] means all).
    kubectl(crds, "delete", "script", "proc-reader", "-n", NAMESPACE, "--wait=true")
    wait_for("the Role gone", lambda: get(crds, "role", "gristmill-script-secrets",
                                          "-n", NAMESPACE) is None)
    answer = kubectl(crds, "get", "secret", "db-creds", "-n", NAMESPACE,
                     kubeconfig=as_worker, check=False)
    assert answer.returncode != 0 and "forbidden" in answer.stderr.lower()
    kubectl(crds, "delete", "workergroup", "proc", "-n", NAMESPACE, "--wait=true")


def test_a_missing_secret_is_in_the_scripts_status_and_fails_its_runs(operator, crds):
    # A tag of its own: the last test's workers may still be draining.
    apply(crds, script("needs-absent", "secrets-missing", secret="absent"))
    found = script_condition(crds, "needs-absent", "SecretsAvailable", "False")
    assert found["reason"] == "SecretNotFound"
    assert f"Secret {NAMESPACE}/absent not found" in found["message"]
    assert condition(get(crds, "script", "needs-absent", "-n", NAMESPACE))["status"] == "False"
    start_workers(crds, "proc-missing", "secrets-missing", "process")
    job, _ = asyncio.run(_run(operator, "needs-absent", "secrets-missing"))
    assert job["status"] == "failed"
    assert job["error"]["message"] == (f"Secret {NAMESPACE}/absent not found: create it or "
                                       f"mark the reference optional")
    apply(crds, {"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": "absent", "namespace": NAMESPACE},
                 "stringData": {"password": PASSWORD}})
    script_condition(crds, "needs-absent", "Ready", "True")  # the recheck timer saw it
    kubectl(crds, "delete", "workergroup", "proc-missing", "-n", NAMESPACE, "--wait=true")
    kubectl(crds, "delete", "script", "needs-absent", "-n", NAMESPACE, "--wait=true")


def test_a_job_pod_gets_its_secret_from_the_kubelet(operator, crds):
    apply(crds, script("pod-reader", "secrets-pod"))
    apply(crds, script("pod-missing", "secrets-pod", secret="never-made"))
    start_workers(crds, "pods", "secrets-pod", "pod")
    job, log_text = asyncio.run(_run(operator, "pod-reader", "secrets-pod"))
    assert_got_the_secret_masked(job, log_text)

    # The kubelet cannot start its container: a clear failure at once, not at the timeout.
    started = time.monotonic()
    job, _ = asyncio.run(_run(operator, "pod-missing", "secrets-pod"))
    assert job["status"] == "failed"
    assert job["error"]["message"] == (f"Secret {NAMESPACE}/never-made not found: create it "
                                       f"or mark the reference optional")
    assert time.monotonic() - started < 60  # spec.timeout is 15 minutes
    kubectl(crds, "delete", "workergroup", "pods", "-n", NAMESPACE, "--wait=true")
