"""How a language runs inside the sandbox: files in the work dir, argv, and the result.

A runtime's wrapper reports the outcome on a pipe the executor holds (its
write end is the job's file descriptor `outcome_fd`), never in a file the
worker would read back: a job controls its work dir, and a file there can be
a link to a host file, a FIFO that never ends or a device that never stops.
A pipe carries only the bytes the job wrote, and the executor reads at most
MAX_REPORT_BYTES of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gristmill.sandbox.base import MAX_RESULT_BYTES, JobOutcome, JobRequest

WORK = "/work"  # where the job's private directory is mounted inside the sandbox
# The result, plus room for an error message and a traceback.
MAX_REPORT_BYTES = MAX_RESULT_BYTES + 256 * 1024


@dataclass
class Report:
    """What a job wrote on its outcome pipe: up to `cap` bytes, and whether it wrote more."""

    cap: int = MAX_REPORT_BYTES
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflowed: bool = False

    def feed(self, chunk: bytes) -> None:
        """Keep `chunk` while under the cap; past it, only note that there was more (the
        reader keeps draining, so a writer is never left blocked)."""
        if self.overflowed or self.size + len(chunk) > self.cap:
            self.overflowed = True
            return
        self.chunks.append(chunk)
        self.size += len(chunk)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Runtime(Protocol):
    def prepare(self, request: JobRequest, workdir: Path, python: str,
                outcome_fd: int) -> list[str]:
        """Write the job's files into `workdir`; return the argv to run inside the sandbox,
        whose wrapper (if any) writes the outcome to file descriptor `outcome_fd`."""

    def env(self, request: JobRequest) -> dict[str, str]:
        """Variables the runtime adds to the job's environment."""

    def outcome(self, request: JobRequest, exit_code: int, stdout: str,
                report: Report) -> JobOutcome:
        """What happened, once the process exited on its own."""
