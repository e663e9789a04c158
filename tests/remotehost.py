"""A test host of our own: a network namespace joined to this one by a veth pair, with a
TCP server in it that greets whoever connects. Jobs reach it the way they would reach a
machine on the network, through the host's routing, never through its loopback.

The addresses are from 198.18.0.0/15 (RFC 2544, for benchmarking), in a pair that only
this test creates and removes; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

GREETING = "hello from the test host"
SERVER = r"""
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(sys.argv[3].encode() + b"\n")
    conn.close()
"""


@dataclass(frozen=True)
class RemoteHost:
    address: str
    port: int


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def remote_host(port: int = 8080) -> Iterator[RemoteHost]:
    tag = f"{os.getpid() % 100000}"
    namespace, host_end, ns_end = f"gm-host-{tag}", f"gmh{tag}", f"gmn{tag}"
    third = os.getpid() % 250 + 1  # apart from another test run's pair
    ours, theirs = f"198.18.{third}.1", f"198.18.{third}.2"
    _ip("netns", "add", namespace)
    server = None
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end,
            "netns", namespace)
        _ip("addr", "add", f"{ours}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("-n", namespace, "addr", "add", f"{theirs}/30", "dev", ns_end)
        _ip("-n", namespace, "link", "set", ns_end, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "route", "add", "default", "via", ours)
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", SERVER, theirs, str(port),
             GREETING], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        time.sleep(0.05)
        yield RemoteHost(theirs, port)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", host_end)
        _ip("netns", "del", namespace)
