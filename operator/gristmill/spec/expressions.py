"""CEL expressions of Flows: compiled once when a Flow loads, evaluated as it runs.

Variables: flow_input, results.<step_id>, iter.value / iter.index (inside a
forEach), env.<NAME>, and error.message / error.step (in onFailure).
CEL never mixes int and double (`1 + 1.5` is an error): write `double(x)`.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import cel

VARIABLES = ("flow_input", "results", "iter", "env", "error")

# results.<id> or results["<id>"], outside string literals.
_STEP_REFERENCE = re.compile(r"\bresults\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*['\"]([^'\"]+)['\"]\s*\])")
_STRING_LITERAL = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"")


class ExpressionError(ValueError):
    """An expression that does not compile or cannot be evaluated; says which and why."""


@functools.lru_cache(maxsize=4096)
def compile_expression(expression: str) -> cel.Program:
    try:
        program = cel.compile(expression)
    except (ValueError, RuntimeError) as exc:
        message = str(exc).removeprefix(f"Failed to parse expression {expression!r}: ")
        raise ExpressionError(" ".join(message.split())) from None
    unknown = sorted(set(program.variables()) - set(VARIABLES))
    if unknown:
        raise ExpressionError(f"unknown variable(s) {', '.join(unknown)}; expressions can read "
                              f"{', '.join(VARIABLES)}")
    return program


def referenced_steps(expression: str) -> set[str]:
    """Step ids an expression reads through `results`."""
    code = _STRING_LITERAL.sub('""', expression)
    found = set()
    for match in _STEP_REFERENCE.finditer(code):
        found.add(match.group(1) or match.group(2))
    # A bracketed reference is a string literal, blanked above: look in the original too.
    for match in _STEP_REFERENCE.finditer(expression):
        if match.group(2):
            found.add(match.group(2))
    return found


def evaluate(expression: str, context: dict[str, Any]) -> Any:
    """Evaluate to a plain JSON-like value; errors say what went wrong in a person's words."""
    program = compile_expression(expression)
    try:
        return program.execute(context)
    except KeyError as exc:
        raise ExpressionError(f"{expression!r}: no such key {exc.args[0]!r} (a step that has "
                              f"not run, was skipped, or a missing field; test with has())") from None
    except Exception as exc:  # the CEL runtime raises TypeError, ValueError, RuntimeError...
        raise ExpressionError(f"{expression!r}: {' '.join(str(exc).split())}") from None
