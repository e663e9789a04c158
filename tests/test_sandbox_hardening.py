"""Hostile jobs against the process sandbox's hardening: the disk cap in bytes and inodes,
no nested namespaces, no mounts, no tracing, the seccomp filter, and directories other
local users could plant things in. Each fails that job with a reason, and the executor
goes on."""

from __future__ import annotations

import errno
import os
import platform
import subprocess
from pathlib import Path

import pytest
from sandboxkit import make_executor, run, traversable

from gristmill.sandbox import seccomp
from gristmill.sandbox.base import Limits, SandboxUnavailable
from gristmill.sandbox.process import ProcessExecutor
from gristmill.sandbox.requirements import RequirementsCache
from gristmill.spec.quantities import parse_memory
from gristmill.spec.script import Resources

NOBODY = 65534
SMALL_DISK = 16 * 2**20
SMALL = {"disk_bytes": SMALL_DISK}


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    return make_executor(tmp_path_factory.mktemp("hardening"))


async def _still_works(executor):
    after = await run(executor, "def main():\n    return 'still here'\n")
    assert after.ok and after.result == "still here"


# -- disk ---------------------------------------------------------------------------------

def test_the_default_disk_is_in_the_spec_and_the_limits():
    assert parse_memory(Resources().disk) == Limits().disk_bytes == 256 * 2**20
    assert Limits(disk_bytes=SMALL_DISK).disk_inodes == 2048


@pytest.mark.parametrize("where", ["/tmp", "/work"])
async def test_filling_the_disk_fails_the_job(executor, where):
    outcome = await run(executor, f"""
        def main():
            with open("{where}/fill", "wb") as f:
                for _ in range(64):  # 64 MiB, four times the disk
                    f.write(b"x" * 2**20)
    """, limits=Limits(**SMALL, max_file_bytes=2**30))
    assert outcome.error["kind"] == "exception"
    assert "No space left on device" in outcome.error["message"]
    assert "spec.resources.disk" in outcome.error["message"]
    await _still_works(executor)


async def test_work_and_tmp_share_one_disk(executor):
    outcome = await run(executor, """
        import os

        def main():
            st = os.statvfs("/work"), os.statvfs("/tmp")
            return [[s.f_blocks * s.f_frsize, s.f_files] for s in st] + [
                os.stat("/work").st_dev == os.stat("/tmp").st_dev]
    """, limits=Limits(**SMALL))
    assert outcome.ok, outcome.error
    assert outcome.result == [[SMALL_DISK, 2048], [SMALL_DISK, 2048], True]


async def test_running_out_of_inodes_fails_the_job(executor):
    outcome = await run(executor, """
        import os

        def main():
            made = 0
            try:
                for i in range(100_000):
                    open(f"/work/f{i}", "w").close()
                    made += 1
            except OSError as exc:
                return {"made": made, "errno": exc.errno}
    """, limits=Limits(**SMALL))
    assert outcome.ok, outcome.error
    assert outcome.result["errno"] == errno.ENOSPC
    assert 1900 < outcome.result["made"] < 2048  # the cap, less what the sandbox uses
    await _still_works(executor)


async def test_input_larger_than_the_disk_is_a_setup_failure(executor):
    outcome = await run(executor, "def main(blob: str):\n    return len(blob)\n",
                        input={"blob": "x" * (2 * 2**20)}, limits=Limits(disk_bytes=2**20))
    assert outcome.error["kind"] == "setup"
    assert "No space left on device" in outcome.error["message"]
    assert "must fit in spec.resources.disk" in outcome.error["message"]


async def test_a_bash_job_filling_the_disk(executor):
    output: list[str] = []
    outcome = await run(executor, "head -c 100000000 /dev/zero > /tmp/big", language="bash",
                        limits=Limits(**SMALL, max_file_bytes=2**30), output=output)
    assert outcome.error["kind"] == "exit"
    assert "No space left on device" in "".join(output)


async def test_the_disk_leaves_nothing_on_the_host(executor):
    outcome = await run(executor, """
        def main():
            open("/work/kept", "w").write("x")
    """)
    assert outcome.ok
    assert list(executor.work_dir.iterdir()) == []


# -- namespaces, mounts, tracing ----------------------------------------------------------

@pytest.mark.parametrize("command", ["unshare -Urn true", "unshare -U true", "unshare -n true",
                                     "unshare -m true"])
async def test_no_nested_namespaces(executor, command):
    output: list[str] = []
    outcome = await run(executor, f"{command} && echo NESTED", language="bash", output=output)
    assert outcome.error["kind"] == "exit"
    assert "NESTED" not in "".join(output)
    assert "unshare failed" in "".join(output)


async def test_no_user_namespace_through_libc(executor):
    # The filter says EPERM; bwrap's --disable-userns alone would say ENOSPC.
    outcome = await run(executor, """
        import ctypes, os

        CLONE_NEWUSER = 0x10000000

        def main():
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWUSER) == 0:
                return "unshared"
            return os.strerror(ctypes.get_errno())
    """)
    assert outcome.ok and outcome.result == os.strerror(errno.EPERM)


@pytest.mark.parametrize("code", [
    "mount -t tmpfs none /tmp && echo MOUNTED",
    "mkdir -p /tmp/m && mount --bind /work /tmp/m && echo MOUNTED",
])
async def test_no_mounts(executor, code):
    output: list[str] = []
    outcome = await run(executor, code, language="bash", output=output)
    assert not outcome.ok and "MOUNTED" not in "".join(output)


async def test_no_mount_syscall(executor):
    outcome = await run(executor, """
        import ctypes, os

        def main():
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0:
                return "mounted"
            return os.strerror(ctypes.get_errno())
    """)
    assert outcome.ok and outcome.result == os.strerror(errno.EPERM)


async def test_cannot_trace_even_its_own_child(executor):
    # Without the filter, Yama (ptrace_scope 1) lets a process trace its descendants.
    outcome = await run(executor, """
        import ctypes, os, subprocess

        PTRACE_ATTACH = 16

        def main():
            child = subprocess.Popen(["sleep", "30"])
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                if libc.ptrace(PTRACE_ATTACH, child.pid, None, None) == 0:
                    return "attached"
                return os.strerror(ctypes.get_errno())
            finally:
                child.kill()
    """)
    assert outcome.ok and outcome.result == os.strerror(errno.EPERM)


# -- the seccomp filter -------------------------------------------------------------------

def test_every_denied_call_is_known_to_libseccomp():
    lib = seccomp._library()
    unknown = [name for name in (*seccomp.DENIED, *seccomp.UNSUPPORTED)
               if lib.seccomp_syscall_resolve_name(name.encode()) == -1]
    assert unknown == []


def test_the_filter_is_built_once_per_process():
    assert seccomp.job_filter() is seccomp.job_filter()
    assert len(seccomp.job_filter()) % 8 == 0  # whole BPF instructions


# Calls that succeed or fail otherwise outside the filter, and fail with EPERM (clone3:
# ENOSYS) inside it. Arguments are harmless: nulls, or this process's own ids.
PROBES = {
    "keyctl": "0, 2**64 - 1, 0, 0, 0",  # KEYCTL_GET_KEYRING_ID, the thread keyring
    "add_key": "None, None, None, 0, 0",
    "request_key": "None, None, None, 0",
    "userfaultfd": "1,",  # UFFD_USER_MODE_ONLY: allowed to unprivileged users
    "io_uring_setup": "1, None",
    "perf_event_open": "None, 0, -1, -1, 0",
    "process_vm_readv": "os.getpid(), None, 0, None, 0, 0",
    "kcmp": "os.getpid(), os.getpid(), 0, 0, 0",  # KCMP_FILE of fd 0 with itself
    "setns": "-1, 0",
    "name_to_handle_at": "-100, None, None, None, 0",
    "clone3": "None, 0",
}
PROBE = """
import ctypes, os

def main(name: str, args: str):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    number = ctypes.CDLL("libseccomp.so.2").seccomp_syscall_resolve_name(name.encode())
    values = [ctypes.c_ulong(a % 2**64) if isinstance(a, int) else a for a in eval(args)]
    if libc.syscall(number, *values) >= 0:
        return "succeeded"
    return errno_name(ctypes.get_errno())

def errno_name(number):
    import errno
    return errno.errorcode.get(number, str(number))
"""


def _probe_here(name: str, args: str) -> str:
    namespace: dict = {}
    exec(PROBE, namespace)  # noqa: S102 - the same probe, in the test's own process
    return namespace["main"](name, args)


@pytest.mark.parametrize("name", sorted(PROBES))
async def test_the_filter_denies(executor, name):
    expected = "ENOSYS" if name in seccomp.UNSUPPORTED else "EPERM"
    assert _probe_here(name, PROBES[name]) != expected  # the call itself is not refused so
    outcome = await run(executor, PROBE, input={"name": name, "args": PROBES[name]})
    assert outcome.ok, outcome.error
    assert outcome.result == expected


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the i386 ABI exists on x86_64 only")
async def test_a_foreign_abi_kills_the_job(executor):
    outcome = await run(executor, """
        import ctypes, mmap

        def main():
            # mov eax, 20 (getpid in the i386 table); int 0x80; ret
            code = b"\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3"
            page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            page.write(code)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            return ctypes.CFUNCTYPE(ctypes.c_int)(address)()
    """)
    assert outcome.error["kind"] == "killed"
    assert "seccomp filter (SIGSYS)" in outcome.error["message"]
    await _still_works(executor)


async def test_ordinary_work_passes_the_filter(executor):
    outcome = await run(executor, """
        import subprocess, threading, multiprocessing, socket

        def main():
            threads = [threading.Thread(target=lambda: None) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with multiprocessing.Pool(2) as pool:
                squares = pool.map(abs, [-1, -4, 9])
            a, b = socket.socketpair()
            a.sendall(b"ok")
            return [subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout,
                    squares, b.recv(2).decode()]
    """)
    assert outcome.ok, outcome.error
    assert outcome.result == ["hi\n", [1, 4, 9], "ok"]


# -- directories other users could plant things in ----------------------------------------

def _as_nobody(*command: str) -> None:
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    "--", *command], check=True)


REQUIREMENT = ("six==1.16.0",)
USES_SIX = "import six\ndef main():\n    return six.__version__\n"


async def test_a_cache_entry_planted_by_another_user_is_refused(tmp_path):
    base = traversable(tmp_path)
    cache = RequirementsCache(base / "cache")
    cache.cache_dir.mkdir(mode=0o755)
    entry = cache.path_for(REQUIREMENT)
    # As a user who could write there would: the entry, with a six that is not six.
    cache.cache_dir.chmod(0o777)
    _as_nobody("mkdir", str(entry))
    _as_nobody("sh", "-c", f"echo \"__version__ = 'planted'\" > {entry}/six.py")
    cache.cache_dir.chmod(0o755)
    executor = ProcessExecutor(work_dir=base / "jobs", cache_dir=base / "cache")
    outcome = await run(executor, USES_SIX, requirements=REQUIREMENT)
    assert outcome.error["kind"] == "setup"
    message = outcome.error["message"]
    assert f"{entry} is not safe to use" in message and f"uid {NOBODY}" in message
    assert f"rm -rf {entry}" in message
    assert executor.requirements.installs == 0


async def test_a_cache_entry_file_others_can_write_is_refused(tmp_path):
    base = traversable(tmp_path)
    executor = ProcessExecutor(work_dir=base / "jobs", cache_dir=base / "cache")
    first = await run(executor, USES_SIX, requirements=REQUIREMENT)
    assert first.ok and first.result == "1.16.0", first.error
    entry = executor.requirements.path_for(REQUIREMENT)
    (entry / "six.py").chmod(0o666)
    fresh = ProcessExecutor(work_dir=base / "jobs", cache_dir=base / "cache")  # a new worker
    outcome = await run(fresh, USES_SIX, requirements=REQUIREMENT)
    assert outcome.error["kind"] == "setup"
    assert "six.py is writable by other users" in outcome.error["message"]


async def test_a_cache_dir_another_user_made_first_is_refused(tmp_path):
    shared = traversable(tmp_path) / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)  # like /tmp
    _as_nobody("mkdir", "-p", str(shared / "gristmill-cache" / "requirements"))
    executor = ProcessExecutor(work_dir=tmp_path / "jobs", cache_dir=shared / "gristmill-cache")
    outcome = await run(executor, USES_SIX, requirements=REQUIREMENT)
    assert outcome.error["kind"] == "setup"
    assert f"belongs to uid {NOBODY}" in outcome.error["message"]


def test_a_work_dir_another_user_made_first_is_refused(tmp_path):
    shared = traversable(tmp_path) / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    _as_nobody("mkdir", str(shared / "gristmill-jobs"))
    with pytest.raises(SandboxUnavailable, match=f"belongs to uid {NOBODY}"):
        ProcessExecutor(work_dir=shared / "gristmill-jobs")


def test_a_world_writable_ancestor_without_the_sticky_bit_is_refused(tmp_path):
    open_dir = traversable(tmp_path) / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(SandboxUnavailable, match="writable by other users"):
        ProcessExecutor(work_dir=open_dir / "jobs")


def test_the_default_directories_are_roots_not_under_tmp(monkeypatch):
    from gristmill.sandbox import process, requirements, uids

    for name in ("GRISTMILL_WORK_DIR", "GRISTMILL_CACHE_DIR", "GRISTMILL_UID_LOCK_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert os.geteuid() == 0  # as the process executor's workers run
    assert requirements._default_cache_dir() == Path("/var/cache/gristmill/requirements")
    assert process._default_work_dir() == Path("/var/lib/gristmill/jobs")
    assert uids.UidPool().lock_dir == Path("/run/gristmill/uids")


def test_a_work_dir_the_job_uids_cannot_reach_is_refused_at_start_up(tmp_path):
    tmp_path.chmod(0o700)
    with pytest.raises(SandboxUnavailable, match=f"cannot reach the work dir .*: {tmp_path} "
                                                 f"is mode 700; chmod o\\+x {tmp_path}"):
        ProcessExecutor(work_dir=tmp_path / "jobs")
