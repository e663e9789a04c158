"""The command line that puts one job in its sandbox, outermost first.

    setpriv (as root: the job's own uid, no capabilities; killed if the worker dies)
      [pasta ... -- setpriv]  network jobs (--job-network pasta): a user and network
                              namespace with outbound access only (and again killed if
                              pasta dies)
        prlimit (memory, CPU time, processes, file size, open files, no core dumps)
          unshare [--user --map-root-user] --mount --pid --fork --kill-child --mount-proc
            sh MOUNT_DISK (a tmpfs of `disk` bytes and inodes, holding /work and /tmp)
              bwrap (new user, pid, ipc, uts, cgroup [and net] namespaces, no nested user
                     namespaces, read-only system dirs, seccomp filter, empty environment;
                     network jobs keep pasta's network, or with --job-network pod the
                     worker pod's own)
                the runtime's argv

Nothing of a job outlives its worker: the first process dies with the worker
(parent-death signal), unshare's child with unshare (--kill-child), and that
child, the shell that becomes bwrap's monitor, is the init of a pid namespace
holding all the rest, so when it dies for any reason the kernel kills every
process of the job. (bwrap's own sandbox process waits for the monitor at
start-up: without the outer pid namespace, a monitor killed at that moment
left it waiting forever.) What a worker killed at a worse moment leaves (before
the parent-death signal is set, or pasta's child waiting for its parent), the
next worker to start kills (uids.py).

bwrap can cap a tmpfs's size but not its inodes, so the disk is mounted by a
shell in a user and mount namespace of the job's own (no privilege beyond
what bwrap needs: unprivileged user namespaces); it vanishes with the job.
Network jobs get their own network namespace from pasta (Debian's passt),
which carries their connections out through the host's stack; the host's
loopback services and abstract unix sockets stay out of reach (no gateway
mapping to the host, no port forwarding either way). pasta needs /dev/net/tun,
which a Kubernetes pod lacks unless a device plugin gives it one: there network
jobs share the worker pod's own network namespace instead (`--job-network pod`),
which reaches what the pod reaches, its loopback included (process.py checks
that it is a pod's own, never the node's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gristmill.sandbox.base import Limits

SITE_DIR = "/opt/gristmill/site"  # where a job's requirements are mounted
SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/etc")
PATH = "/usr/local/bin:/usr/bin:/bin"
CPU_GRACE_S = 5  # between SIGXCPU and SIGKILL
MAX_OPEN_FILES = 1024

# $1 bytes, $2 inodes, $3 the mount point, $4 what goes on it (work/ and tmp/); then the
# command to run. One cp for both directories: every exec here is paid by every job.
MOUNT_DISK = r"""set -e
mount -n -t tmpfs -o "size=$1,nr_inodes=$2,mode=0755" gristmill-disk "$3"
cp -R --preserve=mode "$4/." "$3"
shift 4
exec "$@"
"""

PASTA = ("pasta", "--config-net", "--quiet", "--foreground",
         # No forwarding of ports in either direction: nothing of the host's loopback (as
         # -T/-U auto would give) and nothing of the job's reachable from outside (-t/-u).
         "--tcp-ports", "none", "--udp-ports", "none", "--tcp-ns", "none", "--udp-ns", "none",
         # The gateway address is the real gateway, not an alias of the host's loopback.
         "--no-map-gw")


@dataclass(frozen=True)
class JobDir:
    """A job's directory on the host: `stage` (work/, what the runtime wrote, and an empty
    tmp/), copied onto the job's tmpfs, and `disk`, where that tmpfs is mounted inside the
    job's own mount namespace only (on the host it stays empty)."""

    root: Path

    @property
    def stage(self) -> Path:
        return self.root / "stage"

    @property
    def files(self) -> Path:
        return self.stage / "work"

    @property
    def disk(self) -> Path:
        return self.root / "disk"

    def create(self) -> None:
        self.files.mkdir(parents=True)
        (self.stage / "tmp").mkdir()
        (self.stage / "tmp").chmod(0o1777)
        self.disk.mkdir()


@dataclass(frozen=True)
class JobFds:
    """File descriptors bwrap is told about (the job's outcome pipe is inherited too, and
    named in the runtime's argv)."""

    seccomp: int  # the filter, read by bwrap
    status: int  # bwrap's JSON status: the job started, and how it ended


def system_binds() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def rlimits(limits: Limits) -> list[str]:
    cpu = max(1, math.ceil(limits.timeout_s * limits.cpu_cores))
    return ["prlimit", f"--as={limits.memory_bytes}", f"--cpu={cpu}:{cpu + CPU_GRACE_S}",
            f"--nproc={limits.max_processes}", f"--fsize={limits.max_file_bytes}",
            "--core=0", f"--nofile={MAX_OPEN_FILES}", "--"]


# Where a network job's network comes from (JobRequest.network asks for one).
NETWORK_PASTA = "pasta"  # a network namespace of the job's own, connected out by pasta
NETWORK_POD = "pod"  # the worker pod's own network namespace, shared
JOB_NETWORKS = (NETWORK_PASTA, NETWORK_POD)


def job_command(*, uid: int | None, limits: Limits, network: str | None, argv: list[str],
                env: Mapping[str, str], job_dir: JobDir, site: Path | None,
                fds: JobFds) -> list[str]:
    """`network`: None for no network, else one of JOB_NETWORKS."""
    if network not in (None, *JOB_NETWORKS):
        raise ValueError(f"unknown job network {network!r}")
    command = ["setpriv", "--pdeathsig", "SIGKILL"]
    if uid is not None:
        command += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                    "--bounding-set=-all"]
    command.append("--")
    # A /proc of the new pid namespace: bwrap looks its child up there by the pid it sees
    # (for --json-status-fd); the /proc of a container's own pid namespace lacks it.
    tree = ["--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--"]
    if network == NETWORK_PASTA:  # outside the rlimits: its buffers alone eat a small --as
        command += [*PASTA, "--", "setpriv", "--pdeathsig", "SIGKILL", "--", *rlimits(limits),
                    "unshare", *tree]
    else:
        command += [*rlimits(limits), "unshare", "--user", "--map-root-user", *tree]
    disk = job_dir.disk
    command += ["/bin/sh", "-c", MOUNT_DISK, "sh", str(limits.disk_bytes),
                str(limits.disk_inodes), str(disk), str(job_dir.stage)]
    # The job sees its own uid, as the host does: bwrap maps it onto the namespace root
    # that unshare or pasta made of it.
    job_uid = uid if uid is not None else os.getuid()
    job_gid = uid if uid is not None else os.getgid()
    command += ["bwrap", "--unshare-user", "--uid", str(job_uid), "--gid", str(job_gid),
                "--disable-userns", "--unshare-all", "--die-with-parent", "--new-session",
                "--cap-drop", "ALL", "--hostname", "sandbox", *system_binds(),
                "--proc", "/proc", "--dev", "/dev",
                "--bind", str(disk / "tmp"), "/tmp", "--bind", str(disk / "work"), "/work",
                "--chdir", "/work", "--clearenv"]
    if network is not None:
        command.append("--share-net")  # pasta's namespace, or the worker pod's
    if site is not None:
        command += ["--ro-bind", str(site), SITE_DIR]
    command += ["--remount-ro", "/",  # after the mounts: only /work and /tmp stay writable
                "--seccomp", str(fds.seccomp), "--json-status-fd", str(fds.status)]
    for name, value in env.items():
        command += ["--setenv", name, value]
    return [*command, "--", *argv]
