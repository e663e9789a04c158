"""An embedded PostgreSQL server for `gristmill dev` and the test suite.

It runs the local server binaries (Debian's postgresql package) on a data dir
of our own, listening only on a Unix socket in that dir and on 127.0.0.1.
Postgres refuses to run as root, so as root the server runs as an unprivileged
user that owns the data dir.

Every connection needs a password (SCRAM), a random one kept in the data dir
(mode 0600): 127.0.0.1 is reachable by anything on the machine, and a trusted
superuser there could run programs as the server's user. The server keeps its
port across restarts, kept in the data dir too.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

INSTALL_HINT = "install it with: apt-get install -y postgresql (or pass --database-url)"
PORT_ATTEMPTS = 3  # starts on a fresh port when another process won the race for ours


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


def _free_port(wanted: int = 0) -> int:
    """`wanted` if it is free on 127.0.0.1, else any free port."""
    with socket.socket() as s:
        # As the server binds: connections of its last run, in TIME_WAIT, do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", wanted))
        except OSError:
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
    # Another address to listen on, and the network allowed to log in there (the test
    # cluster's pod network); by default 127.0.0.1 alone.
    also_listen: str | None = None
    also_allow: str | None = None
    max_connections: int = 200

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).absolute()
        self.bin_dir = find_server_binaries()
        self.user = _server_user()
        if not self.port:
            with contextlib.suppress(OSError, ValueError):  # the port it had last time
                self.port = int(self.port_file.read_text())

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "password"

    @property
    def port_file(self) -> Path:
        return self.data_dir / "port"

    def password(self) -> str:
        """The superuser's password, made on first use (readable by us alone)."""
        with contextlib.suppress(FileExistsError):
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return self.password_file.read_text().strip()

    def url(self, dbname: str = "gristmill", host: str = "127.0.0.1") -> str:
        return f"postgresql://gristmill:{self.password()}@{host}:{self.port}/{dbname}"

    def _allow(self, network: str) -> None:
        hba = self.pgdata / "pg_hba.conf"
        line = f"host all all {network} scram-sha-256"
        if line not in hba.read_text():
            with hba.open("a") as f:
                f.write(line + "\n")

    def display_url(self, dbname: str = "gristmill") -> str:
        """The URL without its password, for printing."""
        return (f"postgresql://gristmill:***@127.0.0.1:{self.port}/{dbname} "
                f"(password in {self.password_file})")

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
        # initdb reads the password from a file, as the server's user: one made for it alone.
        handed = self.data_dir / "initdb-password"
        handed.write_text(self.password())
        handed.chmod(0o600)
        self._chown(handed)
        try:
            self._run(str(self.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "gristmill",
                      "--auth=scram-sha-256", f"--pwfile={handed}", "--encoding=UTF8",
                      "--no-sync", "--locale=C")
        finally:
            handed.unlink()

    def _choose_port(self) -> int:
        """The port used last time when it is still free, so URLs stay valid across
        restarts; else a new one, remembered for next time."""
        port = _free_port(self.port)
        if self.port and port != self.port:
            print(f"note: port {self.port} of the embedded PostgreSQL is taken; it now listens "
                  f"on {port}", file=sys.stderr)
        self.port_file.write_text(f"{port}\n")
        return port

    def start(self) -> str:
        """Start the server (initialising it if needed) and return the URL of its database."""
        if not self.initialised():
            self.init()
        elif (self.pgdata / "postmaster.pid").exists():
            self.stop()  # left running by a session that was killed
        if self.user is not None:
            _open_path_for(self.data_dir)
        if self.also_allow:
            self._allow(self.also_allow)
        for attempt in range(PORT_ATTEMPTS):
            self.port = self._choose_port()
            try:
                self._start_server()
                break
            except RuntimeError:
                # Another process took the port between our check and the server's bind.
                if attempt + 1 == PORT_ATTEMPTS or not self._lost_port_race():
                    raise
                self.port = 0
        if self._trusts_everyone():
            self._require_passwords()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'gristmill'")
            if exists.fetchone() is None:
                conn.execute("CREATE DATABASE gristmill")
        return self.url()

    def _lost_port_race(self) -> bool:
        log = self.data_dir / "postgres.log"
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        return "could not bind" in tail or "Address already in use" in tail

    def _start_server(self) -> None:
        options = [
            f"-p {self.port}",
            f"-c listen_addresses=127.0.0.1{',' + self.also_listen if self.also_listen else ''}",
            f"-c unix_socket_directories={self.socket_dir}",
            f"-c max_connections={self.max_connections}",
            "-c shared_buffers=128MB",
            # The queue's table churns: vacuum every 10 s, as the chart's bundled database.
            "-c autovacuum_naptime=10s",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60",
                  "-l", str(self.data_dir / "postgres.log"), "-o", " ".join(options), "start")

    def _trusts_everyone(self) -> bool:
        """A data dir made by an earlier release, whose server let anyone in."""
        hba = (self.pgdata / "pg_hba.conf").read_text()
        return any(line.split()[-1] == "trust" for line in hba.splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))

    def _require_passwords(self) -> None:
        """Give the superuser its password (over the socket, while trust still lets us in),
        then make every connection prove it."""
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user="gristmill",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(sql.SQL("ALTER ROLE gristmill PASSWORD {}").format(
                sql.Literal(self.password())))
            hba = self.pgdata / "pg_hba.conf"
            hba.write_text(re.sub(r"\btrust\s*$", "scram-sha-256", hba.read_text(),
                                  flags=re.MULTILINE))
            conn.execute("SELECT pg_reload_conf()")
        print(f"note: the embedded PostgreSQL in {self.data_dir} now requires a password "
              f"(kept in {self.password_file})", file=sys.stderr)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
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
