"""Secrets read through the Kubernetes API with the worker's own ServiceAccount.

The operator's Role `gristmill-script-secrets` lets that account `get` exactly the
Secrets the namespace's Scripts declare (resourceNames), nothing else: no list, no
watch, so there is no cache here either; each job reads its Secrets when it starts.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Mapping

from gristmill.jobsecrets.resolve import SecretProblem

REQUEST_TIMEOUT = (5, 30)  # connect, read: seconds
ATTEMPTS, RETRY_DELAY_S = 4, 1.0  # about 7 s of API server trouble before a job fails


class _Transient(Exception):
    """No answer, throttled, or a server error: worth another try."""


class ClusterSecrets:
    def __init__(self) -> None:
        self._core = None
        self._lock = threading.Lock()

    def _api(self):
        # Loaded at the first Secret a job needs: a worker whose Scripts declare none
        # needs no cluster (gristmill dev, tests).
        with self._lock:
            if self._core is None:
                from kubernetes import client

                from gristmill.kube import ClusterUnavailable, load_cluster_config
                try:
                    load_cluster_config()
                except ClusterUnavailable as exc:
                    raise SecretProblem(f"the job declares Secrets, and this worker cannot "
                                        f"reach the Kubernetes API to read them: {exc}") from exc
                self._core = client.CoreV1Api()
            return self._core

    def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        for attempt in range(ATTEMPTS):
            try:
                return self._read(namespace, name)
            except _Transient as exc:
                if attempt == ATTEMPTS - 1:
                    raise SecretProblem(f"could not read Secret {namespace}/{name}: "
                                        f"{exc}") from None
                time.sleep(RETRY_DELAY_S * 2 ** attempt)
        raise AssertionError("unreachable")

    def _read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        from kubernetes.client.exceptions import ApiException

        core = self._api()
        try:
            secret = core.read_namespaced_secret(name, namespace,
                                                 _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status == 403:
                raise SecretProblem(
                    f"this worker may not read Secret {namespace}/{name} ({_message(exc)}): "
                    f"the operator grants a process-executor WorkerGroup's workers the "
                    f"Secrets its namespace's Scripts declare (Role gristmill-script-secrets); "
                    f"check that the operator runs and that the WorkerGroup uses the "
                    f"ServiceAccount the operator made for it") from None
            if exc.status == 429 or exc.status >= 500:
                raise _Transient(_message(exc)) from None
            raise SecretProblem(f"could not read Secret {namespace}/{name}: "
                                f"{_message(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - the API server unreachable, say
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}


def _message(exc) -> str:
    try:
        return json.loads(exc.body).get("message") or f"{exc.status} {exc.reason}"
    except (TypeError, ValueError):
        return f"{exc.status} {exc.reason}"
