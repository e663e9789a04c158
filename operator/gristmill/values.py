"""Values from users and jobs, checked before PostgreSQL or JSON sees them.

PostgreSQL's jsonb and text refuse NUL characters and unpaired UTF-16
surrogates, JSON has no NaN or Infinity, Python's json recurses (a deeply
nested document is a RecursionError), and Python's datetime ends at year
9999. A value that breaks any of these must be refused where it enters (an
API request, a job's result), with a message naming the field, so that it can
never fail a statement that serves other jobs. Text that Gristmill only
shows (log lines, error messages) is cleaned instead of refused.

This module is neutral ground: the API, the worker and the runtimes use it,
and it imports nothing of theirs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any

MAX_DEPTH = 128  # nesting levels of a JSON value (serde_json's default recursion limit)
MAX_INT_BITS = 1024  # beyond this an integer is not a number anyone means
# Times outside this range are refused: PostgreSQL and Python disagree at the edges (year 0
# exists in one, year 10000 in the other), and no job is scheduled a thousand years ahead.
MIN_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MAX_TIME = dt.datetime(3000, 1, 1, tzinfo=dt.UTC)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class ValueProblem(ValueError):
    """A value that cannot be stored or sent: `where` names it, `reason` says why and what
    to do instead."""

    def __init__(self, where: str, reason: str):
        if len(where) > 160:  # a path 128 levels deep says no more than its ends do
            where = f"{where[:100]}...{where[-40:]}"
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.message = f"{where}: {reason}"


def _key_path(where: str, key: str) -> str:
    if _IDENTIFIER.match(key):
        return f"{where}.{key}"
    shown = key if len(key) <= 40 else key[:40] + "..."
    return f"{where}[{json.dumps(shown)}]"


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store `text`, or None when it can."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return ("contains a NUL character (\\u0000), which PostgreSQL cannot store: remove it, "
                "or encode binary data (for example as base64)")
    return (f"contains an unpaired UTF-16 surrogate (\\u{ord(found.group()):04x}), which is "
            f"not valid Unicode: send whole characters")


def check_json(value: Any, where: str = "input", max_depth: int = MAX_DEPTH) -> None:
    """Raise ValueProblem, naming the first bad field, unless `value` is JSON that PostgreSQL
    can store as jsonb. Iterative: no value is too deep to be checked."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                raise ValueProblem(path, problem)
        elif isinstance(item, int):
            if item.bit_length() > MAX_INT_BITS:
                raise ValueProblem(path, f"is an integer of {item.bit_length()} bits; send "
                                         f"numbers that large as strings")
        elif isinstance(item, float):
            if math.isnan(item):
                raise ValueProblem(path, "is NaN, which JSON cannot hold: use null or a "
                                         "string instead")
            if math.isinf(item):
                raise ValueProblem(path, "is Infinity (or too large for a 64-bit float), "
                                         "which JSON cannot hold: use null or a string instead")
        elif isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise ValueProblem(path, f"is nested more than {max_depth} levels deep: "
                                         f"flatten it")
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise ValueProblem(path, f"has a key of type {type(key).__name__}; "
                                                 f"JSON object keys are strings")
                    child_path = _key_path(path, key)
                    problem = text_problem(key)
                    if problem:
                        raise ValueProblem(child_path, f"the key {problem}")
                    stack.append((child, child_path, depth + 1))
            else:
                stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        else:
            raise ValueProblem(path, f"is a {type(item).__name__}, which is not a JSON value")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def loads(text: str | bytes, where: str = "input", max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON strictly (no NaN or Infinity, no nesting past `max_depth`) and check that
    PostgreSQL can store it; ValueProblem otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueProblem(where, f"is not valid UTF-8 (byte {exc.start}): send UTF-8 "
                                      f"text") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueProblem(where, f"is not valid JSON: {exc.msg} at line {exc.lineno} "
                                  f"column {exc.colno}") from None
    except ValueError as exc:  # a NaN, or an integer too long for Python to convert
        raise ValueProblem(where, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueProblem(where, f"is nested more than {max_depth} levels deep: "
                                  f"flatten it") from None
    check_json(value, where, max_depth)
    return value


def dumps(value: Any) -> str:
    """JSON text of a checked value (never NaN or Infinity)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def clean_text(text: str) -> str:
    """`text` with what PostgreSQL cannot store (NUL, unpaired surrogates) replaced by
    U+FFFD: for text Gristmill shows rather than returns, such as logs and messages."""
    if _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def check_time(when: dt.datetime, where: str) -> dt.datetime:
    """`when`, made timezone-aware (UTC when naive), if it lies within MIN_TIME..MAX_TIME."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        in_range = MIN_TIME <= when < MAX_TIME
    except OverflowError:  # year 1 at +14:00 is before year 1 in UTC
        in_range = False
    if not in_range:
        raise ValueProblem(where, f"{when.isoformat()} is out of range: give a time from "
                                  f"{MIN_TIME.year} to {MAX_TIME.year - 1}")
    return when
