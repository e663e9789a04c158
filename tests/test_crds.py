"""The CRDs: generated from the models, valid for Kubernetes, and they accept what the
models accept (examples) and refuse what they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from crdkit import cel_errors, refusals, schema_of
from kubernetes_validate import validate as k8s_validate
from kubernetes_validate.utils import latest_version

from gristmill.spec.crds import render_all

ROOT = Path(__file__).parent.parent
CRD_DIR = ROOT / "crds"
OLDEST = "1.30.0"  # optionalOldSelf (the name rules) is on by default from 1.30


def test_crds_dir_matches_the_models():
    rendered = render_all()
    on_disk = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert on_disk == rendered, "crds/ is stale: run `gristmill crds --output-dir crds`"


@pytest.mark.parametrize("version", [OLDEST, latest_version()])
@pytest.mark.parametrize("name", sorted(render_all()))
def test_crds_are_valid_kubernetes_objects(name, version):
    document = yaml.safe_load(render_all()[name])
    k8s_validate(document, version, strict=True)


def _examples():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        yield from yaml.safe_load_all(path.read_text())


@pytest.mark.parametrize("document", list(_examples()), ids=lambda d: d["metadata"]["name"])
def test_examples_validate_against_their_crd(document):
    assert refusals(document["kind"], document) == []


WORKER_GROUP = {"apiVersion": "gristmill.io/v1alpha1", "kind": "WorkerGroup",
                "metadata": {"name": "gpu"}, "spec": {"tags": ["gpu"], "replicas": 2}}
SCRIPT = {"apiVersion": "gristmill.io/v1alpha1", "kind": "Script", "metadata": {"name": "s"},
          "spec": {"language": "python", "code": "def main(): pass"}}


@pytest.mark.parametrize("document, message", [
    ({**SCRIPT, "spec": {**SCRIPT["spec"], "tmeout": "5s"}}, "Additional properties"),
    ({**SCRIPT, "spec": {**SCRIPT["spec"], "language": "ruby"}}, "is not one of"),
    ({**SCRIPT, "spec": {"language": "python"}}, "'code' is a required property"),
    ({**SCRIPT, "spec": {**SCRIPT["spec"], "retries": -1}}, "less than the minimum"),
    ({**WORKER_GROUP, "spec": {"tags": []}}, "should be non-empty"),
    ({**WORKER_GROUP, "spec": {"tags": ["a"], "executor": "vm"}}, "is not one of"),
    ({**WORKER_GROUP, "spec": {"tags": ["a"], "imagePullSecrets": [{}]}},
     "'name' is a required property"),
])
def test_invalid_resources_are_refused_by_the_schema(document, message):
    (problem,) = refusals(document["kind"], document)
    assert message in problem[1]


def test_cel_rules_refuse_what_the_models_refuse():
    bash_with_requirements = {**SCRIPT, "spec": {"language": "bash", "code": "echo",
                                                 "requirements": ["requests"]}}
    schema = schema_of("Script")
    assert cel_errors(schema, bash_with_requirements) == ["requirements are for Python Scripts"]
    assert cel_errors(schema, SCRIPT) == []


def test_worker_group_has_a_scale_subresource():
    document = yaml.safe_load(render_all()["workergroups.yaml"])
    version = document["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert document["spec"]["names"]["categories"] == ["gristmill"]


@pytest.mark.parametrize("version", [OLDEST, latest_version()])
def test_operator_rbac_is_valid_and_covers_what_the_handlers_touch(version):
    documents = list(yaml.safe_load_all((ROOT / "charts/gristmill/files/rbac.yaml").read_text()))
    for document in documents:
        k8s_validate(document, version, strict=True)
    roles = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ClusterRole"}

    def granted_by(name):
        return {(group, resource, verb) for rule in roles[name]["rules"]
                for group in rule["apiGroups"] for resource in rule["resources"]
                for verb in rule["verbs"]}
    granted = granted_by("gristmill-operator")
    needed = {("gristmill.io", plural, verb) for plural in ("scripts", "flows", "workergroups")
              for verb in ("list", "watch", "patch")}
    needed |= {("apps", "deployments", verb) for verb in ("get", "create", "patch")}
    needed |= {("", "events", "create"), ("apps", "deployments/status", "get"),
               ("", "pods", "list"), ("", "pods", "patch")}
    needed |= {(group, resource, verb) for group, resource in (
        ("", "serviceaccounts"), ("rbac.authorization.k8s.io", "rolebindings"),
        ("networking.k8s.io", "networkpolicies")) for verb in ("get", "create", "patch")}
    assert needed <= granted
    rules = roles["gristmill-operator"]["rules"]
    assert not any(verb == "*" for *_, verb in granted)
    # delete, escalate and bind only by name: the job runners' ClusterRole (bind), and the
    # per-namespace Role of Scripts' Secrets (secret_access.py); no right on any Secret.
    assert all(rule.get("resourceNames") for rule in rules
               if {"delete", "escalate", "bind"} & set(rule["verbs"]))
    (job_runner,) = [r for r in rules if r.get("resourceNames") == ["gristmill-job-runner"]]
    assert job_runner["verbs"] == ["bind"] and job_runner["resources"] == ["clusterroles"]
    secret_rules = [r for r in rules if r.get("resourceNames") == ["gristmill-script-secrets"]]
    assert {(r["resources"][0], verb) for r in secret_rules for verb in r["verbs"]} == {
        ("roles", "create"), ("roles", "patch"), ("roles", "delete"), ("roles", "escalate"),
        ("roles", "bind"), ("rolebindings", "delete")}
    # Secrets: written (the worker token of each WorkerGroup), never read; which ones, the
    # admission policy gristmill-operator-secret-writes says.
    assert {verb for _, resource, verb in granted if resource == "secrets"} == {"create",
                                                                                 "patch"}
    assert ("", "pods", "create") not in granted
    # What the pod executor calls, in the namespace it is bound in: its pods through one
    # watch, and each job's Secret created, never read (garbage collection deletes it).
    runner = granted_by("gristmill-job-runner")
    assert runner == {("", "pods", verb) for verb in ("get", "list", "watch", "create", "delete")
                      } | {("", "pods/log", "get"), ("", "secrets", "create")}


def test_cel_rule_min_not_above_max():
    schema = schema_of("WorkerGroup")
    spec = {"tags": ["gpu"], "autoscaling": {"minReplicas": 5, "maxReplicas": 4}}
    assert cel_errors(schema, {**WORKER_GROUP, "spec": spec}) == [
        "autoscaling.minReplicas must not exceed maxReplicas"]
    spec["autoscaling"]["minReplicas"] = 0
    assert cel_errors(schema, {**WORKER_GROUP, "spec": spec}) == []
    assert cel_errors(schema, WORKER_GROUP) == []


@pytest.mark.parametrize("kind, name, refused", [
    ("WorkerGroup", "a" * 45, None),
    ("WorkerGroup", "a" * 46, "at most 45 characters for a WorkerGroup"),
    ("Script", "a" * 63, None),
    ("Script", "a" * 64, "at most 63 characters in a name"),
    ("Script", "a.b", "lower-case letters, digits and '-'"),
    ("Flow", "a.b", "lower-case letters, digits and '-'"),
])
def test_names_are_refused_by_the_crd_and_the_model_alike(kind, name, refused):
    from test_crd_agreement import model_refusals
    spec = {"Script": SCRIPT["spec"], "WorkerGroup": WORKER_GROUP["spec"],
            "Flow": {"steps": [{"id": "a", "script": "s"}]}}[kind]
    document = {"apiVersion": "gristmill.io/v1alpha1", "kind": kind,
                "metadata": {"name": name}, "spec": spec}
    by_crd, by_model = refusals(kind, document), model_refusals(document)
    if refused is None:
        assert by_crd == [] and by_model == []
    else:
        assert [(where, refused in message) for where, message in by_crd] == [("", True)]
        assert [(where, refused in message) for where, message in by_model] == [
            ("metadata.name", True)]


def test_name_rules_hold_on_create_only():
    # An object made before the rules existed stays updatable (the operator reports it).
    import cel
    for rule in schema_of("WorkerGroup")["x-kubernetes-validations"]:
        assert rule["optionalOldSelf"] is True
        program = cel.compile(rule["rule"])
        old = {"metadata": {"name": "b" * 50}}
        assert program.execute({"self": old, "oldSelf": cel.OptionalValue.of(old)})
        assert not program.execute({"self": old, "oldSelf": cel.OptionalValue.none()}) \
            or "matches" in rule["rule"]


@pytest.mark.parametrize("kind", ["Script", "Flow", "WorkerGroup"])
def test_status_is_typed_with_conditions_keyed_by_type(kind):
    status = schema_of(kind)["properties"]["status"]
    assert not status.get("x-kubernetes-preserve-unknown-fields")
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    condition = conditions["items"]
    assert set(condition["required"]) == {"type", "status", "lastTransitionTime", "reason",
                                          "message"}
    assert condition["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert status["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    if kind == "Script":
        assert status["properties"]["inputSchema"]["x-kubernetes-preserve-unknown-fields"]


def _field_at(schema: dict, json_path: str) -> dict:
    """The schema of the field a printer column or the scale subresource reads."""
    node = schema
    for part in json_path.strip(".").split("."):
        name = part.split("[")[0]
        node = node["properties"][name]
        if "[" in part:
            node = node["items"]
    return node


@pytest.mark.parametrize("name", sorted(render_all()))
def test_printer_columns_and_scale_read_fields_the_schema_has(name):
    version = yaml.safe_load(render_all()[name])["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"]
        if path.startswith(".metadata."):
            continue
        # .status.conditions[?(@.type=="Ready")].status reads one condition's field.
        path = path.replace('[?(@.type=="Ready")]', "[]")
        field = _field_at(schema, path)
        expected = {"date": "string"}.get(column["type"], column["type"])
        if column["name"] == "Tags":
            assert field["type"] == "array" and field["items"]["type"] == "string"
        else:
            assert field["type"] == expected, column
    scale = version["subresources"].get("scale")
    if scale:
        assert _field_at(schema, scale["specReplicasPath"])["type"] == "integer"
        assert _field_at(schema, scale["statusReplicasPath"])["type"] == "integer"
        assert _field_at(schema, scale["labelSelectorPath"])["type"] == "string"
