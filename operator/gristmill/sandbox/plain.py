"""A plain subprocess, no sandbox: ONLY for measuring what the sandbox costs (bench/).

It runs the same runtimes in a scratch directory with none of the isolation or
limits of ProcessExecutor. Never use it to run code you do not trust.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gristmill.runtimes import get_runtime
from gristmill.runtimes.base import WORK
from gristmill.sandbox.base import JobOutcome, JobRequest
from gristmill.sandbox.process import PATH, sandbox_python


class PlainExecutor:
    def __init__(self, python: str | None = None):
        self.python = python or sandbox_python()

    async def run(self, request: JobRequest, on_output: Callable[[str], None],
                  cancel: asyncio.Event) -> JobOutcome:
        runtime = get_runtime(request.language)
        workdir = Path(tempfile.mkdtemp(prefix="plain-job-"))
        try:
            argv = [arg.replace(WORK, str(workdir)) for arg in
                    runtime.prepare(request, workdir, self.python)]
            env = {"PATH": PATH, "HOME": str(workdir), **runtime.env(request), **request.env}
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=workdir, env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            stdout, _ = await process.communicate()
            on_output(stdout.decode(errors="replace"))
            return runtime.outcome(request, workdir, process.returncode,
                                   stdout.decode(errors="replace"))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
