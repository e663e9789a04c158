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

# The server restarted, refused us or is full, the network went away, or the transaction
# lost a race (a serialization failure or a deadlock): psycopg's OperationalError, all of
# them. The same work may succeed in a moment. Anything else (bad data, a bug) will fail
# again and must not be retried blindly.
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


def is_transient(exc: BaseException, conn: psycopg.AsyncConnection | None = None) -> bool:
    """Whether `exc` is the database being briefly away rather than a mistake; a connection
    that broke under any error counts too."""
    return isinstance(exc, TRANSIENT_ERRORS) or (
        conn is not None and (conn.closed or conn.broken))


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
        open=False, timeout=wait_s, kwargs=dict(_CONNECTION_OPTIONS),
        # A reconnection attempt gives up quickly and the next request for a connection
        # starts another, so a database that comes back is used within about a second,
        # not after the pool's exponential backoff has grown to minutes.
        reconnect_timeout=2.0)


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
