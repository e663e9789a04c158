"""The authenticator and authorizer the API's settings ask for."""

from __future__ import annotations

from collections.abc import Callable

from gristmill.api.access import AccessSettings
from gristmill.auth.authn import Authenticator, StaticTokenAuthenticator, TokenReviewAuthenticator
from gristmill.auth.authz import Authorizer, LocalAuthorizer, SubjectAccessReviewAuthorizer


class AccessMisconfigured(ValueError):
    """The API cannot check credentials as configured; the message says how to fix it."""


def make_reviewers(settings: AccessSettings
                   ) -> tuple[Authenticator, Authorizer, Callable[[], None]]:
    """(authenticator, authorizer, close)."""
    if settings.authentication == "token":
        if not settings.token or len(settings.token) < 16:
            raise AccessMisconfigured("token authentication needs a token of at least 16 "
                                      "characters (--token-file)")
        static = StaticTokenAuthenticator(settings.token)
        return static, LocalAuthorizer(static.caller.username), lambda: None
    from gristmill.auth.reviews import KubernetesReviews
    from gristmill.kube import ClusterUnavailable, api_client

    try:
        api = api_client(settings.kubeconfig)
    except ClusterUnavailable as exc:
        raise AccessMisconfigured(f"cannot check credentials with the Kubernetes API server: "
                                  f"{exc} (or serve `--authentication token` without a "
                                  f"cluster)") from None
    reviews = KubernetesReviews(api, settings.review_concurrency, settings.review_timeout_s)
    return (TokenReviewAuthenticator(reviews, settings.audiences, settings.token_cache),
            SubjectAccessReviewAuthorizer(reviews, settings.access_cache), api.close)
