"""The Helm chart, rendered and linted by the real Helm library (helm-python-sdk, Helm 4),
every object validated against the Kubernetes schemas, the pods against PSS restricted,
and the Argo CD health check run by a real Lua interpreter."""

from __future__ import annotations

import tomllib
from pathlib import Path

import helm_python as helm
import lupa
import pytest
import yaml
from crdkit import refusals
from kubernetes_validate import validate as k8s_validate
from kubernetes_validate.utils import latest_version
from pss import restricted_violations

from gristmill.spec.workergroup import DEFAULT_WORKER_IMAGE

ROOT = Path(__file__).parent.parent
CHART = ROOT / "charts" / "gristmill"
NAMESPACE = "gristmill-system"


def render(values: dict | None = None) -> list[dict]:
    rendered = helm.Chart.load(CHART).render(values, name="gm", namespace=NAMESPACE,
                                             is_install=True)
    return [document for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for document in yaml.safe_load_all(text) if document]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_lint_is_clean():
    report = helm.lint(CHART, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


E2E_VALUES = yaml.safe_load((ROOT / "e2e" / "release-values.yaml").read_text())


@pytest.mark.parametrize("values", [None, E2E_VALUES], ids=["defaults", "e2e"])
@pytest.mark.parametrize("version", ["1.30.0", latest_version()])
def test_every_object_is_valid(version, values):
    for obj in render(values):
        if obj["apiVersion"].startswith("gristmill.io/"):
            assert refusals(obj["kind"], obj) == []
        else:
            k8s_validate(obj, version, strict=True)


def test_pods_meet_pss_restricted_and_the_operator_runs_alone():
    objects = render()
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
    assert set(workloads) == {"gristmill-operator", "gristmill-api", "gm-postgres"}
    for name, workload in workloads.items():
        assert restricted_violations(workload["spec"]["template"]["spec"]) == [], name
    operator = workloads["gristmill-operator"]["spec"]
    # kopf has no leader election: never two operators, not even during an upgrade.
    assert operator["replicas"] == 1 and operator["strategy"] == {"type": "Recreate"}
    container = operator["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"][
        "periodSeconds"] >= 300  # migrations on a slow database are not a crash loop
    assert container["image"] == "ghcr.io/gristmill/worker:0.1.0"
    # A chart upgrade that changes nothing else restarts no pod.
    for name, workload in workloads.items():
        assert "helm.sh/chart" in workload["metadata"]["labels"], name
        assert "helm.sh/chart" not in workload["spec"]["template"]["metadata"]["labels"], name


def setup_job(objects: list[dict]) -> dict:
    return by_kind(objects, "Job")["gristmill-setup"]


def test_the_bundled_database_password_is_made_once_by_the_setup_hook():
    # Rendered without a cluster (helm template, Argo CD), twice: the same objects, and
    # no password in them; the hook Job makes the Secret on the cluster once.
    first, again = render(), render()
    assert first == again
    assert "gristmill-database" not in by_kind(first, "Secret")
    job = setup_job(first)
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["setup", "--crds", "--database-secret=gristmill-database",
                    "--database-host=gm-postgres", "--worker-token-secret=gm-worker-token-key",
                    f"--namespace={NAMESPACE}"]
    (env,) = [e for e in by_kind(first, "StatefulSet")["gm-postgres"]["spec"]["template"][
        "spec"]["containers"][0]["env"] if e["name"] == "POSTGRES_PASSWORD"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "gristmill-database", "key": "password"}
    # The hook may create Secrets and read only its own two.
    role = by_kind(first, "Role")["gristmill-setup"]
    assert {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
            "resourceNames": ["gristmill-database", "gm-worker-token-key"]} in role["rules"]

    # A given password is used as is (escaped in the URL) and outlives `helm uninstall`,
    # as the data volume does.
    given = render({"database": {"bundled": {"password": "s3cr@t"}}})
    secret = by_kind(given, "Secret")["gristmill-database"]
    assert secret["stringData"] == {
        "password": "s3cr@t", "url": "postgresql://gristmill:s3cr%40t@gm-postgres:5432/gristmill"}
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert setup_job(given)["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "setup", "--crds", "--worker-token-secret=gm-worker-token-key",
        f"--namespace={NAMESPACE}"]


def test_the_setup_hook_is_what_the_cli_runs_and_can_be_left_out():
    from gristmill.cli import build_parser

    job = setup_job(render())
    parsed = build_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert parsed.command == "setup" and parsed.crds and parsed.database_host == "gm-postgres"
    assert restricted_violations(job["spec"]["template"]["spec"]) == []
    assert parsed.worker_token_secret == "gm-worker-token-key"
    # CRDs left to the user, an external database and no API (so no dispatcher and no
    # worker-token key): nothing to do, no hook at all.
    bare = render({"setup": {"crds": False}, "database": {"url": "postgresql://x/y"},
                   "api": {"enabled": False}})
    assert [o for o in bare if o["metadata"]["name"] == "gristmill-setup"] == []
    # With the API, the hook still makes the key.
    key_only = setup_job(render({"setup": {"crds": False},
                                 "database": {"url": "postgresql://x/y"}}))
    assert key_only["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "setup", "--worker-token-secret=gm-worker-token-key", f"--namespace={NAMESPACE}"]


def _env(deployment: dict) -> dict[str, dict]:
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_workers_use_the_api_as_dispatcher_with_the_key_the_setup_hook_makes():
    from gristmill.operator.worker_tokens import dispatcher_from_env

    objects = render()
    # Made on the cluster by the hook, never rendered (a render would make a new key).
    assert "gm-worker-token-key" not in by_kind(objects, "Secret")
    deployments = by_kind(objects, "Deployment")
    key = {"secretKeyRef": {"name": "gm-worker-token-key", "key": "keys"}}
    api, operator = _env(deployments["gristmill-api"]), _env(deployments["gristmill-operator"])
    assert api["GRISTMILL_WORKER_TOKEN_KEYS"]["valueFrom"] == key
    assert operator["GRISTMILL_WORKER_TOKEN_KEYS"]["valueFrom"] == key
    # The operator's URL is the API's Service, at its port.
    url = operator["GRISTMILL_DISPATCHER_URL"]["value"]
    assert url == f"http://gristmill-api.{NAMESPACE}.svc:8080"
    service = by_kind(objects, "Service")["gristmill-api"]
    assert service["spec"]["ports"][0]["port"] == 8080
    assert service["metadata"]["namespace"] == NAMESPACE
    assert f"--allowed-host=gristmill-api.{NAMESPACE}.svc" in deployments["gristmill-api"][
        "spec"]["template"]["spec"]["containers"][0]["args"]
    elsewhere = by_kind(render({"api": {"port": 9000}}), "Deployment")["gristmill-operator"]
    assert _env(elsewhere)["GRISTMILL_DISPATCHER_URL"]["value"] == (
        f"http://gristmill-api.{NAMESPACE}.svc:9000")
    # What the operator makes of them: a dispatcher (the key itself comes from the hook).
    from gristmill.dispatch.tokens import new_key
    assert dispatcher_from_env({"GRISTMILL_DISPATCHER_URL": url,
                                "GRISTMILL_WORKER_TOKEN_KEYS": new_key()}).url == url
    # Two stateless API replicas by default, drained one at a time.
    assert deployments["gristmill-api"]["spec"]["replicas"] == 2
    assert by_kind(objects, "PodDisruptionBudget")["gristmill-api"]["spec"][
        "maxUnavailable"] == 1

    # No API: no dispatcher; the operator's workers connect to the database as before.
    operator = _env(by_kind(render({"api": {"enabled": False}}), "Deployment")[
        "gristmill-operator"])
    assert "GRISTMILL_DISPATCHER_URL" not in operator
    assert "GRISTMILL_WORKER_TOKEN_KEYS" not in operator


def test_an_external_database_replaces_the_bundled_one():
    objects = render({"database": {"url": "postgresql://gm:pw@db.example:5432/gm"}})
    assert by_kind(objects, "StatefulSet") == {}
    secret = by_kind(objects, "Secret")["gristmill-database"]
    assert secret["stringData"] == {"url": "postgresql://gm:pw@db.example:5432/gm"}

    objects = render({"database": {"existingSecret": "my-db"}})
    assert by_kind(objects, "Secret") == {} and by_kind(objects, "StatefulSet") == {}
    env = {e["name"]: e for e in by_kind(objects, "Deployment")["gristmill-operator"]["spec"][
        "template"]["spec"]["containers"][0]["env"]}
    assert env["GRISTMILL_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "my-db"
    # ...and the operator gives the same Secret to every worker Deployment it makes.
    assert env["GRISTMILL_DATABASE_SECRET"]["value"] == "my-db"


@pytest.mark.parametrize("values, message", [
    ({"api": {"replicas": -1}}, "at '/api/replicas': minimum: got -1, want 0"),
    ({"operatr": {}}, "additional properties 'operatr' not allowed"),
    ({"database": {"bundled": {"enabled": False}}},
     "database: set database.url (an external PostgreSQL), database.existingSecret"),
    ({"workerGroups": [{"name": "GPU", "spec": {"tags": ["gpu"]}}]}, "workerGroups/0/name"),
    ({"retention": "a month"}, "at '/retention'"),
])
def test_bad_values_are_refused_with_what_to_fix(values, message):
    with pytest.raises(helm.HelmError) as refused:
        render(values)
    assert message in str(refused.value)


def test_retention_reaches_the_api_and_the_operator_as_the_cli_reads_it():
    from gristmill.cli import build_parser

    deployments = by_kind(render({"retention": "90d"}), "Deployment")
    for name, command in (("gristmill-api", "api"), ("gristmill-operator", "operator")):
        args = deployments[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--retention=90d" in args
        parsed = build_parser().parse_args([*args, "--database-url", "postgresql://x/y"])
        assert parsed.command == command and parsed.retention.days == 90


def test_rbac_is_files_rbac_in_the_release_namespace():
    source = [d for d in yaml.safe_load_all((CHART / "files" / "rbac.yaml").read_text()) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in source}
    rendered = [o for o in render() if (o["kind"], o["metadata"]["name"]) in names]
    assert len(rendered) == len(source)
    for mine, theirs in zip(rendered, source, strict=True):
        if "namespace" in theirs.get("metadata", {}):
            theirs["metadata"]["namespace"] = NAMESPACE
        for subject in theirs.get("subjects", []):
            subject["namespace"] = NAMESPACE
        # The operator's admission policies hold it back by its user name.
        for match in theirs.get("spec", {}).get("matchConditions", []):
            if theirs["metadata"]["name"].startswith("gristmill-operator-"):
                assert "'system:serviceaccount:gristmill:gristmill-operator'" in match[
                    "expression"]
            match["expression"] = match["expression"].replace(
                ":gristmill:gristmill-operator'", f":{NAMESPACE}:gristmill-operator'")
        assert mine == theirs
    policies = by_kind(rendered, "ValidatingAdmissionPolicy")
    bindings = by_kind(rendered, "ValidatingAdmissionPolicyBinding")
    assert len(policies) == 6 and {b["spec"]["policyName"] for b in bindings.values()} == set(
        policies)
    assert all(b["spec"]["validationActions"] == ["Deny"] for b in bindings.values())


def test_crds_versions_and_default_worker_group():
    chart = helm.Chart.load(CHART)
    assert sorted(c["name"] for c in chart.crds) == sorted(
        f"crds/{p.name}" for p in (ROOT / "crds").glob("*.yaml"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart.metadata["appVersion"] == chart.version == project["version"]
    assert DEFAULT_WORKER_IMAGE.endswith(f":{project['version']}")
    (group,) = by_kind(render(), "WorkerGroup").values()
    assert group["metadata"]["namespace"] == NAMESPACE
    assert group["spec"]["image"] == "ghcr.io/gristmill/worker:0.1.0"
    mine = render({"image": {"tag": "dev"}, "workerGroups": [
        {"name": "gpu", "spec": {"tags": ["gpu"], "image": "registry.local/gpu:1"}}]})
    assert by_kind(mine, "WorkerGroup")["gpu"]["spec"]["image"] == "registry.local/gpu:1"
    assert by_kind(mine, "Deployment")["gristmill-api"]["spec"]["template"]["spec"][
        "containers"][0]["image"] == "ghcr.io/gristmill/worker:dev"


def _argocd_health(obj: dict) -> dict:
    """Run files/argocd-health.lua as Argo CD does: `obj` is a global, the script returns."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value
    runtime.globals().obj = to_lua(obj)
    result = runtime.execute((CHART / "files" / "argocd-health.lua").read_text())
    return dict(result.items())


@pytest.mark.parametrize("status, generation, health", [
    (None, 1, "Progressing"),
    ({"conditions": [{"type": "Ready", "status": "True", "reason": "Stored",
                      "message": "version 1 stored", "observedGeneration": 1}]}, 1, "Healthy"),
    ({"conditions": [{"type": "Ready", "status": "True", "reason": "Stored",
                      "observedGeneration": 1}]}, 2, "Progressing"),
    ({"conditions": [{"type": "Ready", "status": "False", "reason": "Invalid",
                      "message": "spec.code: Python syntax error at line 1",
                      "observedGeneration": 3}]}, 3, "Degraded"),
    ({"conditions": [{"type": "Ready", "status": "False", "reason": "MissingReference",
                      "observedGeneration": 1}]}, 1, "Progressing"),
])
def test_argocd_health_follows_the_ready_condition(status, generation, health):
    obj = {"metadata": {"name": "x", "generation": generation}}
    if status:
        obj["status"] = status
    assert _argocd_health(obj)["status"] == health



def test_the_api_is_ready_with_its_database_and_alive_without_it():
    api = by_kind(render(), "Deployment")["gristmill-api"]["spec"]["template"]["spec"]
    container = api["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_several_api_replicas_get_a_disruption_budget():
    assert "gristmill-api" in by_kind(render(), "PodDisruptionBudget")  # 2 by default
    assert "gristmill-api" not in by_kind(render({"api": {"replicas": 1}}),
                                          "PodDisruptionBudget")
    budget = by_kind(render({"api": {"replicas": 3}}), "PodDisruptionBudget")["gristmill-api"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_the_chart_works_as_a_subchart(tmp_path):
    """Helm gives every subchart the parent's `global` values: the schema must take them."""
    import shutil

    parent = tmp_path / "platform"
    (parent / "charts").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "gristmill", symlinks=False)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: platform\nversion: 1.0.0\n"
        "dependencies:\n  - {name: gristmill, version: 0.1.0}\n")
    (parent / "values.yaml").write_text("global: {imageRegistry: registry.example.com}\n"
                                        "gristmill: {retention: 14d}\n")
    rendered = helm.Chart.load(parent).render(None, name="gm", namespace=NAMESPACE,
                                              is_install=True)
    objects = [doc for path, text in rendered.items() if path.endswith(".yaml")
               for doc in yaml.safe_load_all(text) if doc]
    api = by_kind(objects, "Deployment")["gristmill-api"]
    assert "--retention=14d" in api["spec"]["template"]["spec"]["containers"][0]["args"]


def _rules(role: dict) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    assert all(rule["apiGroups"] == ["gristmill.io"] for rule in role["rules"])
    return [(tuple(rule["verbs"]), tuple(rule["resources"])) for rule in role["rules"]]


def test_the_user_roles_are_the_ones_the_api_names_and_join_the_built_in_ones():
    from gristmill.auth.permissions import ROLES

    roles = by_kind(render(), "ClusterRole")
    assert {name: _rules(roles[name]) for name in ROLES} == {
        name: [(rule.verbs, rule.resources) for rule in rules] for name, rules in ROLES.items()}
    aggregated = {name: [key.rsplit("-", 1)[1] for key in roles[name]["metadata"]["labels"]
                         if key.startswith("rbac.authorization.k8s.io/aggregate-to-")]
                  for name in ROLES}
    assert aggregated == {"gristmill-viewer": ["view"], "gristmill-runner": ["edit"],
                          "gristmill-approver": [], "gristmill-admin": ["admin"]}
    alone = by_kind(render({"roles": {"aggregate": False}}), "ClusterRole")
    assert not any("aggregate" in key for name in ROLES for key in alone[name]["metadata"]["labels"])
    assert not set(ROLES) & set(by_kind(render({"roles": {"create": False}}), "ClusterRole"))


def test_every_permission_the_api_asks_for_is_in_a_role_short_of_admin():
    from gristmill.api.access import InNamespace, Listing, OnRun
    from gristmill.api.app import ROUTES
    from gristmill.auth.permissions import Permission, roles_granting

    for method, path, _, access in ROUTES:
        if isinstance(access, InNamespace):
            wanted = [Permission(access.verb, access.resource, access.subresource, "ns")]
        elif isinstance(access, OnRun):
            wanted = [Permission("get", "runs", namespace="ns"),
                      Permission(access.verb, "runs", access.subresource, "ns")]
        elif isinstance(access, Listing):
            wanted = [Permission("list", access.resource, namespace="ns")]
        else:
            continue
        for permission in wanted:
            assert set(roles_granting(permission)) - {"gristmill-admin"}, (method, path)


def test_the_api_may_review_tokens_and_access_and_nothing_more():
    objects = render({"api": {"authentication": {"audiences": ["gristmill"]},
                              "metrics": {"requireAuth": True},
                              "allowedOrigins": ["https://ui.example.com"],
                              "allowedHosts": ["gristmill.example.com"]}})
    role = by_kind(objects, "ClusterRole")["gristmill-api"]
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
         "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
         "verbs": ["create"]}]
    binding = by_kind(objects, "ClusterRoleBinding")["gristmill-api"]
    assert binding["roleRef"]["name"] == "gristmill-api"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gristmill-api",
                                    "namespace": NAMESPACE}]
    pod = by_kind(objects, "Deployment")["gristmill-api"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "gristmill-api" and pod["automountServiceAccountToken"]
    bound = [b for b in by_kind(objects, "ClusterRoleBinding").values()
             if any(s["name"] == "gristmill-api" for s in b["subjects"])]
    assert [b["metadata"]["name"] for b in bound] == ["gristmill-api"]  # no other rights

    from gristmill.cli import _access_settings, build_parser

    args = build_parser().parse_args([*pod["containers"][0]["args"],
                                      "--database-url", "postgresql://x/y"])
    access = _access_settings(args)
    assert access.authentication == "kubernetes" and access.audiences == ("gristmill",)
    assert access.metrics_need_auth and args.allowed_origin == ["https://ui.example.com"]
    assert set(args.allowed_host) == {
        "gristmill-api", f"gristmill-api.{NAMESPACE}", f"gristmill-api.{NAMESPACE}.svc",
        f"gristmill-api.{NAMESPACE}.svc.cluster.local", "gristmill.example.com"}
