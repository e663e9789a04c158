"""Inside a job pod: run the one job the worker described in the job's Secret.

The worker puts everything the job needs (code, input, environment, and the
marker of its outcome line) in a Secret of the job's own, compressed; the pod
mounts it read-only and this command reads it from the path it is given. So
the pod object stays small (every pod watcher in the cluster receives it on
each status change) and the job's input is not readable by whoever may read
pods. The pod's working directory (an emptyDir) is the job's work dir. The
job's own output goes to the container's stdout and stderr, which the worker
follows through the pod log. The runtime's wrapper reports to this command on
a pipe (runtimes/base.py), never through a file in the work dir. The outcome
comes last, on one stdout line that starts with a marker the worker chose for
this job, so nothing the job prints is mistaken for it. Kubernetes enforces
memory, CPU and the deadline; the worker enforces the output cap.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from gristmill.jobsecrets.masking import Masker, masked_outcome
from gristmill.runtimes import get_runtime
from gristmill.runtimes.base import WORK, Report
from gristmill.runtimes.results import checked_result, clean_error, parse_lenient
from gristmill.sandbox.base import JobOutcome, JobRequest, Limits, failure, killed_by_signal

PAYLOAD_DIR = "/var/run/gristmill/job"  # where the job pod mounts its Secret
PAYLOAD_KEY = "job.json.z"  # the Secret's one key: the job as zlib-compressed JSON
MAX_PAYLOAD = 2**20  # the API server refuses a Secret whose data passes 1 MiB
PATH = "/usr/local/bin:/usr/bin:/bin"
LINGER_S = 1.0  # for output still in the pipe once the job's main process exited
# The job's Secrets reach this runner as its own environment, set by the kubelet under
# these names (pod_objects.secret_references); the job gets them under its own names.
SECRET_ENV_PREFIX = "GRISTMILL_SECRET_ENV_"
SECRET_FROM_PREFIX = "GRISTMILL_SECRET_FROM_"
_FROM_NAME = re.compile(r"^GRISTMILL_SECRET_FROM_(\d+)_(.+)$", re.S)


def secret_env_from_prefix(index: int) -> str:
    """The prefix of the variables of the job's `index`th envFrom Secret."""
    return f"{SECRET_FROM_PREFIX}{index}_"


def secret_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The job's Secret variables under the names the Script gave them: envFrom Secrets in
    order, then env's keys, which win (as in a Pod)."""
    from_secrets = sorted((int(found[1]), found[2], value) for name, value in environ.items()
                          if (found := _FROM_NAME.match(name)))
    env = {name: value for _, name, value in from_secrets}
    env.update({name.removeprefix(SECRET_ENV_PREFIX): value for name, value in environ.items()
                if name.startswith(SECRET_ENV_PREFIX) and len(name) > len(SECRET_ENV_PREFIX)})
    return env


class PayloadTooLarge(ValueError):
    """The job does not fit in its Secret."""


def job_payload(request: JobRequest, marker: str) -> bytes:
    """What the worker puts in the job's Secret: all the pod needs to run the job."""
    text = json.dumps({
        "id": request.job_id, "language": request.language, "code": request.code,
        "input": request.input, "inputOrder": list(request.input_order),
        "requirements": list(request.requirements), "env": dict(request.env),
        "maxFileBytes": request.limits.max_file_bytes, "marker": marker,
    }).encode()  # ASCII (ensure_ascii): characters are bytes
    payload = zlib.compress(text, 6)
    if len(payload) > MAX_PAYLOAD:
        raise PayloadTooLarge(
            f"the job's code and input take {len(text) // 1024} KiB, "
            f"{len(payload) // 1024} KiB compressed, and a job pod's Secret holds at most "
            f"{MAX_PAYLOAD // 1024} KiB: pass large data by reference (a URL, a bucket path) "
            f"or run the Script on a process-executor WorkerGroup")
    return payload


def read_payload(payload: bytes) -> tuple[JobRequest, str]:
    """The job and its outcome marker, from what `job_payload` wrote."""
    job = json.loads(zlib.decompress(payload))
    request = JobRequest(job_id=job["id"], language=job["language"], code=job["code"],
                         input=job["input"], input_order=tuple(job["inputOrder"]),
                         requirements=tuple(job["requirements"]), env=job["env"],
                         limits=Limits(max_file_bytes=job["maxFileBytes"]))
    return request, job["marker"]


def outcome_line(marker: str, outcome: JobOutcome) -> str:
    return marker + json.dumps({"ok": outcome.ok, "result": outcome.result,
                                "error": outcome.error})


def parse_outcome_line(marker: str, line: str) -> JobOutcome | None:
    """The outcome on a log line, if it has one. The marker may follow a job's unfinished
    stderr line: runtimes that log partial lines put both on one line."""
    at = line.find(marker)
    if at < 0:
        return None
    try:
        written = parse_lenient(line[at + len(marker):])
    except ValueError:
        return None
    if not isinstance(written, dict) or "ok" not in written:
        return None
    # Checked again: the job can read the marker from its Secret.
    if written["ok"] is True:
        return checked_result(written.get("result"), "the job returned")
    return JobOutcome(ok=False, error=clean_error(written.get("error")))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(request: JobRequest, workdir: Path, secrets: Mapping[str, str] | None = None,
        write: Callable[[str], None] = _write) -> tuple[JobOutcome, bool]:
    """Run the job in `workdir` with its Secrets' variables; the outcome, and whether its
    stdout ended mid-line. The job's output goes to `write`."""
    runtime = get_runtime(request.language)
    env = {"PATH": PATH, "HOME": str(workdir), "LANG": "C.UTF-8", "TMPDIR": "/tmp",
           **runtime.env(request)}
    if request.requirements:
        from gristmill.sandbox.requirements import RequirementsCache  # only when needed

        try:
            # The job's own cache, in its own pod: nobody else could have planted anything.
            site = RequirementsCache(workdir / ".cache", verify=False).install(
                request.requirements, write)
        except RuntimeError as exc:
            return failure("setup", f"{exc} (a job pod installs requirements itself: it "
                                    f"needs to reach the package index)"), False
        env["PYTHONPATH"] = str(site)
    env.update(secrets or {})
    env.update(request.env)  # the Script's values and GRISTMILL_*: as the worker orders them
    report_read, report_write = os.pipe()
    argv = [arg.replace(WORK, str(workdir))
            for arg in runtime.prepare(request, workdir, sys.executable, report_write)]
    max_file = request.limits.max_file_bytes

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file, max_file))

    try:
        process = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, preexec_fn=limit_files,
                                   start_new_session=True, pass_fds=(report_write,))
    finally:
        os.close(report_write)
    report = Report()

    def read_report() -> None:
        with open(report_read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                report.feed(chunk)

    report_reader = threading.Thread(target=read_report, daemon=True)
    report_reader.start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    kept: list[str] = []

    def pump() -> None:
        while chunk := process.stdout.read1(65536):
            text = decoder.decode(chunk)
            write(text)
            kept.append(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    exit_code = process.wait()
    reader.join(LINGER_S)
    # What the job left running goes with it (as bubblewrap's --die-with-parent does in
    # the process executor); one of them may hold stdout open.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    reader.join()
    report_reader.join()
    stdout = "".join(kept)
    outcome = runtime.outcome(request, exit_code, stdout, report)
    if not outcome.ok and outcome.error.get("kind") == "exit":
        outcome = killed_by_signal(exit_code) or outcome  # the OOM killer, most often
    return outcome, bool(stdout) and not stdout.endswith("\n")


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write(f"usage: python -m gristmill.sandbox.pod_job "
                         f"{PAYLOAD_DIR}/{PAYLOAD_KEY}\n")
        return 2
    request, marker = read_payload(Path(sys.argv[1]).read_bytes())
    secrets = secret_environment(os.environ)
    masker = Masker(secrets.values())
    output = masker.stream(_write)  # masked here: the worker never sees the values
    outcome, mid_line = run(request, Path.cwd(), secrets, output.feed)
    output.flush()
    outcome = masked_outcome(masker, outcome)
    _write(("\n" if mid_line else "") + outcome_line(marker, outcome) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
