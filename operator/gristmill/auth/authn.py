"""Authentication: who a bearer token belongs to.

Two authenticators behind one interface: `TokenReviewAuthenticator` asks the Kubernetes
API server (the cluster's own identities: users of the kubeconfig's OIDC or exec plugin,
ServiceAccounts), `StaticTokenAuthenticator` knows one local token (`gristmill dev`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gristmill.api.identity import Caller
from gristmill.auth.cache import ExpiringCache

if TYPE_CHECKING:  # the kubernetes client loads only where a cluster is asked
    from gristmill.auth.reviews import KubernetesReviews

# The local token's caller: an administrator of everything, as the one user of a laptop.
DEV_USERNAME = "gristmill-dev"
DEV_GROUPS = ("system:masters", "system:authenticated")
DEV_CALLER = Caller(DEV_USERNAME, groups=DEV_GROUPS)


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller | None:
        """The caller the token belongs to, or None for a token that is not valid. Raises
        ReviewUnavailable when that cannot be known now."""


class StaticTokenAuthenticator:
    def __init__(self, token: str, caller: Caller = DEV_CALLER):
        if len(token) < 16:
            raise ValueError("the local API token must be at least 16 characters")
        self._token = token.encode()
        self.caller = caller

    async def authenticate(self, token: str) -> Caller | None:
        # Constant time: how much of a guess was right must not show in the answer's timing.
        return self.caller if hmac.compare_digest(token.encode(), self._token) else None


@dataclass(frozen=True)
class TokenCacheSettings:
    """How long review answers are kept. The API server's own token webhook cache keeps
    an authenticated answer 2 minutes; shorter here, so a deleted ServiceAccount or an
    expired token stops working soon. A refusal is kept shorter still, so a token that
    was just minted works at once on the next try."""

    authenticated_ttl_s: float = 60.0
    unauthenticated_ttl_s: float = 10.0
    max_entries: int = 10_000


def _strings(values: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in values or ())


def _caller_of(user: Any) -> Caller:
    extra: Mapping[str, Any] = user.extra or {}
    return Caller(username=user.username or "", uid=user.uid or "",
                  groups=_strings(user.groups),
                  extra={key: _strings(values) for key, values in extra.items()})


class TokenReviewAuthenticator:
    """A TokenReview per token not seen lately. With `audiences`, the token must be meant
    for one of them (a ServiceAccount token minted with `kubectl create token --audience
    ...`), so a token meant for another service cannot be replayed here."""

    def __init__(self, reviews: KubernetesReviews, audiences: tuple[str, ...] = (),
                 cache: TokenCacheSettings = TokenCacheSettings()):
        self.reviews = reviews
        self.audiences = audiences
        self.settings = cache
        self._cache: ExpiringCache[tuple[Caller | None]] = ExpiringCache(cache.max_entries)

    async def authenticate(self, token: str) -> Caller | None:
        key = hashlib.sha256(token.encode()).digest()  # the token itself is never kept
        cached = self._cache.get(key)
        if cached is not None:
            return cached[0]
        review = await self.reviews.token_review(token, self.audiences)
        status = review.status
        caller = None
        if status is not None and status.authenticated and status.user is not None:
            meant_for_us = not self.audiences or set(_strings(status.audiences)) & set(
                self.audiences)
            if meant_for_us:
                caller = _caller_of(status.user)
        ttl = (self.settings.authenticated_ttl_s if caller
               else self.settings.unauthenticated_ttl_s)
        self._cache.put(key, (caller,), ttl)
        return caller
