"""The chart installed for real: Helm 4 (the helm-python-sdk library) installs, upgrades and
uninstalls it on the test control plane; its operator, API and workers run as pods on the
test node; examples applied with kubectl run through the installed API with the pod
executor, driven by the `gristmill` CLI as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import helm_python as helm
import pytest
import yaml
from clusterkit import ROOT, condition, get, kubectl, wait_for
from k8s_cluster import environment

pytestmark = pytest.mark.timeout(360)  # pods start as processes: slower than a unit test
NAMESPACE = "gristmill-system"
RELEASE = "gm"


def gristmill(cluster, *args: str, server: str, timeout: float = 120
              ) -> subprocess.CompletedProcess:
    """The CLI as the cluster's admin: it sends the kubeconfig's token, as for any user."""
    return subprocess.run([sys.executable, "-m", "gristmill.cli", *args, "--server", server],
                          capture_output=True, text=True, timeout=timeout,
                          env=environment(cluster.control_plane))


def release_values(database_url: str) -> dict:
    return {
        "image": {"repository": "ghcr.io/gristmill/worker", "tag": "test"},
        "database": {"url": database_url},
        "workerGroups": [{"name": "default", "spec": {
            "tags": ["python", "bash"], "executor": "pod", "replicas": 1}}],
    }


@pytest.fixture(scope="module")
def release(cluster):
    database_url = cluster.database_url("chart_release")
    with helm.Config(kubeconfig_path=str(cluster.control_plane.admin_kubeconfig),
                     namespace=NAMESPACE) as config:
        installed = config.install(str(ROOT / "charts/gristmill"), RELEASE,
                                   release_values(database_url), namespace=NAMESPACE,
                                   create_namespace=True, wait="watcher", timeout=240)
        yield config, installed, database_url
        config.uninstall(RELEASE, wait="watcher", timeout=120)


def api_server(cluster) -> str:
    """One of the API's pods (two by default: any serves)."""
    pods = get(cluster, "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=gristmill-api")
    serving = [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")
               and p.get("status", {}).get("podIP")]
    assert serving, pods
    return f"http://{serving[0]['status']['podIP']}:8080"


def pod_logs(cluster) -> str:
    """The last lines of the workers' and the API's logs (what a failure needs)."""
    found = []
    for deployment in ("gristmill-workers-default", "gristmill-api"):
        done = kubectl(cluster, "logs", f"deployment/{deployment}", "-n", NAMESPACE,
                       "--tail", "40", check=False)
        found.append(f"--- {deployment}\n{done.stdout}{done.stderr}")
    return "\n".join(found)


def test_the_chart_installs_and_serves_scripts_and_flows(release, cluster):
    _, installed, _ = release
    assert installed["status"] == "deployed"
    for name, replicas in (("gristmill-operator", 1), ("gristmill-api", 2),
                           ("gristmill-workers-default", 1)):
        wait_for(f"{name} available", lambda name=name, replicas=replicas: (get(
            cluster, "deployment", name, "-n", NAMESPACE) or {}).get("status", {}).get(
            "readyReplicas") == replicas, timeout=120)
    group = wait_for("the default WorkerGroup Ready", lambda: (lambda g: g if condition(
        g).get("status") == "True" else None)(get(cluster, "workergroup", "default", "-n",
                                                 NAMESPACE)), timeout=90)
    assert group["spec"]["image"] == "ghcr.io/gristmill/worker:test"
    # NetworkPolicies: the chart's, and those the operator made for the group under its
    # admission policies. Taken by the API server, not enforced (no such network plugin).
    policies = {p["metadata"]["name"] for p in get(
        cluster, "networkpolicies", "-n", NAMESPACE)["items"]}
    assert {"gristmill-api", "gristmill-operator", "gristmill-workers-default",
            "gristmill-jobs-default-no-network"} <= policies

    kubectl(cluster, "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples"))
    for kind, name in (("script", "hello"), ("flow", "process-orders")):
        wait_for(f"{kind} {name} Ready", lambda kind=kind, name=name: condition(get(
            cluster, kind, name, "-n", NAMESPACE)).get("status") == "True", timeout=90)
    server = api_server(cluster)
    try:
        hello = gristmill(cluster, "run", "script", "hello", "-n", NAMESPACE, "--input",
                          '{"name": "cluster"}', "--wait", server=server)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no worker ran the job; the pods say:\n{pod_logs(cluster)}")
    assert hello.returncode == 0, hello.stderr + pod_logs(cluster)
    assert json.loads(hello.stdout) == {"greeting": "Hello, cluster."}
    try:
        flow = gristmill(cluster, "run", "flow", "process-orders", "-n", NAMESPACE, "--input",
                         '{"batch": "b-1"}', "--wait", "-o", "json", server=server, timeout=240)
    except subprocess.TimeoutExpired:
        runs = gristmill(cluster, "runs", "-n", NAMESPACE, "-o", "json", server=server)
        pytest.fail(f"the flow did not finish: {runs.stdout[-3000:]}\n{pod_logs(cluster)}")
    assert flow.returncode == 0, flow.stderr + flow.stdout
    run = json.loads(flow.stdout)
    assert run["status"] == "succeeded" and run["steps"]
    # Every job ran as a pod of its own, through the API server and the node.
    finished_pods = get(cluster, "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=gristmill-job")
    assert finished_pods is not None


def test_the_chart_upgrades_in_place(release, cluster):
    config, _, database_url = release
    values = release_values(database_url)
    values["retention"] = "7d"
    # Helm never upgrades crds/: the chart's setup hook must. Make the Flow CRD an old one.
    flows = get(cluster, "crd", "flows.gristmill.io")
    columns = flows["spec"]["versions"][0].pop("additionalPrinterColumns")
    kubectl(cluster, "replace", "-f", "-", input=json.dumps(flows))
    upgraded = config.upgrade(str(ROOT / "charts/gristmill"), RELEASE, values,
                              namespace=NAMESPACE, wait="watcher", timeout=240)
    assert upgraded["status"] == "deployed" and upgraded["revision"] == 2
    served = get(cluster, "crd", "flows.gristmill.io")["spec"]["versions"][0]
    assert served["additionalPrinterColumns"] == columns
    # The hook's objects went once it succeeded.
    assert get(cluster, "job", "gristmill-setup", "-n", NAMESPACE) is None
    assert get(cluster, "clusterrolebinding", "gristmill-setup") is None
    api = get(cluster, "deployment", "gristmill-api", "-n", NAMESPACE)
    assert "--retention=7d" in api["spec"]["template"]["spec"]["containers"][0]["args"]
    wait_for("the upgraded API serving", lambda: gristmill(
        cluster, "run", "script", "hello", "-n", NAMESPACE, "--wait",
        server=api_server(cluster)).returncode == 0, timeout=120)


def test_the_api_server_takes_every_network_policy_the_chart_renders(cluster):
    """The bundled database's too (the release above has an external one), with every kind
    of peer the values take: a server-side dry run validates them as a create would."""
    namespace = "network-policies"
    cluster.control_plane.ensure_namespace(namespace)
    values = {"operator": {"namespaces": [namespace, "team-a"]},
              "networkPolicies": {"apiFrom": [
                  {"namespaceSelector": {"matchLabels": {
                      "kubernetes.io/metadata.name": "ingress-nginx"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}},
                  {"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.1.0/24"]}}]}}
    rendered = helm.Chart.load(ROOT / "charts/gristmill").render(
        values, name="dry", namespace=namespace, is_install=True)
    text = rendered["gristmill/templates/networkpolicies.yaml"]
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(text) if d}
    assert names == {"dry-postgres", "gristmill-api", "gristmill-operator"}
    created = kubectl(cluster, "create", "--dry-run=server", "-f", "-", "-o", "name",
                      input=text)
    assert sorted(created.stdout.split()) == sorted(
        f"networkpolicy.networking.k8s.io/{name}" for name in names)
