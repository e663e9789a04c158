"""kopf running for real against the Kubernetes emulator, with a real database."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import aiohttp
import kopf
import pytest
from k8s_emulator import emulated_cluster

GROUP = "apis/gristmill.io/v1alpha1/namespaces/team-a"


@kopf.on.login()
def _login_to_the_emulator(**_):
    # Each test has an emulator of its own; kopf must not reuse an earlier one's address.
    return kopf.ConnectionInfo(server=os.environ["GRISTMILL_TEST_KUBE_URL"])


def manifest(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "gristmill.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "team-a"}, "spec": spec}


@contextlib.asynccontextmanager
async def running_operator():
    import gristmill.operator.handlers  # noqa: F401  (registers the handlers)

    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        clusterwide=True, standalone=True, stop_flag=stop, settings=_settings(kopf)))
    # Let kopf list and start watching first: kmock 0.8 replays an object created during
    # the initial listing as a second, stale ADDED event, and kopf then waits on a 422.
    await asyncio.sleep(2)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _settings(kopf):
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # the emulator cannot list namespaces
    return settings


async def get(session, path: str) -> dict:
    async with session.get(path) as response:
        return await response.json()


async def wait_for(check, timeout: float = 20):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.2)


def ready_of(obj: dict) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition["type"] == "Ready":
            return condition["status"]
    return None


@pytest.mark.timeout(90)
async def test_scripts_flows_and_worker_groups_reconciled(database_url, tmp_path):
    async with emulated_cluster(database_url, tmp_path) as cluster, running_operator():
        session = cluster.session
        # A Flow that needs a Script that does not exist yet: not Ready, and says why.
        flow = manifest("Flow", "pipeline", {"steps": [{"id": "a", "script": "hello"}]})
        await session.post(f"{GROUP}/flows", json=flow)

        async def flow_state():
            obj = await get(session, f"{GROUP}/flows/pipeline")
            return obj if ready_of(obj) else None
        waiting = await wait_for(flow_state)
        assert ready_of(waiting) == "False"
        assert "Script 'hello' does not exist" in waiting["status"]["conditions"][0]["message"]

        # A broken Script: Ready=False with the line.
        broken = manifest("Script", "hello", {"language": "python", "code": "def main(:\n"})
        await session.post(f"{GROUP}/scripts", json=broken)

        async def script_state(expected: str):
            obj = await get(session, f"{GROUP}/scripts/hello")
            return obj if ready_of(obj) == expected else None
        failed = await wait_for(lambda: script_state("False"))
        (condition,) = failed["status"]["conditions"]
        assert "Python syntax error at line 1" in condition.get("message", ""), failed

        # Fixing it makes the Script Ready, and the Flow turns Ready untouched.
        await session.patch(f"{GROUP}/scripts/hello",
                            json={"spec": {"code": "def main(name: str = 'x'):\n    return name\n"}},
                            headers={"Content-Type": "application/merge-patch+json"})
        fixed = await wait_for(lambda: script_state("True"))
        assert fixed["status"]["inputSchema"]["properties"]["name"]["type"] == "string"

        async def flow_ready():
            obj = await get(session, f"{GROUP}/flows/pipeline")
            return obj if ready_of(obj) == "True" else None
        assert (await wait_for(flow_ready))["status"]["steps"] == 1

        # A WorkerGroup gets a Deployment it owns.
        group = manifest("WorkerGroup", "default", {"tags": ["python"], "replicas": 2})
        created = await (await session.post(f"{GROUP}/workergroups", json=group)).json()

        async def deployment():
            obj = await get(session, "apis/apps/v1/namespaces/team-a/deployments/"
                                     "gristmill-workers-default")
            return obj if obj.get("kind") == "Deployment" else None
        owned = await wait_for(deployment)
        assert owned["spec"]["replicas"] == 2
        (owner,) = owned["metadata"]["ownerReferences"]
        assert owner["uid"] == created["metadata"]["uid"] and owner["kind"] == "WorkerGroup"
        events = await get(session, "api/v1/namespaces/team-a/events")
        assert any(e.get("reason") == "Stored" for e in events.get("items", []))

        # A pod-executor group also gets what its workers need to run job pods.
        group = manifest("WorkerGroup", "pods", {"tags": ["python"], "executor": "pod"})
        created = await (await session.post(f"{GROUP}/workergroups", json=group)).json()
        for path in ("api/v1/namespaces/team-a/serviceaccounts/gristmill-workers-pods",
                     "apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/"
                     "gristmill-workers-pods",
                     "apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/"
                     "gristmill-jobs-pods-no-network"):
            async def owned_object(path=path):
                obj = await get(session, path)
                return obj if obj.get("metadata", {}).get("ownerReferences") else None
            (owner,) = (await wait_for(owned_object))["metadata"]["ownerReferences"]
            assert owner["uid"] == created["metadata"]["uid"]
        async def pod_workers():
            obj = await get(session, "apis/apps/v1/namespaces/team-a/deployments/"
                                     "gristmill-workers-pods")
            return obj if obj.get("kind") == "Deployment" else None
        template = (await wait_for(pod_workers))["spec"]["template"]["spec"]
        assert template["serviceAccountName"] == "gristmill-workers-pods"


@contextlib.contextmanager
def environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.timeout(90)
async def test_with_a_dispatcher_each_group_gets_a_token_secret_its_workers_read(
        database_url, tmp_path):
    import base64

    from gristmill.dispatch import tokens

    key = tokens.new_key()
    server = "http://gristmill-api.gristmill.svc:8080"
    deployment_path = "apis/apps/v1/namespaces/team-a/deployments/gristmill-workers-gpu"
    secret_path = "api/v1/namespaces/team-a/secrets/gristmill-worker-gpu"
    with environment(GRISTMILL_DISPATCHER_URL=server, GRISTMILL_WORKER_TOKEN_KEYS=key):
        async with emulated_cluster(database_url, tmp_path) as cluster, running_operator():
            session = cluster.session
            created = await (await session.post(f"{GROUP}/workergroups", json=manifest(
                "WorkerGroup", "gpu", {"tags": ["gpu", "cuda"]}))).json()

            async def token_for(tags: tuple[str, ...]):
                secret = await get(session, secret_path)
                deployment = await get(session, deployment_path)
                if secret.get("kind") != "Secret" or deployment.get("kind") != "Deployment":
                    return None
                token = base64.b64decode(secret["data"]["token"]).decode()
                annotations = deployment["spec"]["template"]["metadata"]["annotations"]
                if (tokens.verify(tokens.parse_keys(key), token).tags != tags
                        or annotations["gristmill.io/worker-token-sha256"] != hashlib.sha256(
                            token.encode()).hexdigest()):
                    return None
                return token, secret, deployment
            token, secret, deployment = await wait_for(lambda: token_for(("gpu", "cuda")))
            grant = tokens.verify(tokens.parse_keys(key), token)
            assert (grant.namespace, grant.group, grant.group_uid) == (
                "team-a", "gpu", created["metadata"]["uid"])
            (owner,) = secret["metadata"]["ownerReferences"]
            assert owner["uid"] == created["metadata"]["uid"] and owner["kind"] == "WorkerGroup"
            assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == (
                "gristmill-operator")
            env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0][
                "env"]}
            assert "GRISTMILL_DATABASE_URL" not in env
            assert env["GRISTMILL_SERVER"]["value"] == server
            assert env["GRISTMILL_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": "gristmill-worker-gpu", "key": "token"}

            # New tags: a new token, and the pod template's hash follows (the pods roll).
            await session.patch(f"{GROUP}/workergroups/gpu", json={"spec": {"tags": ["gpu"]}},
                                headers={"Content-Type": "application/merge-patch+json"})
            retagged, _, _ = await wait_for(lambda: token_for(("gpu",)))
            assert retagged != token


@pytest.mark.timeout(90)
async def test_autoscaler_follows_the_queue_and_spares_busy_workers(db, database_url, tmp_path):
    from gristmill.store import queue, workers

    async with emulated_cluster(database_url, tmp_path) as cluster, running_operator():
        session = cluster.session
        group = manifest("WorkerGroup", "auto", {
            "tags": ["python"], "concurrency": 2,
            "autoscaling": {"minReplicas": 1, "maxReplicas": 10, "behavior": {
                "scaleDown": {"stabilizationWindow": "0s",
                              "policies": [{"type": "Percent", "value": 100}]}}}})
        await session.post(f"{GROUP}/workergroups", json=group)
        deployment_path = "apis/apps/v1/namespaces/team-a/deployments/gristmill-workers-auto"

        async def replicas(expected):
            obj = await get(session, deployment_path)
            return obj if obj.get("spec", {}).get("replicas") == expected else None
        await wait_for(lambda: replicas(1))

        # Ten due jobs for two-slot workers: five workers, within a loop or two.
        await queue.enqueue(db, [queue.NewJob(namespace="team-a", tag="python", kind="noop")
                                 for _ in range(10)])
        await wait_for(lambda: replicas(5))
        status = (await get(session, f"{GROUP}/workergroups/auto"))["status"]
        assert status["desiredReplicas"] == 5 and status["queuedJobs"] == 10
        scaled = next(c for c in status["conditions"] if c["type"] == "Scaled")
        assert scaled["reason"] == "ScaledUp" and "1 -> 5" in scaled["message"]

        # Two worker pods, one busy: when the queue empties, the idle one is marked cheap.
        for pod in ("auto-busy", "auto-idle"):
            await session.post("api/v1/namespaces/team-a/pods", json={
                "apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": pod, "namespace": "team-a",
                    # A worker pod's labels (the emulator selects by labels, as Kubernetes).
                    "labels": {"gristmill.io/worker-group": "auto",
                               "app.kubernetes.io/name": "gristmill-worker"}}})
            await workers.register(db, pod, ["python"], 2, hostname=pod)
        async with db.transaction():
            busy = await queue.claim(db, "auto-busy", ["python"], 1)
        await db.execute("DELETE FROM jobs WHERE status = 'queued'")
        await wait_for(lambda: replicas(1))
        costs = {}
        for pod in ("auto-busy", "auto-idle"):
            annotations = (await get(session, f"api/v1/namespaces/team-a/pods/{pod}")
                           )["metadata"].get("annotations", {})
            costs[pod] = annotations.get("controller.kubernetes.io/pod-deletion-cost")
        assert costs == {"auto-busy": "100", "auto-idle": "0"}
        assert len(busy) == 1


@pytest.mark.timeout(120)
async def test_a_restarted_operator_duplicates_nothing(db, database_url, tmp_path):
    async with emulated_cluster(database_url, tmp_path) as cluster:
        session = cluster.session
        async with running_operator():
            await session.post(f"{GROUP}/scripts", json=manifest(
                "Script", "hello", {"language": "python", "code": "def main():\n    return 1\n"}))
            await session.post(f"{GROUP}/flows", json=manifest(
                "Flow", "pipeline", {"steps": [{"id": "a", "script": "hello"}]}))
            await session.post(f"{GROUP}/workergroups", json=manifest(
                "WorkerGroup", "default", {"tags": ["python"], "replicas": 2}))

            async def all_ready():
                script = await get(session, f"{GROUP}/scripts/hello")
                flow = await get(session, f"{GROUP}/flows/pipeline")
                group = await get(session, f"{GROUP}/workergroups/default")
                return ready_of(script) == ready_of(flow) == "True" and ready_of(group)
            await wait_for(all_ready)
            await asyncio.sleep(1)  # let the last status patches land

        async def snapshot():
            objects = {path: await get(session, path) for path in (
                f"{GROUP}/scripts/hello", f"{GROUP}/flows/pipeline",
                f"{GROUP}/workergroups/default",
                "apis/apps/v1/namespaces/team-a/deployments/gristmill-workers-default")}
            events = (await get(session, "api/v1/namespaces/team-a/events"))["items"]
            deployments = (await get(session, "apis/apps/v1/deployments"))["items"]
            stored = await (await db.execute(
                "SELECT (SELECT count(*) FROM scripts), (SELECT count(*) FROM flow_versions),"
                " (SELECT count(*) FROM flows)")).fetchone()
            return ({path: (obj["spec"], obj.get("status"), obj["metadata"].get("finalizers"))
                     for path, obj in objects.items()},
                    sorted(e["reason"] for e in events), len(deployments), stored)
        before = await snapshot()

        async with running_operator():
            await asyncio.sleep(3)  # a full re-listing and a recheck or two
            after = await snapshot()
        assert after == before


@pytest.mark.timeout(90)
async def test_database_errors_are_retried_with_backoff(db, database_url, tmp_path):
    async with emulated_cluster(database_url, tmp_path) as cluster, running_operator():
        session = cluster.session
        # The database drops the operator's connections (a failover, a restart).
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        await session.post(f"{GROUP}/scripts", json=manifest(
            "Script", "hello", {"language": "python", "code": "def main():\n    return 1\n"}))

        async def stored():
            obj = await get(session, f"{GROUP}/scripts/hello")
            return obj if ready_of(obj) == "True" else None
        # kopf's own backoff is a minute; the first retry here comes after a second.
        await wait_for(stored, timeout=15)
        cur = await db.execute("SELECT count(*) FROM scripts")
        assert (await cur.fetchone())[0] == 1


@pytest.mark.timeout(90)
async def test_deleted_definitions_leave_the_store_and_their_finalizers_go(db, database_url,
                                                                          tmp_path):
    from gristmill.store import flows as flow_store
    from gristmill.store import scripts as script_store

    async with emulated_cluster(database_url, tmp_path) as cluster, running_operator():
        session = cluster.session
        await session.post(f"{GROUP}/scripts", json=manifest(
            "Script", "hello", {"language": "python", "code": "def main():\n    return 1\n"}))
        await session.post(f"{GROUP}/flows", json=manifest(
            "Flow", "pipeline", {"steps": [{"id": "a", "script": "hello"}]}))
        await session.post(f"{GROUP}/workergroups", json=manifest(
            "WorkerGroup", "default", {"tags": ["python"]}))

        async def ready(plural, name):
            obj = await get(session, f"{GROUP}/{plural}/{name}")
            return ready_of(obj) == "True"
        for plural, name in (("scripts", "hello"), ("flows", "pipeline"),
                             ("workergroups", "default")):
            await wait_for(lambda plural=plural, name=name: ready(plural, name))
        assert await flow_store.get(db, "team-a", "pipeline") is not None
        # Only Scripts and Flows have cleanup to do; a WorkerGroup's Deployment goes with it.
        group = await get(session, f"{GROUP}/workergroups/default")
        assert not group["metadata"].get("finalizers")

        for plural, name in (("flows", "pipeline"), ("scripts", "hello"),
                             ("workergroups", "default")):
            async with session.delete(f"{GROUP}/{plural}/{name}") as response:
                assert response.status == 200

            async def gone(plural=plural, name=name):
                async with session.get(f"{GROUP}/{plural}/{name}") as response:
                    return response.status == 404
            await wait_for(gone)  # the operator let go of its finalizer
        assert await flow_store.get(db, "team-a", "pipeline") is None
        assert await script_store.get(db, "team-a", "hello") is None


@pytest.mark.timeout(90)
async def test_the_operator_command_serves_probes_and_stops_on_sigterm(database_url, tmp_path):
    import subprocess
    import sys

    from test_cli import free_port

    async with emulated_cluster(database_url, tmp_path) as cluster:
        session = cluster.session
        health, metrics = free_port(), free_port()
        operator = subprocess.Popen(
            [sys.executable, "-m", "gristmill.cli", "operator", "--database-url", database_url,
             "--health-port", str(health), "--metrics-port", str(metrics)],
            env={**os.environ, "GRISTMILL_LOG_LEVEL": "WARNING"})
        try:
            async def probes():
                try:
                    async with aiohttp.ClientSession() as probe, probe.get(
                            f"http://127.0.0.1:{health}/healthz") as response:
                        return await response.json() if response.status == 200 else None
                except aiohttp.ClientError:
                    return None
            # kopf's liveness endpoint, with the operator's own database probe in it.
            assert (await wait_for(probes, timeout=30))["database"] == {"reachable": True}
            await asyncio.sleep(2)  # kopf's first listing: see running_operator()

            await session.post(f"{GROUP}/scripts", json=manifest(
                "Script", "hello", {"language": "python", "code": "def main():\n    return 1\n"}))

            async def stored():
                return ready_of(await get(session, f"{GROUP}/scripts/hello")) == "True"
            await wait_for(stored)
            async with aiohttp.ClientSession() as scrape, scrape.get(
                    f"http://127.0.0.1:{metrics}/metrics") as response:
                assert "gristmill_queue_jobs" in await response.text()
        finally:
            operator.terminate()
            assert await asyncio.to_thread(operator.wait, 30) == 0
