"""TokenReview and SubjectAccessReview calls to the Kubernetes API server.

The kubernetes client blocks, so each call runs in a thread, at most `concurrency` at
once (a burst of new tokens queues here instead of opening a connection each), with a
timeout. Any way the call can fail becomes ReviewUnavailable: the API answers 503 with
Retry-After, never a 500, and never takes a failed review for a yes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gristmill.auth.problems import ReviewUnavailable

_FIX_RIGHTS = ("give the API's ServiceAccount the chart's gristmill-api ClusterRole "
               "(create on tokenreviews and subjectaccessreviews)")


class KubernetesReviews:
    def __init__(self, api_client: client.ApiClient, concurrency: int = 8,
                 timeout_s: float = 5.0):
        self.authentication = client.AuthenticationV1Api(api_client)
        self.authorization = client.AuthorizationV1Api(api_client)
        self.server = api_client.configuration.host
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrency)

    async def token_review(self, token: str, audiences: tuple[str, ...]) -> Any:
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        return await self._call("tokenreviews", self.authentication.create_token_review, body)

    async def access_review(self, spec: dict[str, Any]) -> Any:
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": spec}
        return await self._call("subjectaccessreviews",
                                self.authorization.create_subject_access_review, body)

    async def _call(self, what: str, create, body: dict[str, Any]) -> Any:
        async with self._slots:
            try:
                return await asyncio.to_thread(create, body, _request_timeout=self.timeout_s)
            except ApiException as exc:
                if exc.status in (401, 403):
                    raise ReviewUnavailable(
                        f"the Kubernetes API server at {self.server} refused this API's own "
                        f"request to create {what} (HTTP {exc.status}): {_FIX_RIGHTS}"
                    ) from None
                raise ReviewUnavailable(
                    f"the Kubernetes API server at {self.server} could not review the "
                    f"request (HTTP {exc.status} {exc.reason}): try again shortly") from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise ReviewUnavailable(
                    f"cannot reach the Kubernetes API server at {self.server} to check "
                    f"credentials ({type(exc).__name__}): try again shortly") from None
