"""One watch of a worker's job pods, shared by all the jobs it runs.

The pod executor learns every change of its job pods from one label-selected
list-then-watch, as a client-go informer does: a job waits on it instead of
polling its pod, so a pending or running pod costs no requests. The watch
resumes after the last resourceVersion it saw. When the API server no longer
has that version (410 Gone) it lists again, and a pod missing from the new
list has gone. Whatever breaks (a timeout, a restart of the API server, a
refused request), it reconnects with backoff, and a pod's end is never lost:
the pod object keeps its final status, and the next list or watch shows it.

The API client blocks, so the watch runs in a daemon thread of its own and
hands what it sees to the event loop, where all the state lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

log = logging.getLogger("gristmill.sandbox.pod")
WATCH_S = 300  # the API server ends each watch after this; the next resumes where it ended
READ_SLACK_S = 30  # beyond WATCH_S before a silent connection counts as dead
BACKOFF_S = (0.5, 30.0)  # first and longest wait before reconnecting
SHORT_WATCH_S = 1.0  # a watch that ends sooner without an event counts as trouble


class Gone(Exception):
    """The API server no longer has the resourceVersion the watch would resume from."""


class PodState:
    """What the watch last saw of one job pod."""

    def __init__(self) -> None:
        self.pod: dict[str, Any] | None = None  # the last object seen
        self.gone = False  # deleted, or missing from a list made after its creation
        self.created_at: float | None = None  # monotonic, when its create was answered
        self.changed = asyncio.Event()  # set on every change; a waiter clears it first

    @property
    def status(self) -> dict[str, Any]:
        return (self.pod or {}).get("status") or {}


class PodWatch:
    def __init__(self, core: Any, namespace: str, selector: str):
        self.core, self.namespace, self.selector = core, namespace, selector
        self.states: dict[str, PodState] = {}  # by pod name: the pods of running jobs
        self.trouble: str | None = None  # why the watch is not connected, while it is not
        self.lists = 0  # lists made (the first, then one after each 410): for tests
        # Called with each pod of the first list that no job tracks: one an earlier run of
        # this worker (a restarted container of the same pod) left behind.
        self.on_leftover: Callable[[str], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._response: Any = None

    # ---- the event loop's side ------------------------------------------------------

    def track(self, name: str) -> PodState:
        """Follow a pod about to be created (before, so that no event can be missed)."""
        state = self.states[name] = PodState()
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)
            self._thread.start()
        return state

    def forget(self, name: str) -> None:
        self.states.pop(name, None)

    def stop(self) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:  # closing may block until the stream ends: not here
            threading.Thread(target=_close_quietly, args=(response,), daemon=True).start()

    def _apply(self, kind: str, pod: dict[str, Any]) -> None:
        state = self.states.get((pod.get("metadata") or {}).get("name"))
        if state is None:  # a pod of no running job (its job ended, or an earlier worker's)
            return
        state.pod = pod
        state.gone = kind == "DELETED"
        state.changed.set()

    def _replace(self, pods: list[dict[str, Any]], listed_at: float, first: bool) -> None:
        by_name = {(pod.get("metadata") or {}).get("name"): pod for pod in pods}
        if first and self.on_leftover is not None:
            for name in by_name.keys() - self.states.keys():
                self.on_leftover(name)
        for name, state in self.states.items():
            pod = by_name.get(name)
            if pod is not None:
                state.pod, state.gone = pod, False
            elif state.pod is not None or (state.created_at is not None
                                           and state.created_at < listed_at):
                state.gone = True  # it existed before this list, and is not in it
            else:
                continue  # created after the list began: its ADDED event is on its way
            state.changed.set()

    def _set_trouble(self, trouble: str | None) -> None:
        self.trouble = trouble

    # ---- the watch thread's side --------------------------------------------------------

    def _post(self, function: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: nobody is listening
            self._stopping.set()

    def _run(self) -> None:
        delay = BACKOFF_S[0]
        version: str | None = None
        while not self._stopping.is_set():
            began = time.monotonic()
            events = 0
            try:
                if version is None:
                    listed_at = time.monotonic()
                    pods, version = self._list()
                    self._post(self._replace, pods, listed_at, self.lists == 1)
                    self._post(self._set_trouble, None)
                for seen in self._watch(version):
                    version, events = seen, events + 1
                if events or time.monotonic() - began >= SHORT_WATCH_S:
                    delay = BACKOFF_S[0]
                    continue
                trouble = "the API server ended the pod watch at once"
            except Gone:
                version = None  # list again, at once: what was missed is in the list
                continue
            except Exception as exc:  # noqa: BLE001 - whatever it is, the watch goes on
                if self._stopping.is_set():
                    break
                trouble = _describe(exc)
            self._post(self._set_trouble, trouble)
            log.warning("the pod watch broke (%s); reconnecting in %.1fs", trouble, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        response = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _preload_content=False,
            _request_timeout=(5, 60))
        body = json.loads(response.data)
        self.lists += 1
        return body.get("items") or [], (body.get("metadata") or {}).get("resourceVersion")

    def _watch(self, version: str) -> Iterator[str]:
        """Apply each event of one watch; yields the resourceVersion after each."""
        try:
            response = self.core.list_namespaced_pod(
                self.namespace, label_selector=self.selector, watch=True,
                resource_version=version, allow_watch_bookmarks=True, timeout_seconds=WATCH_S,
                _preload_content=False, _request_timeout=(5, WATCH_S + READ_SLACK_S))
        except ApiException as exc:
            if exc.status == 410:
                raise Gone() from exc
            raise
        self._response = response
        try:
            self._post(self._set_trouble, None)
            for line in _lines(response):
                if self._stopping.is_set():
                    return
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise RuntimeError(f"the watch answered {obj.get('code')}: "
                                       f"{obj.get('message')}")
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._post(self._apply, kind, obj)
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                yield version
        finally:
            self._response = None
            _close_quietly(response)


def _lines(response: Any) -> Iterator[bytes]:
    """The lines of a streamed response, as they arrive."""
    partial = b""
    for chunk in response.stream(65536, decode_content=False):
        *lines, partial = (partial + chunk).split(b"\n")
        yield from (line for line in lines if line.strip())
    if partial.strip():
        yield partial


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        if exc.status == 403:
            return ("403 Forbidden: the worker's ServiceAccount needs list and watch on pods "
                    "(the gristmill-job-runner ClusterRole of this Gristmill version)")
        return f"{exc.status} {exc.reason}".strip()
    return f"{type(exc).__name__}: {exc}"


def _close_quietly(response: Any) -> None:
    with contextlib.suppress(Exception):
        response.close()
