"""Who may do what, through the real kubernetes client against a stand-in that answers
TokenReview and SubjectAccessReview (tests/reviewkit.py): every route refuses callers
without a valid token, asks for exactly its documented permission, and works once that
permission is granted; answers are cached; approvals are the caller's own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from flowkit import apply_yaml_at

from gristmill.api.access import (
    GATE,
    AccessSettings,
    Authenticated,
    Gate,
    Open,
    WorkerToken,
    access_middleware,
)
from gristmill.api.app import ROUTES, ApiSettings
from gristmill.api.crosssite import SECURITY_HEADERS, SiteSettings
from gristmill.api.identity import CALLER, Caller
from gristmill.auth.authn import StaticTokenAuthenticator, TokenCacheSettings
from gristmill.auth.authz import AccessCacheSettings, LocalAuthorizer
from gristmill.auth.cache import ExpiringCache
from tests.apikit import api_in_process, free_port
from tests.reviewkit import FakeKubernetes, kubeconfig, manifests

NS = "team-a"
MANIFESTS = manifests(NS)
LATER = {"scheduledFor": "2999-01-01T00:00:00Z"}  # stays queued: no worker runs here


def _as(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclasses.dataclass
class Api:
    url: str
    fake: FakeKubernetes
    session: aiohttp.ClientSession
    admin: str  # a token allowed everything in NS

    async def call(self, method: str, path: str, token: str | None, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
        async with self.session.request(method, self.url + path, json=body,
                                        headers={**_as(token), **(headers or {})}) as response:
            text = await response.text()
            is_json = response.content_type == "application/json"
            return (response.status, dict(response.headers),
                    json.loads(text) if is_json and text else text)

    async def submit(self, kind: str, name: str, token: str | None = None,
                     body: Any = None) -> str:
        status, _, answer = await self.call("POST", f"/api/v1/namespaces/{NS}/{kind}/{name}/runs",
                                            token or self.admin, body or {})
        assert status == 201, answer
        return answer["id"]


def grant_everything(fake: FakeKubernetes, user: str) -> None:
    for verb, resource in [("create", "scripts/runs"), ("create", "flows/runs"),
                           ("get", "runs"), ("update", "runs/cancel"),
                           ("update", "runs/approval"), ("update", "runs/restart"),
                           ("list", "scripts"), ("list", "flows"), ("list", "runs"),
                           ("list", "audit")]:
        fake.allow(user, verb, resource, NS)


@contextlib.asynccontextmanager
async def running_api(database_url: str, directory: Path,
                      access: AccessSettings | None = None,
                      site: SiteSettings | None = None) -> AsyncIterator[Api]:
    """The manifests applied, the API reviewing with a fresh stand-in, an admin in NS."""
    await apply_yaml_at(database_url, MANIFESTS)
    fake = FakeKubernetes()
    admin = fake.add_user("admin")
    grant_everything(fake, "admin")
    async with fake.serving(directory) as config:
        settings = ApiSettings(database_url, site=site or SiteSettings(),
                               access=dataclasses.replace(access or AccessSettings(),
                                                          kubeconfig=str(config)))
        async with api_in_process(settings) as url, aiohttp.ClientSession() as session:
            yield Api(url, fake, session, admin)


@pytest.fixture
async def api(database_url, tmp_path):
    async with running_api(database_url, tmp_path) as running:
        yield running


# --- every route -------------------------------------------------------------------------

# For each route: a request to make, and the permission(s) it must ask for, as
# (verb, resource/subresource, namespace, name). `runs` are the ids the test made.
RouteCase = tuple[Callable[[dict[str, str]], str], Any, list[tuple[str, str, str, str]]]
READ = ("get", "runs", NS, "")
CASES: dict[tuple[str, str], RouteCase] = {
    ("POST", "/api/v1/namespaces/{namespace}/scripts/{name}/runs"): (
        lambda runs: f"/api/v1/namespaces/{NS}/scripts/hello/runs", LATER,
        [("create", "scripts/runs", NS, "hello")]),
    ("POST", "/api/v1/namespaces/{namespace}/flows/{name}/runs"): (
        lambda runs: f"/api/v1/namespaces/{NS}/flows/gated/runs", {},
        [("create", "flows/runs", NS, "gated")]),
    ("POST", "/api/v1/namespaces/{namespace}/scripts/{name}/runs:batch"): (
        lambda runs: f"/api/v1/namespaces/{NS}/scripts/hello/runs:batch",
        {"runs": [LATER, LATER]}, [("create", "scripts/runs", NS, "hello")]),
    ("POST", "/api/v1/namespaces/{namespace}/flows/{name}/runs:batch"): (
        lambda runs: f"/api/v1/namespaces/{NS}/flows/gated/runs:batch", {"runs": [{}, {}]},
        [("create", "flows/runs", NS, "gated")]),
    ("GET", "/api/v1/namespaces/{namespace}/runs"): (
        lambda runs: f"/api/v1/namespaces/{NS}/runs", None, [("list", "runs", NS, "")]),
    ("GET", "/api/v1/namespaces/{namespace}/audit"): (
        lambda runs: f"/api/v1/namespaces/{NS}/audit", None, [("list", "audit", NS, "")]),
    ("GET", "/api/v1/runs/{id}"): (lambda runs: f"/api/v1/runs/{runs['script']}", None, [READ]),
    ("GET", "/api/v1/runs/{id}/logs"): (
        lambda runs: f"/api/v1/runs/{runs['script']}/logs", None, [READ]),
    ("POST", "/api/v1/runs/{id}/cancel"): (
        lambda runs: f"/api/v1/runs/{runs['script']}/cancel", {},
        [READ, ("update", "runs/cancel", NS, "")]),
    ("POST", "/api/v1/runs/{id}/approve"): (
        lambda runs: f"/api/v1/runs/{runs['gated']}/approve", {},
        [READ, ("update", "runs/approval", NS, "")]),
    ("POST", "/api/v1/runs/{id}/reject"): (
        lambda runs: f"/api/v1/runs/{runs['gated']}/reject", {},
        [READ, ("update", "runs/approval", NS, "")]),
    ("POST", "/api/v1/runs/{id}/restart"): (
        lambda runs: f"/api/v1/runs/{runs['ended']}/restart", {"fromStep": "gate"},
        [READ, ("update", "runs/restart", NS, "")]),
    ("GET", "/api/v1/scripts"): (lambda runs: f"/api/v1/scripts?namespace={NS}", None,
                                 [("list", "scripts", NS, "")]),
    ("GET", "/api/v1/flows"): (lambda runs: "/api/v1/flows", None,
                               [("list", "flows", "", "")]),  # every namespace
    ("GET", "/api/v1/openapi.json"): (lambda runs: "/api/v1/openapi.json", None, []),
}
OPEN_ROUTES = {"/healthz", "/readyz", "/metrics"}


# Routes for workers, with a WorkerGroup's token rather than a Kubernetes one (their
# refusals: tests/test_dispatch.py).
WORKER_ROUTES = {"/api/v1/workers/connect"}


def test_every_route_says_what_it_needs_and_has_a_case_here():
    for method, path, _, access in ROUTES:
        if path in OPEN_ROUTES:
            continue
        if path in WORKER_ROUTES:
            assert isinstance(access, WorkerToken), f"{method} {path}"
            continue
        assert not isinstance(access, Open), f"{method} {path} needs no credentials"
        assert (method, path) in CASES, f"{method} {path}: add its case to CASES"
    assert {path for _, path, _, access in ROUTES if isinstance(access, Open)} <= OPEN_ROUTES


async def _runs(api: Api) -> dict[str, str]:
    ended = await api.submit("flows", "gated")
    await api.call("POST", f"/api/v1/runs/{ended}/reject", api.admin)
    return {"script": await api.submit("scripts", "hello", body=LATER),
            "gated": await api.submit("flows", "gated"), "ended": ended}


def _asked(spec: dict) -> tuple[str, str, str, str]:
    attributes = spec["resourceAttributes"]
    what = attributes["resource"] + (f"/{attributes['subresource']}"
                                     if attributes.get("subresource") else "")
    return attributes["verb"], what, attributes["namespace"], attributes.get("name", "")


@pytest.mark.parametrize("route", list(CASES), ids=[f"{m} {p}" for m, p in CASES])
async def test_each_route_refuses_strangers_and_asks_for_exactly_its_permission(api, route):
    path_of, body, permissions = CASES[route]
    method = route[0]
    path = path_of(await _runs(api))

    status, headers, answer = await api.call(method, path, None, body)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), answer
    assert "kubectl create token" in answer["error"]
    status, headers, answer = await api.call(method, path, "not-a-token-anyone-knows", body)
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"], answer

    nobody = api.fake.add_user("nobody")
    api.fake.access_reviews.clear()
    status, _, answer = await api.call(method, path, nobody, body)
    if not permissions:
        assert status == 200  # the description: any authenticated caller
        return
    if permissions[0] == READ:  # by run id: as if the run did not exist
        assert status == 404 and answer["error"] == f"run {path.split('/')[4]} not found"
    else:
        verb, what, namespace, name = permissions[0]
        assert status == 403 and f"you (nobody) may not {verb} {what}" in answer["error"]
        assert "gristmill-" in answer["error"] and "kubectl auth can-i" in answer["error"]
    assert [_asked(spec) for spec in api.fake.access_reviews] == permissions[:1]
    assert api.fake.access_reviews[0]["user"] == "nobody"

    if len(permissions) > 1:  # may read the run, not act on it: 403 naming the permission
        reader = api.fake.add_user("reader")
        api.fake.allow("reader", *READ[:3])
        status, _, answer = await api.call(method, path, reader, body)
        verb, what, namespace, _ = permissions[1]
        assert status == 403, answer
        assert f"you (reader) may not {verb} {what} in namespace {namespace}" in answer["error"]

    granted = api.fake.add_user("granted")
    for verb, what, namespace, name in permissions:
        api.fake.allow("granted", verb, what, namespace, name)
    api.fake.access_reviews.clear()
    status, _, answer = await api.call(method, path, granted, body)
    assert status < 300, answer
    assert [_asked(spec) for spec in api.fake.access_reviews] == permissions


async def test_a_role_for_one_script_runs_it_and_no_other(api):
    alice = api.fake.add_user("alice")
    api.fake.allow("alice", "create", "scripts/runs", NS, name="hello")
    assert await api.submit("scripts", "hello", alice, LATER)
    status, _, answer = await api.call("POST", f"/api/v1/namespaces/{NS}/scripts/other/runs",
                                       alice, LATER)
    assert status == 403 and "create scripts/runs other in namespace team-a" in answer["error"]


async def test_a_cluster_wide_listing_needs_a_cluster_wide_grant(api):
    status, _, answer = await api.call("GET", "/api/v1/scripts", api.admin)
    assert status == 403 and "list scripts in all namespaces" in answer["error"]
    assert "clusterrolebinding" in answer["error"]
    status, _, answer = await api.call("GET", f"/api/v1/scripts?namespace={NS}", api.admin)
    assert status == 200 and {s["name"] for s in answer} == {"hello", "other"}


async def test_probes_and_metrics_need_no_token_and_get_the_security_headers(api):
    for path in ("/healthz", "/readyz", "/metrics"):
        status, headers, _ = await api.call("GET", path, None)
        assert status == 200, path
        for name, value in SECURITY_HEADERS.items():
            assert headers[name] == value, (path, name)
    assert not api.fake.token_reviews


async def test_metrics_can_be_made_to_need_a_token_allowed_to_read_them(database_url,
                                                                         tmp_path):
    access = AccessSettings(metrics_need_auth=True)
    async with running_api(database_url, tmp_path, access) as api:
        prometheus, stranger = api.fake.add_user("prometheus"), api.fake.add_user("stranger")
        api.fake.allow("prometheus", "get", "/metrics", "")
        assert (await api.call("GET", "/metrics", None))[0] == 401
        status, _, answer = await api.call("GET", "/metrics", stranger)
        assert status == 403 and "may not get /metrics" in answer["error"], answer
        assert "nonResourceURLs: [/metrics]" in answer["error"]
        status, _, text = await api.call("GET", "/metrics", prometheus)
        assert status == 200 and "gristmill" in text
        assert (await api.call("GET", "/healthz", None))[0] == 200


async def test_the_caller_and_where_it_called_from_are_on_the_request():
    """What the audit of a change reads: request[CALLER], with the peer's address."""
    seen: list[Caller] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request[CALLER])
        return web.json_response({})

    token = "a-local-token-for-this-test"
    authenticator = StaticTokenAuthenticator(token)
    app = web.Application(middlewares=[access_middleware])
    app[GATE] = Gate(authenticator, LocalAuthorizer(authenticator.caller.username),
                     lambda: None, {("GET", "/who"): Authenticated()})
    app.router.add_get("/who", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/who", headers=_as(token)) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()
    assert seen == [Caller("gristmill-dev", groups=("system:masters", "system:authenticated"),
                           source="127.0.0.1")]


# --- caching -------------------------------------------------------------------------------

async def test_reviews_are_cached_briefly_then_asked_again(database_url, tmp_path):
    access = AccessSettings(
        token_cache=TokenCacheSettings(authenticated_ttl_s=1.0, unauthenticated_ttl_s=1.0),
        access_cache=AccessCacheSettings(allowed_ttl_s=1.0, denied_ttl_s=1.0))
    async with running_api(database_url, tmp_path, access) as api:
        fake, admin = api.fake, api.admin
        run = await api.submit("scripts", "hello", body=LATER)
        fake.token_reviews.clear()
        fake.access_reviews.clear()
        for _ in range(3):
            assert (await api.call("GET", f"/api/v1/runs/{run}", admin))[0] == 200
            assert (await api.call("GET", f"/api/v1/runs/{run}", "bad-token"))[0] == 401
        # One review per token and one per permission, not per request (admin's token
        # is known from the submit).
        assert [r["token"] for r in fake.token_reviews] == ["bad-token"]
        assert len(fake.access_reviews) == 1
        # A grant removed is seen once the cached answer expires.
        fake.grants.clear()
        await asyncio.sleep(1.2)
        assert (await api.call("GET", f"/api/v1/runs/{run}", admin))[0] == 404
        assert [r["token"] for r in fake.token_reviews] == ["bad-token", admin]
        assert len(fake.access_reviews) == 2


def test_the_cache_stays_within_its_size_and_forgets_expired_entries():
    now = [0.0]
    cache: ExpiringCache[int] = ExpiringCache(max_entries=3, clock=lambda: now[0])
    for i in range(5):
        cache.put(i, i, ttl=10)
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) == 4
    now[0] = 11
    assert cache.get(4) is None


# --- the API server away -------------------------------------------------------------------

async def test_an_unreachable_api_server_is_a_503_with_retry_after(database_url, tmp_path):
    config = kubeconfig(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens
    settings = ApiSettings(database_url, access=AccessSettings(kubeconfig=str(config),
                                                               review_timeout_s=2))
    async with api_in_process(settings) as url, aiohttp.ClientSession() as session:
        api = Api(url, FakeKubernetes(), session, "")
        status, headers, answer = await api.call("GET", "/api/v1/flows", "some-token")
        assert status == 503 and headers["Retry-After"]
        assert "cannot reach the Kubernetes API server" in answer["error"]


async def test_an_api_without_review_rights_says_which_role_it_lacks(api):
    api.fake.refuse_the_api = True
    status, headers, answer = await api.call("GET", "/api/v1/flows", "any-token")
    assert status == 503 and "Retry-After" in headers
    assert "gristmill-api ClusterRole" in answer["error"]


# --- approvals -----------------------------------------------------------------------------

def _gate(run: dict) -> dict:
    (gate,) = run["steps"]
    return gate


async def test_an_approval_records_who_approved_never_a_name_sent(api):
    run = await api.submit("flows", "gated")
    status, _, answer = await api.call("POST", f"/api/v1/runs/{run}/approve", api.admin,
                                       {"by": "cfo@example.com"})
    assert status == 400 and answer["field"] == "by" and "credentials" in answer["error"]
    status, _, answer = await api.call("POST", f"/api/v1/runs/{run}/approve", api.admin, {})
    assert status == 200 and answer["decision"] == "approved"
    _, _, shown = await api.call("GET", f"/api/v1/runs/{run}", api.admin)
    assert _gate(shown)["approvedBy"] == "admin"
    rejected = await api.submit("flows", "gated")
    await api.call("POST", f"/api/v1/runs/{rejected}/reject", api.admin, {})
    _, _, shown = await api.call("GET", f"/api/v1/runs/{rejected}", api.admin)
    assert _gate(shown)["error"]["by"] == "admin" and "rejected by admin" in shown[
        "error"]["message"]


async def test_the_submitter_may_not_approve_a_four_eyes_gate(api):
    alice, bob = api.fake.add_user("alice"), api.fake.add_user("bob")
    grant_everything(api.fake, "alice")
    grant_everything(api.fake, "bob")
    run = await api.submit("flows", "four-eyes", alice)
    status, _, answer = await api.call("POST", f"/api/v1/runs/{run}/approve", alice, {})
    assert status == 403 and "forbidSubmitter" in answer["error"], answer
    status, _, answer = await api.call("POST", f"/api/v1/runs/{run}/approve", bob, {})
    assert status == 200, answer


async def test_a_gate_for_given_groups_refuses_everyone_else(api):
    carol = api.fake.add_user("carol", "engineering")
    dave = api.fake.add_user("dave", "finance")
    grant_everything(api.fake, "carol")
    grant_everything(api.fake, "dave")
    run = await api.submit("flows", "finance-only", carol)
    status, _, answer = await api.call("POST", f"/api/v1/runs/{run}/reject", carol, {})
    assert status == 403 and "members of finance" in answer["error"]
    assert "you are carol in engineering" in answer["error"]
    status, _, answer = await api.call("POST", f"/api/v1/runs/{run}/approve", dave, {})
    assert status == 200, answer


# --- cross-site ----------------------------------------------------------------------------

async def test_cross_site_requests_and_foreign_hosts_are_refused(database_url, tmp_path):
    site = SiteSettings(allowed_origins=("https://ui.example.com",),
                        allowed_hosts=("gristmill.example.com", "*.svc.cluster.local"))
    async with running_api(database_url, tmp_path, site=site) as api:
        url, session, admin = api.url, api.session, api.admin
        flows = f"/api/v1/flows?namespace={NS}"
        port = url.rsplit(":", 1)[1]
        for origin in ("https://evil.example", "null"):
            status, _, answer = await api.call("GET", flows, admin,
                                               headers={"Origin": origin})
            assert status == 403 and "cross-site" in answer["error"]
        status, _, _ = await api.call("GET", flows, admin,
                                      headers={"Sec-Fetch-Site": "cross-site"})
        assert status == 403
        for origin in ("https://ui.example.com", f"http://127.0.0.1:{port}"):
            assert (await api.call("GET", flows, admin, headers={"Origin": origin}))[0] == 200
        for host in ("evil.example", "rebound.example.com:80"):
            status, _, answer = await api.call("GET", flows, admin, headers={"Host": host})
            assert status == 400 and "allowedHosts" in answer["error"]
        for host in ("gristmill.example.com", "api.ns.svc.cluster.local:8080", "10.1.2.3",
                     "[fd00::1]:8080", "localhost:8080"):
            assert (await api.call("GET", flows, admin, headers={"Host": host}))[0] == 200
        # A form or text/plain POST, the kind a page elsewhere can send, is refused.
        run = await api.submit("scripts", "hello", body=LATER)
        for media in ("text/plain", "application/x-www-form-urlencoded"):
            async with session.post(f"{url}/api/v1/runs/{run}/cancel", data=b"{}",
                                    headers={**_as(admin), "Content-Type": media}) as r:
                assert r.status == 415
        _, headers, _ = await api.call("GET", f"/api/v1/runs/{run}", None)
        assert all(headers[name] == value for name, value in SECURITY_HEADERS.items())
        async with session.get(f"{url}/api/v1/runs/{run}/logs", headers=_as(admin)) as r:
            assert r.status == 200 and r.headers["X-Content-Type-Options"] == "nosniff"
