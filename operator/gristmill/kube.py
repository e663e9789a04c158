"""Where the Kubernetes client gets its configuration: the one place that loads it.

In a pod, its service account; elsewhere the kubeconfig of KUBECONFIG (read when
called, not when the client library was first imported, so that a test or a CLI flag
that sets KUBECONFIG late is honoured) or ~/.kube/config.
"""

from __future__ import annotations

import contextlib
import json
import os

from kubernetes import config
from kubernetes.client.exceptions import ApiException


class ClusterUnavailable(RuntimeError):
    """No way to reach a Kubernetes API server from here; the message says why."""


def load_cluster_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, OSError) as exc:
            raise ClusterUnavailable(f"not in a cluster and no usable kubeconfig ({exc}): "
                                     f"set KUBECONFIG or run in a pod") from exc


def api_message(exc: ApiException) -> str:
    """What the API server said, from its Status body (its own words are the clearest)."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return json.loads(exc.body).get("message") or str(exc.reason)
    return f"{exc.status} {exc.reason}"
