"""The API's database access: a pool that reconnects, and units of work retried across a
database restart.

A restarted PostgreSQL leaves every pooled connection stale, and for a second or two
refuses new ones. Both are transient: a unit of work (one function of a connection,
run in autocommit or in one transaction) that fails with such an error is run again
on another connection after a short backoff, for up to `retry_for` seconds, so the
caller sees at most a slower answer. Past that the database counts as down and the
request gets a 503 with Retry-After (DatabaseUnavailable), never a 500.

A transaction whose COMMIT was sent when the connection broke may or may not have
been applied; it is retried only when the caller says the work is safe to repeat
(an idempotent submit), otherwise the caller is told so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gristmill.store import connections

log = logging.getLogger("gristmill.api")

T = TypeVar("T")
Work = Callable[[psycopg.AsyncConnection], Awaitable[T]]

class DatabaseUnavailable(Exception):
    """The database could not serve this request in time: answer 503."""

    def __init__(self, message: str, retry_after: int = 2):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class Database:
    def __init__(self, url: str, pool_size: int = 8, retry_for: float = 5.0):
        self.url = url
        self.retry_for = retry_for
        self.pool = connections.pool(url, size=pool_size, min_size=1, name="gristmill-api")
        self._checking: asyncio.Task | None = None

    async def open(self) -> None:
        # Not waiting: the API starts (and answers 503) while the database is away.
        await self.pool.open(wait=False)

    async def close(self) -> None:
        if self._checking:
            self._checking.cancel()
        await self.pool.close()

    def _check_pool_soon(self) -> None:
        """After one stale connection, test the idle ones at once instead of failing on
        each of them in turn."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._check_pool(), name="pool-check")

    async def _check_pool(self) -> None:
        try:
            await self.pool.check()
        except Exception as exc:  # a check that fails changes nothing; requests retry anyway
            log.info("checking pooled connections failed: %s", exc)

    async def read(self, work: Work[T]) -> T:
        """Run `work` on a pooled autocommit connection, retried across transient errors."""
        return await self._run(work, transaction=False, repeatable_commit=True)

    async def write(self, work: Work[T], repeatable_commit: bool = False,
                    pipeline: bool = False) -> T:
        """Run `work` in one transaction, retried across transient errors. If the
        connection breaks during COMMIT the work is repeated only when
        `repeatable_commit` (it is idempotent); otherwise the caller gets a 503 that says
        the change may have been applied.

        `pipeline`: in psycopg's pipeline mode, so BEGIN, the statements `work` sends
        without reading their results, and COMMIT travel together: a round trip per
        result `work` waits for, plus one for the COMMIT. `work` must read the result of
        at least one statement (a connection that went stale is then found out before
        the COMMIT is sent, and the work is safely retried)."""
        return await self._run(work, transaction=True, repeatable_commit=repeatable_commit,
                               pipeline=pipeline)

    async def _run(self, work: Work[T], transaction: bool, repeatable_commit: bool,
                   pipeline: bool = False) -> T:
        deadline = time.monotonic() + self.retry_for
        delay = 0.0
        while True:
            conn = None
            committing = False
            try:
                wait = max(0.1, min(2.0, deadline - time.monotonic()))
                async with self.pool.connection(timeout=wait) as conn:
                    if not transaction:
                        return await work(conn)
                    if pipeline:
                        # Not conn.transaction(): in a pipeline it waits for BEGIN and
                        # COMMIT each (4 round trips for nothing); the pool's connections
                        # are autocommit, so BEGIN/COMMIT by hand.
                        try:
                            async with conn.pipeline():
                                await conn.execute("BEGIN")
                                result = await work(conn)
                                committing = True
                                await conn.execute("COMMIT")
                        except BaseException:
                            await _roll_back(conn)
                            raise
                        return result
                    async with conn.transaction():
                        result = await work(conn)
                        committing = True
                    return result
            except Exception as exc:
                if not connections.is_transient(exc, conn):
                    raise
                self._check_pool_soon()
                if committing and not repeatable_commit:
                    raise DatabaseUnavailable(
                        "the connection to the database broke while this change was being "
                        "committed, so it may or may not have been applied: check before "
                        "repeating it (send an Idempotency-Key header to make submits safe "
                        "to retry)") from exc
                if time.monotonic() + delay > deadline:
                    raise DatabaseUnavailable(
                        f"the database is unavailable ({_describe(exc)}); retried for "
                        f"{self.retry_for:g} s: try again shortly") from exc
                log.info("database error, retrying in %.2f s: %s", delay, _describe(exc))
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, 0.05), 1.0)

    async def ping(self, timeout: float = 2.0) -> str | None:
        """None when a pooled connection answers within `timeout`, else why not."""
        try:
            async with self.pool.connection(timeout=timeout) as conn:
                await AsyncConnectionPool.check_connection(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            return _describe(exc)
        return None


async def _roll_back(conn: psycopg.AsyncConnection) -> None:
    """End the transaction a failed pipelined unit of work left open (the pool would,
    with a warning); a connection that broke is the pool's to discard."""
    if conn.broken or conn.closed:
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        with contextlib.suppress(psycopg.Error):  # the pool checks it when it comes back
            await conn.execute("ROLLBACK")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PoolTimeout):
        return "no connection could be made in time"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
