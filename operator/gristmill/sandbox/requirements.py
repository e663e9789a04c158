"""Python requirements, installed once per distinct set into a shared read-only cache.

Only wheels are installed (`--only-binary=:all:`), so no package code runs at
install time; the install goes to a temporary directory renamed into place,
under a file lock, so concurrent jobs never see half an install.

What a job imports comes from this cache, so nobody but the worker may write
to it: it lives in a directory of the worker's (root's, as a process-executor
worker runs), never at a path another local user could create first, and the
worker checks the owner and mode of every directory above it and of every
file in an entry before a job uses that entry (see safedir.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from gristmill.sandbox.safedir import UnsafePath, check_tree, ensure_dir


def _default_cache_dir() -> Path:
    # Not under $HOME: /root is closed to the sandbox's uids, which read the installs.
    configured = os.environ.get("GRISTMILL_CACHE_DIR")
    if configured:
        return Path(configured) / "requirements"
    if os.geteuid() == 0:
        return Path("/var/cache/gristmill/requirements")
    return Path(tempfile.gettempdir()) / f"gristmill-cache-{os.geteuid()}" / "requirements"


class RequirementsCache:
    def __init__(self, cache_dir: str | Path | None = None, verify: bool = True):
        """`verify`: check that nobody else can write the cache (off only where the one job
        that uses it could write it anyway, as in a job pod's own work dir)."""
        self.cache_dir = Path(cache_dir or _default_cache_dir()).absolute()
        self.verify = verify
        self.installs = 0  # how many installs this process ran (the cache's misses)
        self._verified: set[str] = set()  # entries checked by this process

    def path_for(self, requirements: Sequence[str]) -> Path:
        key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:32]
        return self.cache_dir / key

    async def ensure(self, requirements: Sequence[str], on_output: Callable[[str], None]) -> Path:
        target = self.path_for(requirements)
        if target.name in self._verified:
            return target
        return await asyncio.to_thread(self.install, requirements, on_output)

    def install(self, requirements: Sequence[str], on_output: Callable[[str], None]) -> Path:
        """ensure(), blocking: where the requirements are installed, installing them once.
        UnsafePath (a RuntimeError) when the cache or the entry is not the worker's alone."""
        target = self.path_for(requirements)
        if target.name in self._verified:
            return target
        if self.verify:
            ensure_dir(self.cache_dir, 0o755)  # ours; the sandbox uids read the installs
        else:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(target):
            return self._checked(target)
        return self._install(list(requirements), target, on_output)

    def _checked(self, target: Path) -> Path:
        if self.verify:
            try:
                check_tree(target)
            except UnsafePath as exc:
                raise UnsafePath(
                    f"the requirements cache entry {target} is not safe to use: {exc}. "
                    f"Remove it (rm -rf {target}) and run the job again") from None
        self._verified.add(target.name)
        return target

    def _install(self, requirements: list[str], target: Path,
                 on_output: Callable[[str], None]) -> Path:
        lock_path = self.cache_dir / f"{target.name}.lock"
        lock_fd = os.open(lock_path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
        with open(lock_fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.lexists(target):  # another worker installed it meanwhile
                return self._checked(target)
            staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=self.cache_dir))
            on_output(f"[gristmill] installing {' '.join(requirements)}\n")
            process = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--target", str(staging),
                 "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
                 "--quiet", *requirements],
                capture_output=True, text=True)
            if process.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                on_output(process.stdout + process.stderr)
                last = (process.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise RuntimeError(f"installing requirements failed: {last}")
            for path in (staging, *staging.rglob("*")):
                if not path.is_symlink():
                    path.chmod(0o755 if path.is_dir() else 0o644)
            staging.rename(target)
            self.installs += 1
            self._verified.add(target.name)
            return target
