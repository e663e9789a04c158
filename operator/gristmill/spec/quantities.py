"""Durations and quantities written the Kubernetes way: `90s`, `5m`, `512Mi`, `500m`.

Manifests keep the string as written (round-trips are faithful); the code
reads numbers through parse_duration, parse_memory and parse_cpu.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?(?:[eE]\d+)?)(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?$")
_MEMORY_UNITS = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "P": 10**15, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m)?$")


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration such as 250ms, 90s, 5m, 1h30m, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: write a duration like 90s, 5m or 1h30m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: it cannot be negative")
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {value!r}: write a duration like 90s, 5m or 1h30m")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def parse_memory(value: str | int | float) -> int:
    """Bytes in a quantity such as 512Mi, 1Gi, 100M or 128974848."""
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}: write an amount like 512Mi or 1Gi")
    match = _MEMORY.match(str(value).strip())
    if not match:
        raise ValueError(f"invalid quantity {value!r}: write an amount like 512Mi or 1Gi")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


def parse_cpu(value: str | int | float) -> float:
    """Cores in a CPU quantity such as 500m (half a core), 1 or 2.5."""
    if isinstance(value, bool):
        raise ValueError(f"invalid CPU quantity {value!r}: write cores like 500m, 1 or 2")
    match = _CPU.match(str(value).strip())
    if not match:
        raise ValueError(f"invalid CPU quantity {value!r}: write cores like 500m, 1 or 2")
    cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    if cores <= 0:
        raise ValueError(f"invalid CPU quantity {value!r}: it must be more than zero")
    return cores


def _keep_text(parse):
    def check(value: str) -> str:
        parse(value)
        return value
    return check


def _as_text(value):
    # YAML reads `timeout: 30` as an int; keep it as the string a person wrote.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Duration = Annotated[str, BeforeValidator(_as_text), AfterValidator(_keep_text(parse_duration))]
MemoryQuantity = Annotated[str, BeforeValidator(_as_text),
                           AfterValidator(_keep_text(parse_memory))]
CpuQuantity = Annotated[str, BeforeValidator(_as_text), AfterValidator(_keep_text(parse_cpu))]
