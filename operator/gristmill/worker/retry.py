"""Retry delays: exponential backoff with jitter, so retries of a burst spread out."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Delay before the attempt after `attempt` (1-based): initial * 2^(attempt-1), capped,
    with "equal jitter" (between half and all of it)."""
    rng = rng or random
    ceiling = min(max_s, initial_s * 2 ** max(attempt - 1, 0))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)
