"""What a job reports reaches the worker only through the outcome pipe, checked.

A job that plants a link, a FIFO or a device where the worker once read the
outcome file gets nothing from it; a job that floods the pipe is cut off; a
result JSON or PostgreSQL cannot hold fails that one job with a message that
names the value. Run against every executor that runs the runtimes: the
process sandbox, the plain one the benchmarks use, and the command inside a
job pod.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from pathlib import Path

import pytest
from sandboxkit import make_executor, run

from gristmill.sandbox import pod_job
from gristmill.sandbox.base import JobOutcome, JobRequest, Limits
from gristmill.sandbox.plain import PlainExecutor


class PodCommand:
    """The job pod's command (pod_job.run) in a scratch dir, as an executor."""

    async def run(self, request: JobRequest, on_output, cancel) -> JobOutcome:
        with tempfile.TemporaryDirectory() as workdir:
            outcome, _ = await asyncio.to_thread(pod_job.run, request, Path(workdir))
            return outcome


@pytest.fixture(scope="module")
def process_executor(tmp_path_factory):
    return make_executor(tmp_path_factory.mktemp("outcome"))


@pytest.fixture(params=["process", "plain", "pod"])
def executor(request, process_executor):
    return {"process": lambda: process_executor, "plain": PlainExecutor,
            "pod": PodCommand}[request.param]()


@pytest.fixture
def secret(tmp_path):
    """A root-only host file."""
    path = tmp_path / "secret"
    token = f"TOP-SECRET-{secrets.token_hex(8)}"
    path.write_text(f'{{"ok": true, "result": "{token}"}}')
    path.chmod(0o600)
    return path, token


# Plants something where the outcome file used to be, then leaves without reporting.
PLANT = """
import os

def main(secret: str):
    os.makedirs(".gristmill", exist_ok=True)
    target = ".gristmill/outcome.json"
    {plant}
    os._exit(0)
"""
PLANTS = {
    "symlink": "os.symlink(secret, target)",
    # Across the sandbox's mounts a hard link to the host file fails: then one to a forgery.
    "hardlink": "try:\n        os.link(secret, target)\n    except OSError:\n"
                "        open('forged', 'w').write('{\"ok\": true, \"result\": \"forged\"}')\n"
                "        os.link('forged', target)",
    "fifo": "os.mkfifo(target)",
    "device": "try:\n        os.mknod(target, 0o666 | 0o020000, os.makedev(1, 5))\n"
              "    except OSError:\n        os.symlink('/dev/zero', target)",
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
async def test_a_planted_outcome_file_is_never_read(executor, secret, plant):
    path, token = secret
    started = time.monotonic()
    outcome = await run(executor, PLANT.format(plant=PLANTS[plant]), input={"secret": str(path)},
                        limits=Limits(timeout_s=20))
    assert time.monotonic() - started < 10  # a FIFO did not block the reader
    assert not outcome.ok
    assert outcome.error["kind"] == "exit"
    assert "before main() returned" in outcome.error["message"]
    assert token not in repr(outcome) and "forged" not in repr(outcome)
    after = await run(executor, "def main():\n    return 'next'\n")
    assert after.ok and after.result == "next"


FD = "int(open('/proc/self/cmdline').read().split(chr(0))[-2])"  # the wrapper's argument


async def test_a_flood_on_the_outcome_pipe_is_cut_off(executor):
    outcome = await run(executor, f"""
        import os

        def main():
            fd = {FD}
            chunk = b"x" * 65536
            for _ in range(20 * 16):  # 20 MiB
                os.write(fd, chunk)
            os._exit(0)
    """)
    assert outcome.error["kind"] == "result"
    assert "main() returned more than 1.2 MiB of JSON" in outcome.error["message"]
    assert "at most 1.0 MiB" in outcome.error["message"]


async def test_an_endless_outcome_is_drained_until_the_timeout(process_executor):
    # What a link to /dev/zero once did to the worker: now the worker drains and discards.
    outcome = await run(process_executor, f"""
        import os

        def main():
            fd = {FD}
            chunk = b"0" * 65536
            while True:
                os.write(fd, chunk)
    """, limits=Limits(timeout_s=3))
    assert outcome.error["kind"] == "timeout"


async def test_garbage_on_the_outcome_pipe_is_a_failure(executor):
    outcome = await run(executor, f"""
        import os

        def main():
            os.write({FD}, b"not json")
            return 1
    """)
    assert outcome.error["kind"] == "result" and "garbled" in outcome.error["message"]


async def test_a_result_over_the_cap(executor):
    outcome = await run(executor, "def main():\n    return 'x' * (2 * 2**20)\n")
    assert outcome.error["kind"] == "result"
    assert outcome.error["message"].startswith("main() returned 2.0 MiB of JSON, and a result "
                                               "holds at most 1.0 MiB")


@pytest.mark.parametrize(("expression", "message"), [
    ("{'x': float('nan')}", "main() returned a value JSON cannot hold: result.x: is NaN"),
    ("[1, float('inf')]", "main() returned a value JSON cannot hold: result[1]: is Infinity"),
    ("{'t': -float('inf')}", "result.t: is Infinity"),
    ("'a\\x00b'", "result: contains a NUL character"),
    ("{'k': '\\ud800'}", "result.k: contains an unpaired UTF-16 surrogate (\\ud800)"),
    ("{'\\x00': 1}", "the key contains a NUL character"),
    ("2 ** 2000", "result: is an integer of 2001 bits"),
    ("nest(200)", "is nested more than 128 levels deep"),
    ("nest(5000)", "main() returned a value nested too deeply to serialise"),
    ("10 ** 5000", "not JSON-serialisable"),
    ("{1, 2}", "main() returned set, which is not JSON-serialisable"),
])
async def test_results_json_or_postgresql_cannot_hold_fail_that_job(executor, expression,
                                                                   message):
    outcome = await run(executor, f"""
        def nest(depth):
            value = []
            for _ in range(depth):
                value = [value]
            return value

        def main():
            return {expression}
    """)
    assert not outcome.ok
    assert outcome.error["kind"] == "result"
    assert message in outcome.error["message"]


@pytest.mark.parametrize(("last_line", "message"), [
    ("echo NaN", "the script's last JSON line is a value JSON cannot hold: result: is NaN"),
    ("echo '[1, -Infinity]'", "result[1]: is Infinity"),
    ("echo '{\"a\": \"\\u0000\"}'", "result.a: contains a NUL character"),
    ("printf 'a\\0b'", "result: contains a NUL character"),
    ("head -c 1500000 /dev/zero | tr '\\0' x", "the script printed 1.4 MiB and no JSON line"),
])
async def test_bash_results_json_or_postgresql_cannot_hold(executor, last_line, message):
    outcome = await run(executor, f"echo starting\n{last_line}\n", language="bash")
    assert not outcome.ok
    assert outcome.error["kind"] == "result"
    assert message in outcome.error["message"]


async def test_a_bash_json_line_is_still_the_result(executor):
    outcome = await run(executor, "echo '{\"n\": 1.5}'\necho done", language="bash")
    assert outcome.ok and outcome.result == {"n": 1.5}


async def test_error_text_is_cleaned(executor):
    outcome = await run(executor, """
        def main():
            raise ValueError("bad\\x00value \\ud800 here")
    """)
    assert outcome.error["kind"] == "exception"
    assert outcome.error["message"] == "ValueError: bad\ufffdvalue \ufffd here"
    assert "\x00" not in outcome.error["traceback"]
    assert "bad\ufffdvalue" in outcome.error["traceback"]


async def test_a_forged_error_report_is_reduced_to_clean_text(executor):
    outcome = await run(executor, f"""
        import os, json

        def main():
            os.write({FD}, json.dumps({{"ok": False, "error": {{
                "kind": "no-such-kind", "message": "x" * 10000 + "\\u0000",
                "traceback": ["not", "text"], "extra": float("nan")}}}}).encode())
            os._exit(0)
    """)
    error = outcome.error
    assert set(error) == {"kind", "message", "traceback"}
    assert error["kind"] == "exception"
    assert len(error["message"]) <= 2003 and "\x00" not in error["message"]
    assert error["traceback"] == '["not", "text"]'


def test_the_pod_outcome_line_is_checked_too():
    marker = "#m# "
    forged = pod_job.parse_outcome_line(marker, marker + '{"ok": true, "result": NaN}')
    assert forged.error["kind"] == "result" and "result: is NaN" in forged.error["message"]
    fine = pod_job.parse_outcome_line(marker, marker + '{"ok": true, "result": [1]}')
    assert fine.ok and fine.result == [1]
    assert pod_job.parse_outcome_line(marker, "no marker here") is None
