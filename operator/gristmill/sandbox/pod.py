"""The `pod` executor: each job in a Kubernetes pod of its own.

The pod meets the Pod Security Standards `restricted` profile (non-root, no
privilege escalation, every capability dropped, RuntimeDefault seccomp, a
read-only root filesystem, no service-account token) and gets the Script's
CPU and memory as requests and limits. It runs `python -m
gristmill.sandbox.pod_job` in the worker image; the worker follows its log
into the job's log and reads the outcome from its last line. The pod is owned
by the worker's own pod, so if the worker dies Kubernetes deletes its job pods
and the reaper re-queues the jobs. A Script without `sandbox.network` gets the
label `gristmill.io/network: none`, which the operator's NetworkPolicy closes.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from gristmill import labels
from gristmill.sandbox.base import JobOutcome, JobRequest, SandboxUnavailable, failure
from gristmill.sandbox.pod_job import (
    MARKER_ENV,
    PayloadTooLarge,
    parse_outcome_line,
    request_env,
)

log = logging.getLogger("gristmill.sandbox.pod")
JOB_UID = 65532  # the distroless "nonroot" uid: any image works, root-owned or not
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
READ_RETRIES = 5  # about 15 s of API server trouble before a job is failed
REQUEST_TIMEOUT = (5, 30)  # connect, read: seconds
QUIET_S = 15.0  # a log this quiet has the pod looked at: a stalled stream must not hang a job
# Waiting reasons that no amount of waiting fixes.
HOPELESS = {"InvalidImageName", "CreateContainerConfigError", "CreateContainerError",
            "ErrImageNeverPull"}


def job_pod(request: JobRequest, image: str, marker: str, start_timeout_s: float,
            worker: str, group: str | None = None, owner: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """The pod of one job (a pure function, validated by the tests against PSS restricted)."""
    limits = request.limits
    resources = {"cpu": f"{max(1, math.ceil(limits.cpu_cores * 1000))}m",
                 "memory": str(limits.memory_bytes)}
    metadata: dict[str, Any] = {
        # Unique per attempt: a retry must not wait for the last attempt's pod to go.
        "name": f"gristmill-job-{request.job_id[:8]}-{secrets.token_hex(4)}",
        "labels": {labels.NAME: "gristmill-job", labels.PART_OF: "gristmill",
                   labels.JOB_ID: request.job_id, labels.WORKER: worker[:63],
                   labels.NETWORK: "allowed" if request.network else "none"},
    }
    if group:
        metadata["labels"][labels.WORKER_GROUP] = group
    if owner:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", **owner,
                                        "blockOwnerDeletion": False}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "restartPolicy": "Never",
            # A backstop only: the worker deletes the pod when the job's timeout passes.
            "activeDeadlineSeconds": math.ceil(limits.timeout_s + start_timeout_s),
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": JOB_UID, "runAsGroup": JOB_UID,
                "fsGroup": JOB_UID, "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "job",
                "image": image,
                "command": ["python", "-m", "gristmill.sandbox.pod_job"],
                "workingDir": "/work",
                "env": [*({"name": name, "value": value}
                          for name, value in request_env(request).items()),
                        {"name": MARKER_ENV, "value": marker}],
                "resources": {"requests": resources, "limits": resources},
                "securityContext": {
                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "volumeMounts": [{"name": "work", "mountPath": "/work"},
                                 {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [
                # spec.resources.disk, for each (the kubelet evicts a pod past it).
                {"name": "work", "emptyDir": {"sizeLimit": str(limits.disk_bytes)}},
                {"name": "tmp", "emptyDir": {"sizeLimit": str(limits.disk_bytes)}},
            ],
        },
    }


def load_kubernetes_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, OSError) as exc:
            raise SandboxUnavailable(f"the pod executor needs the Kubernetes API: not in a "
                                     f"cluster and no usable kubeconfig ({exc})") from exc


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
    def __init__(self, namespace: str, image: str, worker: str, group: str | None = None,
                 owner: dict[str, Any] | None = None, start_timeout_s: float = 300.0,
                 poll_s: float = 0.25):
        self.namespace, self.image, self.worker, self.owner = namespace, image, worker, owner
        self.group = group
        self.start_timeout_s = start_timeout_s
        self.poll_s = poll_s
        self.core = client.CoreV1Api()
        # API calls block: a pool of their own, so that they never wait behind the
        # worker's other uses of asyncio's default executor.
        self.threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="pod-executor")

    async def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One blocking API call in the pool, never waiting forever on a dead connection."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        return await asyncio.get_running_loop().run_in_executor(
            self.threads, functools.partial(function, *args, **kwargs))

    @classmethod
    def from_environment(cls, image: str | None = None) -> PodExecutor:
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
                   start_timeout_s=float(os.environ.get("GRISTMILL_POD_START_TIMEOUT", "300")))

    async def run(self, request: JobRequest, on_output: Callable[[str], None],
                  cancel: asyncio.Event) -> JobOutcome:
        marker = f"#gristmill-outcome-{secrets.token_hex(8)}# "
        try:
            body = job_pod(request, self.image, marker, self.start_timeout_s, self.worker,
                           self.group, self.owner)
        except PayloadTooLarge as exc:
            return failure("setup", str(exc))
        name = body["metadata"]["name"]
        try:
            try:
                await self._call(self.core.create_namespaced_pod, self.namespace, body)
            except ApiException as exc:
                return failure("setup", f"could not create the job pod: {_api_message(exc)}")
            return await self._follow(name, request, marker, on_output, cancel)
        finally:
            # Also when the create's answer was lost: the pod may exist all the same.
            await self._delete(name)

    async def _follow(self, name: str, request: JobRequest, marker: str,
                      on_output: Callable[[str], None], cancel: asyncio.Event) -> JobOutcome:
        started = await self._wait_started(name, cancel)
        if isinstance(started, JobOutcome):
            return started
        timeout_s = request.limits.timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        lines = _LogLines(marker, on_output, request.limits.max_output_bytes)
        stopped = await self._stream_log(name, lines, deadline, timeout_s, cancel)
        if stopped is not None:
            return stopped
        lines.close()
        if lines.outcome is not None:
            return lines.outcome
        # The stream ended without an outcome: the container ended early, or the stream
        # broke (an API server restart) while the job goes on.
        return await self._after_stream(name, marker, deadline, timeout_s, cancel)

    async def _retrying(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`_call`, riding out a few seconds of API server trouble."""
        for attempt in range(READ_RETRIES):
            try:
                return await self._call(function, *args, **kwargs)
            except Exception as exc:
                if not api_trouble(exc):
                    raise
                await asyncio.sleep(min(0.5 * 2 ** attempt, 8.0))
        return await self._call(function, *args, **kwargs)

    async def _read(self, name: str) -> dict[str, Any]:
        response = await self._retrying(self.core.read_namespaced_pod, name, self.namespace,
                                        _preload_content=False)
        return json.loads(response.data)

    async def _wait_started(self, name: str, cancel: asyncio.Event) -> JobOutcome | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        delay = self.poll_s
        why = "still pending"
        while loop.time() < deadline:
            pod = await self._read(name)
            status = pod.get("status") or {}
            if status.get("phase") in ("Running", "Succeeded", "Failed"):
                return None
            why = _pending_reason(status) or why
            if why.split(":")[0] in HOPELESS:
                return failure("setup", f"the job pod cannot start: {why}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), delay)
            if cancel.is_set():
                return failure("cancelled", "cancelled before the job pod started")
            delay = min(delay * 1.5, 2.0)
        return failure("setup", f"the job pod did not start within {self.start_timeout_s:g}s "
                                f"({why}); see `kubectl describe pod {name}`")

    async def _stream_log(self, name: str, lines: _LogLines, deadline: float, timeout_s: float,
                          cancel: asyncio.Event) -> JobOutcome | None:
        """Forward the log until the container ends; an outcome if it had to be stopped."""
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
                            _request_timeout=(5, 86400))  # quiet jobs: QUIET_S
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
        try:
            while True:
                got = asyncio.ensure_future(chunks.get())
                done, _ = await asyncio.wait(
                    {got, cancelled}, timeout=max(0.0, min(deadline - loop.time(), QUIET_S)),
                    return_when=asyncio.FIRST_COMPLETED)
                if got not in done:
                    got.cancel()
                    if cancelled in done:
                        return failure("cancelled", "cancelled while running")
                    if loop.time() >= deadline:
                        return failure("timeout", f"timed out after {timeout_s:g}s "
                                                  f"(spec.timeout)")
                    if _terminated((await self._read(name)).get("status") or {}):
                        return None  # a quiet stream that outlived its container
                    continue
                chunk = got.result()
                if chunk is None:
                    return None
                if not lines.feed(chunk):
                    return failure("output_limit", f"printed more than {lines.cap} bytes "
                                                   f"(spec.resources.maxOutput)")
        finally:
            cancelled.cancel()
            for response in opened:
                # Closing can block until the stream ends (the pod is deleted next): not here.
                threading.Thread(target=_close_quietly, args=(response,), daemon=True).start()

    async def _after_stream(self, name: str, marker: str, deadline: float, timeout_s: float,
                            cancel: asyncio.Event) -> JobOutcome:
        """Wait for the container to end, then take the outcome from the log's tail or say
        why there is none, from what the kubelet saw."""
        loop = asyncio.get_running_loop()
        while True:
            status = (await self._read(name)).get("status") or {}
            terminated = _terminated(status)
            if terminated is not None or status.get("phase") in ("Succeeded", "Failed"):
                break
            if loop.time() >= deadline:
                return failure("timeout", f"timed out after {timeout_s:g}s (spec.timeout)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), self.poll_s * 4)
            if cancel.is_set():
                return failure("cancelled", "cancelled while running")
        with contextlib.suppress(ApiException):
            # The whole log, not its last lines: runtimes split long lines into records,
            # and the outcome line can be long.
            text = await self._call(self.core.read_namespaced_pod_log, name, self.namespace)
            for line in reversed(text.splitlines()):
                outcome = parse_outcome_line(marker, line)
                if outcome is not None:
                    return outcome
        if status.get("reason") == "DeadlineExceeded":
            return failure("timeout", "the job pod passed its activeDeadlineSeconds")
        terminated = terminated or {}
        reason, code = terminated.get("reason"), terminated.get("exitCode")
        if reason == "OOMKilled":
            return failure("memory", "out of memory (OOMKilled): raise spec.resources.memory")
        if code is not None and code > 128:
            return failure("killed", f"the job pod was killed (exit code {code}, {reason})")
        return failure("exit", f"the job pod exited with code {code} ({reason}) before "
                               f"reporting an outcome")

    async def _delete(self, name: str) -> None:
        """Delete the pod; never raises, so that a job's outcome is never lost to it (a pod
        left behind goes with its worker pod)."""
        try:
            await self._retrying(self.core.delete_namespaced_pod, name, self.namespace,
                                 grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete job pod %s (%s); it goes when its worker pod "
                            "goes", name, _api_message(exc))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not delete job pod %s (%s); it goes when its worker pod goes",
                        name, exc)


def api_trouble(exc: BaseException) -> bool:
    """An API server error worth another try: no answer, throttled, or a server error
    (the operator's retrying.py builds on it)."""
    if isinstance(exc, ApiException):
        return exc.status in (0, 429) or exc.status >= 500
    return isinstance(exc, HTTPError | OSError)


def _close_quietly(response: Any) -> None:
    with contextlib.suppress(Exception):
        response.close()


def _pending_reason(status: dict[str, Any]) -> str | None:
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating"):
            return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason')}: {condition.get('message', '')}".rstrip(": ")
    return None


def _terminated(status: dict[str, Any]) -> dict[str, Any] | None:
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return terminated
    return None


def _api_message(exc: ApiException) -> str:
    with contextlib.suppress(ValueError, TypeError):
        return json.loads(exc.body).get("message") or str(exc.reason)
    return f"{exc.status} {exc.reason}"
