"""The dispatcher mode of the operator: each WorkerGroup's token, and the Secret that holds it.

With the chart, the operator has the API's in-cluster URL (GRISTMILL_DISPATCHER_URL) and
the worker-token signing keys (GRISTMILL_WORKER_TOKEN_KEYS, from the Secret the setup hook
makes once). It then signs one token per WorkerGroup (dispatch/tokens.py: the group's
namespace, name, tags and uid) and keeps it in the Secret `gristmill-worker-<group>` of
the group's namespace; the group's workers read it from their environment and talk to the
API, never to PostgreSQL. Without both settings (the operator run on its own, `gristmill
dev`, tests) workers connect to the database as before.

The token is a pure function of the signing key and the group: its `iat` is the group's
creationTimestamp, not the time of the reconcile. So applying the Secret again changes
nothing (a no-op server-side apply writes nothing, resourceVersion stays), and the token
changes exactly when the tags, the group's uid (a recreated group) or the first signing
key change; the Deployment's pod template carries its hash, so only then do the workers
roll. This is why the operator never reads the Secret back: a `get` on Secrets cannot be
limited to its own (RBAC cannot select by label, admission policies never see reads),
and `get` with `create` on every Secret of the cluster would let it mint and read a token
of any ServiceAccount.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gristmill.dispatch import tokens
from gristmill.spec import WorkerGroup

DISPATCHER_URL_ENV = "GRISTMILL_DISPATCHER_URL"
KEYS_ENV = "GRISTMILL_WORKER_TOKEN_KEYS"


@dataclass(frozen=True)
class Dispatcher:
    """The operator's dispatcher settings: where workers connect, and the signing keys
    (the first signs; the API accepts all)."""

    url: str
    keys: tuple[bytes, ...]

    def __repr__(self) -> str:  # never the keys, not even in a traceback
        return f"Dispatcher(url={self.url!r}, keys=<{len(self.keys)}>)"


def dispatcher_from_env(environ: Mapping[str, str]) -> Dispatcher | None:
    """The settings from the operator's environment; None (direct-to-database workers) when
    neither is set. One without the other is a mistake said in one line."""
    url = environ.get(DISPATCHER_URL_ENV, "").strip()
    keys = environ.get(KEYS_ENV, "").strip()
    if not url and not keys:
        return None
    if not url or not keys:
        given, missing = (DISPATCHER_URL_ENV, KEYS_ENV) if url else (KEYS_ENV, DISPATCHER_URL_ENV)
        raise ValueError(f"{given} is set but {missing} is not: workers need both to use the "
                         f"dispatcher (the API's URL and the worker-token keys); set both, or "
                         f"neither for workers that connect to PostgreSQL")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{DISPATCHER_URL_ENV} must be the API's http(s) URL, got {url!r}")
    return Dispatcher(url=url.rstrip("/"), keys=tuple(tokens.parse_keys(keys)))


def _issued_at(body_meta: Mapping[str, Any]) -> int:
    created = body_meta.get("creationTimestamp")
    if isinstance(created, dt.datetime):
        return int(created.timestamp())
    if created:
        return int(dt.datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp())
    return 1  # never 0: issue() would take the time, and the token would change every time


def worker_grant(group: WorkerGroup, uid: str, issued_at: int) -> tokens.WorkerGrant:
    return tokens.WorkerGrant(namespace=group.metadata.namespace, group=group.metadata.name,
                              tags=tuple(group.spec.tags), group_uid=uid, issued_at=issued_at)


def worker_token(dispatcher: Dispatcher, group: WorkerGroup, body_meta: Mapping[str, Any]
                 ) -> str:
    """The group's token, signed with the first key; `body_meta` is the WorkerGroup's
    metadata as the API server sent it (its uid and creationTimestamp)."""
    grant = worker_grant(group, str(body_meta.get("uid") or ""), _issued_at(body_meta))
    return tokens.issue(dispatcher.keys[0], grant)


def token_is_current(dispatcher: Dispatcher, token: str, group: WorkerGroup, uid: str
                     ) -> bool:
    """Whether `token` is one the operator would keep for the group: signed with the first
    key and granting the group's namespace, name, tags and uid."""
    try:
        grant = tokens.verify(dispatcher.keys[:1], token)
    except tokens.TokenRejected:
        return False
    wanted = worker_grant(group, uid, grant.issued_at)
    return grant == wanted


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
