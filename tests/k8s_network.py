"""The test cluster's pod network: a Linux bridge of the session's own, and a network
namespace per pod with a veth into it, so that every pod has an IP and ports of its own
(two workers both serve their probe on 8081) and reaches the host (API server,
PostgreSQL) at the bridge's address, the gateway. No NAT, no route out: pods talk to
the host and to each other only.

Names carry the owning process id, so concurrent test sessions on one machine never
share a bridge, and a session cleans up what dead ones left.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _used_networks() -> list[ipaddress.IPv4Network]:
    found = json.loads(_ip("-j", "-4", "addr").stdout or "[]")
    return [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in found for a in link.get("addr_info", [])]


def remove_leftovers() -> None:
    """Bridges and namespaces of test sessions that are gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("gmpod-") and not _alive(int(name.split("-")[1])):
            _ip("netns", "del", name, check=False)
    for link in json.loads(_ip("-j", "link", "show", "type", "bridge").stdout or "[]"):
        name = link["ifname"]
        if name.startswith("gmbr") and not _alive(int(name[4:])):
            _ip("link", "del", name, check=False)


@dataclass
class PodNetwork:
    owner: int = field(default_factory=os.getpid)
    pods: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (netns, ip)

    def create(self) -> PodNetwork:
        remove_leftovers()
        self.bridge = f"gmbr{self.owner}"[:15]
        used = _used_networks()
        for third in range(self.owner % 200, self.owner % 200 + 200):
            candidate = ipaddress.ip_network(f"10.233.{third % 250}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                self.subnet = candidate
                break
        else:
            raise RuntimeError("no free /24 in 10.233.0.0/16 for the pod network")
        hosts = list(self.subnet.hosts())
        self.gateway, self._free = str(hosts[0]), [str(h) for h in hosts[1:]]
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self._count = 0
        return self

    def add_pod(self, key: str) -> tuple[str, str]:
        """A network namespace with eth0 on the bridge: (its name, the pod's IP)."""
        self._count += 1
        netns = f"gmpod-{self.owner}-{self._count}"
        ip = self._free.pop(0)
        host_side, pod_side = f"gv{self.owner % 10000}x{self._count}"[:15], f"gp{self._count}"
        _ip("netns", "add", netns)
        _ip("link", "add", host_side, "type", "veth", "peer", "name", pod_side)
        _ip("link", "set", host_side, "master", self.bridge, "up")
        _ip("link", "set", pod_side, "netns", netns)
        for args in (("link", "set", "lo", "up"),
                     ("link", "set", pod_side, "name", "eth0"),
                     ("addr", "add", f"{ip}/24", "dev", "eth0"),
                     ("link", "set", "eth0", "up"),
                     ("route", "add", "default", "via", self.gateway)):
            _ip("-n", netns, *args)
        self.pods[key] = (netns, ip)
        return netns, ip

    def remove_pod(self, key: str) -> None:
        found = self.pods.pop(key, None)
        if found:
            _ip("netns", "del", found[0], check=False)  # its veth goes with it
            self._free.append(found[1])

    def destroy(self) -> None:
        for key in list(self.pods):
            self.remove_pod(key)
        with contextlib.suppress(AttributeError):
            _ip("link", "del", self.bridge, check=False)
