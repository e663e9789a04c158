"""The operator on a real API server, as the chart runs it: with the token of its own
ServiceAccount and exactly the permissions of charts/gristmill/files/rbac.yaml, so that
a missing verb fails here. Worker pods run on the test node and take jobs from the
queue; garbage collection, admission and field ownership are the API server's own."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import lupa
import psycopg
import pytest
from clusterkit import ROOT, apply, condition, get, kubectl, wait_for
from kubernetes import client, config
from test_cli import free_port

from gristmill.operator.autoscaler import Autoscaler
from gristmill.operator.groups import DELETION_COST, GroupLoop
from gristmill.sandbox.base import JobRequest, Limits
from gristmill.sandbox.pod_objects import job_pod
from gristmill.store import queue
from gristmill.store import scripts as script_store
from gristmill.store.migrate import migrate_url

pytestmark = pytest.mark.timeout(240)  # pods start as processes: slower than a unit test
OPERATOR_NAMESPACE = "gristmill"  # files/rbac.yaml's own
TEAM = "team-a"
STRICT = "strict"  # enforces Pod Security baseline
RESTRICTED = "restricted"  # enforces Pod Security restricted


class RunningOperator:
    def __init__(self, cluster, tmp_path):
        cp = cluster.control_plane
        for namespace, labels in ((OPERATOR_NAMESPACE, {}), (TEAM, {}), (STRICT, {
                "pod-security.kubernetes.io/enforce": "baseline"}), (RESTRICTED, {
                "pod-security.kubernetes.io/enforce": "restricted"})):
            cp.ensure_namespace(namespace, labels)
        kubectl(cluster, "apply", "-f", str(ROOT / "charts/gristmill/files/rbac.yaml"))
        self.pod_url = cluster.database_url(f"operator_{uuid.uuid4().hex[:8]}")
        self.url = self.pod_url.replace(f"@{cluster.network.gateway}:", "@127.0.0.1:")
        asyncio.run(migrate_url(self.url))
        for namespace in (TEAM, STRICT, RESTRICTED):  # where worker pods read the database
            apply(cluster, {"apiVersion": "v1", "kind": "Secret", "metadata": {
                "name": "gristmill-database", "namespace": namespace},
                "data": {"url": base64.b64encode(self.pod_url.encode()).decode()}})
        self.token = cp.service_account_token(OPERATOR_NAMESPACE, "gristmill-operator")
        self.kubeconfig = cp.kubeconfig(self.token, "gristmill-operator")
        self.health = free_port()
        self.log = tmp_path / "operator.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gristmill.cli", "operator", "--database-url", self.url,
             "--health-port", str(self.health), "--metrics-port", "0",
             "--autoscale-interval", "1"],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig),
                 "GRISTMILL_LOG_LEVEL": "INFO"},
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_for("the operator's /healthz", self._healthy, timeout=60)
        time.sleep(2)  # kopf's first listing, before objects appear (test_operator_kopf.py)

    def _healthy(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=2):
                return True
        except OSError:
            return False

    def stop(self, cluster) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        # Cluster-wide objects go: the chart's release must be able to own them later.
        kubectl(cluster, "delete", "--wait=false", "-f",
                str(ROOT / "charts/gristmill/files/rbac.yaml"))


@pytest.fixture(scope="module")
def operator(crds, tmp_path_factory):
    running = RunningOperator(crds, tmp_path_factory.mktemp("operator"))
    yield running
    running.stop(crds)
    print(running.log.read_text()[-5000:])  # shown when a test of this module failed


def ready(cluster, kind: str, name: str, namespace: str = TEAM) -> dict:
    return wait_for(f"{kind} {namespace}/{name} Ready", lambda: (
        lambda obj: obj if condition(obj).get("status") == "True" else None)(
        get(cluster, kind, name, "-n", namespace)), timeout=90)


def worker_group(name: str, **spec) -> dict:
    return {"apiVersion": "gristmill.io/v1alpha1", "kind": "WorkerGroup",
            "metadata": {"name": name}, "spec": {"tags": ["python"], "replicas": 1, **spec}}


def test_scripts_and_flows_turn_ready_under_the_charts_rbac(operator, crds):
    kubectl(crds, "apply", "-n", TEAM, "-f", str(ROOT / "examples"))
    for kind, name in (("script", "hello"), ("script", "word-count"),
                       ("flow", "process-orders")):
        found = ready(crds, kind, name)
        assert found["status"]["observedGeneration"] == found["metadata"]["generation"]


async def _run_hello(operator, namespace: str = TEAM) -> dict:
    async with await psycopg.AsyncConnection.connect(operator.url, autocommit=True) as db:
        version, _ = await script_store.get(db, namespace, "hello")
        async with db.transaction():
            (job_id,) = await queue.enqueue(db, [queue.NewJob(
                namespace=namespace, tag="python", input={"name": "cluster"},
                script_name="hello", script_hash=version)])
        deadline = time.monotonic() + 90
        while (job := await queue.get_job(db, job_id))["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {job['status']}"
            await asyncio.sleep(0.3)
        return job


def test_a_worker_group_runs_jobs_and_goes_with_its_deployment(operator, crds):
    kubectl(crds, "apply", "-n", TEAM, "-f", str(ROOT / "examples/hello.yaml"))
    ready(crds, "script", "hello")
    apply(crds, worker_group("runners"), "-n", TEAM)
    deployment = wait_for("the group's Deployment", lambda: get(
        crds, "deployment", "gristmill-workers-runners", "-n", TEAM))
    (owner,) = deployment["metadata"]["ownerReferences"]
    assert owner["kind"] == "WorkerGroup" and owner["blockOwnerDeletion"] is True
    budget = wait_for("its disruption budget", lambda: get(
        crds, "pdb", "gristmill-workers-runners", "-n", TEAM))
    assert budget["metadata"]["ownerReferences"][0]["uid"] == owner["uid"]
    # Accepted by the API server (which does not enforce it: no CNI here).
    policy = get(crds, "networkpolicy", "gristmill-workers-runners", "-n", TEAM)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == owner["uid"]
    wait_for("a running worker pod", lambda: get(
        crds, "deployment", "gristmill-workers-runners", "-n", TEAM)["status"].get(
        "readyReplicas") == 1, timeout=90)
    job = asyncio.run(_run_hello(operator))
    assert job["status"] == "succeeded", job["error"]
    assert job["result"] == {"greeting": "Hello, cluster."}
    assert job["worker_id"].startswith("gristmill-workers-runners-")  # a pod's hostname

    kubectl(crds, "delete", "workergroup", "runners", "-n", TEAM, "--wait=true")
    wait_for("the Deployment and budget collected with their group", lambda: get(
        crds, "deployment", "gristmill-workers-runners", "-n", TEAM) is None and get(
        crds, "pdb", "gristmill-workers-runners", "-n", TEAM) is None)
    wait_for("its pods gone", lambda: not get(
        crds, "pods", "-n", TEAM, "-l", "gristmill.io/worker-group=runners")["items"])


def test_pods_refused_by_admission_are_reported(operator, crds):
    """A namespace that enforces Pod Security baseline refuses the process executor's
    worker pods: the WorkerGroup says so, and so does Argo CD's health check."""
    apply(crds, worker_group("refused"), "-n", STRICT)
    group = wait_for("the refusal in the group's status", lambda: (
        lambda g: g if condition(g).get("reason") == "PodsRefused" else None)(
        get(crds, "workergroup", "refused", "-n", STRICT)), timeout=90)
    ready_condition = condition(group)
    assert ready_condition["status"] == "False"
    assert "violates PodSecurity" in ready_condition["message"]
    health = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = health.eval("function(obj) " + (ROOT / "charts/gristmill/files/argocd-health.lua")
                        .read_text() + " end")
    assert check(health.table_from(_lua(health, group))).status == "Degraded"
    kubectl(crds, "delete", "workergroup", "refused", "-n", STRICT, "--wait=true")


def test_the_pod_executor_runs_jobs_where_pod_security_is_restricted(operator, crds):
    """Worker and job pods both pass `restricted`; the worker acts only as
    gristmill-job-runner, bound by the operator; each job's Secret goes with its pod."""
    kubectl(crds, "apply", "-n", RESTRICTED, "-f", str(ROOT / "examples/hello.yaml"))
    ready(crds, "script", "hello", RESTRICTED)
    apply(crds, worker_group("pods", executor="pod"), "-n", RESTRICTED)
    binding = wait_for("the workers' RoleBinding", lambda: get(
        crds, "rolebindings", "-n", RESTRICTED, "-l", "gristmill.io/worker-group=pods")[
        "items"])
    assert [b["roleRef"]["name"] for b in binding] == ["gristmill-job-runner"]
    wait_for("a ready worker pod", lambda: get(
        crds, "deployment", "gristmill-workers-pods", "-n", RESTRICTED)["status"].get(
        "readyReplicas") == 1, timeout=90)
    job = asyncio.run(_run_hello(operator, RESTRICTED))
    assert job["status"] == "succeeded", job["error"]
    assert job["result"] == {"greeting": "Hello, cluster."}

    (job_pod,) = get(crds, "pods", "-n", RESTRICTED, "-l",
                     f"gristmill.io/job-id={job['id']}")["items"] or [None]
    secrets = [s for s in get(crds, "secrets", "-n", RESTRICTED)["items"]
               if any(o["kind"] == "Pod" for o in s["metadata"].get("ownerReferences", []))]
    if job_pod is not None:  # not yet deleted by its worker: its Secret is its own
        assert secrets and all(s["metadata"]["ownerReferences"][0]["uid"] ==
                               job_pod["metadata"]["uid"] for s in secrets)
    wait_for("the job pod deleted and its Secret collected with it", lambda: not get(
        crds, "pods", "-n", RESTRICTED, "-l", f"gristmill.io/job-id={job['id']}")["items"] and not [
        s for s in get(crds, "secrets", "-n", RESTRICTED)["items"]
        if any(o["kind"] == "Pod" for o in s["metadata"].get("ownerReferences", []))],
        timeout=60)
    kubectl(crds, "delete", "workergroup", "pods", "-n", RESTRICTED, "--wait=true")


def _lua(runtime, value):
    if isinstance(value, dict):
        return runtime.table_from({k: _lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_lua(runtime, v) for v in value])
    return value


def test_fields_removed_from_a_worker_group_leave_its_deployment(operator, crds):
    spec = {"replicas": 0, "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "batch", "operator": "Exists"}],
            "env": [{"name": "REGION", "value": "eu"}]}
    apply(crds, worker_group("trimmed", **spec), "-n", TEAM)

    def pod_spec():
        found = get(crds, "deployment", "gristmill-workers-trimmed", "-n", TEAM)
        return found and found["spec"]["template"]["spec"]

    first = wait_for("the Deployment", pod_spec)
    assert first["nodeSelector"] == {"disk": "ssd"} and first["tolerations"]
    trimmed = copy.deepcopy(spec)
    for key in ("nodeSelector", "tolerations", "env"):
        trimmed.pop(key)
    apply(crds, worker_group("trimmed", **trimmed), "-n", TEAM)  # drops what it no longer has
    after = wait_for("nodeSelector and tolerations gone from the Deployment", lambda: (
        lambda s: s if s and "nodeSelector" not in s and "tolerations" not in s else None)(
        pod_spec()))
    env = {e["name"] for e in after["containers"][0]["env"]}
    assert "REGION" not in env and "GRISTMILL_DATABASE_URL" in env
    kubectl(crds, "delete", "workergroup", "trimmed", "-n", TEAM, "--wait=true")


def test_a_script_of_200_kib_applied_by_kubectl_is_handled(operator, crds):
    """kubectl's own last-applied annotation holds the whole Script; kopf's copy must not
    be another (annotations are limited to 256 KiB together)."""
    filler = "\n".join(f"# {'x' * 70}" for _ in range(2_800))  # about 200 KiB of comments
    manifest = {"apiVersion": "gristmill.io/v1alpha1", "kind": "Script",
                "metadata": {"name": "big", "namespace": TEAM},
                "spec": {"language": "python", "code": f"{filler}\ndef main():\n    return 1\n"}}
    apply(crds, manifest)  # client-side apply, as most people run it
    found = ready(crds, "script", "big")
    annotations = found["metadata"].get("annotations", {})
    assert sum(len(k) + len(v) for k, v in annotations.items()) < 256 * 1024


# ---- what the admission policies of files/rbac.yaml leave the operator --------------------

def _pod(name: str, labels: dict[str, str]) -> dict:
    """A pod bound to a node that does not exist: the test node never runs it."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": TEAM, "labels": labels,
                         "annotations": {"note": "kept"}},
            "spec": {"nodeName": "nowhere", "containers": [{"name": "c", "image": "busybox"}]}}


def _refusal(cluster, token: str, path: str, body: dict, method: str = "PATCH") -> str | None:
    """The API server's answer to a strategic-merge patch (or a POST) as `token`: None when
    it is accepted, else the status code and message."""
    kind = "application/strategic-merge-patch+json" if method == "PATCH" else "application/json"
    try:
        cluster.control_plane.request(method, path, body, token=token, content_type=kind)
        return None
    except urllib.error.HTTPError as refused:
        return f"{refused.code} {json.loads(refused.read())['message']}"


def test_the_admission_policies_type_check(operator, crds):
    """The API server checks each expression against the schemas of the kinds it matches;
    a misspelt field would only warn, and then fail every write (failurePolicy Fail)."""
    for name in ("gristmill-operator-pod-writes", "gristmill-operator-owned-writes",
                 "gristmill-operator-role-bindings", "gristmill-job-runner-pods",
                 "gristmill-operator-secret-writes"):
        checked = wait_for(f"{name} type-checked", lambda name=name: (lambda p: p if (
            p["status"].get("observedGeneration") == p["metadata"]["generation"]) else None)(
            get(crds, "validatingadmissionpolicy", name)))
        assert checked["status"].get("typeChecking", {}).get("expressionWarnings") is None, \
            checked["status"]


def test_the_operator_may_set_only_a_worker_pods_deletion_cost(operator, crds):
    worker_labels = {"app.kubernetes.io/name": "gristmill-worker",
                     "gristmill.io/worker-group": "scaled"}
    for pod in (_pod("a-worker", worker_labels), _pod("not-a-worker", {"app": "payments"})):
        kubectl(crds, "create", "-f", "-", input=json.dumps(pod))
    try:
        # The autoscaler's own write, with the operator's own token.
        loop = GroupLoop(pool=None, autoscaler=Autoscaler(), period_s=1)
        loop.core = client.CoreV1Api(config.new_client_from_config(str(operator.kubeconfig)))
        loop._mark_deletion_costs(TEAM, {"a-worker": 3})
        pod = get(crds, "pod", "a-worker", "-n", TEAM)
        assert pod["metadata"]["annotations"] == {DELETION_COST: "300", "note": "kept"}

        pods = f"/api/v1/namespaces/{TEAM}/pods"
        only_cost = "the Gristmill operator may change only a worker pod's controller"
        for patch in ({"spec": {"containers": [{"name": "c", "image": "evil"}]}},
                      {"metadata": {"labels": {"app.kubernetes.io/name": "other"}}},
                      {"metadata": {"annotations": {"note": "changed"}}},
                      {"metadata": {"annotations": {"note": None}}},
                      {"metadata": {"finalizers": ["example.com/hold"]}}):
            refused = _refusal(crds, operator.token, f"{pods}/a-worker", patch)
            assert refused and refused.startswith("403 ") and only_cost in refused, patch
        refused = _refusal(crds, operator.token, f"{pods}/not-a-worker",
                           {"metadata": {"annotations": {DELETION_COST: "0"}}})
        assert refused and "may write only to worker pods" in refused
        # ...and what it was refused did not happen.
        pod = get(crds, "pod", "a-worker", "-n", TEAM)
        assert pod["spec"]["containers"][0]["image"] == "busybox"
        assert pod["metadata"]["labels"] == worker_labels
        assert get(crds, "pod", "not-a-worker", "-n", TEAM)["metadata"]["annotations"] == {
            "note": "kept"}
    finally:
        kubectl(crds, "delete", "pod", "a-worker", "not-a-worker", "-n", TEAM,
                "--grace-period=0", "--force", check=False)


def test_the_operator_may_change_only_objects_it_made(operator, crds):
    apply(crds, {"apiVersion": "apps/v1", "kind": "Deployment",
                 "metadata": {"name": "payments", "namespace": TEAM},
                 "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "payments"}},
                          "template": {"metadata": {"labels": {"app": "payments"}},
                                       "spec": {"containers": [{"name": "c",
                                                                "image": "payments:1"}]}}}})
    try:
        refused = _refusal(crds, operator.token,
                           f"/apis/apps/v1/namespaces/{TEAM}/deployments/payments",
                           {"spec": {"template": {"spec": {"containers": [
                               {"name": "c", "image": "evil"}]}}}})
        assert refused and refused.startswith("403 ")
        assert "may change only objects it made" in refused
        # Nor may it take one over by labelling it.
        refused = _refusal(crds, operator.token,
                           f"/apis/apps/v1/namespaces/{TEAM}/deployments/payments",
                           {"metadata": {"labels": {
                               "app.kubernetes.io/managed-by": "gristmill-operator"}}})
        assert refused and "may change only objects it made" in refused
    finally:
        kubectl(crds, "delete", "deployment", "payments", "-n", TEAM, check=False)
    # RBAC would let it bind its own ClusterRole (it holds every rule of it) to another
    # account, which no policy above would then hold back.
    refused = _refusal(crds, operator.token,
                       f"/apis/rbac.authorization.k8s.io/v1/namespaces/{TEAM}/rolebindings",
                       {"metadata": {"name": "escape", "labels": {
                           "app.kubernetes.io/managed-by": "gristmill-operator"}},
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                    "kind": "ClusterRole", "name": "gristmill-operator"},
                        "subjects": [{"kind": "ServiceAccount", "name": "default",
                                      "namespace": TEAM}]}, method="POST")
    assert refused and "binds only the ClusterRole gristmill-job-runner" in refused
    # Its own objects it still writes: the WorkerGroup tests above make and scale them.


def test_the_operator_writes_worker_token_secrets_unchanged_and_no_other_secret(operator,
                                                                               crds):
    """Dispatcher mode's one Secret per group, as handlers._apply writes it (server-side
    apply with the operator's token): applied again it is not rewritten, and the operator
    may neither read Secrets nor write any other."""
    from gristmill.dispatch import tokens
    from gristmill.operator.deployment import worker_token_secret as token_secret
    from gristmill.operator.ownership import OPERATOR_FIELD_MANAGER, server_side_apply
    from gristmill.operator.worker_tokens import dispatcher_from_env, worker_token
    from gristmill.spec import WorkerGroup

    dispatcher = dispatcher_from_env({"GRISTMILL_DISPATCHER_URL": "http://api:8080",
                                      "GRISTMILL_WORKER_TOKEN_KEYS": tokens.new_key()})
    meta = {"name": "tokens", "namespace": TEAM, "uid": "u-1",
            "creationTimestamp": "2026-12-01T10:00:00Z"}

    def group_of(tags: list[str]) -> WorkerGroup:
        return WorkerGroup.model_validate({"apiVersion": "gristmill.io/v1alpha1",
                                           "kind": "WorkerGroup", "metadata": meta,
                                           "spec": {"tags": tags}})
    group = group_of(["python"])
    core = client.CoreV1Api(config.new_client_from_config(str(operator.kubeconfig)))

    def applied(secret: dict) -> dict:
        server_side_apply(core.patch_namespaced_secret, copy.deepcopy(secret),
                          OPERATOR_FIELD_MANAGER)
        return get(crds, "secret", secret["metadata"]["name"], "-n", TEAM)
    secrets = f"/api/v1/namespaces/{TEAM}/secrets"
    try:
        secret = token_secret(group, worker_token(dispatcher, group, meta))
        first = applied(secret)
        assert first["data"] == secret["data"]
        # The next reconcile: the same token, and nothing written.
        again = applied(token_secret(group, worker_token(dispatcher, group, dict(meta))))
        assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        # New tags: re-issued in place.
        retagged = group_of(["python", "bash"])
        changed = applied(token_secret(retagged, worker_token(dispatcher, retagged, meta)))
        assert changed["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]

        # It reads no Secret, not even its own.
        refused = _refusal(crds, operator.token, f"{secrets}/gristmill-worker-tokens", None,
                           method="GET")
        assert refused and refused.startswith("403 "), refused
        # No other name, type or content, and no Secret of someone else's, even if named so.
        kubectl(crds, "create", "secret", "generic", "gristmill-worker-theirs", "-n", TEAM,
                "--from-literal=token=theirs")
        only = "writes only worker-token Secrets"
        for body in ({**secret, "metadata": {**secret["metadata"], "name": "payments"}},
                     {**secret, "type": "kubernetes.io/service-account-token", "metadata": {
                         **secret["metadata"], "name": "gristmill-worker-sa", "annotations": {
                             "kubernetes.io/service-account.name": "default"}}},
                     {**secret, "metadata": {**secret["metadata"], "name": "gristmill-worker-x"},
                      "data": {**secret["data"], "extra": "eA=="}},
                     {**secret, "metadata": {**secret["metadata"], "name": "gristmill-worker-y",
                                             "labels": {}}}):
            refused = _refusal(crds, operator.token, secrets, body, method="POST")
            assert refused and refused.startswith("403 ") and only in refused, body
        theirs = {**secret, "metadata": {**secret["metadata"], "name": "gristmill-worker-theirs"}}
        with pytest.raises(client.ApiException) as taken:
            server_side_apply(core.patch_namespaced_secret, theirs, OPERATOR_FIELD_MANAGER)
        assert taken.value.status == 403 and "may change only Secrets it made" in taken.value.body
        assert base64.b64decode(get(crds, "secret", "gristmill-worker-theirs", "-n", TEAM)[
            "data"]["token"]) == b"theirs"
    finally:
        kubectl(crds, "delete", "secret", "gristmill-worker-tokens", "gristmill-worker-theirs",
                "-n", TEAM, "--ignore-not-found", check=False)


def test_a_pod_executor_worker_makes_and_deletes_only_job_pods(operator, crds):
    """As the account the operator makes for a pod-executor group: the pods the pod
    executor makes pass, a pod that would run as another account does not, and only job
    pods may be deleted."""
    apply(crds, worker_group("jobs", executor="pod", replicas=0), "-n", TEAM)
    wait_for("the group's RoleBinding", lambda: get(
        crds, "rolebinding", "gristmill-workers-jobs", "-n", TEAM))
    token = crds.control_plane.service_account_token(TEAM, "gristmill-workers-jobs")
    pods = f"/api/v1/namespaces/{TEAM}/pods"
    request = JobRequest(job_id=str(uuid.uuid4()), language="python", code="", input={},
                         limits=Limits(timeout_s=30, memory_bytes=2**28, cpu_cores=0.5))
    pod = job_pod(request, "worker:1", 60, "gristmill-workers-jobs-x", "u-1", group="jobs")
    pod["spec"]["nodeName"] = "nowhere"  # never run: the test node ignores it
    try:
        assert _refusal(crds, token, pods, pod, method="POST") is None
        for change in ({"automountServiceAccountToken": True},
                       {"serviceAccountName": "gristmill-workers-jobs"},
                       {"volumes": [*pod["spec"]["volumes"], {"name": "t", "projected": {
                           "sources": [{"serviceAccountToken": {"path": "token"}}]}}]}):
            other = copy.deepcopy(pod)
            other["metadata"]["name"] += "-other"
            other["spec"].update(change)
            refused = _refusal(crds, token, f"{pods}?dryRun=All", other, method="POST")
            assert refused and refused.startswith("403 "), change
            assert "creates only job pods" in refused
        unlabelled = copy.deepcopy(pod)
        unlabelled["metadata"].update(name="not-a-job", labels={"app": "payments"})
        refused = _refusal(crds, token, pods, unlabelled, method="POST")
        assert refused and "creates only job pods" in refused

        kubectl(crds, "create", "-f", "-", input=json.dumps(_pod("bystander", {})))
        refused = _refusal(crds, token, f"{pods}/bystander", {}, method="DELETE")
        assert refused and "deletes only job pods" in refused
        assert _refusal(crds, token, f"{pods}/{pod['metadata']['name']}", {},
                        method="DELETE") is None
    finally:
        kubectl(crds, "delete", "pod", pod["metadata"]["name"], "bystander", "-n", TEAM,
                "--grace-period=0", "--force", "--ignore-not-found", check=False)
        kubectl(crds, "delete", "workergroup", "jobs", "-n", TEAM, "--wait=true")
