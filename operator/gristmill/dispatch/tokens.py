"""Worker tokens: what a WorkerGroup's pods show the API to get jobs.

The operator signs a token per WorkerGroup (HMAC-SHA256 with a key it shares with the
API, from a Secret of the release) and writes it to a Secret in the group's namespace;
the group's pods read it from their environment. The API checks the signature and
serves the holder only the tags the token names, under a worker id prefixed with the
group's namespace and name, so a worker (or a job that escaped its sandbox) can claim
nothing of another group's and can touch no other group's jobs. A token holds no
database credentials. Several keys may be accepted at once, so a key is rotated by
adding the new one, re-issuing, then dropping the old.

    gmw1.<base64url JSON claims>.<base64url signature>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "gmw1"
MAX_TOKEN_BYTES = 4096
MIN_KEY_BYTES = 32
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$|^\*$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class TokenRejected(Exception):
    """The token is not one the API can accept; the message says why (never the key)."""


@dataclass(frozen=True)
class WorkerGrant:
    """What a worker token allows: serve `tags` as a worker of group `namespace/group`."""

    namespace: str
    group: str
    tags: tuple[str, ...]
    group_uid: str = ""  # the WorkerGroup the token was issued for (a recreated one differs)
    issued_at: int = 0

    @property
    def worker_prefix(self) -> str:
        return f"{self.namespace}/{self.group}/"


def new_key() -> str:
    """A fresh signing key, as the Secret holds it (URL-safe base64 of 32 random bytes)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(MIN_KEY_BYTES)).decode()


def parse_keys(text: str) -> list[bytes]:
    """Signing keys from their Secret's text: one or more, separated by commas or newlines
    (the first signs, all verify)."""
    keys = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        try:
            key = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError):
            raise ValueError("a worker token key is not URL-safe base64 (make one with "
                             "`gristmill worker-token --new-key`)") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a worker token key has {len(key)} bytes; it needs at least "
                             f"{MIN_KEY_BYTES}")
        keys.append(key)
    if not keys:
        raise ValueError("no worker token key given")
    return keys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, f"{PREFIX}.{payload}".encode(), hashlib.sha256).digest())


def issue(key: bytes, grant: WorkerGrant) -> str:
    claims = {"ns": grant.namespace, "group": grant.group, "tags": list(grant.tags),
              "uid": grant.group_uid, "iat": grant.issued_at or int(time.time())}
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{PREFIX}.{payload}.{_signature(key, payload)}"


def verify(keys: Sequence[bytes], token: str) -> WorkerGrant:
    """The grant of a token signed by one of `keys`; TokenRejected otherwise."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("the worker token is too long")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenRejected("this is not a Gristmill worker token (it should start with "
                            f"'{PREFIX}.'; the operator writes it to the Secret "
                            "gristmill-worker-<group>)")
    _, payload, signature = parts
    if not any(hmac.compare_digest(_signature(key, payload), signature) for key in keys):
        raise TokenRejected("the worker token's signature does not match this API's keys "
                            "(issued by another release, or the key was rotated: the "
                            "operator re-issues it)")
    try:
        claims = json.loads(_unb64(payload))
        grant = WorkerGrant(namespace=claims["ns"], group=claims["group"],
                            tags=tuple(claims["tags"]), group_uid=str(claims.get("uid", "")),
                            issued_at=int(claims.get("iat", 0)))
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise TokenRejected("the worker token's claims cannot be read") from None
    if not (isinstance(grant.namespace, str) and _NAME.match(grant.namespace)
            and isinstance(grant.group, str) and _NAME.match(grant.group)
            and grant.tags and all(isinstance(t, str) and _TAG.match(t) for t in grant.tags)):
        raise TokenRejected("the worker token's claims are malformed")
    return grant
