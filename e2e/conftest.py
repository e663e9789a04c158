"""End-to-end tests against a real cluster (kind, k3d, ...): `pytest e2e`.

They use the cluster of the current KUBECONFIG context, apply crds/, run
`gristmill operator` on this machine against it (with a throwaway local
PostgreSQL, or GRISTMILL_E2E_DATABASE_URL), and work in a namespace of their
own. Without a reachable cluster every test is skipped, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent


def _cluster_or_reason():
    try:
        from kubernetes import client, config

        config.load_kube_config()
        client.VersionApi().get_code(_request_timeout=5)
        return client, None
    except Exception as exc:  # no kubeconfig, no cluster, no network: all mean "skip"
        return None, f"no Kubernetes cluster reachable ({type(exc).__name__}: {exc})"


@pytest.fixture(scope="session")
def k8s():
    client, reason = _cluster_or_reason()
    if client is None:
        pytest.skip(reason)
    return client


@pytest.fixture(scope="session")
def crds(k8s):
    extensions = k8s.ApiextensionsV1Api()
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        try:
            extensions.create_custom_resource_definition(body)
        except k8s.exceptions.ApiException as exc:
            if exc.status != 409:
                raise
            current = extensions.read_custom_resource_definition(body["metadata"]["name"])
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            extensions.replace_custom_resource_definition(body["metadata"]["name"], body)
    time.sleep(2)  # let the API server serve the new kinds


@pytest.fixture(scope="session")
def database_url():
    url = os.environ.get("GRISTMILL_E2E_DATABASE_URL")
    if url:
        yield url
        return
    from gristmill.dev.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="gristmill-e2e-", dir="/tmp")))
    yield server.start()
    server.stop()


class Operator:
    """`gristmill operator` run from this checkout against the cluster."""

    def __init__(self, database_url: str):
        self.database_url = database_url
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gristmill.cli", "operator", "--database-url",
             self.database_url, "--health-port", "18081", "--metrics-port", "19090"],
            env={**os.environ, "GRISTMILL_RECHECK_INTERVAL": "2"})
        time.sleep(3)
        assert self.process.poll() is None, "the operator exited at start"

    def stop(self) -> None:
        self.process.terminate()
        assert self.process.wait(timeout=60) == 0

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def operator(crds, database_url):
    running = Operator(database_url)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def namespace(k8s, operator):
    name = f"gristmill-e2e-{uuid.uuid4().hex[:6]}"
    core = k8s.CoreV1Api()
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
