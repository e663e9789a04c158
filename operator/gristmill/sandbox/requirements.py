"""Python requirements, installed once per distinct set into a shared read-only cache.

Only wheels are installed (`--only-binary=:all:`), so no package code runs at
install time; the install goes to a temporary directory renamed into place,
under a file lock, so concurrent jobs never see half an install.
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


def _default_cache_dir() -> Path:
    # Not under $HOME: /root is closed to the sandbox's uids.
    return Path(os.environ.get("GRISTMILL_CACHE_DIR")
                or Path(tempfile.gettempdir()) / "gristmill-cache") / "requirements"


class RequirementsCache:
    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir or _default_cache_dir())
        self.installs = 0  # how many installs this process ran (the cache's misses)

    def path_for(self, requirements: Sequence[str]) -> Path:
        key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:32]
        return self.cache_dir / key

    async def ensure(self, requirements: Sequence[str], on_output: Callable[[str], None]) -> Path:
        target = self.path_for(requirements)
        if target.exists():
            return target
        return await asyncio.to_thread(self.install, requirements, on_output)

    def install(self, requirements: Sequence[str], on_output: Callable[[str], None]) -> Path:
        """ensure(), blocking: where the requirements are installed, installing them once."""
        target = self.path_for(requirements)
        if target.exists():
            return target
        return self._install(list(requirements), target, on_output)

    def _install(self, requirements: list[str], target: Path,
                 on_output: Callable[[str], None]) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.chmod(0o755)  # ours: the sandbox uids read the installs
        with open(self.cache_dir / f"{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.exists():
                return target
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
            return target
