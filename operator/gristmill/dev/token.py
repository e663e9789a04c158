"""The local API token of `gristmill dev`, and how the CLI finds it.

`gristmill dev` writes a random token to DATA_DIR/api-token (mode 0600) and notes, in a
per-user directory (mode 0700), which data dir serves which local port; the CLI asked
to talk to a loopback server on that port reads the token from there. Nobody but the
user who started `gristmill dev` can read either.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

TOKEN_FILE = "api-token"


def registry_dir(environ: Mapping[str, str]) -> Path:
    runtime = environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(environ.get("HOME", "~")).expanduser() / ".local" / "state"
    return base / "gristmill" / "dev-servers"


def _entry(environ: Mapping[str, str], port: int) -> Path:
    return registry_dir(environ) / f"port-{port}"


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def create(data_dir: Path, port: int, environ: Mapping[str, str]) -> Path:
    """A new token for this run of `gristmill dev`; returns its file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    token_file = data_dir.absolute() / TOKEN_FILE
    _write_private(token_file, secrets.token_urlsafe(32) + "\n")
    registry = registry_dir(environ)
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(_entry(environ, port), str(data_dir.absolute()) + "\n")
    return token_file


def forget(port: int, data_dir: Path, environ: Mapping[str, str]) -> None:
    """On stop: the port is no longer this data dir's (unless another dev took it)."""
    entry = _entry(environ, port)
    with contextlib.suppress(OSError):
        if entry.read_text().strip() == str(data_dir.absolute()):
            entry.unlink()


def find(port: int, environ: Mapping[str, str]) -> str | None:
    """The token of the `gristmill dev` serving `port` on this machine, if this user runs
    one. (Only by the registry: a loopback port may as well be a port-forward to a
    cluster's API, which must get the kubeconfig's credentials, not dev's token.)"""
    with contextlib.suppress(OSError):
        data_dir = Path(_entry(environ, port).read_text().strip())
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    return None
