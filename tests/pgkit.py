"""A throwaway PostgreSQL for tests that need a server of their own (or the session's)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gristmill.dev.postgres import EmbeddedPostgres


@contextlib.contextmanager
def embedded_postgres(prefix: str, **options) -> Iterator[EmbeddedPostgres]:
    """A started server (not durable: a clean restart loses nothing anyway) in a fresh
    directory under /tmp, stopped and removed afterwards; `options` go to EmbeddedPostgres."""
    base = Path(tempfile.mkdtemp(prefix=f"gristmill-{prefix}-", dir="/tmp"))
    server = EmbeddedPostgres(base, durable=False, **options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
