"""A kubelet for the emulator: it runs pods as local processes.

The emulator stores Pods but nothing runs them. This runs each new pod's
container command (with its env, working directory and emptyDir volumes as
temporary directories; the image is this machine, `python` this interpreter),
reports the phase and container state through the status subresource as a
kubelet does, serves `pods/{name}/log` (follow included), enforces
activeDeadlineSeconds, and kills the process when the pod is deleted. It is
what lets the pod executor run for real here; isolation is not emulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import aiohttp
import kmock

POD_LOG = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(process: asyncio.subprocess.Process) -> None:
    """Every process of the container goes, as when a container's cgroup is killed: its
    processes may have left the container's session (the pod command starts jobs in one
    of their own)."""
    for pid in [process.pid, *_descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Container:
    def __init__(self):
        self.output = bytearray()
        self.changed = asyncio.Condition()
        self.done = False

    async def append(self, chunk: bytes) -> None:
        async with self.changed:
            self.output += chunk
            self.changed.notify_all()

    async def finish(self) -> None:
        async with self.changed:
            self.done = True
            self.changed.notify_all()

    async def follow(self, follow: bool, cut: bool = False):
        """The log; with `cut`, a followed stream ends after its first chunk, as when the
        API server restarts under a client."""
        yield b""  # headers first, as the API server does
        sent = 0
        while True:
            async with self.changed:
                if sent == len(self.output) and not self.done and follow:
                    await self.changed.wait()
                chunk, done = bytes(self.output[sent:]), self.done
            sent += len(chunk)
            if chunk:
                yield chunk
            if not follow or (done and sent == len(self.output)) or (cut and sent):
                return


class ProcessKubelet:
    def __init__(self, emulator, url: str, namespace: str):
        self.url, self.namespace = url.rstrip("/"), namespace
        self.containers: dict[str, _Container] = {}
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.started: list[dict] = []  # every pod it ran, as created
        self.cut_log_streams = False
        self._tasks: set[asyncio.Task] = set()
        # Logs are text/plain, as the API server serves them (the client refuses octet-stream).
        emulator["get", POD_LOG] << kmock.headers({"Content-Type": "text/plain"}) \
            << self._serve_log

    def _serve_log(self, request):
        name = POD_LOG.match(request.url.path).group(2)
        container = self.containers.get(name)
        if container is None:  # not started: the API server answers 400
            return {"kind": "Status", "code": 400, "message": f"container in pod {name} is "
                                                              f"waiting to start"}
        if "tailLines" in request.params:
            lines = bytes(container.output).splitlines(keepends=True)
            return b"".join(lines[-int(request.params["tailLines"]):])
        return container.follow(request.params.get("follow") == "true", self.cut_log_streams)

    async def __aenter__(self):
        self.session = aiohttp.ClientSession(
            base_url=self.url + "/", connector=aiohttp.TCPConnector(force_close=True))
        self._loop = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_):
        self._loop.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(self._loop, *self._tasks, return_exceptions=True)
        await self.session.close()

    async def _run(self) -> None:
        seen: set[str] = set()
        while True:
            async with self.session.get(f"api/v1/namespaces/{self.namespace}/pods") as response:
                pods = (await response.json()).get("items", [])
            present = {pod["metadata"]["name"] for pod in pods}
            for pod in pods:
                name = pod["metadata"]["name"]
                if name not in seen and pod["metadata"].get("labels", {}).get(
                        "app.kubernetes.io/name") == "gristmill-job":
                    seen.add(name)
                    task = asyncio.create_task(self._run_pod(pod))
                    self._tasks.add(task)
            for name, process in list(self.processes.items()):
                if name not in present:  # deleted: the container is killed
                    _kill(process)
            await asyncio.sleep(0.05)

    async def _status(self, name: str, status: dict) -> None:
        async with self.session.patch(
                f"api/v1/namespaces/{self.namespace}/pods/{name}/status", json={"status": status},
                headers={"Content-Type": "application/merge-patch+json"}):
            pass

    @staticmethod
    def _state(container: dict, state: dict) -> dict:
        return {"name": container["name"], "image": container["image"], "imageID": "",
                "ready": "running" in state, "restartCount": 0, "state": state}

    async def _run_pod(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        (container,) = spec["containers"]
        scratch = Path(tempfile.mkdtemp(prefix=f"kubelet-{name}-"))
        try:
            mounts = {}
            for mount in container.get("volumeMounts", []):
                mounts[mount["mountPath"]] = scratch / mount["name"]
                mounts[mount["mountPath"]].mkdir(exist_ok=True)
            workdir = mounts.get(container.get("workingDir"), scratch)
            command = [*container.get("command", []), *container.get("args", [])]
            command = [sys.executable if arg == "python" else arg for arg in command]
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin",
                   **{var["name"]: var.get("value", "") for var in container.get("env", [])}}
            self.started.append(pod)
            logs = self.containers[name] = _Container()
            process = await asyncio.create_subprocess_exec(
                *command, cwd=workdir, env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            self.processes[name] = process
            await self._status(name, {"phase": "Running", "startTime": _now(),
                                      "containerStatuses": [self._state(container, {
                                          "running": {"startedAt": _now()}})]})
            deadline = spec.get("activeDeadlineSeconds")

            async def pump():
                while chunk := await process.stdout.read(65536):
                    await logs.append(chunk)
            pumping = asyncio.create_task(pump())
            try:
                await asyncio.wait_for(process.wait(), deadline)
                reason = None
            except TimeoutError:
                _kill(process)
                await process.wait()
                reason = "DeadlineExceeded"
            await pumping
            await logs.finish()
            code = process.returncode if process.returncode >= 0 else 128 - process.returncode
            status = {"phase": "Succeeded" if code == 0 and not reason else "Failed",
                      "containerStatuses": [self._state(container, {"terminated": {
                          "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                          "finishedAt": _now()}})]}
            if reason:
                status["reason"] = reason
            with contextlib.suppress(aiohttp.ClientError):
                await self._status(name, status)
        finally:
            process = self.processes.pop(name, None)
            if process is not None and process.returncode is None:
                _kill(process)
                await process.wait()  # reaped in this loop, not by the garbage collector later
            shutil.rmtree(scratch, ignore_errors=True)
