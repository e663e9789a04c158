"""Cross-site protection: what a browser could be made to send, refused; the usual
security headers on every answer.

The API takes bearer tokens only (no cookies), and a browser never attaches one to a
cross-site request on its own, so these are a second line: a page elsewhere cannot
use a user's browser to reach the API (Origin), a DNS-rebound name cannot stand in for
the API's address (Host), and nothing the API sends can be framed, sniffed as HTML or
cached.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from gristmill.api import params
from gristmill.api.runs import RunError

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class SiteSettings:
    """allowed_origins: browser origins besides the API's own that may call it, exactly
    as a browser sends them (https://ui.example.com). allowed_hosts: names the API may be
    addressed by besides IP addresses and localhost, which are always taken (a pod IP,
    a port-forward); "*.example.com" takes every name under example.com. The chart
    passes its Service's names (NAME, NAME.NAMESPACE, NAME.NAMESPACE.svc, ...) and
    api.allowedHosts."""

    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()


def _hostname(host: str) -> str:
    """The name or address of a Host header, without its port: [::1]:8080 -> ::1."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    name = _hostname(host).lower().rstrip(".")
    if _is_address(name) or name == "localhost":
        return True
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def _same_origin(origin: str, host: str) -> bool:
    # Scheme left out on purpose: TLS is often ended in front of the API, so a page on
    # https://api.example.com reaches it as plain http with that Host.
    return urlsplit(origin).netloc.lower() == host.lower()


def site_middleware(settings: SiteSettings):
    origins = {origin.rstrip("/").lower() for origin in settings.allowed_origins}

    @web.middleware
    async def site(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if host and not host_allowed(host, settings.allowed_hosts):
            raise RunError(400, f"this API is not served as {host[:100]!r}: address it by a "
                                f"name in its allowed hosts (chart value api.allowedHosts, "
                                f"`gristmill api --allowed-host`), its Service's name or an "
                                f"IP address")
        origin = request.headers.get("Origin")
        if origin is not None:
            if origin.rstrip("/").lower() not in origins and not _same_origin(origin, host):
                raise RunError(403, f"cross-site request from {origin[:100]!r} refused: only "
                                    f"the API's own origin and its allowed origins (chart "
                                    f"value api.allowedOrigins, `gristmill api "
                                    f"--allowed-origin`) may call it from a browser")
        elif request.headers.get("Sec-Fetch-Site") == "cross-site":
            raise RunError(403, "cross-site request refused: open the API from its own "
                                "origin, or call it outside a browser")
        if request.method == "POST" and request.body_exists and "Content-Type" in request.headers:
            media = request.content_type.lower()
            if not params.is_json_media(media):
                raise RunError(415, f"POST bodies must be JSON (Content-Type: "
                                    f"application/json), not {media[:60]!r}")
        return await handler(request)
    return site


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: on every answer, streamed logs and errors included."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
