"""kmock's Kubernetes emulator with what kopf relies on and kmock 0.8 leaves out.

Filled in on every write: metadata.uid, resourceVersion (bumped on every
write), creationTimestamp, generation (bumped when the spec changes), name
from generateName; and a failed JSON-patch `test` answers 422, not 500.
What the emulator still does not do: garbage collection through owner
references, validation against the CRD schema, RBAC, server-side apply's field
ownership (an apply creates or merges); the real API server tests those.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import uuid

import aiohttp
import attrs
import jsonpatch
import kmock
import yaml
from aiohttp import web
from k8s_kubelet import ProcessKubelet
from kmock._internal import enums

_versions = itertools.count(1000)
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}


@attrs.define
class PatchTestFailed(kmock.KubernetesError):
    status: int = 422
    reason: str = "Invalid"
    message: str = "the JSON patch test operation failed"


class Emulator(kmock.KubernetesEmulator):
    async def _handle(self, request):  # kmock==0.8's private hook, pinned in pyproject
        if self._creating_apply(request):
            return await self._create_by_apply(attrs.evolve(request, action=enums.action.CREATE))
        if request.resource is not None and isinstance(request.data, dict | list):
            self._stamp(request)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed:
            return await self._render_error(PatchTestFailed())

    def _creating_apply(self, request) -> bool:
        """A server-side apply of an object that does not exist creates it. (An apply of one
        that does is merged like a patch: removing the fields the manager stopped setting
        is what the real API server does, and is tested there.)"""
        if request.action != enums.action.UPDATE or request.name is None:
            return False
        if "apply-patch" not in request.headers.get("Content-Type", ""):
            return False
        key = (request.resource, request.namespace, request.name)
        return key not in self._objects or self._objects[key].deleted

    async def _create_by_apply(self, request):
        """What kmock does for a create, for a create that came as an apply (a PATCH, for
        which kmock has no reaction)."""
        self._stamp(request)
        request.data.setdefault("metadata", {}).setdefault("namespace", request.namespace)
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key in self._objects:
                self._objects[key].create(request.data)
            else:
                self._objects[key] = request.data
            raw = self._objects[key].last.raw
            await self._buses[request.resource].put({"type": "ADDED", "object": raw})
        return web.json_response(raw, status=201)

    def _stamp(self, request) -> None:
        version = str(next(_versions))
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if "name" not in meta and "generateName" in meta:
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp",
                            dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["generation"] = 1
            meta["resourceVersion"] = version
        elif request.action == enums.action.UPDATE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            current = self._objects[key].raw if key in self._objects and \
                not self._objects[key].deleted else {}
            generation = (current.get("metadata") or {}).get("generation", 1)
            if isinstance(request.data, dict):
                spec_changed = "spec" in request.data and \
                    request.data["spec"] != current.get("spec")
                meta = request.data.setdefault("metadata", {}) or {}
                request.data["metadata"] = meta
                meta["resourceVersion"] = version
                if spec_changed and request.subresource is None:
                    meta["generation"] = generation + 1
            else:
                spec_changed = any(op.get("path", "").startswith("/spec") for op in request.data)
                request.data.append({"op": "add", "path": "/metadata/resourceVersion",
                                     "value": version})
                if spec_changed and request.subresource is None:
                    request.data.append({"op": "add", "path": "/metadata/generation",
                                         "value": generation + 1})


def write_kubeconfig(path, url: str):
    """A kubeconfig whose current context is the emulator at `url`."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "me", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "me"}}],
    }))
    return path


@attrs.define
class Cluster:
    session: aiohttp.ClientSession  # to the emulator, base URL set
    kubelet: ProcessKubelet | None


@contextlib.asynccontextmanager
async def emulated_cluster(database_url: str, tmp_path, kubelet_namespace: str | None = None):
    """The emulator with Gristmill's resources, and the environment pointing at it; with a
    namespace, a kubelet runs that namespace's job pods as local processes."""
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        for plural, kind in (("scripts", "Script"), ("flows", "Flow"),
                             ("workergroups", "WorkerGroup")):
            emulator.resources[f"gristmill.io/v1alpha1/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=True, singular=kind.lower(), verbs=VERBS,
                subresources={"status"})
        url = str(server.url).rstrip("/")
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
        env = {"KUBECONFIG": str(kubeconfig), "GRISTMILL_DATABASE_URL": database_url,
               "GRISTMILL_RECHECK_INTERVAL": "1", "GRISTMILL_AUTOSCALE_INTERVAL": "1",
               "GRISTMILL_TEST_KUBE_URL": url}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            # A connection per request: a kept-alive one can hang once kopf's streams close.
            connector = aiohttp.TCPConnector(force_close=True)
            async with contextlib.AsyncExitStack() as stack:
                session = await stack.enter_async_context(aiohttp.ClientSession(
                    base_url=url + "/", connector=connector))
                kubelet = None
                if kubelet_namespace:
                    kubelet = await stack.enter_async_context(
                        ProcessKubelet(emulator, url, kubelet_namespace))
                yield Cluster(session, kubelet)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
