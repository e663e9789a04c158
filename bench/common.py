"""Shared pieces of the benchmarks: a throwaway Postgres, percentiles, in-process workers."""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from gristmill.dev.postgres import EmbeddedPostgres
from gristmill.store.migrate import migrate_url


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


@contextlib.asynccontextmanager
async def throwaway_postgres(database: str = "bench") -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """A fresh PostgreSQL with durable (default) settings and a migrated database."""
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-", dir="/tmp") as tmp:
        server = EmbeddedPostgres(Path(tmp), durable=True)
        server.start()
        try:
            url = server.create_database(database)
            await migrate_url(url)
            yield server, url
        finally:
            server.stop()


def seconds(value: dt.timedelta) -> float:
    return value.total_seconds()
