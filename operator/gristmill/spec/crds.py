"""CustomResourceDefinitions generated from the pydantic models (`gristmill crds`).

The models are the single source of truth; crds/*.yaml are their output and a
test keeps the two equal. The API server wants a *structural* schema: no $ref,
no anyOf for optional fields (`nullable` instead), explicit types, and
x-kubernetes-preserve-unknown-fields where a field holds free-form JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel

from gristmill.spec.flow import Flow
from gristmill.spec.meta import NAME_PATTERN, NAME_RULE
from gristmill.spec.script import Script
from gristmill.spec.workergroup import MAX_NAME_LENGTH, NAME_TOO_LONG, WorkerGroup

GROUP = "gristmill.io"
VERSION = "v1alpha1"
MAX_STEP_NESTING = 2  # deeper Flow steps are checked by the operator, not the API server
_KEPT = ("description", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
         "minItems", "maxItems", "format", "x-kubernetes-list-type",
         "x-kubernetes-list-map-keys")
FREE_FORM = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


@dataclass(frozen=True)
class Kind:
    model: type[BaseModel]
    plural: str
    short_names: list[str]
    columns: list[dict[str, str]]
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # path -> CEL rules
    scale: bool = False

    @property
    def status_model(self) -> type[BaseModel]:
        (model,) = [arg for arg in self.model.model_fields["status"].annotation.__args__
                    if arg is not type(None)]
        return model


READY = {"name": "Ready", "type": "string",
         "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}
AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
VERSION_COLUMN = {"name": "Version", "type": "string", "jsonPath": ".status.shortVersion"}

def _name_rules(max_length: int, too_long: str) -> list[dict[str, Any]]:
    """metadata.name as the models read it (ObjectMeta; the API server alone allows dots and
    253 characters), checked when an object is created: an object made before the rule
    existed can still be updated (optionalOldSelf needs Kubernetes 1.30), and the operator
    reports it Invalid instead."""
    checks = [(f"size(self.metadata.name) <= {max_length}", f"metadata.name: {too_long}"),
              (f"self.metadata.name.matches('{NAME_PATTERN}')", f"metadata.name: {NAME_RULE}")]
    return [{"rule": f"oldSelf.hasValue() || {rule}", "optionalOldSelf": True,
             "message": message} for rule, message in checks]


NAME_RULES = _name_rules(63, "at most 63 characters in a name")

KINDS = [
    Kind(Script, "scripts", ["gms"], [
        READY, {"name": "Language", "type": "string", "jsonPath": ".spec.language"},
        {"name": "Tag", "type": "string", "jsonPath": ".status.tag"}, VERSION_COLUMN, AGE,
    ], rules={"": NAME_RULES,
              "spec": [{"rule": "self.language == 'python' || !has(self.requirements) || "
                                "size(self.requirements) == 0",
                        "message": "requirements are for Python Scripts"},
                       {"rule": "!has(self.env) || self.env.all(e, !has(e.valueFrom) || "
                                "!has(e.value) || e.value == '')",
                        "message": "env: give `value` or `valueFrom`, not both"}]}),
    Kind(Flow, "flows", ["gmf"], [
        READY, {"name": "Steps", "type": "integer", "jsonPath": ".status.steps"},
        VERSION_COLUMN, AGE,
    ], rules={"": NAME_RULES}),
    Kind(WorkerGroup, "workergroups", ["gmwg"], [
        READY, {"name": "Tags", "type": "string", "jsonPath": ".spec.tags"},
        {"name": "Executor", "type": "string", "jsonPath": ".spec.executor"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
        {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
        {"name": "Queued", "type": "integer", "jsonPath": ".status.queuedJobs"}, AGE,
    ], rules={"": _name_rules(MAX_NAME_LENGTH, NAME_TOO_LONG),
              "spec": [{"rule": "!has(self.autoscaling) || "
                                "self.autoscaling.minReplicas <= self.autoscaling.maxReplicas",
                        "message": "autoscaling.minReplicas must not exceed maxReplicas"}]},
        scale=True),
]


def _structural(schema: dict[str, Any], defs: dict[str, Any], trail: tuple[str, ...]
                ) -> dict[str, Any]:
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        if trail.count(name) >= MAX_STEP_NESTING:
            return {**FREE_FORM, "description": defs[name].get("description", name)}
        resolved = _structural(defs[name], defs, (*trail, name))
        if "description" in schema:
            resolved["description"] = schema["description"]
        return resolved
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(schema["anyOf"])
        out = _structural(options[0], defs, trail) if len(options) == 1 else dict(FREE_FORM)
        for key in ("description", "x-kubernetes-list-type", "x-kubernetes-list-map-keys"):
            if key in schema:
                out[key] = schema[key]
        if nullable:
            out["nullable"] = True
        return out
    out = {key: schema[key] for key in _KEPT if key in schema}
    if schema.get("x-kubernetes-int-or-string"):
        # A whole number or a string (quantities.py): the API server wants no type here.
        out["x-kubernetes-int-or-string"] = True
        if "x-gristmill-grammar" in schema:
            out["description"] = " ".join(filter(None, (out.get("description"),
                                                        schema["x-gristmill-grammar"])))
        if "default" in schema:
            out["default"] = schema["default"]
        return out
    if "const" in schema:
        out["enum"] = [schema["const"]]
    kind = schema.get("type")
    if kind is None and "enum" in schema:
        kind = "string"
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        if properties:
            out["type"] = "object"
            out["properties"] = {name: _structural(prop, defs, trail)
                                 for name, prop in properties.items()}
            if schema.get("required"):
                out["required"] = list(schema["required"])
        elif isinstance(extra, dict) and extra.get("type"):
            out["type"] = "object"
            out["additionalProperties"] = _structural(extra, defs, trail)
        else:
            out.update(FREE_FORM)
    elif kind == "array":
        out["type"] = "array"
        out["items"] = _structural(schema.get("items", {}), defs, trail)
    elif kind is not None:
        out["type"] = kind
        if schema.get("default") is not None and not isinstance(schema["default"],
                                                                  dict | list):
            out["default"] = schema["default"]
    else:
        out.update(FREE_FORM)
    return out


def _apply_rules(schema: dict[str, Any], rules: dict[str, list[dict[str, Any]]]) -> None:
    for path, path_rules in rules.items():
        node = schema
        for part in filter(None, path.split(".")):
            node = node["properties"][part]
        node["x-kubernetes-validations"] = path_rules


def _status_schema(kind: Kind) -> dict[str, Any]:
    raw = kind.status_model.model_json_schema(by_alias=True)
    status = _structural(raw, raw.get("$defs", {}), ())
    status["description"] = "Observed state, written by the operator."
    return status


def open_api_schema(kind: Kind) -> dict[str, Any]:
    raw = kind.model.model_json_schema(by_alias=True)
    defs = raw.get("$defs", {})
    spec = _structural(raw["properties"]["spec"], defs, ())
    schema = {
        "type": "object",
        "description": (kind.model.model_fields["spec"].annotation.__doc__ or "").strip()
        or kind.model.__doc__ or kind.model.__name__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": _status_schema(kind),
        },
    }
    _apply_rules(schema, kind.rules)
    return schema


def crd(kind: Kind) -> dict[str, Any]:
    name = kind.model.model_fields["kind"].default
    subresources: dict[str, Any] = {"status": {}}
    if kind.scale:
        subresources["scale"] = {"specReplicasPath": ".spec.replicas",
                                 "statusReplicasPath": ".status.replicas",
                                 "labelSelectorPath": ".status.selector"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{GROUP}",
                     "labels": {"app.kubernetes.io/part-of": "gristmill"}},
        "spec": {
            "group": GROUP,
            "names": {"kind": name, "listKind": f"{name}List", "plural": kind.plural,
                      "singular": name.lower(), "shortNames": kind.short_names,
                      "categories": ["gristmill"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": subresources,
                "additionalPrinterColumns": kind.columns,
                "schema": {"openAPIV3Schema": open_api_schema(kind)},
            }],
        },
    }


def render_all() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    header = "# Generated by `gristmill crds` from the pydantic models; do not edit.\n"
    return {f"{kind.plural}.yaml": header + yaml.safe_dump(crd(kind), sort_keys=False,
                                                           width=100)
            for kind in KINDS}
