"""A small client of the Gristmill HTTP API for the CLI (standard library only)."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8080"
FINAL_STATUSES = ("succeeded", "failed", "cancelled")


SUBMIT_RETRY_S = 60.0  # how long `run` keeps retrying a submit the server could not take
REFUSED_RETRY_S = 5.0  # ... and a server that refuses connections (restarting, or not there)


class ApiError(Exception):
    """The server refused a request or could not be reached; the message says why.
    `status` is the HTTP status (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None,
                 retry_after: float | None = None, refused: bool = False):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.refused = refused  # nothing listens there: the request never arrived

    @property
    def retryable(self) -> bool:
        """No answer, a 503, or a 409 with Retry-After (the same Idempotency-Key is still
        being served): the same request may succeed in a moment."""
        return (self.status is None or self.status == 503
                or (self.status == 409 and self.retry_after is not None))


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def default_server() -> str:
    return os.environ.get("GRISTMILL_SERVER", DEFAULT_SERVER)


class Client:
    """`token`: the bearer token to send (None: none); `token_source` says where it came
    from, for the message when the server refuses it."""

    def __init__(self, server: str | None = None, timeout: float = 30.0,
                 token: str | None = None, token_source: str = ""):
        self.server = (server or default_server()).rstrip("/")
        self.timeout = timeout
        self.token = token
        self.token_source = token_source

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None,
              headers: dict[str, str] | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.server + path, data=data, method=method,
            headers={**({"Content-Type": "application/json"} if data else {}),
                     **({"Authorization": f"Bearer {self.token}"} if self.token else {}),
                     **(headers or {})},
        )
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
                message = f"HTTP {exc.code} {exc.reason}"
            if exc.code == 401 and self.token_source:
                message += f" (the CLI sent {self.token_source})"
            raise ApiError(message, exc.code, _retry_after(exc.headers.get("Retry-After"))
                           ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ApiError(f"cannot reach the Gristmill API at {self.server} "
                           f"({str(reason) or type(reason).__name__}); start it with "
                           f"`gristmill dev` or pass --server / set GRISTMILL_SERVER",
                           refused=isinstance(reason, ConnectionRefusedError)) from None

    def _json(self, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> Any:
        with self._open(method, path, body, headers=headers) as response:
            try:
                return json.loads(response.read())
            except (OSError, http.client.HTTPException) as exc:  # the answer was cut off
                raise ApiError(f"the connection to {self.server} broke while reading the "
                               f"answer ({exc or type(exc).__name__})") from None

    def submit(self, kind: str, namespace: str, name: str, body: dict[str, Any],
               retry_for: float = 0.0,
               on_retry: Callable[[str], None] | None = None,
               batch: bool = False) -> dict[str, Any]:
        """Start a run of a Script (kind "scripts") or Flow ("flows"); `batch`: up to 1,000
        runs at once (body {"runs": [...]}, all or none). With `retry_for`, the submit is
        sent with an Idempotency-Key and repeated with the same key while the server
        cannot be reached or answers 503, so a retry never makes a second run."""
        path = f"/api/v1/namespaces/{namespace}/{kind}/{name}/runs" + (":batch" if batch else "")
        if retry_for <= 0:
            return self._json("POST", path, body)
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        start = time.monotonic()
        delay = 0.2
        while True:
            try:
                return self._json("POST", path, body, headers=headers)
            except ApiError as exc:
                budget = min(retry_for, REFUSED_RETRY_S) if exc.refused else retry_for
                if not exc.retryable or time.monotonic() + delay > start + budget:
                    raise
                wait = min(exc.retry_after, 5.0) if exc.retry_after is not None else delay
                if on_retry:
                    on_retry(f"{exc}; retrying in {wait:.1f}s")
                time.sleep(wait)
                delay = min(delay * 2, 2.0)

    def submit_script(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.submit("scripts", namespace, name, body)

    def submit_flow(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.submit("flows", namespace, name, body)

    def decide(self, run_id: str, approve: bool, step: str | None) -> dict[str, Any]:
        """As the caller the token belongs to: the server records who decided."""
        body: dict[str, Any] = {}
        if step:
            body["step"] = step
        return self._json("POST", f"/api/v1/runs/{run_id}/{'approve' if approve else 'reject'}",
                          body)

    def restart(self, run_id: str, from_step: str) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/runs/{run_id}/restart", {"fromStep": from_step})

    def pages(self, path: str, query: Mapping[str, str | Sequence[str] | None],
              all_pages: bool = False) -> Iterator[dict[str, Any]]:
        """The pages of a listing ({"items", "next"}): the first, or with `all_pages` each
        in turn, following `next` with the same filters."""
        params = {key: value for key, value in query.items() if value not in (None, [], ())}
        while True:
            page = self._json("GET", f"{path}?{urllib.parse.urlencode(params, doseq=True)}")
            yield page
            if not all_pages or page["next"] is None:
                return
            params["cursor"] = page["next"]

    def list_runs(self, namespace: str, query: Mapping[str, str | Sequence[str] | None],
                  all_pages: bool = False) -> Iterator[dict[str, Any]]:
        return self.pages(f"/api/v1/namespaces/{namespace}/runs", query, all_pages)

    def list_audit(self, namespace: str, query: Mapping[str, str | Sequence[str] | None],
                   all_pages: bool = False) -> Iterator[dict[str, Any]]:
        return self.pages(f"/api/v1/namespaces/{namespace}/audit", query, all_pages)

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
        unavailable_since = None
        while True:
            try:
                run = self.get_run(run_id)
                unavailable_since = None
            except ApiError as exc:  # the run goes on while the API is briefly away
                unavailable_since = unavailable_since or time.monotonic()
                if not exc.retryable or time.monotonic() - unavailable_since > SUBMIT_RETRY_S:
                    raise
                time.sleep(min(exc.retry_after or 1.0, 5.0))
                continue
            if run["status"] in FINAL_STATUSES:
                return run
            if deadline and time.monotonic() > deadline:
                raise ApiError(f"run {run_id} still {run['status']} after {timeout:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
