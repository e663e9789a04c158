"""Retry delays: exponential backoff with jitter, so retries of a burst spread out."""

from __future__ import annotations

import random

from gristmill.spec import parse_duration


def backoff_delay(
    attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Delay before the attempt after `attempt` (1-based): initial * 2^(attempt-1), capped,
    with "equal jitter" (between half and all of it)."""
    rng = rng or random
    ceiling = min(max_s, initial_s * 2 ** max(attempt - 1, 0))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def retry_delay(policy: dict, attempt: int) -> float:
    """Delay after a failed `attempt` under a flow step's retry policy
    ({backoff: constant|exponential, delay, maxDelay})."""
    delay, max_delay = parse_duration(policy["delay"]), parse_duration(policy["maxDelay"])
    if policy.get("backoff") == "constant":
        return min(delay, max_delay)
    return backoff_delay(attempt, delay, max_delay)
