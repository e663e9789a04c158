"""The pod executor against a real cluster, in a namespace that enforces the Pod Security
Standards `restricted` profile: the API server itself admits (or refuses) the job pods.

Needs the Gristmill image in the cluster, named by GRISTMILL_E2E_IMAGE (the workflow in
.github/workflows/e2e.yaml builds worker_image/ and loads it into kind).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from gristmill.sandbox.base import JobRequest, Limits
from gristmill.sandbox.pod import PodExecutor, load_kubernetes_config

IMAGE = os.environ.get("GRISTMILL_E2E_IMAGE")


@pytest.fixture
def restricted_namespace(k8s):
    if not IMAGE:
        pytest.skip("GRISTMILL_E2E_IMAGE is not set: build worker_image/ and load it into "
                    "the cluster (see .github/workflows/e2e.yaml)")
    name = f"gristmill-e2e-pods-{uuid.uuid4().hex[:6]}"
    core = k8s.CoreV1Api()
    core.create_namespace({"metadata": {"name": name, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    yield name
    core.delete_namespace(name)


def _run(namespace: str, code: str, timeout_s: float = 120):
    load_kubernetes_config()
    executor = PodExecutor(namespace, IMAGE, worker="e2e", start_timeout_s=180)
    request = JobRequest(job_id=str(uuid.uuid4()), language="python", code=code, input={},
                         limits=Limits(timeout_s=timeout_s, memory_bytes=256 * 2**20))
    output: list[str] = []
    outcome = asyncio.run(executor.run(request, output.append, asyncio.Event()))
    return outcome, "".join(output)


def test_a_job_runs_as_a_restricted_pod(k8s, restricted_namespace):
    outcome, output = _run(restricted_namespace,
                           "import os\n\ndef main():\n    print('uid', os.getuid())\n"
                           "    return {'uid': os.getuid()}\n")
    assert outcome.ok, outcome.error
    assert outcome.result == {"uid": 65532} and "uid 65532" in output
    pods = k8s.CoreV1Api().list_namespaced_pod(restricted_namespace).items
    assert [p for p in pods if not p.metadata.deletion_timestamp] == []


def test_a_job_over_its_memory_is_oom_killed(k8s, restricted_namespace):
    outcome, _ = _run(restricted_namespace,
                      "def main():\n    blocks = []\n    while True:\n"
                      "        blocks.append(bytearray(50 * 2**20))\n")
    assert not outcome.ok and outcome.error["kind"] in ("memory", "killed")


def test_a_job_past_its_timeout_is_stopped(k8s, restricted_namespace):
    outcome, _ = _run(restricted_namespace, "import time\n\ndef main():\n    time.sleep(600)\n",
                      timeout_s=5)
    assert outcome.error["kind"] == "timeout"
