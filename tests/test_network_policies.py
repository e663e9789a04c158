"""The NetworkPolicies of the chart and of the operator, by what they would let through.

Nothing here enforces a NetworkPolicy (the tests' pod network is a bare bridge; see
netpol.py): these tests check that the selectors select exactly the pods the chart, the
operator and the pod executor make, and test_cluster_chart.py that the API server takes
the rendered policies."""

from __future__ import annotations

import re

import pytest
from kubernetes_validate import validate as k8s_validate
from kubernetes_validate.utils import latest_version
from netpol import Pod, allowed, connects
from test_chart import NAMESPACE, by_kind, render

from gristmill.operator.deployment import (
    deployment_name,
    worker_deployment,
    worker_network_policy,
)
from gristmill.operator.job_runner import no_network_policy
from gristmill.sandbox.base import JobRequest, Limits
from gristmill.sandbox.pod_objects import job_pod
from gristmill.spec import WorkerGroup

TEAM = "team-a"
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def group(name: str, namespace: str, executor: str = "pod") -> WorkerGroup:
    return WorkerGroup.model_validate({
        "apiVersion": "gristmill.io/v1alpha1", "kind": "WorkerGroup",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"tags": ["python"], "executor": executor}})


def worker(workers: WorkerGroup) -> Pod:
    template = worker_deployment(workers, "gristmill-database")["spec"]["template"]
    return Pod(workers.metadata.namespace, template["metadata"]["labels"])


def job(workers: WorkerGroup, network: bool) -> Pod:
    request = JobRequest(job_id="0b7c6f0e-5d1c-4a51-a0f8-2d8f0b9e6c11", language="python",
                         code="def main():\n    return 1\n", input={}, network=network,
                         limits=Limits(timeout_s=30, memory_bytes=2**28, cpu_cores=0.5))
    pod = job_pod(request, "worker:1", 300, "worker-abc", "u-1",
                  group=workers.metadata.name, owner={"name": "worker-abc", "uid": "u-1"})
    return Pod(workers.metadata.namespace, pod["metadata"]["labels"])


def operator_policies(*groups: WorkerGroup) -> list[dict]:
    """What the operator applies per group (handlers.worker_group_changed)."""
    return [policy for g in groups for policy in (
        [worker_network_policy(g)] + ([no_network_policy(g)] if g.spec.executor == "pod"
                                      else []))]


def release(values: dict | None = None) -> tuple[list[dict], dict[str, Pod]]:
    """The chart's NetworkPolicies, and its pods by name."""
    objects = render(values)
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
    pods = {name: Pod(NAMESPACE, w["spec"]["template"]["metadata"]["labels"])
            for name, w in workloads.items()}
    return list(by_kind(objects, "NetworkPolicy").values()), pods


HOME = group("default", NAMESPACE, "process")
PODS = group("runners", TEAM)
ELSEWHERE = group("batch", "team-b")
STRANGER = Pod(NAMESPACE, {"app": "payments"})


def test_the_chart_renders_its_policies_unless_told_not_to():
    policies, _ = release()
    assert {p["metadata"]["name"] for p in policies} == {
        "gm-postgres", "gristmill-api", "gristmill-operator"}
    assert release({"networkPolicies": {"enabled": False}})[0] == []
    external, _ = release({"database": {"url": "postgresql://gm:pw@db.example/gm"}})
    assert {p["metadata"]["name"] for p in external} == {"gristmill-api", "gristmill-operator"}
    no_api, _ = release({"api": {"enabled": False}})
    assert "gristmill-api" not in {p["metadata"]["name"] for p in no_api}


@pytest.mark.parametrize("version", ["1.30.0", latest_version()])
def test_the_operators_policies_are_valid(version):
    for policy in operator_policies(HOME, PODS):
        k8s_validate(policy, version, strict=True)


def test_only_gristmills_own_pods_reach_the_bundled_postgres():
    chart, pods = release()
    policies = chart + operator_policies(HOME, PODS, ELSEWHERE)
    postgres = pods["gm-postgres"]
    for name in ("gristmill-api", "gristmill-operator"):
        assert connects(policies, pods[name], postgres, 5432), name
        assert not connects(policies, pods[name], postgres, 22), name
    # With the API, workers get their jobs from it (the dispatcher): no database for them.
    for workers in (HOME, PODS, ELSEWHERE, group("runners", TEAM, "process")):
        assert not connects(policies, worker(workers), postgres, 5432), workers.metadata
    for workers in (HOME, PODS):
        for network in (True, False):
            assert not connects(policies, job(workers, network), postgres, 5432), network
    another_release = Pod(NAMESPACE, {**pods["gristmill-api"].labels,
                                      "app.kubernetes.io/instance": "other"})
    for other in (STRANGER, another_release, Pod(TEAM, {"app": "payments"})):
        assert not connects(policies, other, postgres, 5432), other
    # PostgreSQL itself calls nobody.
    assert not allowed(policies, "Egress", postgres, pods["gristmill-api"], 8080)

    # Without the API, workers connect to the database themselves.
    chart, pods = release({"api": {"enabled": False}})
    policies = chart + operator_policies(HOME, PODS, ELSEWHERE)
    for workers in (HOME, PODS, ELSEWHERE, group("runners", TEAM, "process")):
        assert connects(policies, worker(workers), pods["gm-postgres"], 5432), workers.metadata
    for workers in (HOME, PODS):
        assert not connects(policies, job(workers, True), pods["gm-postgres"], 5432)

    # ...only in the namespaces the operator serves.
    chart, pods = release({"api": {"enabled": False},
                           "operator": {"namespaces": [NAMESPACE, TEAM]}})
    policies = chart + operator_policies(HOME, PODS, ELSEWHERE)
    assert connects(policies, worker(PODS), pods["gm-postgres"], 5432)
    assert connects(policies, worker(HOME), pods["gm-postgres"], 5432)
    assert not connects(policies, worker(ELSEWHERE), pods["gm-postgres"], 5432)


def test_the_api_is_reached_from_its_namespace_and_where_the_values_say():
    chart, pods = release()
    policies = chart + operator_policies(HOME)
    api = pods["gristmill-api"]
    assert connects(policies, STRANGER, api, 8080)
    assert connects(policies, worker(HOME), api, 8080)
    assert not connects(policies, STRANGER, api, 9999)
    assert not connects(policies, job(group("default", NAMESPACE), network=True), api, 8080)
    ingress = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    assert not connects(policies, ingress, api, 8080)
    # Workers in any namespace reach the API: it is their dispatcher. Their jobs do not.
    policies = chart + operator_policies(HOME, PODS, ELSEWHERE)
    for workers in (PODS, ELSEWHERE, group("runners", TEAM, "process")):
        assert connects(policies, worker(workers), api, 8080), workers.metadata
        assert not connects(policies, worker(workers), api, 9999), workers.metadata
        for network in (True, False):
            assert not connects(policies, job(workers, network), api, 8080), network
    assert not connects(policies, Pod(TEAM, {"app": "payments"}), api, 8080)
    # ...only in the namespaces the operator serves, when it is told which.
    chart, pods = release({"operator": {"namespaces": [NAMESPACE, TEAM]}})
    policies = chart + operator_policies(HOME, PODS, ELSEWHERE)
    assert connects(policies, worker(PODS), pods["gristmill-api"], 8080)
    assert not connects(policies, worker(ELSEWHERE), pods["gristmill-api"], 8080)

    chart, pods = release({"api": {"port": 9000}, "networkPolicies": {"apiFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}},
        {"ipBlock": {"cidr": "10.20.0.0/16"}}]}})
    api = pods["gristmill-api"]
    assert connects(chart, ingress, api, 9000) and not connects(chart, ingress, api, 8080)
    assert not connects(chart, Pod("ingress-nginx", {"app": "other"}), api, 9000)
    assert connects(chart, worker(PODS), api, 9000)
    (policy,) = [p for p in chart if p["metadata"]["name"] == "gristmill-api"]
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in policy["spec"]["ingress"][0]["from"]


def test_the_operator_takes_connections_only_on_its_ports():
    chart, pods = release()
    operator = pods["gristmill-operator"]
    for port in (8081, 9090):
        assert connects(chart, Pod("monitoring", {"app": "prometheus"}), operator, port)
    assert not connects(chart, STRANGER, operator, 5432)


def test_workers_take_only_their_health_port_and_jobs_without_network_nothing():
    chart, pods = release()
    policies = chart + operator_policies(HOME, PODS, ELSEWHERE)
    dns = Pod("kube-system", {"k8s-app": "kube-dns"})
    for workers in (HOME, PODS):
        assert connects(policies, STRANGER, worker(workers), 8081)
        assert not connects(policies, STRANGER, worker(workers), 8000)
        # Egress stays open: the database, DNS, the API server (pod executor).
        assert allowed(policies, "Egress", worker(workers), dns, 53)
    closed, open_ = job(PODS, network=False), job(PODS, network=True)
    for target, port in ((dns, 53), (STRANGER, 443), (pods["gristmill-api"], 8080)):
        assert not allowed(policies, "Egress", closed, target, port)
    assert not allowed(policies, "Ingress", closed, worker(PODS), 8080)
    assert allowed(policies, "Egress", open_, dns, 53)
    assert allowed(policies, "Egress", open_, STRANGER, 443)
    # The no-network policy holds that group's closed job pods and no other pod.
    (no_network,) = [p for p in operator_policies(PODS) if "no-network" in p["metadata"]["name"]]
    for pod in (worker(PODS), open_, job(group("other", TEAM), network=False)):
        assert allowed([no_network], "Egress", pod, dns, 53), pod


@pytest.mark.parametrize("length", [1, 37, 38, 44, 45])
def test_policy_names_are_valid_and_distinct_for_every_group_name_length(length):
    names = {}
    for stem in ("a", "b"):
        name = (stem * length)[:length]
        workers = group(name, TEAM)
        for policy in operator_policies(workers):
            found = policy["metadata"]["name"]
            assert len(found) <= 63 and NAME.match(found), found
            assert found not in names, (found, names[found])
            names[found] = name
        assert worker_network_policy(workers)["metadata"]["name"] == deployment_name(name)
