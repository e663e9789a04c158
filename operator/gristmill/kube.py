"""Where the Kubernetes client gets its configuration: the one place that loads it.

In a pod, its service account; elsewhere the kubeconfig of KUBECONFIG (read when
called, not when the client library was first imported, so that a test or a CLI flag
that sets KUBECONFIG late is honoured) or ~/.kube/config.
"""

from __future__ import annotations

import contextlib
import json
import os

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


class ClusterUnavailable(RuntimeError):
    """No way to reach a Kubernetes API server from here; the message says why."""


def _load(configuration: client.Configuration | None, kubeconfig: str | None = None) -> None:
    """Into `configuration` (None: the library's global default)."""
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return
        except config.ConfigException:
            pass
    try:
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                                client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise ClusterUnavailable(f"not in a cluster and no usable kubeconfig ({exc}): "
                                 f"set KUBECONFIG or run in a pod") from exc


def load_cluster_config() -> None:
    _load(None)


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A client of its own (not the library's global default) for this process's
    identity: its service account in a pod, else `kubeconfig` (or KUBECONFIG)."""
    configuration = client.Configuration()
    _load(configuration, kubeconfig)
    return client.ApiClient(configuration)


def kubeconfig_bearer_token(kubeconfig: str | None = None, context: str | None = None
                            ) -> str | None:
    """The bearer token the current kubeconfig context authenticates with (a token, or
    what its exec or auth-provider plugin hands out); None when it has none, e.g. a
    client certificate, which proves who you are to the API server only."""
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                                context=context, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise ClusterUnavailable(f"no usable kubeconfig ({exc})") from exc
    # Whatever the client library names its setting (BearerToken, authorization), the
    # header it would send; auth_settings() also runs an exec plugin's refresh hook.
    header = next((setting["value"] for setting in configuration.auth_settings().values()
                   if setting.get("key", "").lower() == "authorization" and setting.get("value")),
                  "")
    scheme, _, token = str(header).partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def api_message(exc: ApiException) -> str:
    """What the API server said, from its Status body (its own words are the clearest)."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return json.loads(exc.body).get("message") or str(exc.reason)
    return f"{exc.status} {exc.reason}"
