"""A plain subprocess, no sandbox: ONLY for measuring what the sandbox costs (bench/).

It runs the same runtimes in a scratch directory with none of the isolation or
limits of ProcessExecutor. Never use it to run code you do not trust. The
outcome still comes on a pipe, as everywhere (runtimes/base.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gristmill.runtimes import get_runtime
from gristmill.runtimes.base import WORK, Report
from gristmill.sandbox.base import JobOutcome, JobRequest
from gristmill.sandbox.process import PATH, drain_pipe, sandbox_python


class PlainExecutor:
    def __init__(self, python: str | None = None):
        self.python = python or sandbox_python()

    async def run(self, request: JobRequest, on_output: Callable[[str], None],
                  cancel: asyncio.Event) -> JobOutcome:
        runtime = get_runtime(request.language)
        workdir = Path(tempfile.mkdtemp(prefix="plain-job-"))
        report_read, report_write = os.pipe()
        try:
            argv = [arg.replace(WORK, str(workdir)) for arg in
                    runtime.prepare(request, workdir, self.python, report_write)]
            env = {"PATH": PATH, "HOME": str(workdir), **runtime.env(request), **request.env}
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, cwd=workdir, env=env, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, pass_fds=(report_write,))
            finally:
                os.close(report_write)
            report = Report()
            reading = drain_pipe(report_read, report.feed)
            report_read = -1  # drain_pipe closes it
            (stdout, _), _ = await asyncio.gather(process.communicate(), reading)
            text = stdout.decode(errors="replace")
            on_output(text)
            return runtime.outcome(request, process.returncode, text, report)
        finally:
            if report_read >= 0:
                os.close(report_read)
            shutil.rmtree(workdir, ignore_errors=True)
