"""Where the Kubernetes client gets its configuration: the one place that loads it.

In a pod, its service account; elsewhere the kubeconfig of KUBECONFIG (read when
called, not when the client library was first imported, so that a test or a CLI flag
that sets KUBECONFIG late is honoured) or ~/.kube/config.
"""

from __future__ import annotations

import os

from kubernetes import config


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
