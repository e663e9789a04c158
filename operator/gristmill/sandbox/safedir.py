"""Directories only the worker can change: where it keeps what it trusts.

A directory is safe when it, and every directory above it, belong to the
worker's user (or root) and nobody else may write to them, so no other local
user can have planted, swapped or linked anything in it. A world-writable
ancestor is accepted only with the sticky bit (as /tmp has), where others
cannot rename or remove what the worker made. Paths are checked with their
links resolved, so a link cannot lead the check astray.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafePath(RuntimeError):
    """A path another local user may control; the message says which entry and the fix."""


def _trusted_owners() -> set[int]:
    return {0, os.geteuid()}


def _owner_problem(path: Path, st: os.stat_result) -> str | None:
    if st.st_uid not in _trusted_owners():
        return (f"{path} belongs to uid {st.st_uid}, not to the worker (uid {os.geteuid()}) "
                f"or root: another user may have planted it")
    return None


def check_dir(path: Path) -> None:
    """Raise UnsafePath unless `path` (an existing directory) and its ancestors are safe."""
    real = Path(os.path.realpath(path))
    for at, directory in enumerate([*reversed(real.parents), real]):
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{directory} is not a directory")
        problem = _owner_problem(directory, st)
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        is_last = at == len(real.parents)
        if not problem and writable_by_others and (is_last or not st.st_mode & stat.S_ISVTX):
            problem = (f"{directory} is writable by other users (mode "
                       f"{stat.S_IMODE(st.st_mode):o}): chmod go-w {directory}")
        if problem:
            raise UnsafePath(f"refusing {path}: {problem}")


def ensure_dir(path: Path, mode: int) -> Path:
    """Create `path` (and missing parents) owned by the worker with `mode`, or check the one
    there; UnsafePath if it, or anything above it, is not safe."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except FileExistsError:
        raise UnsafePath(f"refusing {path}: it exists and is not a directory") from None
    check_dir(path)
    if stat.S_IMODE(path.stat().st_mode) != mode:
        path.chmod(mode)  # ours (checked above): make it what we need
    return path


def check_tree(root: Path) -> None:
    """Raise UnsafePath unless `root` and every entry under it belong to the worker or root
    and none is writable by others; links are checked, never followed."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):  # a link here would be followed by the walk
        raise UnsafePath(f"{root} is not a directory")
    entries = [root]
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        entries.extend(Path(directory) / name for name in (*dirnames, *filenames))
    for entry in entries:
        st = os.lstat(entry)
        problem = _owner_problem(entry, st)
        if not problem and not stat.S_ISLNK(st.st_mode) and \
                st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = f"{entry} is writable by other users"
        if problem:
            raise UnsafePath(problem)
