"""kmock's Kubernetes emulator with what kopf and the pod executor rely on and kmock 0.8
leaves out.

Filled in on every write: metadata.uid, resourceVersion (bumped on every
write), creationTimestamp, generation (bumped when the spec changes), name
from generateName, namespace from the URL; and a failed JSON-patch `test`
answers 422, not 500.
Lists and watches behave as the API server's do: `labelSelector` (equality,
inequality, existence), a list's resourceVersion, a watch that resumes after
the resourceVersion it is given (or starts with the current state as ADDED
events when it has none), ends after `timeoutSeconds`, sends bookmarks when
allowed, and answers an ERROR event with code 410 (Gone) for a version older
than its history holds. Tests can break every open watch, compact the history
and refuse a client's requests (an API server outage).
What the emulator still does not do: garbage collection through owner
references, validation against the CRD schema, RBAC, server-side apply's field
ownership (an apply creates or merges); the real API server tests those.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import aiohttp
import attrs
import jsonpatch
import kmock
import yaml
from aiohttp import web
from k8s_kubelet import ProcessKubelet
from kmock._internal import aiobus, enums

_versions = itertools.count(1000)
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
HISTORY = 10_000  # watch events kept per resource; older versions answer 410 Gone
BOOKMARK_S = 1.0  # between bookmarks on a quiet watch that allows them
_REQUIREMENT = re.compile(r"^(!?)([A-Za-z0-9._/-]+)(?:(==|=|!=)([A-Za-z0-9._-]*))?$")


@attrs.define
class PatchTestFailed(kmock.KubernetesError):
    status: int = 422
    reason: str = "Invalid"
    message: str = "the JSON patch test operation failed"


@attrs.define
class Unavailable(kmock.KubernetesError):
    status: int = 503
    reason: str = "ServiceUnavailable"
    message: str = "the API server is unavailable (an outage the test made)"


def label_selector(text: str | None) -> Callable[[dict], bool]:
    """A predicate on labels for a `labelSelector` of equality, inequality and existence
    requirements (set-based ones are not needed here, and refused)."""
    tests = []
    for requirement in filter(None, (part.strip() for part in (text or "").split(","))):
        match = _REQUIREMENT.match(requirement)
        if not match or (match[1] and match[3]):
            raise ValueError(f"unsupported label selector requirement {requirement!r}")
        negated, key, operator, value = match.groups()
        if operator is None:
            tests.append(lambda labels, key=key, present=not negated: (key in labels) == present)
        else:
            tests.append(lambda labels, key=key, value=value, equal=operator != "!=":
                         (labels.get(key) == value) == equal)
    return lambda labels: all(test(labels) for test in tests)


def _labels(obj: dict) -> dict:
    return (obj.get("metadata") or {}).get("labels") or {}


class _History:
    """The watch events of one resource, in order, with the resourceVersion of each."""

    def __init__(self):
        self.events: list[tuple[int, dict]] = []
        self.dropped = 0  # events before events[0]
        self.horizon = 0  # the oldest version a watch may resume from
        self.generation = 0  # bumped to end every open watch
        self.changed = asyncio.Condition()

    async def record(self, event: dict) -> None:
        """Keep an event under its object's resourceVersion (kopf waits for the version its
        patch answered), or a new one where that would not be newer than the last event
        (a deletion, a deletionTimestamp set): a watch resumes after the version it saw."""
        obj = event.get("object") or {}
        stamped = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if stamped.isdigit() and int(stamped) > self.latest():
            version = int(stamped)
        else:
            version = next(_versions)
            obj = {**obj, "metadata": {**(obj.get("metadata") or {}),
                                       "resourceVersion": str(version)}}
        async with self.changed:
            self.events.append((version, {**event, "object": obj}))
            if len(self.events) > HISTORY:
                self.dropped += len(self.events) - HISTORY
                self.horizon = self.events[len(self.events) - HISTORY - 1][0]
                del self.events[:len(self.events) - HISTORY]
            self.changed.notify_all()

    def latest(self) -> int:
        return self.events[-1][0] if self.events else self.horizon


class _RecordingBus(aiobus.Bus):
    """kmock's event bus of a resource, also writing each event into its history."""

    def __init__(self, history: _History):
        super().__init__()
        self._history = history

    async def put(self, *items):
        for item in items:
            await self._history.record(item)
        await super().put(*items)


class Emulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        self.histories: defaultdict[object, _History] = defaultdict(_History)
        self._buses = _Buses(self.histories)
        self._writes = asyncio.Lock()
        # Requests this predicate picks are refused with 503, as in an API server outage.
        self.refuse: Callable[[object], bool] | None = None
        self.writes: list[tuple[float, str]] = []  # (monotonic time, User-Agent) of each

    async def _handle(self, request):  # kmock==0.8's private hook, pinned in pyproject
        if self.refuse is not None and self.refuse(request):
            return await self._render_error(Unavailable())
        if request.action not in (enums.action.CREATE, enums.action.UPDATE,
                                  enums.action.DELETE):
            return await super()._handle(request)
        self.writes.append((time.monotonic(), request.headers.get("User-Agent", "")))
        # One write at a time: its events go into the history in the order of their versions.
        async with self._writes:
            if self._creating_apply(request):
                return await self._create_by_apply(
                    attrs.evolve(request, action=enums.action.CREATE))
            if request.resource is not None and isinstance(request.data, dict | list):
                self._stamp(request)
            elif request.action == enums.action.DELETE and request.name is not None:
                # A deletion is a write too: a finalizer's deletionTimestamp, or the DELETED
                # event, comes with a version of its own (kopf tests it in its next patch).
                key = (request.resource, request.namespace, request.name)
                if key in self._objects and not self._objects[key].deleted:
                    self._objects[key].patch({"metadata": {
                        "resourceVersion": str(next(_versions))}})
            try:
                return await super()._handle(request)
            except jsonpatch.JsonPatchTestFailed:
                return await self._render_error(PatchTestFailed())

    # ---- what tests do to watches ---------------------------------------------------

    async def break_watches(self) -> None:
        """End every open watch stream, as an API server restart does."""
        for history in list(self.histories.values()):
            async with history.changed:
                history.generation += 1
                history.changed.notify_all()

    def compact(self) -> None:
        """Forget every event so far: a watch resuming from before now gets 410 Gone."""
        for history in self.histories.values():
            history.horizon = history.latest()
            history.dropped += len(history.events)
            history.events.clear()

    # ---- lists and watches -------------------------------------------------------------

    def _matching(self, request, selects: Callable[[dict], bool]) -> list[dict]:
        objs = self._KubernetesEmulator__get_objs(request, strict=False)
        return [obj.raw for obj in objs if not obj.deleted and selects(_labels(obj.raw))]

    async def _serve_list(self, request):
        for resource in self._get_resources():
            if resource == request.resource:
                break
        else:
            raise kmock.KubernetesResourceNotFoundError()
        selects = label_selector(request.params.get("labelSelector"))
        async with self._lock:  # writes record their events under it: a consistent version
            items = self._matching(request, selects)
            version = self.histories[request.resource].latest()
        return {"kind": "List", "apiVersion": "v1",
                "metadata": {"resourceVersion": str(version)}, "items": items}

    async def _serve_watch(self, request):
        yield b""  # the headers, even if nothing happens
        history = self.histories[request.resource]
        selects = label_selector(request.params.get("labelSelector"))
        bookmarks = request.params.get("allowWatchBookmarks") == "true"
        loop = asyncio.get_running_loop()
        timeout = float(request.params.get("timeoutSeconds") or 0)
        ends = loop.time() + timeout if timeout else None
        since = request.params.get("resourceVersion") or ""
        generation = history.generation
        if since.isdigit() and int(since) > 0:
            if int(since) < history.horizon:
                yield {"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since} "
                                                    f"({history.horizon})"}}
                return
            position = history.dropped + sum(1 for version, _ in history.events
                                              if version <= int(since))
            version = int(since)
        else:  # the state now, then what happens next
            async with self._lock:
                current = self._matching(request, selects)
                position = history.dropped + len(history.events)
                version = history.latest()
            for obj in current:
                yield {"type": "ADDED", "object": obj}
        while True:
            async with history.changed:
                events = history.events[max(0, position - history.dropped):]
                if not events and history.generation == generation:
                    wait = BOOKMARK_S if bookmarks else None
                    if ends is not None:
                        remaining = max(0.0, ends - loop.time())
                        wait = remaining if wait is None else min(wait, remaining)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(history.changed.wait(), wait)
                    events = history.events[max(0, position - history.dropped):]
            if history.generation != generation or (ends is not None and loop.time() >= ends):
                return
            position += len(events)
            for _, event in events:
                obj = event.get("object") or {}
                meta = obj.get("metadata") or {}
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if request.name is not None and meta.get("name") != request.name:
                    continue
                if selects(meta.get("labels") or {}):
                    yield event
            if not events and bookmarks:
                version = max(version, history.latest())
                yield {"type": "BOOKMARK", "object": {
                    "kind": "Pod", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(version)}}}
            elif events:
                version = events[-1][0]

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
            if request.namespace and "namespace" not in meta:  # from the URL, as the API server
                meta["namespace"] = request.namespace
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


class _Buses(dict):
    """kmock's buses by resource, each also recording into the resource's history."""

    def __init__(self, histories):
        super().__init__()
        self._histories = histories

    def __missing__(self, resource):
        bus = self[resource] = _RecordingBus(self._histories[resource])
        return bus


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
    emulator: Emulator


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
                yield Cluster(session, kubelet, emulator)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
