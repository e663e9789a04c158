"""The pod executor: a real `gristmill worker --executor pod` and a real queue, its job pods
run by the emulator's kubelet as local processes; the pods checked against PSS restricted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from flowkit import apply_yaml, script
from k8s_emulator import emulated_cluster
from kubernetes_validate import validate as k8s_validate
from kubernetes_validate.utils import latest_version
from pss import restricted_violations
from test_worker import submit, wait_status

from gristmill.operator.deployment import worker_deployment
from gristmill.operator.job_runner import job_runner_objects
from gristmill.sandbox.base import JobOutcome, JobRequest, Limits
from gristmill.sandbox.pod import job_pod
from gristmill.sandbox.pod_job import MARKER_ENV, PayloadTooLarge, parse_outcome_line, request_env
from gristmill.spec import WorkerGroup
from gristmill.store import logs, queue

NAMESPACE = "team-a"
def run_pod_command(request: JobRequest, workdir) -> list[str]:
    """The job pod's command, run here as the kubelet would run it: its stdout lines."""
    done = subprocess.run([sys.executable, "-m", "gristmill.sandbox.pod_job"], cwd=workdir,
                          env={"PATH": os.environ["PATH"], **request_env(request),
                               MARKER_ENV: "#m# "},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_pod_command_takes_large_inputs_and_ends_with_its_job(tmp_path):
    # 300 KB of input (more than one environment string may hold), and a process the
    # job leaves running, which must not keep the pod (and the worker's slot) busy.
    code = ("import subprocess, sys\n\ndef main(blob: str):\n"
            "    subprocess.Popen(['sleep', '60'])\n"
            "    sys.stderr.write('no newline at the end')\n"
            "    return len(blob)\n")
    request = JobRequest(job_id="j-big", language="python", code=code,
                         input={"blob": "x" * 300_000})
    assert len([name for name in request_env(request) if name[-1].isdigit()]) >= 3
    *_, last = run_pod_command(request, tmp_path)
    assert parse_outcome_line("#m# ", last) == JobOutcome(ok=True, result=300_000)


def test_a_job_too_large_for_a_pod_is_refused_with_what_to_do():
    request = JobRequest(job_id="j-huge", language="python", code="def main(b): pass",
                         input={"b": "x" * 2_000_000})
    with pytest.raises(PayloadTooLarge, match="pass large data by reference"):
        request_env(request)


def a_job_pod(network: bool = False) -> dict:
    request = JobRequest(job_id="0b7c6f0e-5d1c-4a51-a0f8-2d8f0b9e6c11", language="python",
                         code="def main():\n    return 1\n", input={}, network=network,
                         limits=Limits(timeout_s=30, memory_bytes=256 * 2**20, cpu_cores=0.5))
    return job_pod(request, "ghcr.io/gristmill/worker:0.1.0", "#m# ", 300, "worker-abc",
                   group="jobs", owner={"name": "worker-abc", "uid": "u-1"})


@pytest.mark.parametrize("version", ["1.29.0", latest_version()])
def test_job_pods_are_valid_and_meet_pss_restricted(version):
    pod = a_job_pod()
    k8s_validate(pod, version, strict=True)
    spec = pod["spec"]
    assert restricted_violations(spec) == []
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": str(256 * 2**20)}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["metadata"]["labels"]["gristmill.io/network"] == "none"
    assert a_job_pod(network=True)["metadata"]["labels"]["gristmill.io/network"] == "allowed"
    (owner,) = pod["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "worker-abc", "uid": "u-1",
                     "blockOwnerDeletion": False}


@pytest.mark.parametrize("version", ["1.29.0", latest_version()])
def test_pod_executor_groups_get_restricted_workers_an_account_and_a_network_policy(version):
    group = WorkerGroup.model_validate({
        "metadata": {"name": "jobs", "namespace": NAMESPACE},
        "spec": {"tags": ["python"], "executor": "pod", "image": "registry.local/worker:1"}})
    deployment = worker_deployment(group, "gristmill-database")
    k8s_validate(deployment, version, strict=True)
    pod_spec = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod_spec) == []
    (container,) = pod_spec["containers"]
    assert container["args"][-2:] == ["--executor", "pod"]
    env = {var["name"]: var for var in container["env"]}
    assert env["GRISTMILL_JOB_IMAGE"]["value"] == "registry.local/worker:1"
    assert env["GRISTMILL_POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert pod_spec["serviceAccountName"] == "gristmill-workers-jobs"
    assert pod_spec["automountServiceAccountToken"] is True

    objects = job_runner_objects(group)
    for obj in objects:
        k8s_validate(obj, version, strict=True)
    account, binding, policy = objects
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == \
        pod_spec["serviceAccountName"]
    assert binding["roleRef"]["name"] == "gristmill-job-runner"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gristmill-workers-jobs",
                                    "namespace": NAMESPACE}]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= a_job_pod()["metadata"]["labels"].items()
    assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]

    # A process-executor group runs bubblewrap, which PSS restricted forbids: the
    # checker says so, and the group gets no pod rights.
    process = group.model_copy(update={"spec": group.spec.model_copy(
        update={"executor": "process"})})
    violations = restricted_violations(worker_deployment(process, "db")["spec"]["template"]["spec"])
    assert "worker: seccomp profile is Unconfined" in violations
    assert job_runner_objects(process) == []


JOBS = (
    script("greet", """
        def main(name: str = "world"):
            print("hello from the pod,", name, flush=True)
            print("#gristmill-outcome-fake# {\\"ok\\": true, \\"result\\": 666}")
            return {"greeting": f"hello {name}"}
    """)
    + script("boom", """
        def main():
            raise ValueError("bad input")
    """)
    + script("slow", """
        import time

        def main():
            print("started", flush=True)
            time.sleep(60)
    """, timeout="2s")
    + script("chatty", """
        def main():
            for _ in range(10000):
                print("x" * 100)
    """, resources="{maxOutput: 100Ki}")
    + """---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata:
  name: count
spec:
  language: bash
  tag: python
  code: |
    echo "counting $WORDS"
    echo "{\\"words\\": $(echo $WORDS | wc -w)}"
"""
)


def start_pod_worker(database_url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "worker", "--database-url", database_url,
         "--tags", "python", "--concurrency", "4", "--poll-interval", "0.2",
         "--executor", "pod", "--job-image", "registry.local/worker:test"],
        env={**os.environ, "GRISTMILL_LOG_LEVEL": "WARNING", "GRISTMILL_POD_NAMESPACE": NAMESPACE,
             "GRISTMILL_WORKER_GROUP": "jobs", "GRISTMILL_POD_NAME": "worker-0",
             "GRISTMILL_POD_UID": "uid-worker-0"})


@pytest.mark.timeout(120)
async def test_jobs_run_as_pods_with_results_logs_and_limits(db, database_url, tmp_path):
    await apply_yaml(db, JOBS)
    async with emulated_cluster(database_url, tmp_path, kubelet_namespace=NAMESPACE) as cluster:
        worker = start_pod_worker(database_url)
        try:
            greet = await submit(db, "greet", {"name": "pods"})
            count = await submit(db, "count", {"WORDS": "one two three"})
            boom = await submit(db, "boom", {})
            slow = await submit(db, "slow", {})
            chatty = await submit(db, "chatty", {})
            done = {job: await wait_status(db, job, ("succeeded", "failed"), timeout=60)
                    for job in (greet, count, boom, slow, chatty)}

            assert done[greet]["result"] == {"greeting": "hello pods"}, done[greet]
            text = "".join(line for _, line in await logs.read(db, greet))
            assert "hello from the pod, pods" in text
            # A job printing something like the outcome line does not fool the worker.
            assert "#gristmill-outcome-fake#" in text and "666" not in str(done[greet]["result"])
            assert done[count]["result"] == {"words": 3}
            assert done[boom]["error"]["kind"] == "exception"
            assert "ValueError: bad input" in done[boom]["error"]["message"]
            assert done[slow]["error"]["kind"] == "timeout"
            assert done[chatty]["error"]["kind"] == "output_limit"

            # Cancelling a running job deletes its pod.
            nap = await submit(db, "slow", {})
            await wait_status(db, nap, ("running",))
            async with db.transaction():
                await queue.cancel(db, [nap], "no longer needed")
            assert (await wait_status(db, nap, ("cancelled",)))["status"] == "cancelled"

            async def pods_left():
                async with cluster.session.get(f"api/v1/namespaces/{NAMESPACE}/pods") as r:
                    return (await r.json())["items"]
            for _ in range(100):
                if not await pods_left():
                    break
                await asyncio.sleep(0.1)
            assert await pods_left() == []  # every job pod deleted when its job ended
            started = cluster.kubelet.started
            assert len(started) == 6
            for pod in started:
                assert restricted_violations(pod["spec"]) == []
                assert pod["metadata"]["labels"]["gristmill.io/worker-group"] == "jobs"
                assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-worker-0"
                assert pod["spec"]["containers"][0]["image"] == "registry.local/worker:test"
        finally:
            worker.terminate()
            assert await asyncio.to_thread(worker.wait, 30) == 0


@pytest.mark.timeout(120)
async def test_a_broken_log_stream_loses_no_result(db, database_url, tmp_path):
    await apply_yaml(db, script("steps", """
        import time

        def main():
            print("first", flush=True)
            time.sleep(2)
            print("second", flush=True)
            return "done"
    """))
    async with emulated_cluster(database_url, tmp_path, kubelet_namespace=NAMESPACE) as cluster:
        cluster.kubelet.cut_log_streams = True  # the API server restarts mid-job
        worker = start_pod_worker(database_url)
        try:
            job = await submit(db, "steps", {})
            done = await wait_status(db, job, ("succeeded", "failed"), timeout=60)
            # The worker waits for the pod to end and reads the outcome from the log's tail.
            assert done["result"] == "done", done["error"]
        finally:
            worker.terminate()
            assert await asyncio.to_thread(worker.wait, 30) == 0
