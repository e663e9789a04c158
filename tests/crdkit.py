"""Custom resources checked against the generated CRDs offline, as kube-apiserver checks them.

jsonschema alone is laxer than the API server in ways that matter here, each measured
against kube-apiserver 1.37.2 (see tests/crd_cases.py):
- unknown fields: the server prunes or refuses them, so `properties` close the object;
- `null` in a field that is not nullable is dropped, then defaults are filled in (so a
  null is the default, or a missing field);
- `x-kubernetes-int-or-string` is `type: [integer, string]`;
- an integer is an int64, or a float with no fraction below 2^53 (1.0 is 1, 2^53 as a
  float is "number");
- `pattern` is RE2: `$` is the end of the text, not "before a final newline";
- `format: date-time` is checked;
- x-kubernetes-validations (CEL) run, a create with no oldSelf.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import cel
import jsonschema
import yaml

from gristmill.spec.crds import render_all

_INT64 = (-(2**63), 2**63 - 1)
_FLOAT_INTEGER_LIMIT = 2**53


def _is_integer(checker, value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    return isinstance(value, float) and value.is_integer() and \
        abs(value) < _FLOAT_INTEGER_LIMIT


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


@functools.cache
def crd_of(kind: str) -> dict:
    for text in render_all().values():
        document = yaml.safe_load(text)
        if document["spec"]["names"]["kind"] == kind:
            return document
    raise KeyError(kind)


def schema_of(kind: str) -> dict:
    return crd_of(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def closed(schema: dict) -> dict:
    """The schema as the API server applies it (see the module's docstring)."""
    schema = copy.deepcopy(schema)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    if schema.pop("x-kubernetes-int-or-string", False):
        schema["type"] = ["integer", "string"]
    if schema.get("nullable"):
        kinds = schema.get("type")
        schema["type"] = [*(kinds if isinstance(kinds, list) else [kinds]), "null"] \
            if kinds else None
    if isinstance(schema.get("pattern"), str) and schema["pattern"].endswith("$"):
        schema["pattern"] = schema["pattern"][:-1] + r"\Z"
    for name, sub in schema.get("properties", {}).items():
        schema["properties"][name] = closed(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    return {k: v for k, v in schema.items() if v is not None}


@functools.cache
def validator_of(kind: str, part: str | None = None):
    schema = schema_of(kind)
    if part is not None:
        schema = schema["properties"][part]
    return _Validator(closed(schema), format_checker=_Validator.FORMAT_CHECKER)


def admitted(schema: dict, value: Any) -> Any:
    """`value` as the API server validates it: without the nulls it drops (in fields that
    are not nullable), then with the schema's defaults filled in."""
    if isinstance(value, dict) and "properties" in schema:
        properties = schema["properties"]
        out = {key: admitted(properties.get(key, {}), item) for key, item in value.items()
               if not (item is None and key in properties
                       and not properties[key].get("nullable"))}
        for key, sub in properties.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [admitted(schema["items"], item) for item in value]
    return value


def cel_errors(schema: dict, value) -> list[str]:
    """The x-kubernetes-validations rules that fail, evaluated as on a create."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        variables = {"self": value}
        if rule.get("optionalOldSelf"):
            variables["oldSelf"] = cel.OptionalValue.none()
        if not cel.compile(rule["rule"]).execute(variables):
            errors.append(rule["message"])
    for name, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and name in value:
            errors += cel_errors(sub, value[name])
    return errors


def path_of(error: jsonschema.ValidationError) -> str:
    """spec.steps[0].timeout, as the API server and the models name a field."""
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def refusals(kind: str, document: dict, part: str | None = None) -> list[tuple[str, str]]:
    """(field, message) of each problem the API server would refuse `document` for."""
    schema = schema_of(kind) if part is None else schema_of(kind)["properties"][part]
    document = admitted(schema, document)
    found = []
    for error in validator_of(kind, part).iter_errors(document):
        where = path_of(error)
        if error.validator == "required":
            missing = re.match(r"'([^']+)' is a required property", error.message)
            where = f"{where}.{missing.group(1)}" if where else missing.group(1)
        found.append((where, error.message))
    if not found and part is None:
        found += [("", message) for message in cel_errors(schema, document)]
    return found
