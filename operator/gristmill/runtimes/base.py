"""How a language runs inside the sandbox: files in the work dir, argv, and the result."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gristmill.sandbox.base import JobOutcome, JobRequest

WORK = "/work"  # where the job's private directory is mounted inside the sandbox


class Runtime(Protocol):
    def prepare(self, request: JobRequest, workdir: Path, python: str) -> list[str]:
        """Write the job's files into `workdir`; return the argv to run inside the sandbox."""

    def env(self, request: JobRequest) -> dict[str, str]:
        """Variables the runtime adds to the job's environment."""

    def outcome(self, request: JobRequest, workdir: Path, exit_code: int,
                stdout: str) -> JobOutcome:
        """What happened, once the process exited on its own."""
