"""The command line that puts one job in its sandbox, outermost first.

    setpriv (as root: the job's own uid, no capabilities)
      [pasta ... --]  network jobs: a user and network namespace with outbound access only
        prlimit (memory, CPU time, processes, file size, open files, no core dumps)
          unshare [--user --map-root-user] --mount   (the user namespace: unless pasta's)
            sh MOUNT_DISK (a tmpfs of `disk` bytes and inodes, holding /work and /tmp)
              bwrap (new user, pid, ipc, uts, cgroup [and net] namespaces, no nested user
                     namespaces, read-only system dirs, seccomp filter, empty environment)
                the runtime's argv

bwrap can cap a tmpfs's size but not its inodes, so the disk is mounted by a
shell in a user and mount namespace of the job's own (no privilege beyond
what bwrap needs: unprivileged user namespaces); it vanishes with the job.
Network jobs get their own network namespace from pasta (Debian's passt),
which carries their connections out through the host's stack; the host's
loopback services and abstract unix sockets stay out of reach (no gateway
mapping to the host, no port forwarding either way).
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

# $1 bytes, $2 inodes, $3 the mount point, $4 the job's files; then the command to run.
MOUNT_DISK = r"""set -e
mount -n -t tmpfs -o "size=$1,nr_inodes=$2,mode=0755" gristmill-disk "$3"
mkdir -m 1777 "$3/tmp"
cp -R "$4" "$3/work"
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
    """A job's directory on the host: `files` (what the runtime wrote, copied to /work) and
    `disk`, where the job's tmpfs is mounted inside its own mount namespace only."""

    root: Path

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def disk(self) -> Path:
        return self.root / "disk"


@dataclass(frozen=True)
class JobFds:
    """File descriptors the sandbox inherits (same numbers inside)."""

    seccomp: int  # the filter, read by bwrap
    status: int  # bwrap's JSON status: the job started, and how it ended
    outcome: int  # the runtime's outcome report, written by the job


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


def job_command(*, uid: int | None, limits: Limits, network: bool, argv: list[str],
                env: Mapping[str, str], job_dir: JobDir, site: Path | None,
                fds: JobFds) -> list[str]:
    command: list[str] = []
    if uid is not None:
        command += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--"]
    if network:  # pasta outside the rlimits: its buffers alone would eat a small --as
        command += [*PASTA, "--", *rlimits(limits), "unshare", "--mount", "--"]
    else:
        command += [*rlimits(limits), "unshare", "--user", "--map-root-user", "--mount", "--"]
    disk = job_dir.disk
    command += ["/bin/sh", "-c", MOUNT_DISK, "sh", str(limits.disk_bytes),
                str(limits.disk_inodes), str(disk), str(job_dir.files)]
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
    if network:
        command.append("--share-net")  # pasta's namespace, not the host's
    if site is not None:
        command += ["--ro-bind", str(site), SITE_DIR]
    command += ["--remount-ro", "/",  # after the mounts: only /work and /tmp stay writable
                "--seccomp", str(fds.seccomp), "--json-status-fd", str(fds.status)]
    for name, value in env.items():
        command += ["--setenv", name, value]
    return [*command, "--", *argv]
