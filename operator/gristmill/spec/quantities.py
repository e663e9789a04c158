"""Durations and quantities written the Kubernetes way: `90s`, `5m`, `512Mi`, `500m`, or a
bare whole number (`timeout: 90`, `cpu: 2`, `memory: 536870912`).

One grammar per kind of value, held here and used twice: by the models (the check
below) and by the CRDs (`x-kubernetes-int-or-string` with the same regular expression,
bounds and lengths), so the API server and `gristmill apply` agree on every value.
The regular expressions are written for both Python's `re` and Go's RE2 (ASCII
classes, no look-around; the models match them whole, as RE2 anchors `$` at the end).

A YAML number with a fraction (`cpu: 0.5`) is refused by both: an int-or-string field
of a custom resource takes whole numbers and strings only (kube-apiserver 1.37 says
`must be of type integer,string: "number"`), so it must be quoted ('0.5') or written
with a unit (500m). Whole numbers written as floats (`1.0`, `1.5e3`) are whole numbers
to the API server and to the models alike.

Manifests keep the value as a string (`90` becomes "90"); the code reads numbers
through parse_duration, parse_memory and parse_cpu. Values beyond any machine (more
than 100 years, 8 EiB or a million cores) count as that much, so no timer, rlimit or
pod field overflows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

INT64_MAX = 2**63 - 1
# Floats below this that have no fraction are whole numbers to the API server (measured with
# kube-apiserver 1.37: 9007199254740991.0 is accepted, 9007199254740992.0 is not).
FLOAT_INTEGER_LIMIT = 2**53
MAX_DURATION_S = 100 * 365 * 86400.0
MAX_BYTES = INT64_MAX
MAX_CORES = 2**20

DURATION_PATTERN = r"^(([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+|[0-9]+(\.[0-9]+)?)$"
# A Kubernetes quantity without a sign; no m, u or n: a fraction of a byte is a mistake.
BYTES_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[kMGTPE]|[eE]\+?[0-9]+)?$"
# Cores or millicores, more than zero (a digit other than 0 somewhere in the number).
CPU_PATTERN = r"^([0-9]*[1-9][0-9]*(\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)m?$"

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)", re.ASCII)
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES_UNITS = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


@dataclass(frozen=True)
class Grammar:
    """How one kind of value is written, for the model's check and the CRD's schema."""

    what: str  # "duration", "quantity", "CPU quantity"
    pattern: str
    max_length: int
    minimum: int  # of the whole-number form
    advice: str  # the end of an error: "write a duration like 90s, 5m or 1h30m"
    examples: str  # "90s, 5m or 1h30m"
    fraction_hint: str  # how to write a fractional YAML number instead
    description: str  # appended to each field's own description in the CRD

    def matches(self, text: str) -> bool:
        return len(text) <= self.max_length and \
            re.fullmatch(self.pattern, text, re.ASCII) is not None

    def schema(self) -> dict[str, Any]:
        # As JSON Schema: pattern and maxLength bind strings, minimum binds numbers.
        return {"type": ["integer", "string"], "x-kubernetes-int-or-string": True,
                "pattern": self.pattern, "maxLength": self.max_length, "minimum": self.minimum,
                "x-gristmill-grammar": self.description}


DURATION = Grammar(
    "duration", DURATION_PATTERN, 64, 0, "write a duration like 90s, 5m or 1h30m",
    "90s, 5m or 1h30m", "'1.5' (quoted) or 1500ms",
    "Duration: 90 (seconds), 250ms, 90s, 5m, 1h30m, 2d; quote fractions ('1.5').")
BYTES = Grammar(
    "quantity", BYTES_PATTERN, 32, 0, "write an amount like 512Mi or 1Gi", "512Mi or 1Gi",
    "a whole number of bytes or a unit, like 1.5Gi",
    "Bytes: 536870912, 512Mi, 1Gi, 100M, 1e9 (no m, u or n).")
CPU = Grammar(
    "CPU quantity", CPU_PATTERN, 32, 1, "write cores like 500m, 1 or 2", "500m, 1 or 2",
    "'0.5' (quoted) or 500m",
    "Cores: 2, '0.5' (quoted), 500m.")


def _problem(grammar: Grammar, value: Any, why: str | None = None) -> ValueError:
    return ValueError(f"invalid {grammar.what} {value!r}: "
                      f"{why or grammar.advice}")


def _as_text(grammar: Grammar):
    """What YAML or JSON gave, as the text the API server would accept, or a ValueError
    with the API server's verdict (same bounds, same types) and how to write it."""
    def convert(value: Any) -> str:
        if isinstance(value, bool) or value is None or \
                not isinstance(value, str | int | float):
            raise _problem(grammar, value)
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()
                    and abs(value) < FLOAT_INTEGER_LIMIT):
                raise _problem(grammar, value, f"the Kubernetes API server takes only whole "
                                               f"numbers or strings here: write "
                                               f"{grammar.fraction_hint}")
            value = int(value)
        if isinstance(value, int):
            if value > INT64_MAX:
                raise _problem(grammar, value, f"too large for a whole number: write it with "
                                               f"a unit, like {grammar.examples}")
            if value < grammar.minimum:
                raise _problem(grammar, value, "it must be more than zero" if grammar.minimum
                               else "it cannot be negative")
            return str(value)
        if len(value) > grammar.max_length:
            raise _problem(grammar, value[:40] + "...",
                           f"longer than {grammar.max_length} characters")
        if not grammar.matches(value):
            raise _problem(grammar, value, _hint(grammar, value))
        return value
    return convert


def _hint(grammar: Grammar, text: str) -> str | None:
    """What is wrong with a common mistake, when it is one."""
    if text.startswith("-"):
        return f"it cannot be negative; {grammar.advice}"
    if grammar is CPU and re.fullmatch(r"[0.]*m?", text):
        return "it must be more than zero"
    if grammar is BYTES and re.fullmatch(r"[0-9.]+K", text):
        return "K is not a Kubernetes unit: write k (1000) or Ki (1024)"
    if grammar is BYTES and re.fullmatch(r"[0-9.]+[kKMGTPE]i?B", text):
        return "drop the B: Kubernetes writes Mi (2^20) or M (10^6), Gi or G, ..."
    if grammar is BYTES and re.fullmatch(r"[0-9.]+[mun]", text):
        return "m, u and n are fractions of a byte: write Mi (2^20) or M (10^6)"
    return None


def _annotated(grammar: Grammar):
    return Annotated[str, BeforeValidator(_as_text(grammar)), WithJsonSchema(grammar.schema())]


Duration = _annotated(DURATION)
MemoryQuantity = _annotated(BYTES)
CpuQuantity = _annotated(CPU)


def _checked_text(grammar: Grammar, value: str | int | float) -> str:
    try:
        return _as_text(grammar)(value)
    except ValueError:
        if isinstance(value, float) and math.isfinite(value) and value >= 0:
            return f"{value:f}"  # code (not a manifest) may hold 1.5 seconds
        raise


def _scaled(number: str, scale: int | Decimal, exponent: int, cap: Decimal) -> Decimal:
    """number x scale x 10^exponent, or `cap` when larger (checked before computing, so a
    hostile 1e999999999 costs nothing)."""
    value = Decimal(number)
    if value == 0:
        return value
    if value.adjusted() + exponent + len(str(int(scale))) > cap.adjusted() + 2:
        return cap
    with localcontext() as context:
        context.prec = 60
        return min(value * scale * Decimal(10) ** exponent, cap)


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration such as 250ms, 90s, 5m, 1h30m, or a bare number of seconds."""
    text = _checked_text(DURATION, value)
    cap = Decimal(MAX_DURATION_S)
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", text, re.ASCII):
        return float(min(Decimal(text), cap))
    total = sum((_scaled(number, _DURATION_UNITS[unit], 0, cap)
                 for number, unit in _DURATION_PART.findall(text)), Decimal(0))
    return float(min(total, cap))


def parse_memory(value: str | int | float) -> int:
    """Bytes in a quantity such as 512Mi, 1Gi, 100M or 128974848, rounded up to a whole byte
    as Kubernetes rounds."""
    text = _checked_text(BYTES, value)
    match = re.fullmatch(r"([0-9.]+)([KMGTPE]i|[kMGTPE]|[eE]\+?([0-9]+))?", text, re.ASCII)
    assert match is not None  # the grammar's pattern matched
    number, suffix, exponent = match.groups()
    cap = Decimal(MAX_BYTES)
    if exponent is not None:
        amount = _scaled(number, 1, int(exponent) if len(exponent) < 12 else 10**12, cap)
    else:
        amount = _scaled(number, _BYTES_UNITS.get(suffix or "", 1), 0, cap)
    return int(amount.to_integral_value(rounding="ROUND_CEILING"))


def parse_cpu(value: str | int | float) -> float:
    """Cores in a CPU quantity such as 500m (half a core), 1 or 2.5, rounded up to a whole
    millicore as Kubernetes rounds."""
    text = _checked_text(CPU, value)
    millis = text.endswith("m")
    amount = _scaled(text.removesuffix("m"), 1, 0 if millis else 3, Decimal(MAX_CORES * 1000))
    return float(amount.to_integral_value(rounding="ROUND_CEILING")) / 1000
