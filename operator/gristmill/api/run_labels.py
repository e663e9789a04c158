"""Labels of a run: Kubernetes-style key/value pairs given on submit (as Argo Workflows
has workflow labels) and matched by `label=KEY=VALUE` in the run listing.

Keys and values follow Kubernetes' own label syntax, so a label that works on a Pod works
on a run, and a selector a person copies from kubectl means the same thing here.
"""

from __future__ import annotations

import re
from typing import Any

from gristmill.values import ValueProblem

MAX_LABELS = 32
_NAME_MAX = 63  # a key's name part, and a value
_PREFIX_MAX = 253
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
EXAMPLE = "team=payments"


def key_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes label key, or None when it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > _PREFIX_MAX
                  or not all(_DNS_LABEL.match(part) for part in prefix.split("."))):
        return (f"the prefix of label key {key[:80]!r} must be a DNS subdomain such as "
                f"example.com (lower-case, at most {_PREFIX_MAX} characters)")
    if not name or len(name) > _NAME_MAX or not _NAME.match(name):
        return (f"label key {key[:80]!r} must be at most {_NAME_MAX} letters, digits, '-', "
                f"'_' or '.', starting and ending with a letter or digit (optionally after "
                f"a prefix such as example.com/)")
    return None


def value_problem(key: str, value: str) -> str | None:
    """Why `value` cannot be the value of label `key`, or None."""
    if value and (len(value) > _NAME_MAX or not _NAME.match(value)):
        return (f"the value of label {key[:80]!r} must be empty or at most {_NAME_MAX} "
                f"letters, digits, '-', '_' or '.', starting and ending with a letter or "
                f"digit")
    return None


def check_labels(value: Any, where: str = "labels") -> dict[str, str]:
    """The labels of a submit body's `labels` field, checked."""
    if not isinstance(value, dict):
        raise ValueProblem(where, 'must be an object of strings, such as '
                                  '{"team": "payments"}')
    if len(value) > MAX_LABELS:
        raise ValueProblem(where, f"has {len(value)} labels; a run takes at most {MAX_LABELS}")
    for key, label_value in value.items():
        if not isinstance(label_value, str):
            raise ValueProblem(f"{where}.{key[:80]}", "must be a string (quote numbers and "
                                                      "booleans: \"1\", \"true\")")
        problem = key_problem(key) or value_problem(key, label_value)
        if problem:
            raise ValueProblem(where, problem)
    return dict(value)


def parse_selector(text: str, where: str = "label") -> tuple[str, str]:
    """One `KEY=VALUE` of the listing's `label` parameter."""
    key, equals, value = text.partition("=")
    if not equals:
        raise ValueProblem(where, f"{text[:80]!r} is not KEY=VALUE; write it as {EXAMPLE}")
    problem = key_problem(key) or value_problem(key, value)
    if problem:
        raise ValueProblem(where, problem)
    return key, value
