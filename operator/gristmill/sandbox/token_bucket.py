"""A token bucket: the pod executor's client-side limit on its writes to the Kubernetes API.

client-go gives every client one (5 requests a second, bursts of 10); the
Python client has none. A worker takes a token for every pod and Secret it
creates and every pod it deletes, so a burst of jobs makes `burst` writes at
once and then `rate` a second, however many jobs wait; each job waits its turn
instead of failing. Turns are first come, first served, except that urgent
takes (deletions: they stop cancelled and timed-out jobs and free the
cluster's capacity) go before every waiting creation.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
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
        # (0 urgent | 1 not, order of arrival, tokens, future): the turns waiting.
        self._waiting: list[tuple[int, int, float, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self.waits = 0  # takes that had to wait: what a test or a metric reads

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def take(self, tokens: float = 1.0, cancel: asyncio.Event | None = None,
                   urgent: bool = False) -> bool:
        """Wait for `tokens` (at most the burst); False if `cancel` is set first."""
        tokens = min(float(tokens), float(self.burst))
        self._refill()
        if not self._waiting and self._tokens >= tokens:
            self._tokens -= tokens
            return True
        self.waits += 1
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (0 if urgent else 1, next(self._arrivals), tokens, turn))
        self._serve()
        cancelled = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
        try:
            await asyncio.wait([turn] if cancelled is None else [turn, cancelled],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if cancelled is not None:
                cancelled.cancel()
            if not turn.done():  # cancelled (or this task was): the turn passes on
                turn.cancel()
                self._serve()
        return not turn.cancelled()

    def _serve(self) -> None:
        """Grant the turns at the head while there are tokens; wake up when the next one is due."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._refill()
        while self._waiting:
            _, _, tokens, turn = self._waiting[0]
            if turn.done():  # given up while it waited
                heapq.heappop(self._waiting)
                continue
            if self._tokens < tokens:
                delay = (tokens - self._tokens) / self.rate
                self._timer = asyncio.get_running_loop().call_later(delay, self._serve)
                return
            heapq.heappop(self._waiting)
            self._tokens -= tokens
            turn.set_result(None)
