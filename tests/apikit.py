"""Helpers for API tests: a real API server on loopback (in this process, or as a
`gristmill api` process), the examples applied, raw HTTP requests.

Both servers take one local token (TOKEN, whose caller may do everything; the API's own
tests of who may do what are tests/test_api_access.py); `session()` and
`api_process(...)`'s environment send it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psycopg
from aiohttp import web

from gristmill.api.access import AccessSettings
from gristmill.api.app import ApiSettings, create_app
from gristmill.dev.manifests import apply_manifests

EXAMPLES = Path(__file__).parent.parent / "examples"
TOKEN = "apikit-local-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LOCAL_ACCESS = AccessSettings(authentication="token", token=TOKEN)


def settings(database_url: str, **options) -> ApiSettings:
    """The API's settings for a test: the local token, and `options`."""
    return ApiSettings(database_url, access=LOCAL_ACCESS, **options)


def local_token_args(directory: Path) -> list[str]:
    """`gristmill api` arguments that make it take TOKEN (kept in a file in `directory`)."""
    token_file = directory / "api-token"
    token_file.write_text(TOKEN)
    return ["--authentication", "token", "--token-file", str(token_file)]


def session(**options) -> aiohttp.ClientSession:
    """A client session that sends the local token."""
    return aiohttp.ClientSession(headers=AUTH, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def apply_examples(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        report = await apply_manifests(conn, [EXAMPLES])
    assert not report.errors, [str(e) for e in report.errors]


@contextlib.asynccontextmanager
async def api_in_process(settings: ApiSettings) -> AsyncIterator[str]:
    """The API app served on a loopback port by this test's event loop; yields its URL."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def api_process(database_url: str, *extra: str, log_path: Path | None = None
                ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`gristmill api` as a process of its own; yields its URL and the process. Its
    output goes to `log_path` (read it to look for tracebacks)."""
    port = free_port()
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    token_dir = tempfile.TemporaryDirectory()
    process = subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "api", "--database-url", database_url,
         "--host", "127.0.0.1", "--port", str(port),
         *local_token_args(Path(token_dir.name)), *extra],
        stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "gristmill api exited"
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "gristmill api did not come up"
                time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        if log_path:
            out.close()
        token_dir.cleanup()


async def raw_request(session: aiohttp.ClientSession, method: str, url: str,
                      data: bytes | None = None, headers: dict[str, str] | None = None
                      ) -> tuple[int, dict, bytes]:
    async with session.request(method, url, data=data, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()
