"""The opaque `cursor` of a listing page: where the next page starts, bound to the query
that made it.

It is base64url of a small JSON document ({"at": time, "id": row id, "q": digest of the
query's namespace and filters}) with a checksum, so a cursor that was cut short, edited
or taken from another listing is a 400 that says so, rather than a page of something
else. It is no secret and grants nothing: a caller can only page through what its
query may read anyway.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from typing import Any

from gristmill.api.runs import RunError
from gristmill.store.pages import Before

_CHECKSUM_BYTES = 8
_FIX = "pass the `next` value of the previous page unchanged, or leave cursor out to start " \
       "from the newest"


def query_digest(**query: Any) -> str:
    """A short digest of a listing's namespace and filters (not its limit, which may change
    from page to page)."""
    canonical = json.dumps(query, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _checksum(payload: bytes) -> bytes:
    return hashlib.sha256(b"gristmill-cursor\0" + payload).digest()[:_CHECKSUM_BYTES]


def encode(position: Before, digest: str) -> str:
    payload = json.dumps({"at": position.at.isoformat(), "id": str(position.id), "q": digest},
                         separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload + _checksum(payload)).rstrip(b"=").decode()


def decode(text: str, digest: str, parse_id: Callable[[str], Any]) -> Before:
    """The position a cursor names; RunError 400 for one that is damaged or belongs to a
    listing with other filters."""
    damaged = RunError(400, f"cursor is not one this API gave out (cut short or changed): "
                            f"{_FIX}")
    if len(text) > 512 or not text.isascii():
        raise damaged
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise damaged from None
    payload, checksum = raw[:-_CHECKSUM_BYTES], raw[-_CHECKSUM_BYTES:]
    if len(raw) <= _CHECKSUM_BYTES or _checksum(payload) != checksum:
        raise damaged
    try:
        fields = json.loads(payload)
        at = dt.datetime.fromisoformat(fields["at"])
        row_id = parse_id(str(fields["id"]))
        cursor_digest = fields["q"]
    except (ValueError, KeyError, TypeError):
        raise damaged from None
    if cursor_digest != digest:
        raise RunError(400, "cursor belongs to a listing with other filters (or another "
                            "namespace): repeat the filters of the page it came from, or "
                            "leave cursor out to start again")
    return Before(at, row_id)
