"""Checking a run's input against a JSON Schema, with messages that name the field."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError


class InputError(ValueError):
    """The input does not match the schema; the message lists every problem."""


def _where(error: ValidationError) -> str:
    path = "input"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _describe(error: ValidationError) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(error.schema.get("properties") or {})
        extra = sorted(set(error.instance) - set(known))
        names = ", ".join(repr(name) for name in extra)
        hint = f" (expected one of: {', '.join(known)})" if known else " (it takes no input)"
        return f"unknown field {names}{hint}"
    return error.message


def check_input(schema: dict[str, Any], value: Any) -> None:
    if not isinstance(value, dict):
        raise InputError(f"input must be a JSON object, not {type(value).__name__}")
    errors = sorted(Draft202012Validator(schema).iter_errors(value),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise InputError("; ".join(f"{_where(e)}: {_describe(e)}" for e in errors))


def apply_defaults(schema: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """The input with the schema's top-level defaults filled in."""
    filled = dict(value)
    for name, prop in (schema.get("properties") or {}).items():
        if name not in filled and isinstance(prop, dict) and "default" in prop:
            filled[name] = prop["default"]
    return filled
