"""Inside a job pod: run the one job the worker described in $GRISTMILL_JOB.

The pod's working directory (an emptyDir) is the job's work dir. The job's own
output goes to the container's stdout and stderr, which the worker follows
through the pod log. The outcome comes last, on one stdout line that starts
with a marker the worker chose for this job, so nothing the job prints is
mistaken for it. Kubernetes enforces memory, CPU and the deadline; the worker
enforces the output cap.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from gristmill.runtimes import get_runtime
from gristmill.runtimes.base import WORK
from gristmill.sandbox.base import JobOutcome, JobRequest, Limits, failure, killed_by_signal
from gristmill.sandbox.requirements import RequirementsCache

JOB_ENV = "GRISTMILL_JOB"
MARKER_ENV = "GRISTMILL_OUTCOME_MARKER"
PATH = "/usr/local/bin:/usr/bin:/bin"


def request_to_env(request: JobRequest) -> str:
    """What the worker puts in $GRISTMILL_JOB: all the pod needs to run the job."""
    return json.dumps({
        "id": request.job_id, "language": request.language, "code": request.code,
        "input": request.input, "inputOrder": list(request.input_order),
        "requirements": list(request.requirements), "env": dict(request.env),
        "maxFileBytes": request.limits.max_file_bytes,
    })


def request_from_env(text: str) -> JobRequest:
    job = json.loads(text)
    return JobRequest(job_id=job["id"], language=job["language"], code=job["code"],
                      input=job["input"], input_order=tuple(job["inputOrder"]),
                      requirements=tuple(job["requirements"]), env=job["env"],
                      limits=Limits(max_file_bytes=job["maxFileBytes"]))


def outcome_line(marker: str, outcome: JobOutcome) -> str:
    return marker + json.dumps({"ok": outcome.ok, "result": outcome.result,
                                "error": outcome.error})


def parse_outcome_line(marker: str, line: str) -> JobOutcome | None:
    if not line.startswith(marker):
        return None
    try:
        written = json.loads(line[len(marker):])
        return JobOutcome(ok=bool(written["ok"]), result=written.get("result"),
                          error=written.get("error"))
    except (ValueError, KeyError, TypeError):
        return None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(request: JobRequest, workdir: Path) -> tuple[JobOutcome, bool]:
    """Run the job in `workdir`; the outcome, and whether its stdout ended mid-line."""
    runtime = get_runtime(request.language)
    env = {"PATH": PATH, "HOME": str(workdir), "LANG": "C.UTF-8", "TMPDIR": "/tmp",
           **runtime.env(request)}
    if request.requirements:
        try:
            site = asyncio.run(RequirementsCache(workdir / ".cache").ensure(
                request.requirements, _write))
        except RuntimeError as exc:
            return failure("setup", f"{exc} (a job pod installs requirements itself: it "
                                    f"needs to reach the package index)"), False
        env["PYTHONPATH"] = str(site)
    env.update(request.env)
    argv = [arg.replace(WORK, str(workdir))
            for arg in runtime.prepare(request, workdir, sys.executable)]
    max_file = request.limits.max_file_bytes

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file, max_file))

    process = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, preexec_fn=limit_files)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    kept: list[str] = []
    while chunk := process.stdout.read1(65536):
        text = decoder.decode(chunk)
        _write(text)
        kept.append(text)
    exit_code = process.wait()
    stdout = "".join(kept)
    outcome = runtime.outcome(request, workdir, exit_code, stdout)
    if not outcome.ok and outcome.error.get("kind") == "exit":
        outcome = killed_by_signal(exit_code) or outcome  # the OOM killer, most often
    return outcome, bool(stdout) and not stdout.endswith("\n")


def main() -> int:
    marker = os.environ[MARKER_ENV]
    request = request_from_env(os.environ[JOB_ENV])
    outcome, mid_line = run(request, Path.cwd())
    _write(("\n" if mid_line else "") + outcome_line(marker, outcome) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
