"""A small client of the Gristmill HTTP API for the CLI (standard library only)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8080"
FINAL_STATUSES = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """The server refused a request or could not be reached; the message says why."""


def default_server() -> str:
    return os.environ.get("GRISTMILL_SERVER", DEFAULT_SERVER)


class Client:
    def __init__(self, server: str | None = None, timeout: float = 30.0):
        self.server = (server or default_server()).rstrip("/")
        self.timeout = timeout

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.server + path, data=data, method=method,
            headers={"Content-Type": "application/json"} if data else {},
        )
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code} {exc.reason}"
            raise ApiError(message) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"cannot reach the Gristmill API at {self.server} ({reason}); "
                           f"start it with `gristmill dev` or pass --server / set "
                           f"GRISTMILL_SERVER") from None

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def submit_script(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/namespaces/{namespace}/scripts/{name}/runs", body)

    def submit_flow(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/namespaces/{namespace}/flows/{name}/runs", body)

    def decide(self, run_id: str, approve: bool, step: str | None, by: str) -> dict[str, Any]:
        body: dict[str, Any] = {"by": by}
        if step:
            body["step"] = step
        return self._json("POST", f"/api/v1/runs/{run_id}/{'approve' if approve else 'reject'}",
                          body)

    def restart(self, run_id: str, from_step: str) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/runs/{run_id}/restart", {"fromStep": from_step})

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/runs/{run_id}")

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/runs/{run_id}/cancel", {})

    def logs(self, run_id: str, follow: bool = False) -> Iterator[str]:
        query = "?follow=1" if follow else ""
        with self._open("GET", f"/api/v1/runs/{run_id}/logs{query}",
                        timeout=3600 if follow else None) as response:
            while chunk := response.read1(65536):
                yield chunk.decode(errors="replace")

    def log_tail(self, run_id: str, lines: int = 20) -> str:
        text = "".join(self.logs(run_id))
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Poll a run until it ends (or the timeout passes) and return it."""
        deadline = time.monotonic() + timeout if timeout else None
        delay = 0.02
        while True:
            run = self.get_run(run_id)
            if run["status"] in FINAL_STATUSES:
                return run
            if deadline and time.monotonic() > deadline:
                raise ApiError(f"run {run_id} still {run['status']} after {timeout:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
