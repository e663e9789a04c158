"""Helpers for tests that run jobs in the real process sandbox."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

from gristmill.sandbox.base import JobRequest
from gristmill.sandbox.process import ProcessExecutor


def traversable(base: Path) -> Path:
    """`base`, opened for the job uids: pytest's tmp dirs are 0700."""
    base.chmod(0o755)
    for parent in base.parents:
        if parent == parent.parent:
            break
        parent.chmod(parent.stat().st_mode | 0o001)
    return base


def make_executor(base: Path, **options) -> ProcessExecutor:
    traversable(base)
    return ProcessExecutor(work_dir=base / "jobs", cache_dir=base / "cache", **options)


async def run(executor, code: str, language: str = "python", cancel: asyncio.Event | None = None,
              output: list[str] | None = None, **request):
    request.setdefault("input", {})
    request.setdefault("job_id", "0123456789abcdef")
    return await executor.run(
        JobRequest(language=language, code=textwrap.dedent(code), **request),
        (output if output is not None else []).append, cancel or asyncio.Event())
