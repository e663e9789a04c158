"""Which bearer token the CLI sends, and where it came from (said when it is refused).

In order: --token or GRISTMILL_TOKEN; for a server on this machine, the token of the
`gristmill dev` serving that port; else the current kubeconfig's credentials (a token,
or what its exec or auth-provider plugin hands out), as kubectl would send them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from gristmill.dev import token as dev_token


@dataclass(frozen=True)
class Credentials:
    token: str | None
    source: str  # for messages: "GRISTMILL_TOKEN", "the kubeconfig (context admin)", ...


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _from_kubeconfig(environ: Mapping[str, str]) -> Credentials:
    from gristmill.kube import ClusterUnavailable, kubeconfig_bearer_token

    try:
        found = kubeconfig_bearer_token(environ.get("KUBECONFIG"))
    except ClusterUnavailable as exc:
        return Credentials(None, f"no token: GRISTMILL_TOKEN is not set and {exc}")
    if found is None:
        return Credentials(None, "no token: the kubeconfig's current user has none (a client "
                                 "certificate proves who you are to the Kubernetes API "
                                 "server only); use a kubeconfig with a token or an exec "
                                 "plugin, or set GRISTMILL_TOKEN=$(kubectl create token ...)")
    return Credentials(found, "the kubeconfig's current user")


def resolve(server: str, explicit: str | None, environ: Mapping[str, str]) -> Credentials:
    if explicit:
        return Credentials(explicit, "--token")
    if environ.get("GRISTMILL_TOKEN"):
        return Credentials(environ["GRISTMILL_TOKEN"].strip(), "GRISTMILL_TOKEN")
    url = urlsplit(server)
    if url.hostname and _is_loopback(url.hostname):
        port = url.port or (443 if url.scheme == "https" else 80)
        found = dev_token.find(port, environ)
        if found:
            return Credentials(found, f"the token of the gristmill dev on port {port}")
    return _from_kubeconfig(environ)
