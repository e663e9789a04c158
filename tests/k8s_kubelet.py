"""A kubelet for the emulator: it runs pods as local processes.

The emulator stores Pods but nothing runs them. This runs each new pod's
container command (with its env, working directory, emptyDir volumes as
temporary directories and Secret volumes as directories of the Secret's keys;
the image is this machine, `python` this interpreter, and a command argument
under a mount path names the same file in its directory), reports the phase
and container state through the status subresource as a kubelet does (Pending
with ContainerCreating until the pod's Secrets exist and `start_delay_s` has
passed), serves `pods/{name}/log` (follow included), enforces
activeDeadlineSeconds, and kills the process when the pod is deleted. It is
what lets the pod executor run for real here; isolation is not emulated.
"""

from __future__ import annotations

import asyncio
import base64
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


class ContainerLog:
    """What a container printed, for the log endpoint (the test node's too)."""

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
        self.containers: dict[str, ContainerLog] = {}
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.started: list[dict] = []  # every pod it ran, as created
        self.cut_log_streams = False
        self.start_delay_s = 0.0  # how long a pod stays ContainerCreating (a real start)
        # Images that cannot run: the waiting reason and message their pods report.
        self.image_errors: dict[str, tuple[str, str]] = {}
        self.deleted: set[str] = set()
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
            self.deleted |= seen - present
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

    async def _secret(self, name: str) -> dict | None:
        async with self.session.get(f"api/v1/namespaces/{self.namespace}/secrets/{name}") as r:
            return await r.json() if r.status == 200 else None

    async def _volumes(self, pod: dict, scratch: Path) -> dict[str, Path] | None:
        """Each volume as a directory; None if the pod was deleted before its Secrets came.
        A missing Secret is retried, as the kubelet retries a failed mount."""
        name = pod["metadata"]["name"]
        directories = {}
        for volume in pod["spec"].get("volumes", []):
            directory = directories[volume["name"]] = scratch / volume["name"]
            directory.mkdir()
            if "secret" not in volume:
                continue
            while (secret := await self._secret(volume["secret"]["secretName"])) is None:
                if name in self.deleted:
                    return None
                await asyncio.sleep(0.05)
            for key, value in (secret.get("data") or {}).items():
                (directory / key).write_bytes(base64.b64decode(value))
                (directory / key).chmod(volume["secret"].get("defaultMode", 0o644))
        return directories

    async def _run_pod(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        (container,) = spec["containers"]
        scratch = Path(tempfile.mkdtemp(prefix=f"kubelet-{name}-"))
        try:
            await self._status(name, {"phase": "Pending", "containerStatuses": [self._state(
                container, {"waiting": {"reason": "ContainerCreating"}})]})
            if container["image"] in self.image_errors:
                reason, message = self.image_errors[container["image"]]
                await self._status(name, {"phase": "Pending", "containerStatuses": [
                    self._state(container, {"waiting": {"reason": reason,
                                                        "message": message}})]})
                return
            await asyncio.sleep(self.start_delay_s)
            volumes = await self._volumes(pod, scratch)
            if volumes is None or name in self.deleted:
                return
            mounts = {mount["mountPath"]: volumes[mount["name"]]
                      for mount in container.get("volumeMounts", [])}
            workdir = mounts.get(container.get("workingDir"), scratch)

            def in_container(arg: str) -> str:
                for path in sorted(mounts, key=len, reverse=True):
                    if arg == path or arg.startswith(path + "/"):
                        return str(mounts[path]) + arg[len(path):]
                return sys.executable if arg == "python" else arg
            command = [in_container(arg) for arg in
                       [*container.get("command", []), *container.get("args", [])]]
            # The image is this machine: its Python path too (this checkout, not another).
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin",
                   **{key: os.environ[key] for key in ("PYTHONPATH",) if key in os.environ},
                   **{var["name"]: var.get("value", "") for var in container.get("env", [])}}
            self.started.append(pod)
            logs = self.containers[name] = ContainerLog()
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
