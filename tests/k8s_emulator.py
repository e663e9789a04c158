"""kmock's Kubernetes emulator with what kopf relies on and kmock 0.8 leaves out.

Filled in on every write: metadata.uid, resourceVersion (bumped on every
write), creationTimestamp, generation (bumped when the spec changes), name
from generateName; and a failed JSON-patch `test` answers 422, not 500.
What the emulator still does not do: garbage collection through owner
references, validation against the CRD schema, RBAC, server-side apply.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid

import attrs
import jsonpatch
import kmock
from kmock._internal import enums

_versions = itertools.count(1000)


@attrs.define
class PatchTestFailed(kmock.KubernetesError):
    status: int = 422
    reason: str = "Invalid"
    message: str = "the JSON patch test operation failed"


class Emulator(kmock.KubernetesEmulator):
    async def _handle(self, request):  # kmock==0.8's private hook, pinned in pyproject
        if request.resource is not None and isinstance(request.data, dict | list):
            self._stamp(request)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed:
            return await self._render_error(PatchTestFailed())

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
