"""A kubelet for the real test control plane: one Node that runs every pod.

It registers a Node, binds pending pods to it (there is no scheduler), and runs each
pod's containers as processes: in a network namespace of the pod's own on the test
pod network (an IP, ports of its own), with its volumes bind-mounted in a mount
namespace of the container's own (emptyDir, projected service-account tokens the API
server issues, Secrets, ConfigMaps, the downward API), its environment (values,
fieldRef, secretKeyRef, configMapKeyRef, and the KUBERNETES_SERVICE_* variables), its
restart policy with a back-off, activeDeadlineSeconds, and graceful deletion (SIGTERM,
the grace period, SIGKILL, then the final delete a kubelet makes). It reports pod and
container status, and serves container logs over HTTPS so that `pods/log` works
through the real API server.

What it does not do: pull images (the image is this machine: Gristmill's image runs
`gristmill`, `python` is this interpreter; other images cannot run and say so), run as
the pod's user (containers run as root), isolate the filesystem (see the runc tests
for that), enforce resources, or run probes (containers count as ready once started).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from k8s_cluster import ControlPlane
from k8s_kubelet import ContainerLog
from k8s_network import PodNetwork

log = logging.getLogger("k8s_node")
NODE = "gristmill-test-node"
PROJECT_SOURCE = Path(__file__).resolve().parent.parent / "operator"
SOURCE_MOUNT = "/run/gristmill-test-node/src"  # the project, where a covered /work hides it
GRISTMILL_IMAGE_MARKERS = ("gristmill",)  # images whose entrypoint is `gristmill`
MAX_BACKOFF_S = 10.0
# Where pods' volumes live on the host: not under /tmp, which pods cover with an emptyDir
# of their own before their other volumes are mounted.
SCRATCH = Path("/var/lib/gristmill-test-node/pods")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerConfigError(Exception):
    """What the kubelet reports as CreateContainerConfigError, in its words."""


@dataclass
class RunningPod:
    pod: dict[str, Any]
    netns: str
    ip: str
    scratch: Path
    logs: dict[str, ContainerLog] = field(default_factory=dict)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    statuses: dict[str, dict] = field(default_factory=dict)
    task: asyncio.Task | None = None
    stopping: bool = False

    @property
    def key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"


class Node:
    def __init__(self, control_plane: ControlPlane, network: PodNetwork):
        self.cp, self.network = control_plane, network
        self.pods: dict[str, RunningPod] = {}  # by uid
        self.hosts = SCRATCH / f"hosts-{os.getpid()}-{id(self):x}"  # every pod's /etc/hosts
        self.port = 0
        self._deletions: set[asyncio.Task] = set()

    # ---- the API server ------------------------------------------------------------------

    async def _api(self, method: str, path: str, body: Any = None,
                   content_type: str = "application/json") -> Any:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(method, self.cp.url + path, json=body,
                                        headers=headers) as response:
            text = await response.text()
            if response.status >= 400:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=text[:500])
            return json.loads(text) if text else None

    async def _patch_status(self, running: RunningPod, status: dict) -> None:
        meta = running.pod["metadata"]
        with contextlib.suppress(aiohttp.ClientResponseError):  # the pod may be gone
            await self._api("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                                     f"{meta['name']}/status", {"status": status},
                            "application/merge-patch+json")

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, ready: threading.Event, stop: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.cp.admin_token}"}
        connector = aiohttp.TCPConnector(ssl=self.cp.ssl_context())
        async with aiohttp.ClientSession(headers=headers, connector=connector) as self.session:
            runner = await self._serve_logs()
            await self._register()
            self._write_hosts({})
            watching = asyncio.create_task(self._watch())
            heartbeats = asyncio.create_task(self._heartbeat())
            services = asyncio.create_task(self._services())
            ready.set()
            await stop.wait()
            for task in [watching, heartbeats, services, *self._deletions]:
                task.cancel()
            await asyncio.gather(watching, heartbeats, services, *self._deletions,
                                 return_exceptions=True)
            for running in list(self.pods.values()):
                await self._stop_pod(running, grace_s=2)
            await runner.cleanup()

    # ---- Services: what cluster DNS and kube-proxy give a pod, in the small ---------------

    async def _services(self) -> None:
        """Every Service with a selector resolves, in every pod (/etc/hosts), to the address
        of one running pod it selects: `NAME.NAMESPACE.svc[.cluster.local]` reaches it on
        the Service's port when that is the pod's port (no proxy here)."""
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                found = await self._api("GET", "/api/v1/services")
                names: dict[str, str] = {}
                for service in found["items"]:
                    meta, selector = service["metadata"], service["spec"].get("selector")
                    if not selector:
                        continue
                    for running in self.pods.values():
                        pod_meta = running.pod["metadata"]
                        labels = pod_meta.get("labels", {})
                        if (pod_meta["namespace"] == meta["namespace"] and not running.stopping
                                and running.processes
                                and all(labels.get(k) == v for k, v in selector.items())):
                            names[f"{meta['name']}.{meta['namespace']}.svc"] = running.ip
                            break
                self._write_hosts(names)
            await asyncio.sleep(0.5)

    def _write_hosts(self, names: dict[str, str]) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{ip} {name} {name}.cluster.local" for name, ip in sorted(names.items())]
        text = "\n".join(lines) + "\n"
        SCRATCH.mkdir(parents=True, exist_ok=True)
        if not self.hosts.exists() or self.hosts.read_text() != text:
            with open(self.hosts, "w") as hosts:  # in place: pods bind-mount this very file
                hosts.write(text)

    async def _register(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE,
                                                      "kubernetes.io/os": "linux"}}}
        with contextlib.suppress(aiohttp.ClientResponseError):  # 409: registered before
            await self._api("POST", "/api/v1/nodes", node)
        await self._node_status()

    async def _node_status(self) -> None:
        capacity = {"cpu": str(os.cpu_count() or 2), "memory": "16Gi", "pods": "250"}
        await self._api("PATCH", f"/api/v1/nodes/{NODE}/status", {"status": {
            "addresses": [{"type": "InternalIP", "address": self.network.gateway},
                          {"type": "Hostname", "address": NODE}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "capacity": capacity, "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the test node runs pods as processes",
                            "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}],
            "nodeInfo": {"kubeletVersion": "v1.37.2", "containerRuntimeVersion": "process://",
                         "operatingSystem": "linux", "architecture": "amd64",
                         "osImage": "test", "kernelVersion": os.uname().release,
                         "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                         "bootID": ""}}}, "application/merge-patch+json")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(20)
            with contextlib.suppress(aiohttp.ClientError):
                await self._node_status()

    async def _watch(self) -> None:
        """Every pod in the cluster: bind the unscheduled, run ours, stop the deleted."""
        version = ""
        while True:
            try:
                if not version:
                    listing = await self._api("GET", "/api/v1/pods")
                    version = listing["metadata"]["resourceVersion"]
                    for pod in listing["items"]:
                        await self._on_pod("ADDED", pod)
                async with self.session.get(
                        self.cp.url + "/api/v1/pods",
                        params={"watch": "true", "resourceVersion": version,
                                "allowWatchBookmarks": "true"},
                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as stream:
                    async for line in stream.content:
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            version = ""  # 410 Gone: list again
                            break
                        version = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            await self._on_pod(event["type"], event["object"])
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("pod watch broke (%s); watching again", exc)
                await asyncio.sleep(0.5)

    async def _on_pod(self, kind: str, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        running = self.pods.get(uid)
        if kind == "DELETED":
            if running:
                await self._stop_pod(running, grace_s=0)
            return
        if not spec.get("nodeName"):
            if not meta.get("deletionTimestamp"):
                await self._bind(pod)
            return
        if spec["nodeName"] != NODE:
            return
        if meta.get("deletionTimestamp"):
            if running and not running.stopping:
                deletion = asyncio.create_task(self._delete_gracefully(running, pod))
                self._deletions.add(deletion)
                deletion.add_done_callback(self._deletions.discard)
            elif not running:  # never started here (or this node restarted): let it go
                await self._final_delete(pod)
            return
        if running is None and pod.get("status", {}).get("phase", "Pending") == "Pending":
            self._start_pod(pod)

    async def _bind(self, pod: dict) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(aiohttp.ClientResponseError):  # bound meanwhile, or gone
            await self._api("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                                    f"{meta['name']}/binding",
                            {"apiVersion": "v1", "kind": "Binding",
                             "metadata": {"name": meta["name"]},
                             "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}})

    # ---- a pod -------------------------------------------------------------------------------

    def _start_pod(self, pod: dict) -> None:
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        netns, ip = self.network.add_pod(pod["metadata"]["uid"])
        SCRATCH.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{pod['metadata']['name'][:40]}-", dir=SCRATCH))
        running = RunningPod(pod, netns, ip, scratch)
        self.pods[pod["metadata"]["uid"]] = running
        running.task = asyncio.create_task(self._run_pod(running), name=key)

    async def _run_pod(self, running: RunningPod) -> None:
        spec = running.pod["spec"]
        started = _now()
        try:
            volumes = await self._volumes(running)
        except Exception as exc:  # a Secret that is not there, say: the kubelet waits too
            await self._patch_status(running, {"phase": "Pending", "conditions": [{
                "type": "ContainersReady", "status": "False", "reason": "VolumeError",
                "message": str(exc)[:500]}]})
            return
        await self._patch_status(running, {"phase": "Pending", "hostIP": self.network.gateway,
                                           "podIP": running.ip, "podIPs": [{"ip": running.ip}],
                                           "startTime": started})
        containers = spec["containers"]
        deadline = spec.get("activeDeadlineSeconds")
        loops = [asyncio.create_task(self._run_container(running, c, volumes))
                 for c in containers]
        try:
            await asyncio.wait_for(asyncio.gather(*loops), deadline)
            reason = None
        except TimeoutError:
            reason = "DeadlineExceeded"
            await self._kill_all(running, grace_s=0)
            await asyncio.gather(*loops, return_exceptions=True)
        if running.stopping:
            return
        codes = [s.get("state", {}).get("terminated", {}).get("exitCode", 1)
                 for s in running.statuses.values()]
        status = {"phase": "Succeeded" if not reason and all(c == 0 for c in codes)
                  else "Failed",
                  "conditions": [{"type": "Ready", "status": "False"}],
                  "containerStatuses": list(running.statuses.values())}
        if reason:
            status.update(reason=reason, message=f"Pod was active on the node longer than "
                                                 f"the specified deadline ({deadline}s)")
        await self._patch_status(running, status)

    async def _run_container(self, running: RunningPod, container: dict,
                             volumes: dict[str, Path]) -> None:
        name = container["name"]
        policy = running.pod["spec"].get("restartPolicy", "Always")
        logs = running.logs[name] = ContainerLog()
        restarts, backoff = 0, 1.0
        while not running.stopping:
            argv = self._argv(container)
            if argv is None:
                running.statuses[name] = self._container_status(container, restarts, {
                    "waiting": {"reason": "ErrImageNeverPull", "message": f"the test node "
                                f"runs only Gristmill's image, not {container['image']}"}})
                await self._report(running)
                return
            try:
                env = await self._environment(running, container)
            except (aiohttp.ClientError, ContainerConfigError) as exc:  # not there (yet)
                running.statuses[name] = self._container_status(container, restarts, {
                    "waiting": {"reason": "CreateContainerConfigError",
                                "message": str(exc)[:500]}})
                await self._report(running)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            process = await asyncio.create_subprocess_exec(
                *self._in_pod(running, container, volumes, argv), env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            running.processes[name] = process
            running.statuses[name] = self._container_status(
                container, restarts, {"running": {"startedAt": _now()}}, ready=True)
            await self._report(running)
            while chunk := await process.stdout.read(65536):
                await logs.append(chunk)
            code = await process.wait()
            code = code if code >= 0 else 128 - code
            running.statuses[name] = self._container_status(container, restarts, {
                "terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                               "finishedAt": _now()}})
            if running.stopping or policy == "Never" or (policy == "OnFailure" and code == 0):
                break
            restarts += 1
            await self._report(running)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        await logs.finish()

    async def _report(self, running: RunningPod) -> None:
        statuses = list(running.statuses.values())
        ready = all(s.get("ready") for s in statuses) and len(statuses) == len(
            running.pod["spec"]["containers"])
        condition = {"type": "Ready", "status": "True" if ready else "False"}
        # Pending until a container has run, as a kubelet reports it (a container that
        # cannot be configured, for a missing Secret, leaves its pod Pending).
        ran = any(s["restartCount"] or {"running", "terminated"} & set(s["state"])
                  for s in statuses)
        await self._patch_status(running, {
            "phase": "Running" if ran else "Pending", "containerStatuses": statuses,
            "conditions": [condition, {**condition, "type": "ContainersReady"}]})

    @staticmethod
    def _container_status(container: dict, restarts: int, state: dict,
                          ready: bool = False) -> dict:
        return {"name": container["name"], "image": container["image"], "imageID": "",
                "ready": ready, "started": "running" in state, "restartCount": restarts,
                "state": state}

    @staticmethod
    def _argv(container: dict) -> list[str] | None:
        command = list(container.get("command") or [])
        if not command:  # the image's entrypoint
            if not any(marker in container["image"] for marker in GRISTMILL_IMAGE_MARKERS):
                return None
            command = ["gristmill"]
        argv = [*command, *container.get("args", [])]
        if argv[0] == "gristmill":
            return [sys.executable, "-m", "gristmill.cli", *argv[1:]]
        return [sys.executable if arg in ("python", "python3") else arg for arg in argv]

    def _in_pod(self, running: RunningPod, container: dict, volumes: dict[str, Path],
                argv: list[str]) -> list[str]:
        """The pod's network namespace, a mount namespace of the container's own (what `ip
        netns exec` gives) with its volumes in place, the pod's name as its hostname (a UTS
        namespace), then the command."""
        mounts = [f"hostname {shlex.quote(running.pod['metadata']['name'][:63])}",
                  f"mount --bind {shlex.quote(str(self.hosts))} /etc/hosts",
                  f"mkdir -p {SOURCE_MOUNT} && mount --bind {shlex.quote(str(PROJECT_SOURCE))} "
                  f"{SOURCE_MOUNT}"]
        for mount in container.get("volumeMounts", []):
            source = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            target = shlex.quote(mount["mountPath"])
            mounts.append(f"mkdir -p {target} && mount --bind {shlex.quote(str(source))} "
                          f"{target}")
            if mount.get("readOnly"):
                mounts.append(f"mount -o remount,bind,ro {target}")
        workdir = container.get("workingDir")
        if workdir:
            mounts.append(f"mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)}")
        script = " && ".join(mounts) + ' && exec "$@"'
        return ["ip", "netns", "exec", running.netns, "unshare", "--uts", "--",
                "/bin/sh", "-c", script, "sh", *argv]

    # ---- volumes and environment ------------------------------------------------------------

    async def _volumes(self, running: RunningPod) -> dict[str, Path]:
        found = {}
        for volume in running.pod["spec"].get("volumes", []):
            path = running.scratch / "volumes" / volume["name"]
            path.mkdir(parents=True)
            if "secret" in volume:
                await self._write_items(path, await self._data(
                    running, "secrets", volume["secret"]["secretName"]))
            elif "configMap" in volume:
                await self._write_items(path, await self._data(
                    running, "configmaps", volume["configMap"]["name"]))
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    await self._project(running, source, path)
            elif "downwardAPI" in volume:
                for item in volume["downwardAPI"]["items"]:
                    (path / item["path"]).write_text(self._field(running, item["fieldRef"]))
            path.chmod(0o1777 if "emptyDir" in volume else 0o755)
            found[volume["name"]] = path
        return found

    async def _data(self, running: RunningPod, kind: str, name: str) -> dict[str, bytes]:
        namespace = running.pod["metadata"]["namespace"]
        obj = await self._api("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        return {k: v.encode() for k, v in (obj.get("data") or {}).items()}

    @staticmethod
    async def _write_items(path: Path, data: dict[str, bytes]) -> None:
        for key, value in data.items():
            (path / key).write_bytes(value)

    async def _project(self, running: RunningPod, source: dict, path: Path) -> None:
        meta = running.pod["metadata"]
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            account = running.pod["spec"].get("serviceAccountName", "default")
            answer = await self._api(
                "POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                    "expirationSeconds": token.get("expirationSeconds", 3607),
                    "audiences": [token["audience"]] if token.get("audience") else None,
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                       "uid": meta["uid"]}}})
            (path / token["path"]).write_text(answer["status"]["token"])
        elif "configMap" in source:
            data = await self._data(running, "configmaps", source["configMap"]["name"])
            for item in source["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                (path / item["path"]).write_bytes(data[item["key"]])
        elif "secret" in source:
            data = await self._data(running, "secrets", source["secret"]["name"])
            for item in source["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                (path / item["path"]).write_bytes(data[item["key"]])
        elif "downwardAPI" in source:
            for item in source["downwardAPI"]["items"]:
                (path / item["path"]).write_text(self._field(running, item["fieldRef"]))

    def _field(self, running: RunningPod, ref: dict) -> str:
        pod = running.pod
        values = {"metadata.name": pod["metadata"]["name"],
                  "metadata.namespace": pod["metadata"]["namespace"],
                  "metadata.uid": pod["metadata"]["uid"],
                  "spec.nodeName": NODE, "spec.serviceAccountName":
                      pod["spec"].get("serviceAccountName", "default"),
                  "status.podIP": running.ip, "status.hostIP": self.network.gateway}
        path = ref["fieldPath"]
        if path.startswith("metadata.labels['"):
            return pod["metadata"].get("labels", {}).get(path[17:-2], "")
        return values[path]

    async def _environment(self, running: RunningPod, container: dict) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
               "PYTHONPATH": SOURCE_MOUNT, "PYTHONUNBUFFERED": "1",
               "HOSTNAME": running.pod["metadata"]["name"],
               # What a Service for the API server gives every pod: here, its real address.
               "KUBERNETES_SERVICE_HOST": self.cp.host,
               "KUBERNETES_SERVICE_PORT": str(self.cp.port)}
        # As the kubelet's makeEnvironmentVariables: envFrom first, then env, which wins;
        # a missing Secret or key stops the container unless its reference is optional.
        for source in container.get("envFrom", []):
            kind, ref = (("secrets", source["secretRef"]) if "secretRef" in source
                         else ("configmaps", source["configMapRef"]))
            data = await self._optional_data(running, kind, ref)
            for key, value in (data or {}).items():
                env[source.get("prefix", "") + key] = value.decode()
        for var in container.get("env", []):
            source = var.get("valueFrom")
            if source is None:
                env[var["name"]] = var.get("value", "")
            elif "fieldRef" in source:
                env[var["name"]] = self._field(running, source["fieldRef"])
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                kind, ref = (("secrets", source["secretKeyRef"]) if "secretKeyRef" in source
                             else ("configmaps", source["configMapKeyRef"]))
                data = await self._optional_data(running, kind, ref)
                if data is None:
                    continue
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = "Secret" if kind == "secrets" else "ConfigMap"
                    raise ContainerConfigError(
                        f"couldn't find key {ref['key']} in {what} "
                        f"{running.pod['metadata']['namespace']}/{ref['name']}")
                env[var["name"]] = data[ref["key"]].decode()
        return env

    async def _optional_data(self, running: RunningPod, kind: str, ref: dict
                             ) -> dict[str, bytes] | None:
        """A Secret's or ConfigMap's data; None when it is missing and optional."""
        try:
            return await self._data(running, kind, ref["name"])
        except aiohttp.ClientResponseError as exc:
            if exc.status != 404:
                raise
            if ref.get("optional"):
                return None
            raise ContainerConfigError(f'{kind[:-1]} "{ref["name"]}" not found') from None

    # ---- stopping --------------------------------------------------------------------------------

    async def _kill_all(self, running: RunningPod, grace_s: float) -> None:
        alive = [p for p in running.processes.values() if p.returncode is None]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM if grace_s else signal.SIGKILL)
        if alive and grace_s:
            _, late = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in alive],
                                         timeout=grace_s)
            for process in alive:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)

    async def _stop_pod(self, running: RunningPod, grace_s: float) -> None:
        running.stopping = True
        await self._kill_all(running, grace_s)
        if running.task:
            await asyncio.gather(running.task, return_exceptions=True)
        self.pods.pop(running.pod["metadata"]["uid"], None)
        self.network.remove_pod(running.pod["metadata"]["uid"])
        shutil.rmtree(running.scratch, ignore_errors=True)

    async def _delete_gracefully(self, running: RunningPod, pod: dict) -> None:
        grace = pod["metadata"].get("deletionGracePeriodSeconds", 30)
        await self._stop_pod(running, grace_s=grace)
        await self._final_delete(pod)

    async def _final_delete(self, pod: dict) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(aiohttp.ClientResponseError):
            await self._api("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                                      f"{meta['name']}",
                            {"gracePeriodSeconds": 0,
                             "preconditions": {"uid": meta["uid"]}})

    # ---- logs -----------------------------------------------------------------------------------

    async def _serve_logs(self) -> web.AppRunner:
        async def container_log(request: web.Request) -> web.StreamResponse:
            ns, name, container = (request.match_info[k] for k in ("ns", "pod", "container"))
            running = next((r for r in self.pods.values()
                            if r.key == f"{ns}/{name}"), None)
            logs = running.logs.get(container) if running else None
            if logs is None:
                return web.Response(status=404, text=f"container {container} of {ns}/{name} "
                                                     f"is not running on this node")
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await response.prepare(request)
            if "tailLines" in request.query:
                lines = bytes(logs.output).splitlines(keepends=True)
                await response.write(b"".join(lines[-int(request.query["tailLines"]):]))
            else:
                async for chunk in logs.follow(request.query.get("follow") == "true"):
                    if chunk:
                        await response.write(chunk)
            return response

        app = web.Application()
        app.router.add_get("/containerLogs/{ns}/{pod}/{container}", container_log)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        cert, key = self.cp.authority.issue("kubelet", [self.network.gateway])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        site = web.TCPSite(runner, self.network.gateway, 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return runner


class NodeThread:
    """The node's event loop in a thread of its own, for a test session."""

    def __init__(self, control_plane: ControlPlane, network: PodNetwork):
        self.node = Node(control_plane, network)
        self._ready = threading.Event()

    def start(self) -> NodeThread:
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="k8s-node", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the test node did not come up")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.node.run(self._ready, self._stop))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
