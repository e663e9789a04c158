"""Job uids from the worker's user namespace, the pod-network check and the start-up
diagnosis, on their own (test_sandbox_in_runc.py runs them in a real container)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from sandboxkit import make_executor, run

from gristmill.sandbox import diagnose
from gristmill.sandbox.base import SandboxUnavailable
from gristmill.sandbox.uids import UidPool
from gristmill.sandbox.userns import (
    HOST_RANGE,
    POD_RANGE,
    Extent,
    in_user_namespace,
    is_initial,
    job_uid_range,
)

HOST = [Extent(0, 0, 2**32 - 1)]
POD = [Extent(0, 1_310_720, 65536)]  # a hostUsers: false pod's, as the kubelet maps it


def test_a_host_worker_keeps_the_host_range():
    assert job_uid_range(HOST, HOST) == HOST_RANGE == (200_000, 4096)
    assert is_initial(HOST) and not is_initial(POD)


def test_a_pod_of_65536_ids_takes_10000_to_59999():
    assert job_uid_range(POD, POD) == POD_RANGE == (10_000, 50_000)


def test_only_ids_mapped_as_uids_and_as_gids_are_taken():
    gids = [Extent(0, 1_310_720, 30_000)]
    assert job_uid_range(POD, gids) == (10_000, 20_000)
    pieces = [Extent(0, 5_000_000, 12_000), Extent(20_000, 6_000_000, 45_536)]
    assert job_uid_range(pieces, pieces) == (20_000, 40_000)


def test_too_few_mapped_ids_say_what_to_change():
    rootless = [Extent(0, 1000, 1), Extent(1, 100_000, 10_030)]
    with pytest.raises(SandboxUnavailable, match=r"maps uids 0-0, 1-10030: jobs need at least "
                                                 r"64 uids.*hostUsers: false"):
        job_uid_range(rootless, rootless)


def test_the_pool_takes_its_range_from_this_process_user_namespace(tmp_path):
    pool = UidPool(tmp_path / "uids")
    assert (pool.first, pool.count) == job_uid_range()
    if not in_user_namespace():
        assert (pool.first, pool.count) == HOST_RANGE


CHECK = ("from gristmill.sandbox.userns import network_belongs_to_this_pod as f; "
         "print(f())")


@pytest.mark.parametrize(("unshare", "expected"), [
    ([], "False"),  # the host's network
    (["--user", "--map-root-user"], "False"),  # a user namespace of its own, the host's net
    (["--user", "--map-root-user", "--net"], "True"),  # as a hostUsers: false pod
])
def test_only_a_network_namespace_of_the_workers_own_user_namespace_is_a_pods(unshare,
                                                                               expected):
    if in_user_namespace():
        pytest.skip("this test runs in a user namespace already")
    command = (["unshare", *unshare, "--"] if unshare else []) + [sys.executable, "-c", CHECK]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.stdout.strip() == expected, result.stderr


async def test_pod_network_on_a_host_fails_network_jobs_loudly(tmp_path, caplog):
    if in_user_namespace():
        pytest.skip("this test runs in a user namespace already")
    with caplog.at_level(logging.WARNING, logger="gristmill.sandbox"):
        executor = make_executor(tmp_path, job_network="pod")
    assert "network jobs will fail" in caplog.text
    outcome = await run(executor, "def main():\n    return 1\n", network=True)
    assert not outcome.ok and outcome.error["kind"] == "setup"
    assert "--job-network pod" in outcome.error["message"]
    assert "hostUsers: false" in outcome.error["message"]
    plain = await run(executor, "def main():\n    return 2\n")  # other jobs are unaffected
    assert plain.ok and plain.result == 2


def test_an_unknown_job_network_is_refused(tmp_path):
    with pytest.raises(SandboxUnavailable, match="unknown job network 'host'"):
        make_executor(tmp_path, job_network="host")


MOUNTINFO = """\
22 27 0:5 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
48 22 0:40 /sys /proc/sys ro,nosuid,nodev,noexec,relatime - proc proc rw
49 22 0:46 / /proc/acpi ro,relatime - tmpfs tmpfs ro
51 22 0:6 /null /proc/keys rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
60 22 0:50 / /proc/sys/fs/binfmt_misc rw,relatime - binfmt_misc binfmt_misc rw
"""


def test_the_runtimes_proc_masks_are_recognised():
    assert diagnose.masked_proc_paths(MOUNTINFO) == ["/proc/acpi", "/proc/keys", "/proc/sys"]
    assert diagnose.masked_proc_paths(MOUNTINFO.splitlines()[0] + "\n") == []


def test_a_seccomp_filter_is_recognised():
    assert diagnose.seccomp_filtered("Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n")
    assert not diagnose.seccomp_filtered("Name:\tx\nSeccomp:\t0\n")


def test_a_pod_worker_that_is_the_nodes_root_says_so(tmp_path, monkeypatch, caplog):
    if os.geteuid() != 0 or in_user_namespace():
        pytest.skip("needs root in the host's user namespace")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # as in every pod
    with caplog.at_level(logging.WARNING, logger="gristmill.sandbox"):
        make_executor(tmp_path)
    assert "runs in a Kubernetes pod as the node's root" in caplog.text
    assert "ignored hostUsers: false" in caplog.text
