"""What the worker's user namespace maps, and which uids its jobs may take from it.

On a host (the initial user namespace maps every id) jobs take uids from
200000 up, far from the host's users. A Kubernetes pod with `hostUsers: false`
gets a user namespace of its own mapping 65536 ids (0-65535 inside) onto a host
range no other pod on the node shares; uids outside the map cannot own a file
or run a process there, so its jobs take 10000-59999: above the image's users,
below nobody (65534) and the nonroot user of distroless images (65532). Each pod's
range is its own on the node, so two workers' jobs never share a uid there, and so
never one process limit (RLIMIT_NPROC counts per uid).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from gristmill.sandbox.base import SandboxUnavailable

HOST_RANGE = (200_000, 4096)  # (first uid, how many): a worker on a host
POD_RANGE = (10_000, 50_000)  # a worker in a user namespace of 65536 ids
MIN_UIDS = 64  # fewer than this many ids mapped for jobs is a mistake, not a small pool
_FULL_MAP = (0, 0, 2**32 - 1)  # the initial user namespace's
_NS_GET_USERNS = 0xB701  # ioctl: the user namespace that owns a namespace (linux/nsfs.h)


@dataclass(frozen=True)
class Extent:
    """One line of /proc/PID/uid_map: `count` ids from `inside` map to `outside` on."""

    inside: int
    outside: int
    count: int


def read_map(path: str | Path) -> list[Extent]:
    extents = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            inside, outside, count = (int(field) for field in line.split())
            extents.append(Extent(inside, outside, count))
    return extents


def is_initial(extents: list[Extent]) -> bool:
    """Whether a map is the initial user namespace's (every id mapped onto itself)."""
    return [(e.inside, e.outside, e.count) for e in extents] == [_FULL_MAP]


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace of its own (a `hostUsers: false` pod,
    a rootless container), not the host's."""
    return not is_initial(read_map("/proc/self/uid_map"))


def _mapped_runs(extents: list[Extent], first: int, end: int) -> list[tuple[int, int]]:
    """The parts of [first, end) that `extents` map, as (start, end) pairs."""
    runs = []
    for extent in sorted(extents, key=lambda e: e.inside):
        start, stop = max(first, extent.inside), min(end, extent.inside + extent.count)
        if start < stop:
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
    return runs


def _largest_common_run(uid_map: list[Extent], gid_map: list[Extent], first: int,
                        end: int) -> tuple[int, int]:
    """(first, count) of the longest run in [first, end) mapped as uids and as gids (a job
    takes the same number for both)."""
    best = (first, 0)
    for u_start, u_end in _mapped_runs(uid_map, first, end):
        for g_start, g_end in _mapped_runs(gid_map, u_start, u_end):
            if g_end - g_start > best[1]:
                best = (g_start, g_end - g_start)
    return best


def job_uid_range(uid_map: list[Extent] | None = None,
                  gid_map: list[Extent] | None = None) -> tuple[int, int]:
    """(first, count) of the uids jobs take here: the host range where it is mapped, else
    the pod range as far as it is mapped; SandboxUnavailable when neither is."""
    uid_map = read_map("/proc/self/uid_map") if uid_map is None else uid_map
    gid_map = read_map("/proc/self/gid_map") if gid_map is None else gid_map
    for first, count in (HOST_RANGE, POD_RANGE):
        start, mapped = _largest_common_run(uid_map, gid_map, first, first + count)
        if (first, count) == HOST_RANGE and mapped == count:
            return first, count
        if (first, count) == POD_RANGE and mapped >= MIN_UIDS:
            return start, mapped
    shown = ", ".join(f"{e.inside}-{e.inside + e.count - 1}" for e in uid_map) or "none"
    raise SandboxUnavailable(
        f"the worker's user namespace maps uids {shown}: jobs need at least {MIN_UIDS} uids "
        f"and gids of their own in {POD_RANGE[0]}-{sum(POD_RANGE) - 1} (or all of "
        f"{HOST_RANGE[0]}-{sum(HOST_RANGE) - 1}); in Kubernetes use `hostUsers: false` with "
        f"the kubelet's default of 65536 ids per pod")


def network_belongs_to_this_pod() -> bool:
    """Whether this process's network namespace is owned by its own user namespace, which is
    not the host's: then it was made with or after that namespace (a `hostUsers: false`
    pod's own network), never the node's, which the initial user namespace owns."""
    if not in_user_namespace():
        return False
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        owner = fcntl.ioctl(fd, _NS_GET_USERNS)
    except OSError:  # EPERM: owned by an ancestor of ours, such as the host's
        return False
    finally:
        os.close(fd)
    try:
        mine, its = os.stat("/proc/self/ns/user"), os.fstat(owner)
        return (mine.st_dev, mine.st_ino) == (its.st_dev, its.st_ino)
    finally:
        os.close(owner)
