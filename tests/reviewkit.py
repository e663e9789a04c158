"""A stand-in Kubernetes API server that answers only TokenReview and SubjectAccessReview,
from a table of tokens and grants the test writes; the API reaches it through the real
kubernetes client and a kubeconfig, as it reaches a cluster."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.apikit import free_port

API_TOKEN = "the-api-service-account-token"  # what the API itself authenticates with
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


@dataclass(frozen=True)
class Grant:
    """`verb` on `resource` ("runs", "runs/cancel", "scripts/runs"...) in `namespace`
    ("" only for cluster-wide questions), optionally only for object `name`."""

    user: str
    verb: str
    resource: str
    namespace: str
    name: str = ""


@dataclass
class FakeKubernetes:
    users: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # token -> user
    grants: set[Grant] = field(default_factory=set)
    token_reviews: list[dict] = field(default_factory=list)  # every spec received
    access_reviews: list[dict] = field(default_factory=list)
    refuse_the_api: bool = False  # answer 403 to the API's own requests

    def add_user(self, name: str, *groups: str) -> str:
        token = f"token-of-{name}"
        self.users[token] = (name, groups)
        return token

    def allow(self, user: str, verb: str, resource: str, namespace: str, name: str = "") -> None:
        self.grants.add(Grant(user, verb, resource, namespace, name))

    def _allowed(self, spec: dict) -> bool:
        if "nonResourceAttributes" in spec:  # a URL such as /metrics: a grant of that path
            url = spec["nonResourceAttributes"]
            return Grant(spec["user"], url["verb"], url["path"], "") in self.grants
        attributes = spec["resourceAttributes"]
        resource = attributes["resource"] + (
            f"/{attributes['subresource']}" if attributes.get("subresource") else "")
        return any(g.user == spec["user"] and g.verb == attributes["verb"]
                   and g.resource == resource and g.namespace == attributes["namespace"]
                   and g.name in ("", attributes.get("name", "")) for g in self.grants)

    async def _review(self, request: web.Request) -> web.Response:
        if self.refuse_the_api or request.headers.get("Authorization") != f"Bearer {API_TOKEN}":
            return web.json_response({"kind": "Status", "code": 403}, status=403)
        body = await request.json()
        spec = body["spec"]
        if request.path == TOKEN_REVIEWS:
            self.token_reviews.append(spec)
            found = self.users.get(spec["token"])
            status = {"authenticated": found is not None}
            if found:
                status["user"] = {"username": found[0], "groups": list(found[1])}
                status["audiences"] = spec.get("audiences") or ["https://kubernetes.default.svc"]
        else:
            self.access_reviews.append(spec)
            status = {"allowed": self._allowed(spec)}
        return web.json_response({**body, "status": status}, status=201)

    @contextlib.asynccontextmanager
    async def serving(self, directory: Path) -> AsyncIterator[Path]:
        """Serve on loopback; yields a kubeconfig that reaches it as the API's account."""
        app = web.Application()
        app.router.add_post(TOKEN_REVIEWS, self._review)
        app.router.add_post(ACCESS_REVIEWS, self._review)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield kubeconfig(directory, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()


def kubeconfig(directory: Path, server: str) -> Path:
    path = directory / "api.kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "api",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "api", "user": {"token": API_TOKEN}}],
        "contexts": [{"name": "api", "context": {"cluster": "fake", "user": "api"}}],
    }))
    return path


def manifests(namespace: str) -> str:
    """Two Scripts and three gated Flows: one open, one four-eyes, one for finance."""
    return f"""
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {{name: hello, namespace: {namespace}}}
spec: {{language: python, code: "def main(name: str = 'world'):\\n    return name\\n"}}
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {{name: other, namespace: {namespace}}}
spec: {{language: python, code: "def main():\\n    return 1\\n"}}
---
apiVersion: gristmill.io/v1alpha1
kind: Flow
metadata: {{name: gated, namespace: {namespace}}}
spec:
  steps:
    - {{id: gate, suspend: {{timeout: 1h}}}}
---
apiVersion: gristmill.io/v1alpha1
kind: Flow
metadata: {{name: four-eyes, namespace: {namespace}}}
spec:
  steps:
    - {{id: gate, suspend: {{timeout: 1h, forbidSubmitter: true}}}}
---
apiVersion: gristmill.io/v1alpha1
kind: Flow
metadata: {{name: finance-only, namespace: {namespace}}}
spec:
  steps:
    - {{id: gate, suspend: {{timeout: 1h, approvers: {{groups: [finance], users: [cfo]}}}}}}
"""
