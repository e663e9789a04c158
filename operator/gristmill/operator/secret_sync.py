"""Keeps each namespace's `gristmill-script-secrets` Role and RoleBinding in step with its
Scripts and WorkerGroups (secret_access.py says what they hold), and checks that the
Secrets a Script needs exist.

The existence check reads metadata only (a PartialObjectMetadata GET), through the same
Role: the operator may `get` exactly the Secrets that Scripts declare, as their workers
may, and no other; it never lists or watches Secrets, so a Secret created later is seen
by the Script's recheck timer (handlers.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gristmill.operator.ownership import OPERATOR_FIELD_MANAGER, server_side_apply
from gristmill.operator.secret_access import (
    SECRETS_ROLE,
    namespace_secrets,
    secrets_role,
    secrets_role_binding,
    worker_accounts,
)

log = logging.getLogger("gristmill.operator.secrets")
GROUP, VERSION = "gristmill.io", "v1alpha1"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
REQUEST_TIMEOUT = (5, 30)


class SecretAccess:
    def __init__(self, operator_user: str | None = None):
        self.custom = client.CustomObjectsApi()
        self.rbac = client.RbacAuthorizationV1Api()
        self.core = client.CoreV1Api()
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.operator_user = operator_user

    def who_am_i(self) -> str | None:
        """The operator's own user name (a SelfSubjectReview, which every authenticated
        user may make), to bind it to the Roles it keeps; None if the cluster cannot say."""
        try:
            review = client.AuthenticationV1Api().create_self_subject_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                _request_timeout=REQUEST_TIMEOUT)
            username = review.status.user_info.username
        except Exception as exc:  # noqa: BLE001 - refused, or a server without the API
            log.warning("cannot learn the operator's own user name (%s): Scripts' "
                        "SecretsAvailable stays Unknown; set GRISTMILL_OPERATOR_USER", exc)
            return None
        return username

    async def sync(self, namespace: str) -> None:
        """Apply (or delete) the namespace's Role and RoleBinding; one namespace at a time,
        so that two events never apply the union of two different listings out of order."""
        async with self._locks[namespace]:
            await asyncio.to_thread(self._sync, namespace)

    def _sync(self, namespace: str) -> None:
        scripts = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "scripts", _request_timeout=REQUEST_TIMEOUT)["items"]
        secrets = namespace_secrets(scripts)
        if not secrets:
            # resourceNames: [] would allow every Secret; no Role at all allows none.
            for delete in (self.rbac.delete_namespaced_role_binding,
                           self.rbac.delete_namespaced_role):
                _ignoring_gone(delete, SECRETS_ROLE, namespace)
            return
        groups = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "workergroups", _request_timeout=REQUEST_TIMEOUT)["items"]
        # The Role first: a binding to a new account never meets a stale, wider Role.
        server_side_apply(self.rbac.patch_namespaced_role, secrets_role(namespace, secrets),
                          OPERATOR_FIELD_MANAGER)
        server_side_apply(self.rbac.patch_namespaced_role_binding, secrets_role_binding(
            namespace, worker_accounts(groups), self.operator_user), OPERATOR_FIELD_MANAGER)

    async def missing(self, namespace: str, names: list[str]) -> tuple[list[str], str | None]:
        """The Secrets of `names` that do not exist, and why some could not be checked."""
        return await asyncio.to_thread(self._missing, namespace, names)

    def _missing(self, namespace: str, names: list[str]) -> tuple[list[str], str | None]:
        missing: list[str] = []
        unknown: str | None = None
        for name in names:
            try:
                # Metadata only: the values never travel to the operator.
                response = self.core.read_namespaced_secret(
                    name, namespace, _headers={"Accept": METADATA_ONLY},
                    _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
                response.read()
                response.release_conn()
            except ApiException as exc:
                if exc.status == 404:
                    missing.append(name)
                elif exc.status == 403:
                    unknown = (f"the operator may not read Secret {namespace}/{name} yet "
                               f"(Role {SECRETS_ROLE}); checking again shortly")
                else:
                    unknown = (f"could not check Secret {namespace}/{name}: {exc.status} "
                               f"{exc.reason}")
        return missing, unknown


def _ignoring_gone(call: Any, name: str, namespace: str) -> None:
    try:
        call(name, namespace, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        if exc.status != 404:
            raise
