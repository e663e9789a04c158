"""Who is calling: the identity the API's authentication middleware puts on each request,
as Kubernetes' own user.Info has it (username, uid, groups, extra), and where the request
came from. Authorization, approvals and audit rows all read it from here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Caller:
    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""  # the client's address, as the API saw it


CALLER = web.RequestKey("caller", Caller)


def caller_of(request: web.Request) -> Caller:
    """The authenticated caller; only the open routes (/healthz, ...) have none."""
    return request[CALLER]
