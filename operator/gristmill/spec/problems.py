"""Lists of problems cut to a readable size: the first few, then how many more.

A Flow with 2,000 bad references once gave a 26 MB error; nobody reads past
the first screen, and a Kubernetes status message or an Event must stay small.
"""

from __future__ import annotations

from collections.abc import Sequence

SHOWN = 10  # problems spelled out; the rest are counted


def summarize(problems: Sequence[str], shown: int = SHOWN) -> list[str]:
    """`problems`, or its first `shown` and a last line "and N more"."""
    if len(problems) <= shown + 1:
        return list(problems)
    return [*problems[:shown], f"and {len(problems) - shown:,} more"]


def some_of(names: Sequence[str], shown: int = SHOWN) -> str:
    """A few names, comma-separated, for a hint such as "(known: a, b, ... and 90 more)"."""
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, ... and {len(names) - shown:,} more"


def clip(text: str, limit: int = 160) -> str:
    """Text quoted in a message: whole when short, its start otherwise."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
