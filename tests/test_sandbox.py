"""The process sandbox with real bubblewrap: jobs run, hostile jobs are stopped and reported."""

from __future__ import annotations

import asyncio
import glob
import os
import socket
import time

import pytest
from sandboxkit import make_executor, run

from gristmill.sandbox.base import JobRequest, Limits


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    return make_executor(tmp_path_factory.mktemp("sandbox"))


async def test_python_job_returns_mains_result(executor):
    outcome = await run(executor, """
        def main(name: str, times: int = 2):
            return {"greeting": " ".join([f"hi {name}"] * times)}
    """, input={"name": "ada"})
    assert outcome.ok and outcome.result == {"greeting": "hi ada hi ada"}


async def test_async_main(executor):
    outcome = await run(executor, """
        import asyncio

        async def main():
            await asyncio.sleep(0.01)
            return [1, 2]
    """)
    assert outcome.ok and outcome.result == [1, 2]


async def test_exception_is_a_failure_with_its_traceback(executor):
    output: list[str] = []
    outcome = await run(executor, """
        def helper():
            raise KeyError("missing")

        def main():
            helper()
    """, output=output)
    assert not outcome.ok
    assert outcome.error["kind"] == "exception"
    assert outcome.error["message"] == "KeyError: 'missing'"
    assert 'File "/work/main.py", line 3, in helper' in outcome.error["traceback"]
    assert "run.py" not in outcome.error["traceback"]  # the wrapper's frames are trimmed
    assert "KeyError" in "".join(output)


async def test_unserialisable_result(executor):
    outcome = await run(executor, "def main():\n    return object()\n")
    assert outcome.error["kind"] == "result" and "not JSON-serialisable" in outcome.error["message"]


async def test_logs_stream_while_the_job_runs(executor):
    seen_at: list[tuple[float, str]] = []
    started = time.monotonic()

    def on_output(text: str) -> None:
        seen_at.append((time.monotonic() - started, text))

    outcome = await executor.run(JobRequest(
        job_id="stream", language="python", input={},
        code="import time\ndef main():\n    print('first')\n    time.sleep(1)\n    print('second')\n"),
        on_output, asyncio.Event())
    assert outcome.ok
    first = next(t for t, text in seen_at if "first" in text)
    finished = time.monotonic() - started
    assert first < finished - 0.8  # the first line arrived long before the end


async def test_bash_gets_env_and_arguments_and_returns_the_json_line(executor):
    outcome = await run(executor, """
        echo "name=$name count=$count args=$1,$2"
        echo '{"done": true}'
        echo "trailing text"
    """, language="bash", input={"name": "bob", "count": 3}, input_order=("count", "name"))
    assert outcome.ok and outcome.result == {"done": True}


async def test_bash_plain_stdout_is_the_result(executor):
    outcome = await run(executor, 'echo "hello $1"', language="bash", input={"who": "you"})
    assert outcome.ok and outcome.result == "hello you"


async def test_bash_non_zero_exit_fails(executor):
    outcome = await run(executor, "echo nope >&2\nexit 4", language="bash")
    assert outcome.error["kind"] == "exit" and "code 4" in outcome.error["message"]


@pytest.mark.parametrize("code", [
    "import subprocess\ndef main():\n    subprocess.run(['mount', '-o', 'remount,rw', '/'], check=True)\n",
    "import ctypes\ndef main():\n    libc = ctypes.CDLL(None)\n"
    "    if libc.mount(b'none', b'/', None, 32 | 1 << 5, None) != 0:\n"  # MS_REMOUNT
    "        raise PermissionError(ctypes.get_errno())\n",
])
async def test_cannot_remount_the_root(executor, code):
    assert not (await run(executor, code)).ok


@pytest.mark.parametrize("path", ["/etc/gristmill-test", "/usr/gristmill-test", "/root/x",
                                  "/gristmill-test"])
async def test_cannot_write_outside_the_work_dir(executor, path):
    outcome = await run(executor, f"def main():\n    open({path!r}, 'w').write('x')\n")
    assert outcome.error["kind"] == "exception"
    assert not os.path.exists(path)


async def test_can_write_its_work_dir_and_tmp(executor):
    outcome = await run(executor, """
        def main():
            open("/work/out.txt", "w").write("a")
            open("/tmp/scratch", "w").write("b")
            return open("/work/out.txt").read() + open("/tmp/scratch").read()
    """)
    assert outcome.ok and outcome.result == "ab"


async def test_cannot_read_root_or_the_workers_secrets(executor, monkeypatch):
    monkeypatch.setenv("GRISTMILL_DATABASE_URL", "postgresql://admin:s3cret@db/gristmill")
    outcome = await run(executor, """
        import glob, os

        def main():
            seen = dict(os.environ)
            for path in glob.glob("/proc/*/environ"):
                try:
                    text = open(path, "rb").read().decode(errors="replace")
                    seen[path] = text.replace("\\0", "\\n")  # a result holds no NUL
                except OSError:
                    pass
            try:
                seen["root"] = os.listdir("/root")
            except OSError as exc:
                seen["root"] = str(exc)
            return seen
    """, env={"ALLOWED": "yes"})
    assert outcome.ok
    text = repr(outcome.result)
    assert "s3cret" not in text and "GRISTMILL_DATABASE_URL" not in text
    assert outcome.result["ALLOWED"] == "yes"
    assert isinstance(outcome.result["root"], str)  # an error, not a listing


async def test_no_network_unless_asked(executor):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        refused = await run(executor, f"""
            import socket

            def main():
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        """)
        assert refused.error["kind"] == "exception"
        assert "ConnectionRefusedError" in refused.error["message"]
        unreachable = await run(executor, """
            import socket

            def main():
                socket.create_connection(("198.18.0.1", 80), timeout=2).close()
        """)
        assert "Network is unreachable" in unreachable.error["message"]  # only lo exists
    finally:
        listener.close()


BOMB_UIDS = (320_000, 16)  # the test's own uids: other sandboxes on the machine are not ours


async def test_fork_bomb_is_stopped_and_the_executor_keeps_working(tmp_path):
    from gristmill.sandbox.uids import UidPool

    executor = make_executor(tmp_path, uids=UidPool(tmp_path / "uids", *BOMB_UIDS))
    bomb = await run(executor, """
        import os

        def main():
            while True:
                os.fork()
    """, limits=Limits(timeout_s=10, max_processes=32))
    assert not bomb.ok and "maxProcesses" in bomb.error["message"]
    # Bash reports its failed forks and carries on; the limit holds and the job ends.
    started = time.monotonic()
    await run(executor, "bomb() { bomb | bomb & }; bomb; wait", language="bash",
              limits=Limits(timeout_s=5, max_processes=32))
    assert time.monotonic() - started < 8
    for _ in range(100):  # nothing of it survives (dying takes a moment)
        if not _sandbox_processes():
            break
        await asyncio.sleep(0.1)
    assert not _sandbox_processes()
    after = await run(executor, "def main():\n    return 'still here'\n")
    assert after.ok and after.result == "still here"


def _sandbox_processes() -> list[str]:
    """Processes still running as one of the test's sandbox uids."""
    first, count = BOMB_UIDS
    found = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(status) as f:
                text = f.read()
        except OSError:
            continue
        uid = int(text.split("Uid:")[1].split()[0])
        if first <= uid < first + count:
            found.append(status)
    return found


async def test_memory_exhaustion(executor):
    outcome = await run(executor, """
        def main():
            hog = []
            while True:
                hog.append(bytearray(50 * 1024 * 1024))
    """, limits=Limits(memory_bytes=256 * 2**20))
    assert outcome.error["kind"] == "memory"


async def test_timeout(executor):
    started = time.monotonic()
    outcome = await run(executor, "def main():\n    while True:\n        pass\n",
                        limits=Limits(timeout_s=2))
    assert outcome.error["kind"] == "timeout" and "2s" in outcome.error["message"]
    assert time.monotonic() - started < 4


async def test_cpu_time_limit(executor):
    outcome = await run(executor, "def main():\n    while True:\n        pass\n",
                        limits=Limits(timeout_s=2, cpu_cores=0.5))
    assert outcome.error["kind"] in ("cpu", "timeout")


async def test_output_flood(executor):
    outcome = await run(executor, "def main():\n    while True:\n        print('x' * 1000)\n",
                        limits=Limits(max_output_bytes=100_000))
    assert outcome.error["kind"] == "output_limit"


async def test_cancel_mid_run(executor):
    cancel = asyncio.Event()
    job = asyncio.create_task(run(executor, "import time\ndef main():\n    time.sleep(60)\n",
                                  cancel=cancel))
    await asyncio.sleep(0.5)
    cancel.set()
    outcome = await asyncio.wait_for(job, 5)
    assert outcome.error["kind"] == "cancelled"


async def test_concurrent_jobs_cannot_read_each_others_files(executor):
    writer = asyncio.create_task(run(executor, """
        import time

        def main():
            open("/work/secret.txt", "w").write("mine")
            time.sleep(2)
    """))
    await asyncio.sleep(1)
    (writer_dir,) = [p for p in executor.work_dir.iterdir() if p.name.startswith("job-")]
    reader = await run(executor, """
        import os

        def main(paths: list) -> list:
            found = []
            for path in paths:
                try:
                    found.append(open(path).read())
                except OSError as exc:
                    found.append(type(exc).__name__)
            return found
    """, input={"paths": [str(writer_dir / "secret.txt"), "/work/secret.txt"]})
    assert reader.ok and "mine" not in reader.result
    assert (await writer).ok
    assert not any(p.name.startswith("job-") for p in executor.work_dir.iterdir())  # cleaned up


async def test_requirements_are_installed_once_and_reused(executor):
    code = "import six\ndef main():\n    return six.__version__\n"
    first = await run(executor, code, requirements=("six==1.16.0",))
    assert first.ok and first.result == "1.16.0", first.error
    installs = executor.requirements.installs
    second = await run(executor, code, requirements=("six==1.16.0",))
    assert second.ok and executor.requirements.installs == installs


async def test_a_requirement_that_cannot_install_is_a_setup_failure(executor):
    outcome = await run(executor, "def main():\n    pass\n",
                        requirements=("gristmill-no-such-package-xyz==9.9.9",))
    assert outcome.error["kind"] == "setup"
