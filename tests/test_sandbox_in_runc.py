"""The process executor in a real container: the chart's default worker pod, as the operator
builds it, run in runc the way containerd 2.4 and the kubelet would run it (runc_pod.py),
serving Python, Bash, requirements and network jobs from a real PostgreSQL.

The container has network, pid, ipc, uts and mount namespaces of its own, as a pod has; it
reaches the test's PostgreSQL through the server's Unix socket, bound into it. Each
variant of the pod spec that does not work is run too, and must fail at the worker's
start with what to change, never later in every job.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import psycopg
import pytest
import yaml
from pgkit import embedded_postgres
from runc_pod import (
    IDS_PER_POD,
    Bind,
    Container,
    Pod,
    RuncUnavailable,
    build_rootfs,
    container_config,
    containerd_seccomp,
    containerd_spec,
    need,
    python_binds,
    run_container,
    runc_problem,
)

from gristmill.api.runs import SubmitRequest, submit_script_run
from gristmill.dev.postgres import EmbeddedPostgres
from gristmill.operator.deployment import worker_deployment
from gristmill.spec import WorkerGroup, load_manifest_text
from gristmill.store import logs, queue
from gristmill.store import scripts as script_store
from gristmill.store.migrate import migrate_url

ROOT = Path(__file__).parent.parent
SOURCE = ROOT / "operator"
IMAGE_SOURCE = "/opt/gristmill/operator"  # where the container has the project (the image's)
WHEELS = "/opt/wheels"
SOCKET_DIR = "/run/postgresql"
ENTRYPOINT = [sys.executable, "-m", "gristmill.cli"]  # the image's ENTRYPOINT ["gristmill"]
START_TIMEOUT = 60

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def runc_host():
    need(runc_problem() is None, runc_problem() or "")
    try:
        containerd_spec()
    except RuncUnavailable as exc:
        need(False, str(exc))


@pytest.fixture(scope="module")
def postgres():
    with embedded_postgres("runc-pg") as server:
        yield server


class Database:
    """A migrated database of the test's own: its URL here, and in a container that has
    the server's socket dir at SOCKET_DIR."""

    def __init__(self, server: EmbeddedPostgres, name: str):
        self.url = server.url(name)
        self.socket_dir = server.socket_dir
        self.in_container = (f"postgresql://gristmill:{server.password()}@/{name}"
                             f"?host={SOCKET_DIR}&port={server.port}")


@pytest.fixture
async def database(postgres):
    name = f"runc_{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(postgres.create_database, name)
    database = Database(postgres, name)
    await migrate_url(database.url)
    try:
        yield database
    finally:
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# the pod specs ----------------------------------------------------------------------

def chart_worker_group() -> dict:
    """The chart's default WorkerGroup, rendered by Helm."""
    rendered = helm.Chart.load(ROOT / "charts" / "gristmill").render(
        None, name="gm", namespace="gristmill", is_install=True)
    groups = [doc for path, text in rendered.items() if path.endswith(".yaml")
              for doc in yaml.safe_load_all(text) if doc and doc["kind"] == "WorkerGroup"]
    (group,) = groups
    return group


def chart_worker_pod(**env: str) -> dict:
    """The pod template the operator makes of the chart's default WorkerGroup (with `env`
    added to the group, as a user would point pip at a mirror)."""
    group = chart_worker_group()
    group["spec"]["env"] = [{"name": k, "value": v} for k, v in env.items()]
    deployment = worker_deployment(WorkerGroup.model_validate(group), "gristmill-database")
    return deployment["spec"]["template"]["spec"]


def old_worker_pod() -> dict:
    """What the operator gave process-executor workers before: no user namespace, the
    default (masked) /proc, seccomp Unconfined."""
    pod = copy.deepcopy(chart_worker_pod())
    del pod["hostUsers"]
    (container,) = pod["containers"]
    container["securityContext"] = {"allowPrivilegeEscalation": False,
                                    "seccompProfile": {"type": "Unconfined"}}
    container["args"] = container["args"][:container["args"].index("--job-network")]
    return pod


def with_security(pod: dict, **changes) -> dict:
    pod = copy.deepcopy(pod)
    security = pod["containers"][0]["securityContext"]
    for key, value in changes.items():
        if value is None:
            security.pop(key, None)
        else:
            security[key] = value
    return pod


def image_env() -> dict[str, str]:
    """The worker image's ENV (worker_image/Dockerfile), and where its project is."""
    env = {"PYTHONPATH": IMAGE_SOURCE}
    for line in (ROOT / "worker_image" / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in line[4:].split())
    return env


# the container ---------------------------------------------------------------------

def host_id_base() -> int:
    """A host range for the pod's ids, as the kubelet allocates them: a multiple of 65536,
    far above the host's users and the host range of job uids (200000 up)."""
    return IDS_PER_POD * random.randint(64, 1000)


@contextlib.contextmanager
def worker_container(pod_spec: dict, database: Database | None = None,
                     wheels: Path | None = None,
                     entrypoint: list[str] = ENTRYPOINT,
                     localhost_profiles: dict[str, dict] | None = None) -> Iterator[Container]:
    """`pod_spec`'s worker container: the image's ENTRYPOINT (or `entrypoint`) with the
    pod's args, and the worker image's files as far as the worker needs them."""
    base = host_id_base() if pod_spec.get("hostUsers") is False else 0
    url = database.in_container if database else "postgresql://gristmill@/unused"
    pod = Pod(pod_spec, "worker", entrypoint=entrypoint,
              secrets={"gristmill-database": {"url": url}}, host_id_base=base,
              localhost_profiles=localhost_profiles or {})
    binds = [Bind("/usr"), Bind("/etc"), *python_binds(), Bind(str(SOURCE), IMAGE_SOURCE)]
    if database:
        binds.append(Bind(str(database.socket_dir), SOCKET_DIR))
    if wheels:
        binds.append(Bind(str(wheels), WHEELS))
    # Not under pytest's 0700 dirs: the container's root must reach its rootfs.
    bundle = Path(tempfile.mkdtemp(prefix="gristmill-runc-", dir="/tmp"))
    bundle.chmod(0o711)
    build_rootfs(bundle / "rootfs", binds, writable=["/var", "/run", "/root"], owner=base)
    config = container_config(pod, rootfs=bundle / "rootfs", binds=binds,
                              extra_env=image_env())
    try:
        with run_container(bundle, config) as container:
            yield container
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


def wait_for_exit(container: Container, timeout: float = START_TIMEOUT) -> int:
    try:
        return container.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not exit:\n{container.output()}") from None


# jobs ----------------------------------------------------------------------------------

SCRIPTS = """
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: whoami}
spec:
  language: python
  code: |
    import os

    def main():
        masked = [line.split()[4] for line in open("/proc/self/mountinfo")
                  if line.split()[4].startswith("/proc/")]
        return {"uid": os.getuid(), "pid": os.getpid(), "proc_mounts": masked,
                "python": os.path.realpath("/proc/self/exe")}
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: shout}
spec:
  language: bash
  code: |
    echo "hello from bash, $1" >&2
    echo "{\\"shout\\": \\"${1^^}\\", \\"uid\\": $(id -u)}"
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: wheel}
spec:
  language: python
  requirements: [gristmill-probe-wheel==1.0]
  code: |
    import gristmill_probe_wheel

    def main():
        return gristmill_probe_wheel.VALUE
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: online}
spec:
  language: python
  sandbox: {network: true}
  code: |
    import os, socket

    def main():
        return {"ns": os.readlink("/proc/self/ns/net"),
                "interfaces": sorted(name for _, name in socket.if_nameindex())}
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: nap}
spec:
  language: bash
  code: |
    echo napping >&2
    sleep 4.32109
"""


def probe_wheel(directory: Path) -> Path:
    """A pure-Python wheel made here (no index needed): gristmill_probe_wheel.VALUE == 42."""
    directory.mkdir(exist_ok=True)
    path = directory / "gristmill_probe_wheel-1.0-py3-none-any.whl"
    info = "gristmill_probe_wheel-1.0.dist-info"
    files = {
        "gristmill_probe_wheel/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gristmill-probe-wheel\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gristmill-tests\nRoot-Is-Purelib: true"
                         "\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    directory.chmod(0o755)
    path.chmod(0o644)
    return path


async def submit(url: str, name: str, job_input: dict | None = None) -> uuid.UUID:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        answer = await submit_script_run(db, "default", name,
                                         SubmitRequest(input=job_input or {}))
    return uuid.UUID(answer["id"])


async def finished(url: str, job_id: uuid.UUID, container: Container,
                   timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        while time.monotonic() < deadline:
            job = await queue.get_job(db, job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                job["log"] = "".join(text for _, text in await logs.read(db, job_id))
                return job
            assert container.process.poll() is None, \
                f"the worker exited:\n{container.output()}"
            await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish; the worker said:\n"
                         f"{container.output()}")


async def apply_scripts(url: str) -> None:
    loaded = load_manifest_text(SCRIPTS, source="<test>")
    assert not loaded.errors, loaded.errors
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        for script in loaded.resources:
            await script_store.apply(db, script)


def host_processes_with(marker: str) -> list[tuple[int, int]]:
    """(pid, host uid) of the host's processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker.encode() in (entry / "cmdline").read_bytes():
                status = (entry / "status").read_text()
                uid = next(line.split()[1] for line in status.splitlines()
                           if line.startswith("Uid:"))
                found.append((int(entry.name), int(uid)))
    return found


def init_pid(container: Container) -> int:
    state = subprocess.run(["runc", "--root", str(container.state), "state", container.id],
                           capture_output=True, text=True, check=True)
    return json.loads(state.stdout)["pid"]


# the tests -----------------------------------------------------------------------------

async def test_the_charts_worker_pod_runs_jobs_in_a_container(runc_host, tmp_path, database):
    pod_spec = chart_worker_pod(PIP_NO_INDEX="1", PIP_FIND_LINKS=WHEELS)
    assert pod_spec["hostUsers"] is False
    probe_wheel(tmp_path / "wheels")
    await apply_scripts(database.url)
    with worker_container(pod_spec, database, wheels=tmp_path / "wheels") as worker:
        python = await finished(database.url, await submit(database.url, "whoami"), worker)
        assert python["status"] == "succeeded", (python["error"], worker.output())
        result = python["result"]
        # A job's uid is one the pod's user namespace maps, from the pod range; on the
        # host it is the pod's own (each pod on a node has a range of its own).
        assert 10_000 <= result["uid"] < 60_000
        # procMount Unmasked: neither the worker's /proc nor the job's has masks.
        assert result["proc_mounts"] == []
        masks = worker.exec("grep", "-c", " /proc/", "/proc/self/mountinfo")
        assert masks.stdout.strip() == "0", masks

        bash = await finished(database.url, await submit(database.url, "shout", {"word": "hi"}),
                              worker)
        assert bash["status"] == "succeeded", (bash["error"], worker.output())
        assert bash["result"]["shout"] == "HI" and 10_000 <= bash["result"]["uid"] < 60_000
        assert "hello from bash, hi" in bash["log"]

        wheel = await finished(database.url, await submit(database.url, "wheel"), worker)
        assert wheel["status"] == "succeeded", (wheel["error"], wheel["log"], worker.output())
        assert wheel["result"] == 42

        # No /dev/net/tun in a pod: a network job shares the worker pod's own network
        # namespace (--job-network pod), and its log says so.
        online = await finished(database.url, await submit(database.url, "online"), worker)
        assert online["status"] == "succeeded", (online["error"], worker.output())
        assert online["result"]["ns"] == os.readlink(f"/proc/{init_pid(worker)}/ns/net")
        assert online["result"]["ns"] != os.readlink("/proc/self/ns/net")  # not the node's
        assert online["result"]["interfaces"] == ["lo"]
        assert "shares the worker pod's network" in online["log"]
        assert "network jobs share this worker pod's own network namespace" in worker.output()

        # On the host, a job's processes run as the pod's own ids: two pods on a node
        # never share a job uid, nor so a process limit.
        await submit(database.url, "nap")
        for _ in range(100):
            jobs = host_processes_with("\x004.32109")
            if jobs:
                break
            await asyncio.sleep(0.1)
        base = worker.host_id_base
        assert jobs and all(base + 10_000 <= uid < base + 60_000 for _, uid in jobs), jobs

        health = worker.exec(sys.executable, "-c", "import urllib.request; print(urllib.request"
                             ".urlopen('http://127.0.0.1:8081/healthz', timeout=5).status)")
        assert health.stdout.strip() == "200", health
    assert host_processes_with("\x004.32109") == []  # nothing outlives the pod


async def test_the_old_pod_spec_passed_the_old_probe_and_failed_every_job(runc_host):
    """The issue, reproduced: with the runtime's masked /proc, bwrap's old probe (no --proc)
    passes and a job fails; the worker now runs a job at start, so it fails there instead,
    saying what to change."""
    pod_spec = old_worker_pod()
    script = textwrap.dedent("""
        import asyncio, subprocess, json
        from gristmill.sandbox.base import JobRequest
        from gristmill.sandbox.process import ProcessExecutor

        mounts = {line.split()[4]: line.split() for line in open("/proc/self/mountinfo")}
        old = subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--", "true"])
        ProcessExecutor._probe = lambda self: None  # the start-up check as it was: none
        executor = ProcessExecutor()
        job = JobRequest(job_id="0123456789", language="bash", code="echo ran", input={})
        outcome = asyncio.run(executor.run(job, print, asyncio.Event()))
        print(json.dumps({"old_probe": old.returncode, "ok": outcome.ok,
                          "error": outcome.error, "keys": mounts.get("/proc/keys"),
                          "sys": mounts.get("/proc/sys")}))
    """)
    pod_spec["containers"][0]["args"] = []
    with worker_container(pod_spec, entrypoint=[sys.executable, "-c", script]
                          ) as container:
        assert wait_for_exit(container) == 0, container.output()
        report = json.loads(container.output().strip().splitlines()[-1])
    # /proc has the kubelet's masks: /proc/keys is /dev/null, /proc/sys is read-only.
    assert report["keys"][3] == "/null" and report["keys"][4] == "/proc/keys", report
    assert report["sys"][5].split(",")[0] == "ro", report
    assert report["old_probe"] == 0
    assert not report["ok"] and report["error"]["kind"] == "setup"
    # (bwrap's "Can't mount proc on /newroot/proc" before; now the mount of the job's
    # outer pid namespace fails first, in the same way.)
    assert "mount /proc failed: Operation not permitted" in report["error"]["message"]

    with worker_container(old_worker_pod()) as worker:
        assert wait_for_exit(worker) == 1, worker.output()
        said = worker.output()
    assert "the sandbox cannot start a job here" in said
    assert "mount /proc failed: Operation not permitted" in said
    assert "procMount: Unmasked" in said and "hostUsers: false" in said


@pytest.mark.parametrize(("name", "change", "says"), [
    ("masked /proc in a user namespace", {"procMount": None}, "procMount: Unmasked"),
    ("seccomp RuntimeDefault", {"seccompProfile": {"type": "RuntimeDefault"}},
     "seccompProfile: {type: Unconfined}"),
    ("seccomp RuntimeDefault with CAP_SYS_ADMIN",
     {"seccompProfile": {"type": "RuntimeDefault"},
      "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID",
                                                "SETGID", "SETPCAP", "KILL", "SYS_ADMIN"]}},
     "pivot_root: Operation not permitted"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_pod_specs_that_cannot_run_jobs_stop_the_worker_at_start(runc_host, name,
                                                                  change, says):
    pod_spec = with_security(chart_worker_pod(), **change)
    with worker_container(pod_spec) as worker:
        assert wait_for_exit(worker) == 1, worker.output()
        said = worker.output()
    assert "the sandbox cannot start a job here" in said or \
        "bubblewrap cannot create namespaces here" in said, said
    assert says in said, said


# What bwrap and the job's chain call beyond containerd's RuntimeDefault (which allows clone
# only without namespace flags): measured here, one call left out at a time fails.
SANDBOX_CALLS = ("unshare", "clone", "mount", "umount2", "pivot_root", "sethostname")


async def test_a_localhost_seccomp_profile_with_what_the_sandbox_calls_runs_jobs(runc_host,
                                                                                 database):
    """The stricter alternative to Unconfined: containerd's RuntimeDefault plus the six
    calls the sandbox makes, as a Localhost profile installed on the nodes."""
    pod_spec = chart_worker_pod()
    security = pod_spec["containers"][0]["securityContext"]
    security["seccompProfile"] = {"type": "Localhost",
                                  "localhostProfile": "gristmill-process-worker.json"}
    profile = containerd_seccomp([f"CAP_{c}" for c in security["capabilities"]["add"]])
    profile["syscalls"].append({"names": list(SANDBOX_CALLS), "action": "SCMP_ACT_ALLOW"})
    await apply_scripts(database.url)
    with worker_container(pod_spec, database, localhost_profiles={
            "gristmill-process-worker.json": profile}) as worker:
        job = await finished(database.url, await submit(database.url, "whoami"), worker)
        assert job["status"] == "succeeded", (job["error"], worker.output())
        seccomp = worker.exec("grep", "^Seccomp:", "/proc/1/status")
        assert seccomp.stdout.split() == ["Seccomp:", "2"], seccomp  # the worker is filtered
