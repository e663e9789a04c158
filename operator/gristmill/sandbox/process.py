"""The `process` executor: each job in a bubblewrap sandbox of its own, under limits.

As root, the job runs as a uid of its own (one per concurrent job, see uids.py)
with every capability dropped; command.py builds the chain of tools that
confines it. The job sees a read-only view of the system directories only
(not /root, /home, /var, /run), a private /work and /tmp on a tmpfs capped in
bytes and inodes (spec.resources.disk), no network unless the Script asks
(and then a network namespace of its own with outbound access, or with
`job_network="pod"` the worker pod's own network namespace), no nested
user namespaces, a seccomp filter (seccomp.py), and an empty environment but
for what the Script declares. rlimits cap memory (address space), CPU time,
processes (per uid, hence one uid per job), file size and core dumps; the
worker enforces wall-clock time and output size.

The worker reads nothing the job can name: output comes on pipes, the outcome
on a pipe of its own (runtimes/base.py), and bwrap reports on a status pipe
whether the job started at all, which tells a sandbox that could not be set
up from a job that failed.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gristmill.runtimes import get_runtime
from gristmill.runtimes.base import Report
from gristmill.sandbox import diagnose
from gristmill.sandbox.base import (
    JobOutcome,
    JobRequest,
    Limits,
    SandboxUnavailable,
    failure,
    killed_by_signal,
)
from gristmill.sandbox.command import (
    JOB_NETWORKS,
    NETWORK_PASTA,
    NETWORK_POD,
    PATH,
    SITE_DIR,
    JobDir,
    JobFds,
    job_command,
)
from gristmill.sandbox.requirements import RequirementsCache
from gristmill.sandbox.safedir import UnsafePath, ensure_dir
from gristmill.sandbox.seccomp import filter_fd, job_filter
from gristmill.sandbox.uids import UidPool
from gristmill.sandbox.userns import in_user_namespace, network_belongs_to_this_pod
from gristmill.values import clean_text

__all__ = ["PATH", "SITE_DIR", "ProcessExecutor", "check_sandbox_available", "drain_pipe",
           "sandbox_python"]

_SIGXCPU_EXIT = 128 + signal.SIGXCPU
STDERR_TAIL = 4096  # characters of stderr kept to explain a sandbox that did not start
TUN = "/dev/net/tun"
POD_NETWORK_NOTE = ("[gristmill] this job shares the worker pod's network (the worker runs "
                    "with --job-network pod): it reaches what the pod reaches, the pod's "
                    "localhost included\n")
log = logging.getLogger("gristmill.sandbox")


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
    tools = ["unshare", "prlimit", "mount"] + (["setpriv"] if os.geteuid() == 0 else [])
    for tool in tools:
        if shutil.which(tool) is None:
            package = "mount" if tool == "mount" else "util-linux"
            raise SandboxUnavailable(f"{tool} not found; install it with: "
                                     f"apt-get install -y {package}")
    job_filter()  # libseccomp present and the filter compiles
    if os.geteuid() == 0:
        return  # jobs never run bwrap as root: ProcessExecutor starts a whole job instead
    # Necessary, not sufficient: ProcessExecutor then starts a whole job before it serves.
    probe = subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise SandboxUnavailable(f"bubblewrap cannot create namespaces here "
                                 f"({probe.stderr.strip()}); {diagnose.advice()}")


def network_problem(job_network: str = NETWORK_PASTA) -> str | None:
    """Why `network: true` jobs cannot run here, or None."""
    if job_network == NETWORK_POD:
        if network_belongs_to_this_pod():
            return None
        return ("sandbox.network: the worker runs with --job-network pod, which shares the "
                "worker pod's own network namespace with network jobs, but this worker's is "
                "not a pod's own (it is not owned by the worker's user namespace, so it may be "
                "the node's): run the worker in a pod with hostUsers: false, or with "
                "--job-network pasta where /dev/net/tun is available")
    if shutil.which("pasta") is None:
        return ("sandbox.network needs pasta on the worker: apt-get install -y passt")
    try:
        st = os.stat(TUN)
    except OSError:
        st = None
    if st is None or not stat.S_ISCHR(st.st_mode) or st.st_mode & 0o006 != 0o006:
        return (f"sandbox.network needs {TUN} that every user may open (mode 0666, as udev "
                f"makes it): chmod 0666 {TUN} (as root); in Kubernetes, where a pod has no "
                f"{TUN}, run the worker with --job-network pod (the operator does)")
    return None


def _check_reachable(work_dir: Path) -> None:
    """Job uids start in their dir under `work_dir`: every directory above it must let
    others through."""
    for directory in work_dir.parents:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise SandboxUnavailable(
                f"the sandbox's uids cannot reach the work dir {work_dir}: {directory} is "
                f"mode {stat.S_IMODE(directory.stat().st_mode):o}; chmod o+x {directory}, or "
                f"use a work dir whose parents others may enter")


def _default_work_dir() -> Path:
    configured = os.environ.get("GRISTMILL_WORK_DIR")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/lib/gristmill/jobs")
    return Path(tempfile.gettempdir()) / f"gristmill-jobs-{os.geteuid()}"


class _Stream:
    """Collects a process's output, forwards it as text, and counts it against the cap."""

    def __init__(self, on_output: Callable[[str], None], cap: int, keep: bool):
        self.on_output = on_output
        self.cap = cap
        self.total = 0
        self.kept: list[str] | None = [] if keep else None
        self.tail = ""
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
                shown = clean_text(text)  # the log; the result (bash's stdout) is checked
                self.on_output(shown)
                self.tail = (self.tail + shown)[-STDERR_TAIL:]
                if self.kept is not None:
                    self.kept.append(text)


async def drain_pipe(fd: int, feed: Callable[[bytes], None]) -> None:
    """Read the pipe `fd` (ours, closed here) to its end, handing each chunk to `feed`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    try:
        while chunk := await reader.read(65536):
            feed(chunk)
    finally:
        transport.close()


def _started(status: bytes) -> bool:
    """Whether bwrap's JSON status says the job's process started."""
    for line in status.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            if "child-pid" in json.loads(line):
                return True
    return False


class ProcessExecutor:
    def __init__(self, work_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 python: str | None = None, uids: UidPool | None = None,
                 job_network: str = NETWORK_PASTA):
        """`job_network`: where network jobs' network comes from (command.JOB_NETWORKS)."""
        if job_network not in JOB_NETWORKS:
            raise SandboxUnavailable(f"unknown job network {job_network!r}: choose one of "
                                     f"{', '.join(JOB_NETWORKS)}")
        self.job_network = job_network
        check_sandbox_available()
        self.as_root = os.geteuid() == 0
        try:  # job uids may enter their own dir, not list the others
            self.work_dir = ensure_dir(Path(work_dir or _default_work_dir()).absolute(), 0o711)
        except UnsafePath as exc:
            raise SandboxUnavailable(f"the work dir is not safe: {exc}") from None
        self.python = python or sandbox_python()
        self.requirements = RequirementsCache(cache_dir)
        self.uids = (uids or UidPool()) if self.as_root else None
        if self.uids is not None:
            _check_reachable(self.work_dir)
            self.uids.reap_orphans()  # what a worker that died here left behind
            self._remove_stale_job_dirs()
        self._probe()
        self._warn_if_the_nodes_root()
        self._announce_network()

    def _warn_if_the_nodes_root(self) -> None:
        """A worker pod is meant to be root over its own user namespace only: one that runs
        as the node's root was given hostUsers: false by a runtime that ignored it."""
        if self.as_root and os.environ.get("KUBERNETES_SERVICE_HOST") and \
                not in_user_namespace():
            log.warning("this worker runs in a Kubernetes pod as the node's root (no user "
                        "namespace of its own: the container runtime ignored hostUsers: "
                        "false, as containerd 1.6 and older do); its jobs' uids are shared "
                        "with every such pod on the node. Use containerd 2.0+ or CRI-O "
                        "1.25+ on the nodes, or executor: pod")

    def _announce_network(self) -> None:
        """Say at start-up where network jobs' network comes from, unless it is their own."""
        if self.job_network != NETWORK_POD:
            return
        problem = network_problem(NETWORK_POD)
        if problem:
            log.warning("%s; network jobs will fail", problem)
        else:
            log.warning("network jobs share this worker pod's own network namespace "
                        "(--job-network pod): they reach what the pod reaches, its localhost "
                        "(the worker's health port) included, but not the node's")

    def _remove_stale_job_dirs(self) -> None:
        """Job dirs of a worker that died: each is named after its job's uid (job-UID-...),
        which no lease holds any more."""
        for entry in os.scandir(self.work_dir):
            parts = entry.name.split("-")
            if len(parts) < 3 or parts[0] != "job" or not parts[1].isdigit():
                continue
            with self.uids.if_free(int(parts[1])) as free:
                if free:
                    shutil.rmtree(entry.path, ignore_errors=True)

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
        if request.reads_secrets:  # the worker reads them into env first (worker/secret_env)
            return failure("setup", "the job's Secret references were not read: the process "
                                    "executor runs jobs whose Secrets are already in their env")
        if request.network and (problem := network_problem(self.job_network)):
            return failure("setup", problem)
        if request.network and self.job_network == NETWORK_POD:
            on_output(POD_NETWORK_NOTE)
        site = None
        if request.requirements:
            try:
                site = await self.requirements.ensure(request.requirements, on_output)
            except RuntimeError as exc:
                return failure("setup", str(exc))
        with self._launch(request, runtime, site) as launch:
            return await self._supervise(request, runtime, launch, on_output, cancel)

    @contextlib.contextmanager
    def _launch(self, request: JobRequest, runtime, site: Path | None) -> Iterator[_Launch]:
        """Everything one job's sandbox needs: a uid, its files, its pipes, its command."""
        with contextlib.ExitStack() as stack:
            uid = stack.enter_context(self.uids.lease()) if self.uids else None
            job_dir = JobDir(Path(tempfile.mkdtemp(
                prefix=f"job-{uid if uid is not None else 'u'}-{request.job_id[:8]}-",
                dir=self.work_dir)))
            stack.callback(shutil.rmtree, job_dir.root, ignore_errors=True)
            job_dir.create()
            fds = stack.enter_context(_OwnedFds())
            report_read, report_write = fds.add(*os.pipe())
            status_read, status_write = fds.add(*os.pipe())
            seccomp = fds.add(filter_fd())[0]
            argv = runtime.prepare(request, job_dir.files, self.python, report_write)
            if uid is not None:
                for path in (job_dir.root, *job_dir.root.rglob("*")):
                    os.chown(path, uid, uid, follow_symlinks=False)
            job_dir.root.chmod(0o700)
            network = self.job_network if request.network else None
            command = job_command(uid=uid, limits=request.limits, network=network,
                                  argv=argv, env=self._environment(request, site),
                                  job_dir=job_dir, site=site,
                                  fds=JobFds(seccomp=seccomp, status=status_write))
            yield _Launch(command, fds, (report_write, status_write, seccomp), report_read,
                          status_read)

    def _probe(self) -> None:
        """Start what every job starts, with `true` for the job, so that a sandbox that
        cannot work here says why at start-up rather than in every job."""
        request = JobRequest(job_id="probe000", language="bash", code="true", input={})
        with self._launch(request, get_runtime("bash"), None) as launch:
            process = subprocess.Popen(launch.command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       cwd="/", env={"PATH": PATH}, start_new_session=True,
                                       pass_fds=launch.child_ends)
            for fd in launch.child_ends:
                launch.fds.close(fd)
            _, stderr = process.communicate(timeout=60)
            with open(launch.fds.release(launch.status_read), "rb") as status_pipe:
                status = status_pipe.read()
        if process.returncode != 0 or not _started(status):
            tail = stderr.decode(errors="replace").strip()[-STDERR_TAIL:]
            raise SandboxUnavailable(f"the sandbox cannot start a job here "
                                     f"({tail or f'exit code {process.returncode}'}); "
                                     f"{diagnose.advice()}")

    async def _supervise(self, request: JobRequest, runtime, launch: _Launch,
                         on_output: Callable[[str], None], cancel: asyncio.Event) -> JobOutcome:
        limits: Limits = request.limits
        fds = launch.fds
        process = await asyncio.create_subprocess_exec(
            *launch.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd="/", env={"PATH": PATH},
            start_new_session=True, pass_fds=launch.child_ends)
        for fd in launch.child_ends:  # only the sandbox holds them now: EOF when it ends
            fds.close(fd)
        report, status = Report(), bytearray()
        report_read, status_read = launch.report_read, launch.status_read
        counter = [0]
        out = _Stream(on_output, limits.max_output_bytes, keep=True)
        err = _Stream(on_output, limits.max_output_bytes, keep=False)
        pumps = asyncio.gather(out.pump(process.stdout, counter), err.pump(process.stderr, counter),
                               drain_pipe(fds.release(report_read), report.feed),
                               drain_pipe(fds.release(status_read), status.extend))
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
        if not _started(bytes(status)):
            tail = err.tail.strip() or f"exit code {exit_code}"
            if "No space left on device" in tail:
                tail += " (the job's code and input must fit in spec.resources.disk)"
            return failure("setup", f"the sandbox could not start the job: {tail}")
        if exit_code == _SIGXCPU_EXIT or exit_code == -signal.SIGXCPU:
            return failure("cpu", "used up its CPU time (spec.timeout x spec.resources.cpu)")
        outcome = runtime.outcome(request, exit_code, "".join(out.kept or []), report)
        if not outcome.ok and outcome.error.get("kind") == "exit":
            return killed_by_signal(exit_code) or outcome
        return outcome


@dataclass(frozen=True)
class _Launch:
    command: list[str]
    fds: _OwnedFds
    child_ends: tuple[int, ...]  # the outcome, status and seccomp fds the sandbox inherits
    report_read: int
    status_read: int


class _OwnedFds(contextlib.AbstractContextManager):
    """File descriptors this job's run must close, each exactly once: closing a number twice
    could close another job's pipe that reused it."""

    def __init__(self) -> None:
        self.open: set[int] = set()

    def add(self, *fds: int) -> tuple[int, ...]:
        self.open.update(fds)
        return fds

    def release(self, fd: int) -> int:
        """`fd`, now closed by whoever it is handed to."""
        self.open.remove(fd)
        return fd

    def close(self, fd: int) -> None:
        if fd in self.open:
            self.open.remove(fd)
            os.close(fd)

    def __exit__(self, *exc_info) -> None:
        for fd in list(self.open):
            self.close(fd)


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    tasks = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _kill(process: asyncio.subprocess.Process) -> None:
    # bwrap dies, its pid-1 child gets SIGKILL (--die-with-parent), and with it
    # every process of the job's pid namespace; pasta, for network jobs, is in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
