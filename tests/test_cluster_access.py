"""Who may do what, on a real API server with real RBAC: the API runs as a ServiceAccount
bound to exactly the chart's gristmill-api ClusterRole and reviews real ServiceAccount
tokens against the chart's user ClusterRoles and a Role of the test's own."""

from __future__ import annotations

import json

import aiohttp
import helm_python as helm
import pytest
import yaml
from clusterkit import ROOT, apply, kubectl, wait_for
from flowkit import apply_yaml_at

from gristmill.api.access import AccessSettings
from gristmill.api.app import ApiSettings
from tests.apikit import api_in_process
from tests.reviewkit import manifests

pytestmark = pytest.mark.timeout(180)
API_NAMESPACE = "gristmill-authz"
TEAM = "authz-a"
MANIFESTS = manifests(TEAM)
LATER = {"scheduledFor": "2999-01-01T00:00:00Z"}  # no worker here: it stays queued


def chart_rbac() -> list[dict]:
    """The chart's API identity and user roles, as a release in API_NAMESPACE has them."""
    rendered = helm.Chart.load(ROOT / "charts" / "gristmill").render(
        None, name="gm", namespace=API_NAMESPACE, is_install=True)
    wanted = {"templates/api-rbac.yaml", "templates/roles.yaml"}
    return [doc for path, text in rendered.items() if path.rsplit("gristmill/", 1)[-1] in wanted
            for doc in yaml.safe_load_all(text) if doc]


def user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def bind(cluster, name: str, role_kind: str, role: str, *accounts: str) -> None:
    apply(cluster, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": TEAM},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": a, "namespace": TEAM}
                     for a in accounts]})


def can(cluster, account: str, verb: str, resource: str, subresource: str = "") -> bool:
    """The API server's answer, asked as the admin (kubectl auth can-i needs the resource
    in discovery, and runs are in no CRD)."""
    review = cluster.control_plane.request(
        "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
         "spec": {"user": user(TEAM, account), "groups": ["system:serviceaccounts"],
                  "resourceAttributes": {"group": "gristmill.io", "namespace": TEAM,
                                         "verb": verb, "resource": resource,
                                         "subresource": subresource}}})
    return review["status"].get("allowed", False)


@pytest.fixture(scope="module")
def rbac(cluster):
    cp = cluster.control_plane
    for namespace in (API_NAMESPACE, TEAM):
        cp.ensure_namespace(namespace)
    objects = chart_rbac()
    apply(cluster, {"apiVersion": "v1", "kind": "List", "items": objects})
    # alice may run the Script hello and read runs; nothing else.
    apply(cluster, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": "run-hello", "namespace": TEAM},
                    "rules": [{"apiGroups": ["gristmill.io"], "resources": ["scripts/runs"],
                               "verbs": ["create"], "resourceNames": ["hello"]},
                              {"apiGroups": ["gristmill.io"], "resources": ["runs"],
                               "verbs": ["get"]}]})
    bind(cluster, "alice-runs-hello", "Role", "run-hello", "alice")
    bind(cluster, "viewers", "ClusterRole", "gristmill-viewer", "victor")
    bind(cluster, "runners", "ClusterRole", "gristmill-runner", "sam")
    bind(cluster, "approvers", "ClusterRole", "gristmill-approver", "sam", "victor")
    tokens = {name: cp.service_account_token(TEAM, name)
              for name in ("alice", "victor", "sam", "mallory")}
    wait_for("the bindings in force", lambda: can(cluster, "victor", "update", "runs",
                                                  "approval"))
    api_token = cp.service_account_token(API_NAMESPACE, "gristmill-api")
    yield tokens, cp.kubeconfig(api_token, "gristmill-api")
    kubectl(cluster, "delete", "--wait=false", "--ignore-not-found", "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
                o for o in objects if "namespace" not in o["metadata"]]}))


async def _call(session, url, method, path, token, body=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_real_rbac_decides_who_runs_reads_cancels_and_approves(rbac, database_url):
    tokens, kubeconfig = rbac
    await apply_yaml_at(database_url, MANIFESTS)
    settings = ApiSettings(database_url, access=AccessSettings(kubeconfig=str(kubeconfig)))
    async with api_in_process(settings) as url, aiohttp.ClientSession() as session:
        def call(method, path, who=None, body=None):
            return _call(session, url, method, path, tokens.get(who, who), body)
        scripts = f"/api/v1/namespaces/{TEAM}/scripts"

        assert (await call("GET", scripts.replace(f"namespaces/{TEAM}/", ""), None))[0] == 401
        # A Role for one Script: alice runs hello, and not other.
        status, run = await call("POST", f"{scripts}/hello/runs", "alice", LATER)
        assert status == 201, run
        status, answer = await call("POST", f"{scripts}/other/runs", "alice", LATER)
        assert status == 403 and f"you ({user(TEAM, 'alice')}) may not create scripts/runs " \
            f"other in namespace {TEAM}" in answer["error"], answer
        # A viewer reads the run and may not cancel it; a stranger does not see it at all.
        run_path = f"/api/v1/runs/{run['id']}"
        assert (await call("GET", run_path, "victor"))[0] == 200
        status, answer = await call("POST", f"{run_path}/cancel", "victor", {})
        assert status == 403 and "update runs/cancel" in answer["error"], answer
        assert "gristmill-runner" in answer["error"]
        status, answer = await call("GET", run_path, "mallory")
        assert status == 404 and answer["error"] == f"run {run['id']} not found"
        # The submitter of a four-eyes gate may not approve it; another approver may.
        status, gated = await call("POST", f"/api/v1/namespaces/{TEAM}/flows/four-eyes/runs",
                                   "sam", {})
        assert status == 201, gated
        gate = f"/api/v1/runs/{gated['id']}"
        status, answer = await call("POST", f"{gate}/approve", "sam", {})
        assert status == 403 and "forbidSubmitter" in answer["error"], answer
        status, answer = await call("POST", f"{gate}/approve", "victor", {})
        assert status == 200, answer
        shown = (await call("GET", gate, "victor"))[1]
        assert shown["steps"][0]["approvedBy"] == user(TEAM, "victor")


async def test_audience_bound_tokens_are_taken_and_others_are_not(rbac, cluster,
                                                                   database_url):
    _, kubeconfig = rbac
    cp = cluster.control_plane
    minted = cp.request("POST", f"/api/v1/namespaces/{TEAM}/serviceaccounts/victor/token",
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"audiences": ["gristmill"], "expirationSeconds": 600}})
    for_us = minted["status"]["token"]
    general = cp.service_account_token(TEAM, "victor")  # the API server's own audience
    access = AccessSettings(kubeconfig=str(kubeconfig), audiences=("gristmill",))
    async with api_in_process(ApiSettings(database_url, access=access)) as url, \
            aiohttp.ClientSession() as session:
        flows = f"/api/v1/flows?namespace={TEAM}"
        assert (await _call(session, url, "GET", flows, for_us))[0] == 200
        status, answer = await _call(session, url, "GET", flows, general)
        assert status == 401 and "meant for another service" in answer["error"]
