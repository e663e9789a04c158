"""The `pod` executor: each job in a Kubernetes pod of its own.

The pod meets the Pod Security Standards `restricted` profile (non-root, no
privilege escalation, every capability dropped, RuntimeDefault seccomp, a
read-only root filesystem, no service-account token) and gets the Script's
CPU and memory as requests and limits. It runs `python -m
gristmill.sandbox.pod_job` in the worker image on the job's Secret, which
holds its code, input and environment (compressed, at most 1 MiB) so that
the pod object stays small and readers of pods do not see them; the Secret
is owned by its pod and goes with it. The worker follows the pod's log into
the job's log and reads the outcome from its last line. The pod is owned by
the worker's own pod, so if the worker dies Kubernetes deletes its job pods
and the reaper re-queues the jobs. A Script without `sandbox.network` gets the
label `gristmill.io/network: none`, which the operator's NetworkPolicy closes.

What a job costs the API server: creating its pod and Secret, one log
stream, deleting the pod; nothing while the pod is pending or running, as all
of a worker's jobs learn their pods' states from one label-selected watch
(pod_watch.py). A worker's writes go through a token bucket
(token_bucket.py), so a burst of jobs waits its turn on this side. The objects
themselves are in pod_objects.py, the reading of their status in
pod_status.py.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from gristmill import labels
from gristmill.kube import ClusterUnavailable, api_message, load_cluster_config
from gristmill.sandbox.base import JobOutcome, JobRequest, SandboxUnavailable, failure
from gristmill.sandbox.pod_job import PayloadTooLarge, job_payload, parse_outcome_line
from gristmill.sandbox.pod_objects import job_pod, job_secret
from gristmill.sandbox.pod_status import (
    HOPELESS,
    config_problem,
    ended,
    explain_end,
    pending_reason,
    started,
)
from gristmill.sandbox.pod_watch import PodState, PodWatch
from gristmill.sandbox.token_bucket import TokenBucket

log = logging.getLogger("gristmill.sandbox.pod")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
READ_RETRIES = 5  # about 15 s of API server trouble before a job is failed
CREATE_ATTEMPTS = 6  # the same for a create refused with 429 or 5xx
REQUEST_TIMEOUT = (5, 30)  # connect, read: seconds
LANDED_S = 30.0  # for the watch to show a pod whose create's answer was lost
DRAIN_S = 5.0  # a log stream's time to end once the watch saw its container end
WRITE_RATE, WRITE_BURST = 5.0, 10  # client-go's defaults (QPS 5, burst 10)
DELETE_GRACE_S = 5  # SIGTERM, then SIGKILL: a job pod has nothing to save


def load_kubernetes_config() -> None:
    try:
        load_cluster_config()
    except ClusterUnavailable as exc:
        raise SandboxUnavailable(f"the pod executor needs the Kubernetes API: {exc}") from exc


class _LogLines:
    """Splits a pod's log into lines: the job's output is forwarded, the outcome kept."""

    def __init__(self, marker: str, on_output: Callable[[str], None], cap: int):
        self.marker, self.on_output, self.cap = marker, on_output, cap
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""
        self.total = 0
        self.outcome: JobOutcome | None = None

    def feed(self, chunk: bytes) -> bool:
        """Take a chunk; False once the output cap is passed."""
        self.total += len(chunk)
        if self.total > self.cap:
            return False
        *lines, self.partial = (self.partial + self.decoder.decode(chunk)).split("\n")
        out = []
        for line in lines:
            outcome = parse_outcome_line(self.marker, line)
            if outcome is None:
                out.append(line + "\n")
                continue
            self.outcome = outcome
            if before := line[:line.find(self.marker)]:  # the job's unfinished last line
                out.append(before + "\n")
        if out:
            self.on_output("".join(out))
        return True

    def close(self) -> None:
        if self.partial:  # a last line without a newline
            self.feed(b"\n")


class PodExecutor:
    # Job pods name their Secrets; the kubelet reads them, the worker never does.
    resolves_secret_refs = True

    def __init__(self, namespace: str, image: str, worker: str, group: str | None = None,
                 owner: dict[str, Any] | None = None, start_timeout_s: float = 300.0,
                 write_rate: float = WRITE_RATE, write_burst: int = WRITE_BURST):
        self.namespace, self.image, self.worker, self.owner = namespace, image, worker, owner
        self.group = group
        self.start_timeout_s = start_timeout_s
        # Selects this worker's job pods and no one else's, even another run in its pod.
        self.worker_uid = (owner or {}).get("uid") or uuid.uuid4().hex
        self.core = client.CoreV1Api()
        # API calls block: a pool of their own, so that they never wait behind the
        # worker's other uses of asyncio's default executor.
        self.threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="pod-executor")
        self.writes = TokenBucket(write_rate, write_burst)
        self.watch = PodWatch(self.core, namespace, f"{labels.WORKER_UID}={self.worker_uid}")
        self.watch.on_leftover = self._leftover
        self._cleanups: set[asyncio.Task[None]] = set()

    async def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One blocking API call in the pool, never waiting forever on a dead connection."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        return await asyncio.get_running_loop().run_in_executor(
            self.threads, functools.partial(function, *args, **kwargs))

    @classmethod
    def from_environment(cls, image: str | None = None, write_rate: float = WRITE_RATE,
                         write_burst: int = WRITE_BURST) -> PodExecutor:
        """In a worker pod: its namespace, image and identity come from the downward API."""
        load_kubernetes_config()
        namespace = os.environ.get("GRISTMILL_POD_NAMESPACE") or (
            SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
            if SERVICE_ACCOUNT_NAMESPACE.exists() else "default")
        image = image or os.environ.get("GRISTMILL_JOB_IMAGE")
        if not image:
            raise SandboxUnavailable("the pod executor needs the job image: pass --job-image "
                                     "or set GRISTMILL_JOB_IMAGE")
        name, uid = os.environ.get("GRISTMILL_POD_NAME"), os.environ.get("GRISTMILL_POD_UID")
        owner = {"name": name, "uid": uid} if name and uid else None
        return cls(namespace, image, worker=name or os.uname().nodename,
                   group=os.environ.get("GRISTMILL_WORKER_GROUP"), owner=owner,
                   start_timeout_s=float(os.environ.get("GRISTMILL_POD_START_TIMEOUT", "300")),
                   write_rate=write_rate, write_burst=write_burst)

    def close(self) -> None:
        """Stop the pod watch (a worker never needs to: its threads are daemons)."""
        self.watch.stop()
        self.threads.shutdown(wait=False)

    def _leftover(self, name: str) -> None:
        """A job pod of an earlier run of this worker: its job has been (or will be) handed to
        another worker by the reaper, so it goes, as a process executor's jobs go."""
        log.info("deleting job pod %s, left behind by an earlier run of this worker", name)
        task = asyncio.get_running_loop().create_task(self._delete(name, PodState()))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def run(self, request: JobRequest, on_output: Callable[[str], None],
                  cancel: asyncio.Event) -> JobOutcome:
        marker = f"#gristmill-outcome-{secrets.token_hex(8)}# "
        try:
            # Compressing a MiB of code and input takes milliseconds: not on the event loop.
            payload = await asyncio.get_running_loop().run_in_executor(
                self.threads, job_payload, request, marker)
        except PayloadTooLarge as exc:
            return failure("setup", str(exc))
        body = job_pod(request, self.image, self.start_timeout_s, self.worker, self.worker_uid,
                       self.group, self.owner)
        name = body["metadata"]["name"]
        # The pod's and its Secret's turns at once: a created pod must not wait for its
        # Secret behind other jobs.
        if not await self.writes.take(2, cancel):
            return failure("cancelled", "cancelled while waiting its turn to create the job pod")
        state = self.watch.track(name)
        try:
            created = await self._create("the job pod", self.core.create_namespaced_pod, body,
                                         state)
            if isinstance(created, JobOutcome):
                return created
            state.created_at = time.monotonic()
            secret = job_secret(body, created["metadata"]["uid"], payload)
            made = await self._create("the job's Secret", self.core.create_namespaced_secret,
                                      secret)
            if isinstance(made, JobOutcome):
                return made
            return await self._follow(name, state, request, marker, on_output, cancel)
        finally:
            # Also when the create's answer was lost: the pod may exist all the same.
            await self._delete(name, state)
            self.watch.forget(name)

    async def _create(self, what: str, function: Callable[..., Any], body: dict[str, Any],
                      state: PodState | None = None) -> dict[str, Any] | JobOutcome:
        """Create an object, riding out a throttled or troubled API server."""
        for attempt in range(CREATE_ATTEMPTS):
            if attempt:
                await self.writes.take(1)  # a retry is a write too
            try:
                response = await self._call(function, self.namespace, body,
                                            _preload_content=False)
                return json.loads(response.data)
            except Exception as exc:
                if isinstance(exc, ApiException) and exc.status == 409 and attempt:
                    return await self._landed(what, state)  # an earlier answer was lost
                if attempt == CREATE_ATTEMPTS - 1 or not api_trouble(exc):
                    return failure("setup", f"could not create {what}: {_problem(exc)}")
                await asyncio.sleep(_retry_after(exc) or min(0.5 * 2 ** attempt, 8.0))
        raise AssertionError("unreachable")

    async def _landed(self, what: str, state: PodState | None) -> dict[str, Any] | JobOutcome:
        """An object an earlier attempt created: a Secret is fine as it is; a pod's uid (for
        its Secret's owner reference) comes from the watch."""
        if state is None:
            return {}
        deadline = asyncio.get_running_loop().time() + LANDED_S
        while state.pod is None:
            state.changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return failure("setup", f"{what} was created, but the worker's pod watch has "
                                        f"not shown it ({self.watch.trouble or 'no event'})")
            await _until_changed(state, None, remaining)
        return state.pod

    async def _follow(self, name: str, state: PodState, request: JobRequest, marker: str,
                      on_output: Callable[[str], None], cancel: asyncio.Event) -> JobOutcome:
        pending = await self._wait_started(name, state, cancel)
        if isinstance(pending, JobOutcome):
            return pending
        timeout_s = request.limits.timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        lines = _LogLines(marker, on_output, request.limits.max_output_bytes)
        stopped = await self._stream_log(name, state, lines, deadline, timeout_s, cancel)
        if stopped is not None:
            return stopped
        lines.close()
        if lines.outcome is not None:
            return lines.outcome
        # The stream ended without an outcome: the container ended early, or the stream
        # broke (an API server restart) while the job goes on.
        return await self._after_stream(name, state, marker, deadline, timeout_s, cancel)

    async def _retrying(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`_call`, riding out a few seconds of API server trouble."""
        for attempt in range(READ_RETRIES):
            try:
                return await self._call(function, *args, **kwargs)
            except Exception as exc:
                if not api_trouble(exc):
                    raise
                await asyncio.sleep(_retry_after(exc) or min(0.5 * 2 ** attempt, 8.0))
        return await self._call(function, *args, **kwargs)

    async def _wait_started(self, name: str, state: PodState, cancel: asyncio.Event
                            ) -> JobOutcome | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        why = "still pending"
        while True:
            state.changed.clear()  # before looking: a change from now on wakes the wait
            status = state.status
            if started(status):
                return None
            if state.gone:
                return failure("killed", f"the job pod {name} was deleted before it started "
                                         f"(from outside, or with its worker pod)")
            why = pending_reason(status) or why
            if why.split(":")[0] in HOPELESS:
                return failure("setup", config_problem(why, self.namespace)
                               or f"the job pod cannot start: {why}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if await _until_changed(state, cancel, remaining):
                return failure("cancelled", "cancelled before the job pod started")
        watch = (f"; the worker's pod watch is reconnecting ({self.watch.trouble})"
                 if self.watch.trouble else "")
        return failure("setup", f"the job pod did not start within {self.start_timeout_s:g}s "
                                f"({why}){watch}; see `kubectl describe pod {name}`")

    async def _stream_log(self, name: str, state: PodState, lines: _LogLines, deadline: float,
                          timeout_s: float, cancel: asyncio.Event) -> JobOutcome | None:
        """Forward the log until it ends, or until DRAIN_S after the watch saw the container
        end (a stalled stream must not hang a job); an outcome if it had to be stopped."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        opened: list[Any] = []

        def put(chunk: bytes | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)

        def pump() -> None:
            # Opening and reading both block; here they never hold up timeouts or cancels.
            try:
                for attempt in range(3):
                    try:
                        response = self.core.read_namespaced_pod_log(
                            name, self.namespace, follow=True, _preload_content=False,
                            _request_timeout=(5, 86400))  # quiet jobs: the watch, DRAIN_S
                        break
                    except Exception as exc:
                        if attempt == 2 or not api_trouble(exc):
                            raise
                        time.sleep(1)
                opened.append(response)
                for chunk in response.stream(65536):
                    put(chunk)
            except Exception:  # noqa: BLE001 - closed under us, or the pod went away
                pass
            finally:
                put(None)

        # A daemon thread of its own: a stream that never ends must not keep the worker alive.
        threading.Thread(target=pump, name=f"log-{name}", daemon=True).start()
        cancelled = asyncio.ensure_future(cancel.wait())
        got: asyncio.Future[bytes | None] | None = None
        changed: asyncio.Future[Any] | None = None
        ended_at: float | None = None
        try:
            while True:
                if cancel.is_set():
                    return failure("cancelled", "cancelled while running")
                if loop.time() >= deadline:
                    return failure("timeout", f"timed out after {timeout_s:g}s (spec.timeout)")
                if changed is None or changed.done():
                    state.changed.clear()
                    changed = asyncio.ensure_future(state.changed.wait())
                if ended_at is None and _ended(state):
                    ended_at = loop.time()
                until = deadline if ended_at is None else min(deadline, ended_at + DRAIN_S)
                got = got or asyncio.ensure_future(chunks.get())
                done, _ = await asyncio.wait({got, cancelled, changed},
                                             timeout=max(0.0, until - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if got in done:
                    chunk, got = got.result(), None
                    if chunk is None:
                        return None
                    if not lines.feed(chunk):
                        return failure("output_limit", f"printed more than {lines.cap} bytes "
                                                       f"(spec.resources.maxOutput)")
                elif not done and ended_at is not None and loop.time() < deadline:
                    return None  # the stream outlived its container: the whole log is read
        finally:
            for future in (cancelled, got, changed):
                if future is not None:
                    future.cancel()
            for response in opened:
                # Closing can block until the stream ends (the pod is deleted next): not here.
                threading.Thread(target=_close_quietly, args=(response,), daemon=True).start()

    async def _after_stream(self, name: str, state: PodState, marker: str, deadline: float,
                            timeout_s: float, cancel: asyncio.Event) -> JobOutcome:
        """Wait for the watch to see the container end, then take the outcome from the whole
        log or say why there is none, from what the kubelet saw."""
        loop = asyncio.get_running_loop()
        while True:
            state.changed.clear()
            if _ended(state):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                return failure("timeout", f"timed out after {timeout_s:g}s (spec.timeout)")
            if await _until_changed(state, cancel, remaining):
                return failure("cancelled", "cancelled while running")
        with contextlib.suppress(Exception):
            # The whole log, not its last lines: runtimes split long lines into records,
            # and the outcome line can be long. A pod deleted from outside has none.
            text = await self._retrying(self.core.read_namespaced_pod_log, name, self.namespace)
            for line in reversed(text.splitlines()):
                outcome = parse_outcome_line(marker, line)
                if outcome is not None:
                    return outcome
        return explain_end(state.status, state.gone)

    async def _delete(self, name: str, state: PodState) -> None:
        """Delete the pod (its Secret goes with it); never raises, so that a job's outcome is
        never lost to it (a pod left behind goes with its worker pod)."""
        if state.gone:
            return  # deleted from outside already
        await self.writes.take(1, urgent=True)  # before any creation that waits
        try:
            # Not forced: the object stays until the kubelet has stopped the container (a
            # forced delete lets a cancelled job run on unseen).
            await self._retrying(self.core.delete_namespaced_pod, name, self.namespace,
                                 grace_period_seconds=DELETE_GRACE_S)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete job pod %s (%s); it goes when its worker pod "
                            "goes", name, api_message(exc))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not delete job pod %s (%s); it goes when its worker pod goes",
                        name, exc)


async def _until_changed(state: PodState, cancel: asyncio.Event | None, timeout: float) -> bool:
    """Wait until the watch changes the pod's state (or the timeout); True if cancelled.
    The caller cleared `state.changed` before it last looked."""
    waiters = [asyncio.ensure_future(state.changed.wait())]
    if cancel is not None:
        waiters.append(asyncio.ensure_future(cancel.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return cancel is not None and cancel.is_set()


def api_trouble(exc: BaseException) -> bool:
    """An API server error worth another try: no answer, throttled, or a server error
    (the operator's retrying.py builds on it)."""
    if isinstance(exc, ApiException):
        return exc.status in (0, 429) or exc.status >= 500
    return isinstance(exc, HTTPError | OSError)


def _close_quietly(response: Any) -> None:
    with contextlib.suppress(Exception):
        response.close()


def _ended(state: PodState) -> bool:
    return state.gone or ended(state.status)


def _retry_after(exc: BaseException) -> float | None:
    """The seconds a 429 (or 503) asks the client to wait, within reason."""
    headers = getattr(exc, "headers", None) or {}
    with contextlib.suppress(TypeError, ValueError):
        return min(float(headers.get("Retry-After")), 10.0)
    return None


def _problem(exc: BaseException) -> str:
    """What a person reads when a create failed."""
    if not isinstance(exc, ApiException):
        return f"{type(exc).__name__}: {exc}"
    message = api_message(exc)
    if exc.status == 403:
        message += (" (the worker's ServiceAccount needs the gristmill-job-runner ClusterRole "
                    "of this Gristmill version, bound in this namespace: it may create pods "
                    "and secrets)")
    return message
