"""The Idempotency-Key header on submits (draft-ietf-httpapi-idempotency-key-header).

The same key with the same body gets the first response again (and no second run);
the same key with another body is a 422; a duplicate that arrives while the first is
still being served is a 409 with Retry-After. A key belongs to one namespace and route
and lives 24 hours. Only successful submits are kept: a refused one may be repeated
with the same key once the cause is fixed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from aiohttp import web

from gristmill.api.runs import RunError
from gristmill.store import idempotency as keys

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
KEY_PATTERN = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"  # printable ASCII, as in HTTP fields


def key_of(request: web.Request) -> str | None:
    """The request's key, or None. The draft makes it a structured-field string ("..."),
    but most clients send a bare token; both are taken."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise RunError(400, f"the {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable "
                            f"ASCII characters, such as a UUID")
    return key


def fingerprint(body: dict[str, Any]) -> str:
    """The body's identity: the same JSON written differently is the same request."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    replayed: bool = False


async def submit_once(conn: psycopg.AsyncConnection, namespace: str, route: str, key: str,
                      body_fingerprint: str,
                      submit: Callable[[], Awaitable[dict[str, Any]]]) -> Answer:
    """Run `submit` unless this key already has a response; in the caller's transaction."""
    locked, stored = await keys.lock_and_find(conn, namespace, route, key)
    if not locked:
        raise RunError(409, f"a request with this {HEADER} is still being served: repeat it "
                            f"in a moment to get its response", headers={"Retry-After": "1"})
    if stored is not None:
        if stored.fingerprint != body_fingerprint:
            raise RunError(422, f"this {HEADER} was used for a different request body in the "
                                f"last 24 hours: use a new key for a new request")
        return Answer(stored.status, stored.body, replayed=True)
    body = await submit()
    await keys.record(conn, namespace, route, key,
                      keys.StoredResponse(body_fingerprint, 201, body))
    return Answer(201, body)
