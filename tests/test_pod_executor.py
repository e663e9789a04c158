"""The pod executor: a real `gristmill worker --executor pod` and a real queue, its job pods
run by the emulator's kubelet as local processes; the pods checked against PSS restricted."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import uuid

import kmock
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
from gristmill.sandbox.pod import PodExecutor, load_kubernetes_config
from gristmill.sandbox.pod_job import (
    PAYLOAD_KEY,
    PayloadTooLarge,
    job_payload,
    parse_outcome_line,
    read_payload,
)
from gristmill.sandbox.pod_objects import job_pod, job_secret
from gristmill.sandbox.pod_status import explain_end
from gristmill.sandbox.token_bucket import TokenBucket
from gristmill.spec import WorkerGroup
from gristmill.store import logs, queue

NAMESPACE = "team-a"


def run_pod_command(request: JobRequest, workdir) -> list[str]:
    """The job pod's command, run here as the kubelet would run it on the job's Secret
    (mounted as a file): its stdout lines."""
    secret = workdir / "secret"
    secret.mkdir()
    (secret / PAYLOAD_KEY).write_bytes(job_payload(request, "#m# "))
    work = workdir / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "gristmill.sandbox.pod_job",
                           str(secret / PAYLOAD_KEY)], cwd=work,
                          env={key: os.environ[key] for key in ("PATH", "PYTHONPATH")
                               if key in os.environ}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_pod_command_takes_large_inputs_and_ends_with_its_job(tmp_path):
    # 300 KB of input, and a process the job leaves running, which must not keep the pod
    # (and the worker's slot) busy.
    code = ("import subprocess, sys\n\ndef main(blob: str):\n"
            "    subprocess.Popen(['sleep', '60'])\n"
            "    sys.stderr.write('no newline at the end')\n"
            "    return len(blob)\n")
    request = JobRequest(job_id="j-big", language="python", code=code,
                         input={"blob": "x" * 300_000})
    *_, last = run_pod_command(request, tmp_path)
    assert parse_outcome_line("#m# ", last) == JobOutcome(ok=True, result=300_000)


def test_what_fits_a_jobs_secret_compressed_is_taken_and_the_rest_refused_with_what_to_do():
    # 2 MB of input that compresses well fits the 1 MiB a Secret may hold...
    roomy = JobRequest(job_id="j-roomy", language="python", code="def main(b): pass",
                       input={"b": "x" * 2_000_000})
    assert len(job_payload(roomy, "#m# ")) < 64 * 1024
    # ... and 1.6 MB of noise does not.
    noise = base64.b64encode(os.urandom(1_200_000)).decode()
    huge = JobRequest(job_id="j-huge", language="python", code="def main(b): pass",
                      input={"b": noise})
    with pytest.raises(PayloadTooLarge, match=r"KiB compressed, and a job pod's Secret holds "
                                              r"at most 1024 KiB: pass large data by reference"):
        job_payload(huge, "#m# ")


def a_job_pod(network: bool = False, blob: str = "") -> dict:
    request = JobRequest(job_id="0b7c6f0e-5d1c-4a51-a0f8-2d8f0b9e6c11", language="python",
                         code="def main(blob=''):\n    return 1\n", input={"blob": blob},
                         network=network,
                         limits=Limits(timeout_s=30, memory_bytes=256 * 2**20, cpu_cores=0.5))
    return job_pod(request, "ghcr.io/gristmill/worker:0.1.0", 300, "worker-abc", "u-1",
                   group="jobs", owner={"name": "worker-abc", "uid": "u-1"})


@pytest.mark.parametrize("version", ["1.29.0", latest_version()])
def test_job_pods_are_valid_and_meet_pss_restricted(version):
    pod = a_job_pod(blob="secret input " * 40_000)
    k8s_validate(pod, version, strict=True)
    spec = pod["spec"]
    assert restricted_violations(spec) == []
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": str(256 * 2**20)}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["metadata"]["labels"]["gristmill.io/network"] == "none"
    assert pod["metadata"]["labels"]["gristmill.io/worker-uid"] == "u-1"
    assert a_job_pod(network=True)["metadata"]["labels"]["gristmill.io/network"] == "allowed"
    (owner,) = pod["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "worker-abc", "uid": "u-1",
                     "blockOwnerDeletion": False}
    # Neither code nor input in the pod object: what every pod watcher receives stays small.
    assert "secret input" not in json.dumps(pod) and "def main" not in json.dumps(pod)
    assert len(json.dumps(pod)) < 3000
    assert "env" not in container
    # They come from the job's Secret, mounted read-only for the job's group alone.
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"] == {"secretName": pod["metadata"]["name"], "defaultMode": 0o440}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True and container["command"][-1].startswith(
        mount["mountPath"] + "/")

    secret = job_secret(pod, "pod-uid-1", job_payload(JobRequest(
        job_id="j", language="python", code="def main(): pass", input={}), "#m# "))
    k8s_validate(secret, version, strict=True)
    assert secret["metadata"]["name"] == pod["metadata"]["name"]
    assert secret["immutable"] is True and secret["type"] == "Opaque"
    assert secret["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"], "uid": "pod-uid-1",
        "blockOwnerDeletion": False}]
    assert secret["metadata"]["labels"]["gristmill.io/worker-uid"] == "u-1"


def test_what_the_kubelet_reports_becomes_a_failure_a_person_can_act_on():
    def ended(reason=None, code=None, **status):
        state = {"terminated": {"reason": reason, "exitCode": code}} if code is not None \
            else {"running": {}}
        return {"containerStatuses": [{"state": state}], **status}
    assert explain_end(ended("OOMKilled", 137)).error["kind"] == "memory"
    assert explain_end(ended("Error", 137)).error["kind"] == "killed"
    assert explain_end(ended("Error", 3)).error == {
        "kind": "exit", "message": "the job pod exited with code 3 (Error) before reporting "
                                   "an outcome"}
    assert explain_end({"reason": "DeadlineExceeded"}).error["kind"] == "timeout"
    evicted = explain_end({"reason": "Evicted", "message": "Pod ephemeral local storage usage "
                                                          "exceeds the total limit"})
    assert evicted.error["kind"] == "killed" and "ephemeral local storage" in \
        evicted.error["message"]
    assert "deleted before it ended" in explain_end(ended(), gone=True).error["message"]


async def test_the_token_bucket_lets_a_burst_through_then_serves_turns_in_order():
    bucket = TokenBucket(rate=20, burst=3)
    granted = []

    async def take(name, tokens, urgent=False):
        assert await bucket.take(tokens, urgent=urgent)
        granted.append(name)
    cancel = asyncio.Event()
    cancel.set()
    # Started in one turn of the event loop, before any token comes back: the burst goes to
    # the first, the rest wait in order, a deletion (urgent) first, and a take cancelled
    # while it waits gives its turn up.
    await asyncio.gather(take("pod a", 2), take("secret a", 1), take("pod b", 2),
                         take("pod c", 2), take("delete a", 1, urgent=True),
                         bucket.take(3, cancel), take("pod d", 5))
    assert granted == ["pod a", "secret a", "delete a", "pod b", "pod c", "pod d"]
    assert bucket.waits == 5  # all but the burst's two
    with pytest.raises(ValueError, match="a rate above 0"):
        TokenBucket(rate=0, burst=1)


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
    # Its workers get an account of their own (they read their jobs' Secrets with it,
    # through the operator's gristmill-script-secrets Role), and no pod rights.
    assert [obj["kind"] for obj in job_runner_objects(process)] == ["ServiceAccount"]


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

            async def napping():  # its pod runs (not merely its job)
                return "started" in "".join(line for _, line in await logs.read(db, nap))
            await until(napping, "the job's pod prints", timeout=30)
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
            # All of them followed through one watch, and no pod was read on its own.
            asked = executor_requests(cluster)
            assert asked.count("watch pods") == asked.count("list pods") == 1, asked
            assert "fetch pods (one)" not in asked
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


# ---- the executor in this process, against the emulator and its kubelet -----------------

WORKER_UID = "uid-worker-0"


@contextlib.asynccontextmanager
async def pod_executor(tmp_path, **options):
    """A PodExecutor as a worker pod has it, on the emulator; job pods run by its kubelet."""
    async with emulated_cluster("postgresql://unused", tmp_path,
                                kubelet_namespace=NAMESPACE) as cluster:
        load_kubernetes_config()  # the emulator's kubeconfig, from KUBECONFIG
        executor = PodExecutor(NAMESPACE, "registry.local/worker:test", worker="worker-0",
                               group="jobs", owner={"name": "worker-0", "uid": WORKER_UID},
                               **options)
        try:
            yield cluster, executor
        finally:
            executor.close()


def python_job(code: str, timeout_s: float = 60, **input) -> JobRequest:
    return JobRequest(job_id=str(uuid.uuid4()), language="python",
                      code=textwrap.dedent(code), input=input,
                      limits=Limits(timeout_s=timeout_s))


async def run_job(executor: PodExecutor, request: JobRequest,
                  cancel: asyncio.Event | None = None) -> tuple[JobOutcome, str]:
    output: list[str] = []
    outcome = await executor.run(request, output.append, cancel or asyncio.Event())
    return outcome, "".join(output)


def executor_requests(cluster) -> list[str]:
    """What the executor asked of the API server (the kubelet's requests are aiohttp's)."""
    asked = []
    for request in cluster.emulator:
        if not request.headers.get("User-Agent", "").startswith("OpenAPI"):
            continue
        parts = request.url.path.split("/")
        what = parts[5] + ("/" + parts[7] if len(parts) > 7 else "")
        action = request.action.value.lower() if request.action else request.method.value
        asked.append(f"{action} {what}" + (" (one)" if action == "fetch" else ""))
    return asked


async def until(predicate, what: str, timeout: float = 20.0):
    for _ in range(int(timeout / 0.05)):
        if value := await predicate():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def job_pods(cluster) -> list[dict]:
    async with cluster.session.get(f"api/v1/namespaces/{NAMESPACE}/pods") as response:
        return (await response.json())["items"]


@pytest.mark.timeout(60)
async def test_one_watch_serves_every_job_and_no_pod_is_polled(tmp_path):
    async with pod_executor(tmp_path) as (cluster, executor):
        cluster.kubelet.start_delay_s = 1.0  # pending a while, as real pods are
        jobs = [python_job("""
            def main(n: int):
                print("job", n, flush=True)
                return n * n
        """, n=n) for n in range(4)]
        done = await asyncio.gather(*(run_job(executor, job) for job in jobs))
        assert [outcome.result for outcome, _ in done] == [0, 1, 4, 9]
        assert [output for _, output in done] == [f"job {n}\n" for n in range(4)]

        asked = collections.Counter(executor_requests(cluster))
        # Per job: its pod, its Secret, one log stream, the pod's deletion; for all of them
        # one list and one watch, and not a single read of a pod, however long it pends.
        assert asked == {"create pods": 4, "create secrets": 4, "fetch pods/log (one)": 4,
                         "delete pods": 4, "list pods": 1, "watch pods": 1}, asked
        (watch,) = [r for r in cluster.emulator if r.action == kmock.action.WATCH
                    and r.headers.get("User-Agent", "").startswith("OpenAPI")]
        assert watch.params["labelSelector"] == f"gristmill.io/worker-uid={WORKER_UID}"
        assert watch.params["allowWatchBookmarks"] == "true" and "resourceVersion" in watch.params

        # Every Secret is its pod's (so that it goes with it) and holds the job, not the pod.
        for pod in cluster.kubelet.started:
            name = pod["metadata"]["name"]
            async with cluster.session.get(
                    f"api/v1/namespaces/{NAMESPACE}/secrets/{name}") as response:
                secret = await response.json()
            (owner,) = secret["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"]) == ("Pod", name,
                                                                    pod["metadata"]["uid"])
            request, _ = read_payload(base64.b64decode(secret["data"][PAYLOAD_KEY]))
            assert request.job_id == pod["metadata"]["labels"]["gristmill.io/job-id"]
        assert await job_pods(cluster) == []


@pytest.mark.timeout(90)
async def test_a_broken_watch_and_an_api_server_away_lose_no_pods_end(tmp_path):
    async with pod_executor(tmp_path) as (cluster, executor):
        emulator, kubelet = cluster.emulator, cluster.kubelet
        kubelet.cut_log_streams = True  # the log cannot tell: only the watch sees the end
        job = asyncio.create_task(run_job(executor, python_job("""
            import time

            def main():
                print("first", flush=True)
                time.sleep(1.5)
                print("second", flush=True)
                return "done"
        """)))

        async def watched_running():
            return any(state.status.get("phase") == "Running"
                       for state in executor.watch.states.values())
        await until(watched_running, "the watch sees the job pod run")
        # The API server goes away under the worker: the watch breaks and cannot come back...
        emulator.refuse = lambda request: request.headers.get(
            "User-Agent", "").startswith("OpenAPI")
        await emulator.break_watches()

        async def ended():
            pods = await job_pods(cluster)
            return pods and pods[0].get("status", {}).get("phase") == "Succeeded"
        await until(ended, "the job pod ends")
        # ... the pod ends meanwhile, and by the time it is back the history is compacted,
        # so the watch's resourceVersion is Gone (410) and it must list again.
        emulator.compact()
        await until(lambda: asyncio.sleep(0, executor.watch.trouble), "the watch sees trouble")
        emulator.refuse = None
        outcome, output = await job
        assert outcome == JobOutcome(ok=True, result="done"), outcome
        assert "first" in output
        assert executor.watch.lists == 2 and executor.watch.trouble is None
        assert await job_pods(cluster) == []


@pytest.mark.timeout(60)
async def test_pending_pods_fail_with_the_kubelets_reason_stop_on_cancel_and_time_out(tmp_path):
    async with pod_executor(tmp_path, start_timeout_s=1.0) as (cluster, executor):
        kubelet = cluster.kubelet
        quick = python_job("def main():\n    return 1\n")
        kubelet.image_errors["registry.local/worker:test"] = (
            "ErrImageNeverPull", 'Container image "registry.local/worker:test" is not present')
        outcome, _ = await run_job(executor, quick)
        assert outcome.error["kind"] == "setup"
        assert outcome.error["message"].startswith(
            "the job pod cannot start: ErrImageNeverPull: Container image")
        kubelet.image_errors.clear()

        kubelet.start_delay_s = 30
        outcome, _ = await run_job(executor, quick)
        assert outcome.error == {"kind": "setup", "message": AnyStr(
            "the job pod did not start within 1s (still pending); see `kubectl describe pod")}

        executor.start_timeout_s = 30
        cancel = asyncio.Event()
        job = asyncio.create_task(run_job(executor, quick, cancel))
        await until(lambda: job_pods(cluster), "the job pod exists")
        cancel.set()
        outcome, _ = await job
        assert outcome.error == {"kind": "cancelled",
                                 "message": "cancelled before the job pod started"}
        assert await job_pods(cluster) == []  # deleted with its job

        # A job too large for its Secret never reaches the API server.
        before = len(executor_requests(cluster))
        noise = base64.b64encode(os.urandom(1_200_000)).decode()
        outcome, _ = await run_job(executor, python_job("def main(b):\n    pass\n", b=noise))
        assert outcome.error["kind"] == "setup" and "pass large data by reference" in \
            outcome.error["message"]
        assert len(executor_requests(cluster)) == before


@pytest.mark.timeout(60)
async def test_a_pod_deleted_from_outside_ends_its_job_at_once(tmp_path):
    async with pod_executor(tmp_path) as (cluster, executor):
        job = asyncio.create_task(run_job(executor, python_job("""
            import time

            def main():
                print("napping", flush=True)
                time.sleep(600)
        """, timeout_s=600)))
        (pod,) = await until(lambda: job_pods(cluster), "the job pod exists")
        await until(lambda: asyncio.sleep(0, cluster.kubelet.processes), "the job pod runs")
        async with cluster.session.delete(
                f"api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}"):
            pass
        outcome, _ = await job
        assert outcome.error["kind"] == "killed"
        assert "deleted before it ended" in outcome.error["message"]


@pytest.mark.timeout(60)
async def test_a_restarted_worker_deletes_the_job_pods_its_last_run_left(tmp_path):
    async with pod_executor(tmp_path) as (cluster, executor):
        # A job pod of this worker pod's last container (it crashed): still running.
        async with cluster.session.post(f"api/v1/namespaces/{NAMESPACE}/pods", json={
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "left-behind", "labels": {
                    "app.kubernetes.io/name": "gristmill-job",
                    "gristmill.io/worker-uid": WORKER_UID}},
                "spec": {"containers": [{"name": "job", "image": "local",
                                         "command": ["sleep", "600"]}]}}):
            pass
        await until(lambda: asyncio.sleep(0, cluster.kubelet.processes), "it runs")
        outcome, _ = await run_job(executor, python_job("def main():\n    return 1\n"))
        assert outcome.ok
        await until(lambda: asyncio.sleep(0, not cluster.kubelet.processes), "it is gone")
        assert await job_pods(cluster) == []


@pytest.mark.timeout(60)
async def test_writes_wait_their_turn_in_the_token_bucket_and_jobs_do_not_fail(tmp_path):
    async with pod_executor(tmp_path, write_rate=1.0, write_burst=2) as (cluster, executor):
        jobs = [python_job("def main(n: int):\n    return n\n", n=n) for n in range(4)]
        first = asyncio.create_task(run_job(executor, jobs[0]))
        await until(lambda: job_pods(cluster), "the first job pod exists")
        # The first job took the whole burst (its pod and its Secret): the next one waits
        # its turn, and a job cancelled meanwhile creates nothing.
        cancel = asyncio.Event()
        second = asyncio.create_task(run_job(executor, jobs[1], cancel))
        await until(lambda: asyncio.sleep(0, executor.writes.waits), "the second job waits")
        cancel.set()
        assert (await second)[0].error == {
            "kind": "cancelled", "message": "cancelled while waiting its turn to create the "
                                            "job pod"}
        rest = await asyncio.gather(first, *(run_job(executor, job) for job in jobs[2:]))
        assert [outcome.result for outcome, _ in rest] == [0, 2, 3]
        assert executor.writes.waits >= 3
        asked = collections.Counter(executor_requests(cluster))
        assert asked["create pods"] == asked["create secrets"] == asked["delete pods"] == 3


class AnyStr(str):
    """Equal to any string that starts with it."""

    def __eq__(self, other):
        return isinstance(other, str) and other.startswith(self)

    __hash__ = str.__hash__
