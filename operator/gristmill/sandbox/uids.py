"""A uid of its own for every job running on this host.

RLIMIT_NPROC counts processes per uid, and a job's files are private to its
uid, so two jobs must never share one, even across worker processes: each
uid is leased by holding an exclusive flock on a file named after it. The
uids come from those the worker's user namespace maps (userns.py): 200000 up
on a host, 10000-59999 in a pod of its own user namespace, whose host ids no
other pod on the node shares. The lock files live in a directory only root
may write (see safedir.py): a local user who could create them first could
hold every uid, or point them elsewhere.

A uid nobody holds has no job, so a sandbox still running as it was left by a
worker that died at a moment its jobs could not follow it (pasta's or bwrap's
start-up, which wait on their parent): a starting worker kills those
(reap_orphans), holding each uid's lock while it does. It kills the sandbox's
own processes (command.py's chain, known by its arguments); each is the init
of a pid namespace or has its child die with it, so the kernel takes the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from gristmill.sandbox.safedir import ensure_dir
from gristmill.sandbox.userns import job_uid_range

# Arguments only the sandbox's own processes carry (command.py): bwrap, pasta, unshare.
CHAIN_MARKS = (b"--disable-userns", b"--no-map-gw", b"--kill-child")


class UidPool:
    def __init__(self, lock_dir: str | Path | None = None, first: int | None = None,
                 count: int | None = None):
        """`first` and `count`: the uids to lease (default: job_uid_range())."""
        self.lock_dir = ensure_dir(Path(lock_dir or os.environ.get("GRISTMILL_UID_LOCK_DIR")
                                        or "/run/gristmill/uids"), 0o700)
        if first is None or count is None:
            first, count = job_uid_range()
        self.first, self.count = first, count
        self._next = os.getpid() % count  # processes start their search apart

    def _try_lock(self, uid: int) -> int | None:
        """The fd holding `uid`'s lock, or None when another lease holds it."""
        fd = os.open(self.lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @contextlib.contextmanager
    def lease(self) -> Iterator[int]:
        for step in range(self.count):
            uid = self.first + (self._next + step) % self.count
            fd = self._try_lock(uid)
            if fd is None:
                continue
            self._next = (self._next + step + 1) % self.count
            try:
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        raise RuntimeError(f"all {self.count} sandbox uids are in use on this host")

    @contextlib.contextmanager
    def if_free(self, uid: int) -> Iterator[bool]:
        """Hold `uid`'s lock while the block runs, if no lease holds it: whether it was free."""
        fd = self._try_lock(uid) if self.first <= uid < self.first + self.count else None
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def reap_orphans(self) -> int:
        """Kill every process running as a uid of the pool that no lease holds; how many."""
        by_uid: dict[int, list[int]] = defaultdict(list)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:  # not the owner of /proc/PID: a process that is not dumpable shows root's
                with open(f"/proc/{entry.name}/status") as status:
                    fields = dict(line.split(":", 1) for line in status if ":" in line)
                uid = int(fields["Uid"].split()[0])
                if not self.first <= uid < self.first + self.count:
                    continue
                with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                    arguments = cmdline.read().split(b"\0")
            except (OSError, KeyError, ValueError):
                continue
            if fields.get("State", "").strip().startswith("Z"):
                continue  # already dead, waiting for its parent
            if not any(mark in arguments for mark in CHAIN_MARKS):
                continue
            by_uid[uid].append(int(entry.name))
        killed = 0
        for uid, pids in by_uid.items():
            with self.if_free(uid) as free:
                if not free:
                    continue  # a live job's
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed += 1
        return killed
