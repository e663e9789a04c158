"""An embedded PostgreSQL server for `gristmill dev` and the test suite.

It runs the local server binaries (Debian's postgresql package) on a data dir
of our own, listening only on a Unix socket in that dir and on 127.0.0.1.
Postgres refuses to run as root, so as root the server runs as an unprivileged
user that owns the data dir.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install it with: apt-get install -y postgresql (or pass --database-url)"


class PostgresNotFound(RuntimeError):
    pass


def find_server_binaries() -> Path:
    """The bin dir holding initdb and pg_ctl, newest major version first."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        bin_dir = Path(on_path).resolve().parent  # often a symlink into /usr/lib/postgresql
        if (bin_dir / "initdb").exists() and (bin_dir / "createdb").exists():
            return bin_dir
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for bin_dir in candidates:
        if Path(bin_dir, "initdb").exists() and Path(bin_dir, "pg_ctl").exists():
            return Path(bin_dir)
    raise PostgresNotFound(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """The user to run the server as when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresNotFound("running as root, but neither a 'postgres' nor a 'nobody' user exists")


def _open_path_for(path: Path) -> None:
    """Let an unprivileged server user traverse every parent of `path` (search only, not
    list), and say so: it changes directories outside the data dir."""
    for parent in [path, *path.parents]:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if mode & 0o001 == 0:
            parent.chmod(mode | 0o001)
            print(f"note: made {parent} traversable by others (o+x) so that the PostgreSQL "
                  f"server, which cannot run as root, reaches its data dir; pass --data-dir "
                  f"under /var/tmp or /srv to avoid this", file=sys.stderr)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`; `start()` creates it on first use."""

    data_dir: Path
    port: int = 0
    durable: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).absolute()
        self.bin_dir = find_server_binaries()
        self.user = _server_user()

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "run"

    def url(self, dbname: str = "gristmill") -> str:
        return f"postgresql://gristmill@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self.user is not None:
            cmd = ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}",
                   "--clear-groups", "--", *cmd]
        # A session of its own: Ctrl-C in the terminal must not reach the server, whose
        # SIGINT means "fast shutdown"; `gristmill dev` stops it in order instead.
        result = subprocess.run(cmd, capture_output=True, text=True, cwd="/",
                                start_new_session=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.data_dir, self.socket_dir):
            d.mkdir(exist_ok=True)
            self._chown(d)
        if self.user is not None:
            _open_path_for(self.data_dir)
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "gristmill",
                  "--auth=trust", "--encoding=UTF8", "--no-sync", "--locale=C")

    def start(self) -> str:
        """Start the server (initialising it if needed) and return the URL of its database."""
        if not self.initialised():
            self.init()
        elif (self.pgdata / "postmaster.pid").exists():
            self.stop()  # left running by a session that was killed
        if self.user is not None:
            _open_path_for(self.data_dir)
        self.port = self.port or _free_port()
        options = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.socket_dir}",
            "-c max_connections=200",
            "-c shared_buffers=128MB",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60",
                  "-l", str(self.data_dir / "postgres.log"), "-o", " ".join(options), "start")
        self._run(str(self.bin_dir / "createdb"), "-h", str(self.socket_dir), "-p",
                  str(self.port), "-U", "gristmill", "gristmill", check=False)
        return self.url()

    def create_database(self, name: str) -> str:
        self._run(str(self.bin_dir / "createdb"), "-h", str(self.socket_dir), "-p",
                  str(self.port), "-U", "gristmill", name)
        return self.url(name)

    def restart(self) -> None:
        """Stop and start the server with the same options (what `pg_ctl restart` does on a
        real host: every client connection breaks)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w",
                  "-t", "60", "-l", str(self.data_dir / "postgres.log"), "restart")

    def stop(self) -> None:
        if self.initialised():
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w",
                      "stop", check=False)
