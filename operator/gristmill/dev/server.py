"""`gristmill dev`: Postgres, the API and local workers in one command, no cluster.

The workers are real `gristmill worker` processes (what a WorkerGroup's pods
run), supervised here and restarted if they die. Manifests are re-applied
when their files change. The API takes one random local token (dev/token.py), which
the CLI finds by itself; a caller without it gets a 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import logging
import os
import re
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from gristmill.api.access import AccessSettings
from gristmill.api.app import ApiSettings
from gristmill.api.server import serve
from gristmill.dev import token as dev_token
from gristmill.dev.manifests import apply_manifests
from gristmill.dev.postgres import EmbeddedPostgres
from gristmill.housekeeping import DEFAULT_RETENTION, run_housekeeping
from gristmill.sandbox.process import check_sandbox_available
from gristmill.store.migrate import migrate_url

log = logging.getLogger("gristmill.dev")

PR_SET_PDEATHSIG = 1  # prctl(2)
RELOAD_INTERVAL_S = 1.0
WORKER_STOP_TIMEOUT_S = 15.0


@dataclass
class DevOptions:
    paths: list[str]
    database_url: str | None
    data_dir: Path
    workers: int
    host: str = "127.0.0.1"
    port: int = 8080
    retention: dt.timedelta = DEFAULT_RETENTION
    environ: Mapping[str, str] = field(default_factory=dict)  # where the token is noted
    secrets: list[str] = field(default_factory=list)  # Secret manifests beyond `paths`


def _manifest_snapshot(paths: list[str]) -> dict[str, tuple[float, int]]:
    """mtime and size of every manifest file under `paths`, to notice edits."""
    snapshot = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else [
            p for p in root.rglob("*") if p.suffix in (".yaml", ".yml")]
        for path in files:
            with contextlib.suppress(OSError):
                stat = path.stat()
                snapshot[str(path)] = (stat.st_mtime, stat.st_size)
    return snapshot


def _terminate_with_parent(parent: int):
    """A preexec_fn asking the kernel to SIGTERM the child when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arrange() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return arrange


class WorkerPool:
    """N `gristmill worker` processes serving every tag, restarted when they die."""

    def __init__(self, database_url: str, count: int, secrets: list[str] | None = None):
        self.database_url = database_url
        self.count = count
        # Where the workers read jobs' Secrets (Secret manifests), instead of a cluster.
        self.secret_args = [arg for path in secrets or []
                            for arg in ("--secrets", str(Path(path).resolve()))]
        self.processes: list[asyncio.subprocess.Process] = []

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {**os.environ, "GRISTMILL_DATABASE_URL": self.database_url}
        # A session of its own: Ctrl-C reaches `dev`, which stops workers in order. And
        # SIGTERM when `dev` dies, even of SIGKILL: no worker outlives it.
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gristmill.cli", "worker", "--tags", "*", "--concurrency", "1",
            *self.secret_args, env=env, start_new_session=True, preexec_fn=_terminate_with_parent(os.getpid()))

    async def start(self) -> None:
        self.processes = [await self._spawn() for _ in range(self.count)]

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(1)
            for i, process in enumerate(self.processes):
                if process.returncode is not None:
                    log.warning("worker %d exited with %s; restarting it", i, process.returncode)
                    self.processes[i] = await self._spawn()

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), WORKER_STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _reload_forever(url: str, paths: list[str], names: set[tuple[str, str]]) -> None:
    """Re-apply the manifests when a file changes. Nothing a file holds stops this loop: a
    failed reload is reported and tried again (quietly) until a later edit fixes it."""
    snapshot = _manifest_snapshot(paths)
    last_failure = None
    while True:
        await asyncio.sleep(RELOAD_INTERVAL_S)
        try:
            current = _manifest_snapshot(paths)
            if current == snapshot:
                continue
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                report = await apply_manifests(conn, paths, previously=names)
        except Exception as exc:  # noqa: BLE001 (the loop must outlive any one reload)
            failure = f"[reload] failed: {type(exc).__name__}: {exc}"[:2000]
            if failure != last_failure:
                print(f"{failure}; retrying", flush=True)
                log.debug("reload failed", exc_info=True)
            last_failure, snapshot = failure, {}  # {}: try again next round
            continue
        snapshot, last_failure = current, None
        names.clear()
        names.update(report.names)
        for line in report.lines() or ["manifests changed; nothing to apply"]:
            print(f"[reload] {line}", flush=True)


def _without_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


async def run_dev(options: DevOptions, stop: asyncio.Event) -> int:
    check_sandbox_available()
    for path in options.paths:
        if not Path(path).exists():
            print(f"gristmill: {path}: no such file or directory", file=sys.stderr)
            return 2
    server = None
    url = options.database_url
    if url is None:
        server = EmbeddedPostgres(options.data_dir.absolute() / "postgres")
        url = await asyncio.to_thread(server.start)
    workers = WorkerPool(url, options.workers, [*options.paths, *options.secrets])
    tasks: dict[asyncio.Task, str] = {}
    api = None
    try:
        await migrate_url(url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            report = await apply_manifests(conn, options.paths)
        for line in report.lines():
            print(line, flush=True)
        names = set(report.names)
        await workers.start()
        api_stop = asyncio.Event()
        token_file = dev_token.create(options.data_dir, options.port, options.environ)
        settings = ApiSettings(url, access=AccessSettings(
            authentication="token", token=token_file.read_text().strip()))
        api = asyncio.create_task(serve(settings, options.host, options.port, api_stop))
        tasks = {
            api: "the API",
            asyncio.create_task(workers.supervise()): "the worker supervisor",
            asyncio.create_task(_reload_forever(url, options.paths, names)): "the reloader",
            asyncio.create_task(run_housekeeping(url, options.retention, api_stop)):
                "housekeeping",
        }
        await asyncio.sleep(0.2)  # let the API bind, or fail to
        for task in tasks:
            if task.done():
                task.result()
        print(f"gristmill dev: API on http://{options.host}:{options.port}, "
              f"{options.workers} worker(s), database "
              f"{server.display_url() if server else _without_password(url)}\n"
              f"  try: gristmill run script NAME --input '{{...}}' --wait   (Ctrl-C to stop)\n"
              f"  the CLI finds the API token by itself; for curl or another shell:\n"
              f"    export GRISTMILL_TOKEN=\"$(cat {token_file})\"",
              flush=True)
        stop_wait = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        # Every part runs until told to stop: one that ends is a bug, and dev says so.
        died = [task for task in done if task in tasks]
        for task in died:
            error = task.exception()
            if isinstance(error, OSError):
                raise error  # the API's port, say: reported below in one line
            log.critical("%s stopped unexpectedly; stopping gristmill dev", tasks[task],
                         exc_info=error)
        print("gristmill dev: stopping", flush=True)
        api_stop.set()
        return 1 if died else 0
    except OSError as exc:
        print(f"gristmill: {exc}", file=sys.stderr)
        return 1
    finally:
        for task in tasks:
            if task is not api:  # the API stops on api_stop, in order
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await workers.stop()
        dev_token.forget(options.port, options.data_dir, options.environ)
        if server is not None:
            await asyncio.to_thread(server.stop)
