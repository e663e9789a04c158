"""The CRDs: generated from the models, valid for Kubernetes, and they accept what the
models accept (examples) and refuse what they refuse."""

from __future__ import annotations

import copy
from pathlib import Path

import cel
import jsonschema
import pytest
import yaml
from kubernetes_validate import validate as k8s_validate
from kubernetes_validate.utils import latest_version

from gristmill.spec.crds import render_all

ROOT = Path(__file__).parent.parent
CRD_DIR = ROOT / "crds"


def test_crds_dir_matches_the_models():
    rendered = render_all()
    on_disk = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert on_disk == rendered, "crds/ is stale: run `gristmill crds --output-dir crds`"


@pytest.mark.parametrize("version", ["1.29.0", latest_version()])
@pytest.mark.parametrize("name", sorted(render_all()))
def test_crds_are_valid_kubernetes_objects(name, version):
    document = yaml.safe_load(render_all()[name])
    k8s_validate(document, version, strict=True)


def _closed(schema: dict) -> dict:
    """The schema as the API server applies it: unknown fields are an error."""
    schema = copy.deepcopy(schema)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    if schema.get("nullable"):
        schema["type"] = [schema["type"], "null"] if "type" in schema else None
    for key in ("properties",):
        for name, sub in schema.get(key, {}).items():
            schema[key][name] = _closed(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _closed(schema[key])
    return {k: v for k, v in schema.items() if v is not None}


def _schema_of(kind: str) -> dict:
    for text in render_all().values():
        document = yaml.safe_load(text)
        if document["spec"]["names"]["kind"] == kind:
            return document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


def _cel_errors(schema: dict, value) -> list[str]:
    """Evaluate the x-kubernetes-validations rules, as the API server does."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not cel.compile(rule["rule"]).execute({"self": value}):
            errors.append(rule["message"])
    for name, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and name in value:
            errors += _cel_errors(sub, value[name])
    return errors


def _examples():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        yield from yaml.safe_load_all(path.read_text())


@pytest.mark.parametrize("document", list(_examples()), ids=lambda d: d["metadata"]["name"])
def test_examples_validate_against_their_crd(document):
    schema = _schema_of(document["kind"])
    jsonschema.validate(document, _closed(schema))
    assert _cel_errors(schema, document) == []


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
])
def test_invalid_resources_are_refused_by_the_schema(document, message):
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(document, _closed(_schema_of(document["kind"])))


def test_cel_rules_refuse_what_the_models_refuse():
    bash_with_requirements = {**SCRIPT, "spec": {"language": "bash", "code": "echo",
                                                 "requirements": ["requests"]}}
    schema = _schema_of("Script")
    assert _cel_errors(schema, bash_with_requirements) == ["requirements are for Python Scripts"]
    assert _cel_errors(schema, SCRIPT) == []


def test_worker_group_has_a_scale_subresource():
    document = yaml.safe_load(render_all()["workergroups.yaml"])
    version = document["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert document["spec"]["names"]["categories"] == ["gristmill"]


@pytest.mark.parametrize("version", ["1.29.0", latest_version()])
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
    assert not any(verb in ("*", "delete", "escalate") for *_, verb in granted)
    # It may bind the job runners' role, by name, and nothing else; it never runs pods.
    (bind,) = [r for r in roles["gristmill-operator"]["rules"] if "bind" in r["verbs"]]
    assert bind["resourceNames"] == ["gristmill-job-runner"] and bind["verbs"] == ["bind"]
    assert ("", "pods", "create") not in granted
    # What the pod executor calls, in the namespace it is bound in: its pods through one
    # watch, and each job's Secret created, never read (garbage collection deletes it).
    runner = granted_by("gristmill-job-runner")
    assert runner == {("", "pods", verb) for verb in ("get", "list", "watch", "create", "delete")
                      } | {("", "pods/log", "get"), ("", "secrets", "create")}


def test_cel_rule_min_not_above_max():
    schema = _schema_of("WorkerGroup")
    spec = {"tags": ["gpu"], "autoscaling": {"minReplicas": 5, "maxReplicas": 4}}
    assert _cel_errors(schema, {**WORKER_GROUP, "spec": spec}) == [
        "autoscaling.minReplicas must not exceed maxReplicas"]
    spec["autoscaling"]["minReplicas"] = 0
    assert _cel_errors(schema, {**WORKER_GROUP, "spec": spec}) == []
    assert _cel_errors(schema, WORKER_GROUP) == []
