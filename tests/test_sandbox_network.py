"""`sandbox.network: true` jobs: out to the network through pasta, but never into the host's
loopback services or its abstract unix sockets (which belong to the host's network
namespace, where the dev PostgreSQL and the worker's own ports live)."""

from __future__ import annotations

import os
import socket

import pytest
from remotehost import GREETING, remote_host
from sandboxkit import make_executor, run

from gristmill.sandbox import command
from gristmill.sandbox.process import network_problem


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    problem = network_problem()
    assert problem is None, problem  # .ci/run installs passt and opens /dev/net/tun
    return make_executor(tmp_path_factory.mktemp("network"))


@pytest.fixture(scope="module")
def remote():
    with remote_host() as host:
        yield host


@pytest.fixture
def loopback_service():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0)
    yield listener
    listener.close()


@pytest.fixture
def abstract_socket():
    name = f"gristmill-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("\0" + name)
    listener.listen()
    yield name
    listener.close()


CONNECT = """
import socket

def main(address: str, port: int):
    with socket.create_connection((address, port), timeout=5) as conn:
        return conn.makefile().readline().strip()
"""


async def test_a_network_job_reaches_a_host_on_the_network(executor, remote):
    outcome = await run(executor, CONNECT, network=True,
                        input={"address": remote.address, "port": remote.port})
    assert outcome.ok, outcome.error
    assert outcome.result == GREETING


async def test_the_remote_host_is_out_of_reach_without_network(executor, remote):
    outcome = await run(executor, CONNECT, input={"address": remote.address,
                                                  "port": remote.port})
    assert "Network is unreachable" in outcome.error["message"]


@pytest.mark.parametrize("network", [True, False])
async def test_host_loopback_services_are_unreachable(executor, loopback_service, network):
    port = loopback_service.getsockname()[1]
    socket.create_connection(("127.0.0.1", port), timeout=2).close()  # it is there
    loopback_service.accept()[0].close()
    outcome = await run(executor, CONNECT, network=network,
                        input={"address": "127.0.0.1", "port": port})
    assert outcome.error["kind"] == "exception"
    assert "ConnectionRefusedError" in outcome.error["message"]
    with pytest.raises(BlockingIOError):  # nothing came through
        loopback_service.accept()


@pytest.mark.parametrize("network", [True, False])
async def test_host_abstract_sockets_are_unreachable(executor, abstract_socket, network):
    probe = socket.socket(socket.AF_UNIX)
    probe.connect("\0" + abstract_socket)  # it is there
    probe.close()
    outcome = await run(executor, """
        import socket

        def main(name: str):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect("\\0" + name)
            return "connected"
    """, network=network, input={"name": abstract_socket})
    assert outcome.error["kind"] == "exception"
    assert "ConnectionRefusedError" in outcome.error["message"]


async def test_a_network_job_has_a_network_namespace_of_its_own(executor):
    outcome = await run(executor, """
        import os, socket

        def main():
            return {"ns": os.readlink("/proc/self/ns/net"),
                    "interfaces": sorted(name for _, name in socket.if_nameindex())}
    """, network=True)
    assert outcome.ok, outcome.error
    assert outcome.result["ns"] != os.readlink("/proc/self/ns/net")
    assert "lo" in outcome.result["interfaces"] and len(outcome.result["interfaces"]) == 2


def test_pasta_maps_no_gateway_to_the_host_and_forwards_no_ports():
    # With pasta's defaults, connecting to the gateway address reaches the host's loopback
    # and -T/-U auto forward the host's bound loopback ports into the job. The gateway is
    # a real machine here, which a test must not probe, so the options are checked.
    options = " ".join(command.PASTA)
    assert "--no-map-gw" in options
    for flag in ("--tcp-ports", "--udp-ports", "--tcp-ns", "--udp-ns"):
        assert f"{flag} none" in options
