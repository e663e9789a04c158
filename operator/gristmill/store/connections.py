"""Connections to PostgreSQL that outlive its restarts.

Every long-lived process (worker, API, operator) gets its connections here:
TCP keepalives so a vanished server or a network partition is noticed in
about half a minute rather than hours, pools that replace broken connections,
and one answer to "is this error worth retrying?".
"""

from __future__ import annotations

import random

import psycopg
import psycopg_pool

# The server restarted, refused us, or the network went away: the same request may work in
# a moment. Anything else (bad data, a bug) will fail again and must not be retried blindly.
TRANSIENT_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout)

CONNECT_TIMEOUT_S = 10
_CONNECTION_OPTIONS = {
    "autocommit": True,
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


async def connect(url: str) -> psycopg.AsyncConnection:
    """A dedicated autocommit connection (for LISTEN, which cannot share a pooled one)."""
    return await psycopg.AsyncConnection.connect(url, **_CONNECTION_OPTIONS)


def pool(url: str, size: int, name: str, wait_s: float = 10.0, min_size: int | None = None
         ) -> psycopg_pool.AsyncConnectionPool:
    """A pool of up to `size` autocommit connections (`min_size` kept open, default all),
    opened by `async with` or `open()`.

    A connection that breaks (a restarted server) is discarded when it is returned and
    replaced in the background; the caller retries on TRANSIENT_ERRORS. `wait_s` bounds
    how long a caller waits for a connection before PoolTimeout.
    """
    return psycopg_pool.AsyncConnectionPool(
        url, min_size=size if min_size is None else min_size, max_size=size, name=name,
        open=False, timeout=wait_s,
        kwargs=dict(_CONNECTION_OPTIONS),
        # Keep trying to reconnect for as long as the process lives: a database that is
        # down for ten minutes must not leave a pool that stopped trying.
        reconnect_timeout=float("inf"))


class Backoff:
    """Delays between retries of a loop's step: `first` doubling up to `cap`, with jitter so
    a fleet that lost its database does not come back in lockstep."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap = first, cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2 ** self.failures)
        self.failures += 1
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.failures = 0
