"""A uid of its own for every job running on this host.

RLIMIT_NPROC counts processes per uid, and a job's files are private to its
uid, so two jobs must never share one, even across worker processes: each
uid is leased by holding an exclusive flock on a file named after it. The lock
files live in a directory only root may write (see safedir.py): a local user
who could create them first could hold every uid, or point them elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from gristmill.sandbox.safedir import ensure_dir

FIRST_UID = 200_000
COUNT = 4096


class UidPool:
    def __init__(self, lock_dir: str | Path | None = None, first: int = FIRST_UID,
                 count: int = COUNT):
        self.lock_dir = ensure_dir(Path(lock_dir or os.environ.get("GRISTMILL_UID_LOCK_DIR")
                                        or "/run/gristmill/uids"), 0o700)
        self.first, self.count = first, count
        self._next = os.getpid() % count  # processes start their search apart

    @contextlib.contextmanager
    def lease(self) -> Iterator[int]:
        for step in range(self.count):
            uid = self.first + (self._next + step) % self.count
            fd = os.open(self.lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._next = (self._next + step + 1) % self.count
            try:
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        raise RuntimeError(f"all {self.count} sandbox uids are in use on this host")
