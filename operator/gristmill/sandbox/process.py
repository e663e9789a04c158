"""The `process` executor: each job in a bubblewrap sandbox of its own, under limits.

As root, the job runs as a uid of its own (one per concurrent job, see uids.py)
with every capability dropped: setpriv -> prlimit -> bwrap. bwrap gives it new
user, pid, net, ipc, uts and mount namespaces, a read-only view of the system
directories only (not /root, /home, /var, /run, /tmp), a private writable work
dir at /work, a private /tmp, no network unless the Script asks, and an empty
environment but for what the Script declares. rlimits cap memory (address
space), CPU time, processes (per uid, hence one uid per job), file size and
core dumps; the worker enforces wall-clock time and output size.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from gristmill.runtimes import get_runtime
from gristmill.sandbox.base import (
    JobOutcome,
    JobRequest,
    Limits,
    SandboxUnavailable,
    failure,
    killed_by_signal,
)
from gristmill.sandbox.requirements import RequirementsCache
from gristmill.sandbox.uids import UidPool

SITE_DIR = "/opt/gristmill/site"  # where a job's requirements are mounted
SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/etc")
PATH = "/usr/local/bin:/usr/bin:/bin"
CPU_GRACE_S = 5  # between SIGXCPU and SIGKILL
_SIGXCPU_EXIT = 128 + signal.SIGXCPU


def sandbox_python() -> str:
    """The interpreter jobs run with: Debian's, unless GRISTMILL_SANDBOX_PYTHON says
    otherwise (it must live under a directory the sandbox mounts, such as /usr)."""
    return os.environ.get("GRISTMILL_SANDBOX_PYTHON") or (
        "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)


def check_sandbox_available() -> None:
    """Fail early, in one line, when the sandbox cannot work on this machine."""
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable("bubblewrap (bwrap) not found; install it with: "
                                 "apt-get install -y bubblewrap")
    if os.geteuid() == 0:
        for tool in ("setpriv", "prlimit"):
            if shutil.which(tool) is None:
                raise SandboxUnavailable(f"{tool} not found; install it with: "
                                         f"apt-get install -y util-linux")
    probe = subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap cannot create namespaces here ({probe.stderr.strip()}); in a "
            f"Kubernetes pod the worker needs a seccomp profile that allows user namespaces, "
            f"or use the pod executor")


def _system_binds() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


class _Stream:
    """Collects a process's output, forwards it as text, and counts it against the cap."""

    def __init__(self, on_output: Callable[[str], None], cap: int, keep: bool):
        self.on_output = on_output
        self.cap = cap
        self.total = 0
        self.kept: list[str] | None = [] if keep else None
        self.exceeded = asyncio.Event()

    async def pump(self, reader: asyncio.StreamReader, counter: list[int]) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := await reader.read(65536):
            counter[0] += len(chunk)
            if counter[0] > self.cap:
                # Past the cap the job is killed; keep draining to EOF, or asyncio never
                # sees the pipe close and the process's exit is never reported.
                self.exceeded.set()
                continue
            text = decoder.decode(chunk)
            if text:
                self.on_output(text)
                if self.kept is not None:
                    self.kept.append(text)


class ProcessExecutor:
    def __init__(self, work_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 python: str | None = None):
        check_sandbox_available()
        self.as_root = os.geteuid() == 0
        self.work_dir = Path(work_dir or os.environ.get("GRISTMILL_WORK_DIR")
                             or Path(tempfile.gettempdir()) / "gristmill-jobs")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.chmod(0o711)  # job uids may enter their own dir, not list the others
        self.python = python or sandbox_python()
        self.requirements = RequirementsCache(cache_dir)
        self.uids = UidPool() if self.as_root else None

    def _command(self, uid: int | None, request: JobRequest, argv: list[str], env: dict[str, str],
                 workdir: Path, site: Path | None) -> list[str]:
        limits = request.limits
        cpu = max(1, math.ceil(limits.timeout_s * limits.cpu_cores))
        command: list[str] = []
        if uid is not None:
            command += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all", "--"]
        command += ["prlimit", f"--as={limits.memory_bytes}", f"--cpu={cpu}:{cpu + CPU_GRACE_S}",
                    f"--nproc={limits.max_processes}", f"--fsize={limits.max_file_bytes}",
                    "--core=0", "--nofile=1024", "--"]
        command += ["bwrap", "--unshare-all", "--die-with-parent", "--new-session",
                    "--cap-drop", "ALL", "--hostname", "sandbox", *_system_binds(),
                    "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                    "--bind", str(workdir), "/work", "--chdir", "/work", "--clearenv"]
        if request.network:
            command.append("--share-net")
        if site is not None:
            command += ["--ro-bind", str(site), SITE_DIR]
        command += ["--remount-ro", "/"]  # after the mounts: only /work and /tmp stay writable
        for name, value in env.items():
            command += ["--setenv", name, value]
        return [*command, "--", *argv]

    def _environment(self, request: JobRequest, site: Path | None) -> dict[str, str]:
        env = {"PATH": PATH, "HOME": "/work", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
        env.update(get_runtime(request.language).env(request))
        if site is not None:
            env["PYTHONPATH"] = SITE_DIR
        env.update(request.env)
        return env

    async def run(self, request: JobRequest, on_output: Callable[[str], None],
                  cancel: asyncio.Event) -> JobOutcome:
        runtime = get_runtime(request.language)
        site = None
        if request.requirements:
            try:
                site = await self.requirements.ensure(request.requirements, on_output)
            except RuntimeError as exc:
                return failure("setup", str(exc))
        with contextlib.ExitStack() as stack:
            uid = stack.enter_context(self.uids.lease()) if self.uids else None
            workdir = Path(tempfile.mkdtemp(prefix=f"job-{request.job_id[:8]}-",
                                            dir=self.work_dir))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            argv = runtime.prepare(request, workdir, self.python)
            if uid is not None:
                for path in (workdir, *workdir.rglob("*")):
                    os.chown(path, uid, uid, follow_symlinks=False)
            workdir.chmod(0o700)
            command = self._command(uid, request, argv, self._environment(request, site),
                                    workdir, site)
            return await self._supervise(request, runtime, command, workdir, on_output, cancel)

    async def _supervise(self, request: JobRequest, runtime, command: list[str], workdir: Path,
                         on_output: Callable[[str], None], cancel: asyncio.Event) -> JobOutcome:
        limits: Limits = request.limits
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd="/", env={"PATH": PATH},
            start_new_session=True)
        counter = [0]
        out = _Stream(on_output, limits.max_output_bytes, keep=True)
        err = _Stream(on_output, limits.max_output_bytes, keep=False)
        pumps = asyncio.gather(out.pump(process.stdout, counter), err.pump(process.stderr, counter))
        waits = {
            "exited": asyncio.ensure_future(asyncio.shield(pumps)),
            "cancelled": asyncio.ensure_future(cancel.wait()),
            "output_limit": asyncio.ensure_future(_either(out.exceeded, err.exceeded)),
        }
        done, _ = await asyncio.wait(waits.values(), timeout=limits.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        reason = next((name for name, fut in waits.items() if fut in done), "timeout")
        if reason != "exited":
            _kill(process)
        exit_code = await process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pumps, 5)
        for fut in waits.values():
            fut.cancel()
        if reason == "timeout":
            return failure("timeout", f"timed out after {limits.timeout_s:g}s (spec.timeout)")
        if reason == "cancelled":
            return failure("cancelled", "cancelled while running")
        if reason == "output_limit":
            return failure("output_limit", f"printed more than {limits.max_output_bytes} bytes "
                                           f"(spec.resources.maxOutput)")
        if exit_code == _SIGXCPU_EXIT or exit_code == -signal.SIGXCPU:
            return failure("cpu", "used up its CPU time (spec.timeout x spec.resources.cpu)")
        outcome = runtime.outcome(request, workdir, exit_code, "".join(out.kept or []))
        if not outcome.ok and outcome.error.get("kind") == "exit":
            return killed_by_signal(exit_code) or outcome
        return outcome


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    tasks = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _kill(process: asyncio.subprocess.Process) -> None:
    # bwrap dies, its pid-1 child gets SIGKILL (--die-with-parent), and with it
    # every process of the job's pid namespace.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
