"""What the pod executor costs on Gristmill's side.

    python bench/pod_executor.py [--jobs 50] [--parallel 20]

1. API requests per job: a trivial Python job (def main(): return 1) run by the
   PodExecutor against kmock's emulator, whose pods tests/k8s_kubelet.py runs as
   local processes. The count is the executor's design (create, status reads,
   log follow, delete); the emulator's latencies are not a real API server's
   and are not reported.
2. The pod command's own cost: `python -m gristmill.sandbox.pod_job` run here
   as a container would run it, against the same job in a plain subprocess
   (the wrapper alone) and in the process executor's bubblewrap sandbox.
What this cannot measure: a real kubelet's pod start-up (seconds on a real
cluster, more when the image is pulled), which dominates a job pod's latency.
"""

from __future__ import annotations

import argparse
import asyncio
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
from gristmill.sandbox.pod_job import MARKER_ENV, request_env  # noqa: E402
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


async def api_requests_per_job(jobs: int, parallel: int) -> float:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        url = str(server.url).rstrip("/")
        with tempfile.TemporaryDirectory() as scratch:
            kubeconfig = write_kubeconfig(Path(scratch) / "kubeconfig", url)
            config.load_kube_config(config_file=str(kubeconfig))
        async with ProcessKubelet(emulator, url, NAMESPACE):
            await run_jobs(PodExecutor(NAMESPACE, "local", worker="bench"), jobs, parallel)
        # The executor's requests only (the kubelet's come from aiohttp).
        return sum(1 for request in emulator
                   if request.headers.get("User-Agent", "").startswith("OpenAPI")) / jobs


def time_pod_command(jobs: int) -> list[float]:
    timings = []
    for number in range(jobs):
        request = JobRequest(job_id=f"bench{number:08d}", language="python", code=CODE,
                             input={})
        with tempfile.TemporaryDirectory() as workdir:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "gristmill.sandbox.pod_job"],
                                  cwd=workdir, capture_output=True, text=True,
                                  env={"PATH": os.environ["PATH"], **request_env(request),
                                       MARKER_ENV: "#m# "})
            timings.append((time.perf_counter() - started) * 1000)
            assert done.returncode == 0 and '"ok": true' in done.stdout, done.stderr
    return timings


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=20)
    args = parser.parse_args()
    for parallel in (1, args.parallel):
        per_job = await api_requests_per_job(args.jobs, parallel)
        print(f"{f'API requests per job, {parallel} at a time':<44} {per_job:5.1f}")
    print(line("plain subprocess (the wrapper alone)",
               await run_jobs(PlainExecutor(), args.jobs, 1)))
    print(line("pod command (python -m ...pod_job)", time_pod_command(args.jobs)))
    print(line("process executor (bubblewrap)",
               await run_jobs(ProcessExecutor(), args.jobs, 1)))


if __name__ == "__main__":
    asyncio.run(main())
