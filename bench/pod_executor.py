"""What the pod executor costs on Gristmill's side.

    python bench/pod_executor.py [--jobs 20] [--parallel 20] [--start-delay 3] [--burst 60]

1. API requests per job: a trivial Python job (def main(): return 1) run by the
   PodExecutor against kmock's emulator, whose pods tests/k8s_kubelet.py runs as
   local processes, with pods that start at once and pods that stay
   ContainerCreating for --start-delay seconds (a real start: seconds). The
   count is the executor's design (creates, status reads or the shared watch,
   log follow, delete), all of its requests divided by the jobs; the
   emulator's latencies are not a real API server's and are not reported.
2. A burst of --burst jobs, --parallel at once (a worker of that concurrency):
   the most API writes the executor made in any one second, and its writes a
   second over the burst (its token bucket's doing).
3. The size of a job pod object with 100 KB of input: what every pod watcher in
   the cluster receives on each of the pod's status changes.
4. The pod command's own cost: `python -m gristmill.sandbox.pod_job` run here
   as a container would run it, against the same job in a plain subprocess
   (the wrapper alone) and in the process executor's bubblewrap sandbox.
What this cannot measure: a real kubelet's pod start-up (seconds on a real
cluster, more when the image is pulled), which dominates a job pod's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kmock
from common import percentile
from kubernetes import config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from k8s_emulator import Emulator, write_kubeconfig  # noqa: E402
from k8s_kubelet import ProcessKubelet  # noqa: E402

from gristmill.sandbox.base import JobRequest  # noqa: E402
from gristmill.sandbox.plain import PlainExecutor  # noqa: E402
from gristmill.sandbox.pod import PodExecutor  # noqa: E402
from gristmill.sandbox.pod_job import PAYLOAD_KEY, job_payload  # noqa: E402
from gristmill.sandbox.pod_objects import job_pod  # noqa: E402
from gristmill.sandbox.process import ProcessExecutor  # noqa: E402

CODE = "def main():\n    return 1\n"
NAMESPACE = "bench"


async def run_jobs(executor, jobs: int, parallel: int) -> list[float]:
    timings: list[float] = []
    slots = asyncio.Semaphore(parallel)

    async def one(number: int) -> None:
        async with slots:
            request = JobRequest(job_id=f"bench{number:08d}", language="python", code=CODE,
                                 input={})
            started = time.perf_counter()
            outcome = await executor.run(request, lambda _: None, asyncio.Event())
            timings.append((time.perf_counter() - started) * 1000)
            assert outcome.ok, outcome.error
    await asyncio.gather(*(one(n) for n in range(jobs)))
    return timings


def line(name: str, timings: list[float]) -> str:
    return (f"{name:<44} p50 {statistics.median(timings):7.1f} ms   "
            f"p99 {percentile(timings, 99):7.1f} ms")


def _by_the_executor(user_agent: str) -> bool:
    return user_agent.startswith("OpenAPI")  # the kubelet's requests come from aiohttp


async def api_requests_per_job(jobs: int, parallel: int, start_delay_s: float
                               ) -> tuple[float, int, float]:
    """The executor's requests per job, the most writes it made in one second, and its
    writes a second over the run."""
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        url = str(server.url).rstrip("/")
        with tempfile.TemporaryDirectory() as scratch:
            kubeconfig = write_kubeconfig(Path(scratch) / "kubeconfig", url)
            config.load_kube_config(config_file=str(kubeconfig))
        async with ProcessKubelet(emulator, url, NAMESPACE) as kubelet:
            kubelet.start_delay_s = start_delay_s
            executor = PodExecutor(NAMESPACE, "local", worker="bench")
            try:
                await run_jobs(executor, jobs, parallel)
            finally:
                executor.close()
        asked = sum(1 for request in emulator
                    if _by_the_executor(request.headers.get("User-Agent", "")))
        writes = [at for at, agent in emulator.writes if _by_the_executor(agent)]
        most = max(sum(1 for other in writes if at <= other < at + 1) for at in writes)
        return asked / jobs, most, len(writes) / max(writes[-1] - writes[0], 1e-3)


def pod_object_bytes(input_bytes: int) -> int:
    request = JobRequest(job_id="bench0000", language="python", code=CODE,
                         input={"blob": "x" * input_bytes})
    return len(json.dumps(job_pod(request, "local", 300, "bench", "uid")))


def time_pod_command(jobs: int) -> list[float]:
    timings = []
    for number in range(jobs):
        request = JobRequest(job_id=f"bench{number:08d}", language="python", code=CODE,
                             input={})
        with tempfile.TemporaryDirectory() as workdir:
            secret = Path(workdir) / PAYLOAD_KEY
            secret.write_bytes(job_payload(request, "#m# "))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "gristmill.sandbox.pod_job",
                                   str(secret)], cwd=workdir, capture_output=True, text=True,
                                  env={key: os.environ[key] for key in ("PATH", "PYTHONPATH")
                                       if key in os.environ})
            timings.append((time.perf_counter() - started) * 1000)
            assert done.returncode == 0 and '"ok": true' in done.stdout, done.stderr
    return timings


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--burst", type=int, default=60,
                        help="jobs in the burst whose API writes are counted (%(default)s)")
    parser.add_argument("--start-delay", type=float, default=3.0,
                        help="seconds a job pod stays ContainerCreating (%(default)s)")
    args = parser.parse_args()
    for delay in (0.0, args.start_delay):
        for parallel in (1, args.parallel):
            per_job, _, _ = await api_requests_per_job(args.jobs, parallel, delay)
            print(f"{f'API requests per job, pods start in {delay:g} s, {parallel} at once':<52}"
                  f" {per_job:5.1f}")
    _, most, rate = await api_requests_per_job(args.burst, args.parallel, 0.0)
    print(f"{f'a burst of {args.burst} jobs, {args.parallel} at once: API writes':<52} at most "
          f"{most} in one second, {rate:.1f} a second over the burst")
    print(f"{'job pod object with 100 KB of input':<52} {pod_object_bytes(100_000):,} bytes")
    print(line("plain subprocess (the wrapper alone)",
               await run_jobs(PlainExecutor(), args.jobs, 1)))
    print(line("pod command (python -m ...pod_job)", time_pod_command(args.jobs)))
    print(line("process executor (bubblewrap)",
               await run_jobs(ProcessExecutor(), args.jobs, 1)))


if __name__ == "__main__":
    asyncio.run(main())
