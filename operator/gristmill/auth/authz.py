"""Authorization: may this caller do this? Kubernetes RBAC decides, through a
SubjectAccessReview per (caller, permission), cached briefly like the API server's own
webhook authorizer (which keeps a yes 5 minutes and a no 30 seconds; shorter here, so a
removed RoleBinding takes effect within a minute)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gristmill.api.identity import Caller
from gristmill.auth.cache import ExpiringCache
from gristmill.auth.permissions import GROUP, Permission

if TYPE_CHECKING:  # the kubernetes client loads only where a cluster is asked
    from gristmill.auth.reviews import KubernetesReviews


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # the authorizer's own words, if it gave any


class Authorizer(Protocol):
    async def decide(self, caller: Caller, permission: Permission) -> Decision:
        """Raises ReviewUnavailable when the answer cannot be known now."""


class LocalAuthorizer:
    """`gristmill dev`: the local token's caller may do everything; nobody else exists."""

    def __init__(self, username: str):
        self.username = username

    async def decide(self, caller: Caller, permission: Permission) -> Decision:
        if caller.username == self.username:
            return Decision(True)
        return Decision(False, f"only {self.username} is known to this local server")


@dataclass(frozen=True)
class AccessCacheSettings:
    allowed_ttl_s: float = 30.0
    denied_ttl_s: float = 10.0
    max_entries: int = 10_000


def review_spec(caller: Caller, permission: Permission) -> dict[str, Any]:
    spec: dict[str, Any] = {"user": caller.username, "groups": list(caller.groups)}
    if caller.uid:
        spec["uid"] = caller.uid
    if caller.extra:
        spec["extra"] = {key: list(values) for key, values in caller.extra.items()}
    if permission.path:
        spec["nonResourceAttributes"] = {"path": permission.path, "verb": permission.verb}
        return spec
    attributes = {"group": GROUP, "verb": permission.verb, "resource": permission.resource,
                  "namespace": permission.namespace}
    if permission.subresource:
        attributes["subresource"] = permission.subresource
    if permission.name:
        attributes["name"] = permission.name
    spec["resourceAttributes"] = attributes
    return spec


def _cache_key(caller: Caller, permission: Permission) -> tuple:
    extra = tuple(sorted((k, tuple(v)) for k, v in caller.extra.items()))
    return caller.username, caller.uid, caller.groups, extra, permission


class SubjectAccessReviewAuthorizer:
    def __init__(self, reviews: KubernetesReviews,
                 cache: AccessCacheSettings = AccessCacheSettings()):
        self.reviews = reviews
        self.settings = cache
        self._cache: ExpiringCache[Decision] = ExpiringCache(cache.max_entries)

    async def decide(self, caller: Caller, permission: Permission) -> Decision:
        key = _cache_key(caller, permission)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        review = await self.reviews.access_review(review_spec(caller, permission))
        status = review.status
        allowed = bool(status and status.allowed and not status.denied)
        reason = (status.reason or status.evaluation_error or "") if status else ""
        decision = Decision(allowed, reason)
        self._cache.put(key, decision, self.settings.allowed_ttl_s if allowed
                        else self.settings.denied_ttl_s)
        return decision
