"""Who may call which route: authentication and authorization of every request.

Each route declares what it needs (`Open`, `Authenticated`, `InNamespace`, `OnRun`,
`Listing`; the fourth column of api/app.py ROUTES). The middleware authenticates the
bearer token (401 when there is none or it is not valid), puts the caller on the request
(`request[CALLER]`) and checks the route's permission with the authorizer (403 naming the
permission). Routes by run id look the run's namespace up first, and a caller who may
not `get runs` there is told the run does not exist, as for an unknown id: a run's
existence is not leaked across namespaces.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from gristmill.api import params
from gristmill.api.database import Database
from gristmill.api.identity import CALLER, Caller
from gristmill.api.runs import RunError
from gristmill.auth.authn import Authenticator, TokenCacheSettings
from gristmill.auth.authz import AccessCacheSettings, Authorizer
from gristmill.auth.permissions import Permission, roles_granting
from gristmill.dispatch import tokens
from gristmill.store import flows as flow_store

log = logging.getLogger("gristmill.api")


@dataclass(frozen=True)
class AccessSettings:
    """How the API knows its callers.

    authentication "kubernetes": bearer tokens are checked with TokenReview (with
    `audiences`, the token must be meant for one of them; leave empty for the API
    server's own audience, which is what `kubectl` and exec plugins hand out) and each
    action with SubjectAccessReview, as the API's ServiceAccount (or `kubeconfig`).
    "token": one local token (`gristmill dev`), whose caller may do everything.
    """

    authentication: Literal["kubernetes", "token"] = "kubernetes"
    token: str | None = None
    audiences: tuple[str, ...] = ()
    kubeconfig: str | None = None
    metrics_need_auth: bool = False  # true: GET /metrics needs `get` on nonResourceURL /metrics
    review_concurrency: int = 8
    review_timeout_s: float = 5.0
    token_cache: TokenCacheSettings = TokenCacheSettings()
    access_cache: AccessCacheSettings = AccessCacheSettings()


# --- what a route needs --------------------------------------------------------------------

@dataclass(frozen=True)
class Open:
    """No credentials: probes, and (unless settings say otherwise) metrics."""


@dataclass(frozen=True)
class Authenticated:
    """Any authenticated caller (the API's own description)."""


@dataclass(frozen=True)
class InNamespace:
    """A verb on a resource in the path's {namespace}, on the object named by {name} when
    the path has one (so a Role's resourceNames can allow one Script)."""

    verb: str
    resource: str
    subresource: str = ""


@dataclass(frozen=True)
class OnRun:
    """A verb on runs (or a subresource of runs) in the namespace of the run {id}."""

    verb: str
    subresource: str = ""


@dataclass(frozen=True)
class Listing:
    """`list` on a resource in the ?namespace= given, or in all namespaces."""

    resource: str


@dataclass(frozen=True)
class Metrics:
    """Open, unless `metrics_need_auth`: then `get` on the non-resource URL /metrics, as
    kube-rbac-proxy and the kubelet ask of Prometheus."""


@dataclass(frozen=True)
class WorkerToken:
    """A WorkerGroup's worker token (dispatch/tokens.py), not a Kubernetes one: the
    dispatcher's WebSocket."""


Access = Open | Authenticated | InNamespace | OnRun | Listing | Metrics | WorkerToken

READ_RUNS = "get"


# --- the middleware ------------------------------------------------------------------------

class Unauthenticated(Exception):
    """401: no usable credentials; the message says what to send. `invalid`: a token was
    sent but not accepted (RFC 6750's invalid_token)."""

    def __init__(self, message: str, invalid: bool = False):
        super().__init__(message)
        self.message = message
        self.invalid = invalid

    @property
    def challenge(self) -> str:
        return 'Bearer realm="gristmill"' + (', error="invalid_token"' if self.invalid else "")


_HOW_TO_AUTHENTICATE = (
    "send a bearer token (Authorization: Bearer TOKEN): the gristmill CLI sends the current "
    "kubeconfig's credentials (or, for `gristmill dev`, its local token); from a script, "
    "`kubectl create token SERVICEACCOUNT -n NAMESPACE` makes one")


def _bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if header is None:
        raise Unauthenticated(f"this API needs credentials: {_HOW_TO_AUTHENTICATE}")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(f"the Authorization header must be 'Bearer TOKEN' (not "
                              f"{scheme[:20]!r}); {_HOW_TO_AUTHENTICATE}")
    if not token.isascii() or not token.isprintable() or len(token) > 16384:
        raise Unauthenticated("the bearer token is not a token (printable ASCII, at most "
                              "16 KiB): send the one your kubeconfig or `kubectl create "
                              "token` gives")
    return token


def forbidden(caller: Caller, permission: Permission) -> RunError:
    if permission.path:
        return RunError(403, f"you ({caller.username}) may not {permission.phrase()}: bind a "
                             f"ClusterRole with nonResourceURLs: [{permission.path}], verbs: "
                             f"[{permission.verb}]; check with "
                             f"`{permission.can_i(caller.username)}`")
    roles = roles_granting(permission)
    role = roles[0] if roles else "gristmill-admin"
    where = f"in namespace {permission.namespace}" if permission.namespace else "cluster-wide"
    binding = "rolebinding" if permission.namespace else "clusterrolebinding"
    return RunError(403, f"you ({caller.username}) may not {permission.phrase()}: ask for "
                         f"the {role} role {where} (kubectl create {binding} ... "
                         f"--clusterrole={role} --user={caller.username}); check with "
                         f"`{permission.can_i(caller.username)}`")


def not_found(run_id: object) -> RunError:
    # The same words as for an id nobody knows (api/runs.py get_run).
    return RunError(404, f"run {run_id} not found")


@dataclass
class Gate:
    """The authenticator, the authorizer and what each route needs."""

    authenticator: Authenticator
    authorizer: Authorizer
    database: Callable[[], Database]
    routes: dict[tuple[str, str], Access]
    metrics_need_auth: bool = False
    worker_keys: tuple[bytes, ...] = ()

    async def allows(self, caller: Caller, permission: Permission) -> bool:
        decision = await self.authorizer.decide(caller, permission)
        if not decision.allowed:
            log.info("denied %s to %s%s", permission.phrase(), caller.username,
                     f" ({decision.reason})" if decision.reason else "")
        return decision.allowed

    async def require(self, caller: Caller, permission: Permission) -> None:
        if not await self.allows(caller, permission):
            raise forbidden(caller, permission)

    async def check(self, request: web.Request, caller: Caller, access: Access) -> None:
        if isinstance(access, InNamespace):
            await self.require(caller, Permission(
                access.verb, access.resource, access.subresource,
                params.name(request, "namespace"),
                params.name(request, "name") if "name" in request.match_info else ""))
        elif isinstance(access, Listing):
            namespace = params.query_name(request, "namespace") or ""
            await self.require(caller, Permission("list", access.resource,
                                                  namespace=namespace))
        elif isinstance(access, OnRun):
            await self._check_run(request, caller, access)
        elif isinstance(access, Metrics):
            await self.require(caller, Permission("get", path="/metrics"))

    async def _check_run(self, request: web.Request, caller: Caller, access: OnRun) -> None:
        run_id = params.run_id(request)
        namespace = await self.database().read(
            lambda conn: flow_store.run_namespace(conn, run_id))
        if namespace is None or not await self.allows(
                caller, Permission(READ_RUNS, "runs", namespace=namespace)):
            raise not_found(run_id)
        if (access.verb, access.subresource) != (READ_RUNS, ""):
            await self.require(caller, Permission(access.verb, "runs", access.subresource,
                                                  namespace))

    def needs_credentials(self, access: Access) -> bool:
        if isinstance(access, Metrics):
            return self.metrics_need_auth
        return not isinstance(access, Open)


GATE = web.AppKey("gate", Gate)
WORKER_GRANT = web.RequestKey("worker_grant", tokens.WorkerGrant)


def _peer(request: web.Request) -> str:
    return request.remote or ""


@web.middleware
async def access_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    gate = request.app[GATE]
    route = request.match_info.route
    if request.match_info.http_exception is not None or route.resource is None:
        return await handler(request)  # no such route: aiohttp's 404 or 405
    access = gate.routes[(route.method, route.resource.canonical)]
    if not gate.needs_credentials(access):
        return await handler(request)
    if isinstance(access, WorkerToken):
        request[WORKER_GRANT] = _worker_grant(gate, request)
        return await handler(request)
    caller = await gate.authenticator.authenticate(_bearer_token(request))
    if caller is None:
        raise Unauthenticated(f"the bearer token was not accepted (expired, revoked, or "
                              f"meant for another service): {_HOW_TO_AUTHENTICATE}",
                              invalid=True)
    request[CALLER] = dataclasses.replace(caller, source=_peer(request))
    await gate.check(request, request[CALLER], access)
    return await handler(request)


def _worker_grant(gate: Gate, request: web.Request) -> tokens.WorkerGrant:
    if not gate.worker_keys:
        raise Unauthenticated("this API takes no workers: it has no worker token keys "
                              "(GRISTMILL_WORKER_TOKEN_KEYS, set by the chart); run workers "
                              "with --database-url instead")
    try:
        return tokens.verify(gate.worker_keys, _bearer_token(request))
    except tokens.TokenRejected as exc:
        raise Unauthenticated(str(exc), invalid=True) from None


async def authorize(request: web.Request, verb: str, resource: str, namespace: str = "",
                    subresource: str = "", name: str = "") -> None:
    """For a handler that decides its permission itself (e.g. listing runs in a namespace
    taken from the query): 403 unless the authenticated caller may."""
    await request.app[GATE].require(request[CALLER], Permission(
        verb, resource, subresource, namespace, name))
