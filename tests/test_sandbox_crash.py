"""A worker killed at any moment (while its jobs start, or while they run) leaves none of
their processes running: a job's processes die with its worker, and what cannot (a pasta
or bwrap that was starting, which waits on its parent forever) is killed by the next
worker that starts on the host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from sandboxkit import traversable

from gristmill.sandbox.process import ProcessExecutor
from gristmill.sandbox.uids import UidPool

FIRST_UID, COUNT = 310_000, 16  # a range of the test's own: leftovers are only ours

WORKER = textwrap.dedent("""
    import asyncio, sys
    from gristmill.sandbox.base import JobRequest
    from gristmill.sandbox.process import ProcessExecutor
    from gristmill.sandbox.uids import UidPool

    base, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    executor = ProcessExecutor(work_dir=f"{base}/jobs",
                               uids=UidPool(f"{base}/uids", first=first, count=count))
    JOBS = [("python", "import time\\ndef main():\\n    time.sleep(300)\\n", False),
            ("bash", "sleep 300 & sleep 301; wait", False),
            ("python", "import subprocess\\ndef main():\\n    subprocess.run(['sleep', '302'])\\n",
             True)]

    async def main():
        jobs = [executor.run(JobRequest(job_id=f"crash{i:011d}", language=language, code=code,
                                        input={}, network=network), lambda _: None,
                             asyncio.Event())
                for i, (language, code, network) in enumerate(JOBS)]
        print("starting", flush=True)
        await asyncio.gather(*jobs)

    asyncio.run(main())
""")


def _ours() -> list[str]:
    """Live (not zombie) processes running as one of the test's uids."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        uid = int(status["Uid"].split()[0])
        if FIRST_UID <= uid < FIRST_UID + COUNT and not status["State"].strip().startswith("Z"):
            found.append(f"{entry} {command[:120]}")
    return found


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 1.5])
def test_a_killed_worker_leaves_no_job_running(tmp_path, delay):
    base = traversable(tmp_path)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(base), str(FIRST_UID),
                               str(COUNT)], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "starting"
        time.sleep(delay)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    if delay >= 1.5:  # the jobs were running: they die with their worker
        assert _gone_soon(), _ours()
    ProcessExecutor(work_dir=base / "jobs", uids=UidPool(base / "uids", first=FIRST_UID,
                                                         count=COUNT))  # a new worker
    assert _gone_soon(), _ours()
    assert list((base / "jobs").iterdir()) == []  # and their dirs


def _gone_soon() -> bool:
    for _ in range(50):  # dying takes a moment
        if not _ours():
            return True
        time.sleep(0.1)
    return False
