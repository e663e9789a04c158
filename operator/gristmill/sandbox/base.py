"""What an executor is given and what it answers: the contract between worker and sandbox."""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # not imported at run time: a job pod's command starts faster without it
    import asyncio


# The largest result a job may return, as compact JSON: results are stored in PostgreSQL
# and passed to the next steps of a Flow; large data belongs in a bucket or a database.
MAX_RESULT_BYTES = 2**20
BYTES_PER_INODE = 8192  # the disk's cap on files and directories: one per 8 KiB of it
MIN_INODES = 1024


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 900.0  # wall clock of one attempt
    memory_bytes: int = 512 * 2**20
    cpu_cores: float = 1.0  # process sandbox: CPU time is capped at timeout_s * cpu_cores
    max_processes: int = 64
    max_output_bytes: int = 10 * 2**20  # stdout and stderr together
    max_file_bytes: int = 100 * 2**20
    disk_bytes: int = 256 * 2**20  # /work and /tmp together (spec.resources.disk)

    @property
    def disk_inodes(self) -> int:
        """Files and directories /work and /tmp may hold together."""
        return max(MIN_INODES, self.disk_bytes // BYTES_PER_INODE)


@dataclass(frozen=True)
class SecretKeyRef:
    """An environment variable whose value is a key of a Secret in the job's namespace."""

    env_name: str
    secret: str
    key: str
    optional: bool = False


@dataclass(frozen=True)
class SecretEnvFrom:
    """A Secret whose every key becomes an environment variable (`prefix` + key)."""

    secret: str
    prefix: str = ""
    optional: bool = False


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    language: str  # python | bash
    code: str
    input: dict[str, Any]
    input_order: tuple[str, ...] = ()  # bash: the order of positional arguments
    requirements: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # all the job's environment
    network: bool = False
    limits: Limits = Limits()
    # The job's Secrets, as references: the pod executor hands them to the kubelet; for the
    # process executor the worker reads them first (jobsecrets.resolve) into `env`.
    secret_env: tuple[SecretKeyRef, ...] = ()
    secret_env_from: tuple[SecretEnvFrom, ...] = ()

    @property
    def reads_secrets(self) -> bool:
        return bool(self.secret_env or self.secret_env_from)


@dataclass(frozen=True)
class JobOutcome:
    ok: bool
    result: Any = None  # JSON-serialisable
    # {"kind": exception | exit | timeout | memory | cpu | output_limit | killed | cancelled |
    #  setup | result, "message": one line a person can act on, "traceback": optional}
    error: dict[str, Any] | None = None


def failure(kind: str, message: str, **extra: Any) -> JobOutcome:
    return JobOutcome(ok=False, error={"kind": kind, "message": message, **extra})


def killed_by_signal(exit_code: int) -> JobOutcome | None:
    """The failure of a process killed by a signal (as -N from Python, 128+N from a shell),
    or None when it exited on its own."""
    number = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
    if number == signal.SIGKILL:
        return failure("killed", "killed (SIGKILL): out of memory or killed from outside")
    if number == signal.SIGSYS:
        return failure("killed", "killed by the sandbox's seccomp filter (SIGSYS): it made a "
                                 "system call through a foreign ABI (such as 32-bit int 0x80 "
                                 "on x86_64); build it for the host's architecture")
    if 0 < number < 65:
        return failure("killed", f"killed by signal {signal.Signals(number).name}")
    return None


class Executor(Protocol):
    async def run(self, request: JobRequest, on_output: Callable[[str], None],
                  cancel: asyncio.Event) -> JobOutcome: ...
