"""The models and the CRDs give the same verdict on every duration and quantity value.

The table (tests/crd_cases.py) was checked against kube-apiserver 1.37.2 as well; here
each value goes through pydantic and through the CRD's schema offline (crdkit), and a
refusal must name the field on both sides.
"""

from __future__ import annotations

import re

import pytest
from crd_cases import FIELDS, Field
from crdkit import refusals, schema_of
from pydantic import ValidationError

from gristmill.spec import KINDS
from gristmill.spec.manifests import _field_path


def model_refusals(document: dict) -> list[tuple[str, str]]:
    try:
        KINDS[document["kind"]].model_validate(document)
    except ValidationError as exc:
        return [(_field_path(tuple(e["loc"])), e["msg"]) for e in exc.errors()]
    return []


def _verdicts(field: Field, refused) -> list[str]:
    """Every value whose verdict is not the table's, or whose refusal names another field."""
    wrong = []
    for value, accepted in [*field.values, (None, True)]:
        problems = refused(field.document(value))
        expected = field.expected(value, accepted)
        if expected and problems:
            wrong.append(f"{value!r}: refused: {problems}")
        elif not expected and not problems:
            wrong.append(f"{value!r}: accepted")
        elif not expected and any(where != field.path for where, _ in problems):
            wrong.append(f"{value!r}: refused for another field: {problems}")
    return wrong


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.id)
def test_the_model_gives_the_tables_verdict(field):
    assert _verdicts(field, model_refusals) == []


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.id)
def test_the_crd_gives_the_tables_verdict(field):
    assert _verdicts(field, lambda document: refusals(field.kind, document)) == []


def _same_as(kind: str, path: str) -> tuple[str, str]:
    """The field a nested one repeats: an inline step's fields are a Script's, and a step's
    fields are the same at every depth (branches, loop bodies, onFailure)."""
    if ".inline." in path:
        return "Script", "spec." + path.rsplit(".inline.", 1)[1]
    step = re.search(r"^spec\.(.*(steps\[0\]|default\[0\]|onFailure))\.(?!.*(steps\[0\]|"
                     r"default\[0\]|onFailure))", path)
    return (kind, f"spec.steps[0].{path[step.end():]}") if step else (kind, path)


def test_every_duration_and_quantity_field_is_in_the_table():
    """A new Duration, MemoryQuantity or CpuQuantity field must join the table."""
    def int_or_string_paths(schema: dict, path: str):
        if schema.get("x-kubernetes-int-or-string"):
            yield path
        for name, sub in schema.get("properties", {}).items():
            yield from int_or_string_paths(sub, f"{path}.{name}" if path else name)
        if isinstance(schema.get("items"), dict):
            yield from int_or_string_paths(schema["items"], f"{path}[0]")

    in_table = {_same_as(f.kind, f.path) for f in FIELDS}
    found = {(kind, path) for kind in ("Script", "Flow", "WorkerGroup")
             for path in int_or_string_paths(schema_of(kind), "")}
    assert len(found) > 100  # the nested steps are there
    missing = {_same_as(*field) for field in found} - in_table
    assert not missing, f"add these fields to tests/crd_cases.py: {sorted(missing)}"


def test_errors_say_how_to_write_the_value():
    from crd_cases import Field as F
    cases = [
        (F("Script", "spec.resources.cpu", []), 0.5, "write '0.5' (quoted) or 500m"),
        (F("Script", "spec.timeout", []), 1.5, "write '1.5' (quoted) or 1500ms"),
        (F("Script", "spec.resources.memory", []), "500m", "m, u and n are fractions of a byte"),
        (F("Script", "spec.resources.memory", []), "1K", "write k (1000) or Ki (1024)"),
        (F("Script", "spec.resources.memory", []), "1GB", "drop the B"),
        (F("Script", "spec.resources.cpu", []), "0", "it must be more than zero"),
        (F("Script", "spec.resources.cpu", []), 0, "it must be more than zero"),
        (F("Script", "spec.timeout", []), -5, "it cannot be negative"),
        (F("Script", "spec.timeout", []), "5 minutes", "write a duration like 90s, 5m or 1h30m"),
        (F("Script", "spec.timeout", []), 2**63, "too large for a whole number"),
    ]
    for field, value, message in cases:
        ((where, reason),) = model_refusals(field.document(value))
        assert where == field.path and message in reason, (value, reason)
