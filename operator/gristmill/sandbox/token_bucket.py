"""A token bucket: the pod executor's client-side limit on its writes to the Kubernetes API.

client-go gives every client one (5 requests a second, bursts of 10); the
Python client has none. A worker takes tokens for every pod and Secret it
creates, so a burst of jobs creates `burst` pods at once and then `rate` a
second, and each job waits its turn instead of failing. Reservations are
served in the order they are made (a job that asks first starts first).
Deletions take their token without waiting: they free the cluster's capacity,
there are never more of them than creations, and they only push later
creations back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if not rate > 0 or burst < 1:
            raise ValueError(f"a token bucket needs a rate above 0 and a burst of at least 1 "
                             f"(got rate {rate}, burst {burst})")
        self.rate, self.burst = float(rate), int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self.waits = 0  # takes that had to wait: what a test or a metric reads

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def reserve(self, tokens: float = 1.0) -> float:
        """Take `tokens`; the seconds until they may be used (0: now). The bucket may go
        into debt, which later reservations wait out: that keeps them in order."""
        self._refill()
        self._tokens -= tokens
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def give_back(self, tokens: float = 1.0) -> None:
        """Return unused tokens (a job cancelled while it waited)."""
        self._refill()
        self._tokens = min(float(self.burst), self._tokens + tokens)

    async def take(self, tokens: float = 1.0, cancel: asyncio.Event | None = None) -> bool:
        """Wait for `tokens`; False, with the tokens given back, if `cancel` is set first."""
        delay = self.reserve(tokens)
        if delay <= 0:
            return True
        self.waits += 1
        if cancel is None:
            await asyncio.sleep(delay)
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancel.wait(), delay)
        if cancel.is_set():
            self.give_back(tokens)
            return False
        return True
