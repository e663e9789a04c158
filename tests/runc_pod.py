"""A pod's container run in runc the way the kubelet and containerd would run it.

`container_config` takes a pod spec as the operator builds it (a Deployment's pod
template) and returns the OCI config containerd's CRI plugin (v2.4) would hand runc
for one of its containers: containerd's default spec (capabilities, mounts; no rlimits,
no /run) with the kubelet's masked and read-only /proc paths, then the
container's securityContext applied as the kubelet translates it:

| pod spec                              | OCI config                                        |
| ------------------------------------- | ------------------------------------------------- |
| hostUsers: false                      | a user namespace mapping 65536 ids to a host range |
| procMount: Unmasked (else Default)    | no masked or read-only paths (else the kubelet's)  |
| capabilities add / drop               | containerd's 14 default capabilities, changed      |
| seccompProfile RuntimeDefault         | containerd's default profile for those capabilities |
| seccompProfile Localhost              | the named profile (`Pod.localhost_profiles`)       |
| seccompProfile Unconfined (or unset)  | no seccomp filter (the kubelet's default)          |
| allowPrivilegeEscalation: false       | noNewPrivileges                                    |
| readOnlyRootFilesystem: true          | a read-only root                                   |

containerd's defaults come from containerd itself: tests/oci_defaults/ is a small Go
program built once per machine from the Go module proxy (cached outside the repository).
Not emulated: AppArmor and SELinux (these machines have neither: see README), resources
(no cgroup limits), the pause container (the container's namespaces are its own),
idmapped mounts (runc 1.1 has none: the rootfs is chowned to the container's root
instead, as containerd did before idmap support), and the kubelet's /etc/hosts and
/etc/resolv.conf.

The rootfs is the image as far as the worker needs it: the host's /usr and /etc, the
test's Python and the project's source, each bound read-only on its own (never an rbind
of a directory holding the bundle, which would carry the host's unmasked /proc inside
and hide the failure under test), in a directory owned by the container's root, as an
image layer is under a user namespace. The container gets network, pid, ipc, uts and
mount namespaces of its own, as a pod does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).parent
OCI_DEFAULTS_SOURCE = HERE / "oci_defaults"
CACHE = Path(os.environ.get("GRISTMILL_OCI_CACHE") or Path.home() / ".cache" / "gristmill"
             / "oci-defaults")
IDS_PER_POD = 65536  # the kubelet's default userNamespaces.idsPerPod

# The kubelet's (v1.37.2, pkg/securitycontext/util.go) for procMount Default; it adds
# /sys/devices/system/cpu/cpuN/thermal_throttle where those exist.
KUBELET_MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore",
                        "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                        "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                        "/sys/devices/virtual/powercap")
KUBELET_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                          "/proc/sysrq-trigger")


class RuncUnavailable(RuntimeError):
    """What this machine lacks to run containers, and how to get it."""


def need(condition: bool, why: str) -> None:
    """Skip with the reason where a tool is missing; in CI fail instead, so a missing
    install step cannot pass as a skip."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI=true: a test that needs it fails rather than skips)")
    pytest.skip(why)


def runc_problem() -> str | None:
    if os.geteuid() != 0:
        return "runc runs containers as root here"
    if shutil.which("runc") is None:
        return "runc not found: apt-get install -y runc"
    return None


# containerd's defaults ------------------------------------------------------------------

def _oci_defaults_binary() -> Path:
    """tests/oci_defaults built (once per machine and source version)."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((OCI_DEFAULTS_SOURCE / name).read_bytes())
    binary = CACHE / digest.hexdigest()[:16] / "oci-defaults"
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        raise RuncUnavailable("go not found: it builds tests/oci_defaults (containerd's "
                              "defaults) from the Go module proxy")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(f".{os.getpid()}")
    result = subprocess.run(["go", "build", "-o", str(partial), "."], cwd=OCI_DEFAULTS_SOURCE,
                            capture_output=True, text=True,
                            env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"})
    if result.returncode != 0:
        raise RuncUnavailable(f"building tests/oci_defaults failed: {result.stderr[-2000:]}")
    partial.rename(binary)
    return binary


def _oci_defaults(*args: str) -> dict:
    result = subprocess.run([str(_oci_defaults_binary()), *args], capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout)


def containerd_spec() -> dict:
    return _oci_defaults("spec")


def containerd_seccomp(capabilities: list[str]) -> dict:
    return _oci_defaults("seccomp", *capabilities)


# the kubelet's and containerd's translation of a pod spec ------------------------------

@dataclass(frozen=True)
class Bind:
    """A host path bound read-only into the container (one file or directory, never its
    submounts)."""

    source: str
    destination: str | None = None

    def mount(self) -> dict:
        return {"destination": self.destination or self.source, "type": "bind",
                "source": self.source, "options": ["bind", "ro", "nosuid", "nodev"]}


@dataclass
class Pod:
    """One container of a pod spec and what the kubelet resolves for it."""

    pod_spec: dict
    container_name: str
    entrypoint: list[str]  # the image's ENTRYPOINT (the spec gives `args` only)
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=lambda: {
        "metadata.name": "worker-0", "metadata.namespace": "default",
        "metadata.uid": str(uuid.uuid4())})
    host_id_base: int = 0  # where the pod's ids start on the host (hostUsers: false)
    # The node's seccomp profiles (the kubelet's seccomp/ dir), by localhostProfile.
    localhost_profiles: Mapping[str, dict] = field(default_factory=dict)

    @property
    def container(self) -> dict:
        return next(c for c in self.pod_spec["containers"] if c["name"] == self.container_name)

    @property
    def security(self) -> dict:
        return self.container.get("securityContext") or {}

    @property
    def user_namespace(self) -> bool:
        return self.pod_spec.get("hostUsers") is False

    def env(self) -> list[str]:
        values = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                  f"HOSTNAME={self.metadata['metadata.name']}"]
        for var in self.container.get("env", []):
            source = var.get("valueFrom")
            if source is None:
                value = var["value"]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]]
            else:
                value = self.metadata[source["fieldRef"]["fieldPath"]]
            values.append(f"{var['name']}={value}")
        return values

    def capabilities(self, defaults: list[str]) -> list[str]:
        """containerd's WithCapabilities: its defaults, then ALL dropped or added, then
        each named one."""
        asked = self.security.get("capabilities") or {}
        adds = [c.upper() for c in asked.get("add", [])]
        drops = [c.upper() for c in asked.get("drop", [])]
        caps = list(defaults)
        if "ALL" in adds:
            raise ValueError("capabilities.add ALL is not emulated")
        if "ALL" in drops:
            caps = []
        caps += [f"CAP_{c}" for c in adds if f"CAP_{c}" not in caps]
        return [c for c in caps if c[4:] not in drops]

    def seccomp_profile(self) -> dict:
        own = self.security.get("seccompProfile")
        pods = (self.pod_spec.get("securityContext") or {}).get("seccompProfile")
        # Without one, the kubelet asks for Unconfined (unless its SeccompDefault is on).
        return own or pods or {"type": "Unconfined"}


def container_config(pod: Pod, *, rootfs: Path, binds: list[Bind],
                     extra_env: Mapping[str, str] = {}) -> dict:
    """The runc config for `pod`'s container, as containerd's CRI plugin builds it."""
    if pod.security.get("privileged"):
        raise ValueError("privileged containers are not emulated")
    base = containerd_spec()
    config: dict = {"ociVersion": base["ociVersion"], "hostname":
                    pod.metadata["metadata.name"]}
    process = dict(base["process"])
    process.pop("rlimits", None)  # containerd's CRI drops the default rlimits
    process["terminal"] = False
    process["args"] = [*pod.entrypoint, *pod.container.get("command", []),
                       *pod.container.get("args", [])]
    process["env"] = [*pod.env(), *(f"{k}={v}" for k, v in extra_env.items())]
    caps = pod.capabilities(base["process"]["capabilities"]["bounding"])
    # No ambient capabilities: the CRI plugin clears them.
    process["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}
    process["noNewPrivileges"] = pod.security.get("allowPrivilegeEscalation") is False
    config["process"] = process
    config["root"] = {"path": str(rootfs),
                      "readonly": pod.security.get("readOnlyRootFilesystem") is True}

    mounts = [m for m in base["mounts"] if m["destination"] != "/run"]  # WithoutRunMount
    mounts.append({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                   "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]})
    config["mounts"] = mounts + [bind.mount() for bind in binds]

    linux = {key: value for key, value in base["linux"].items()
             if key not in ("maskedPaths", "readonlyPaths", "seccomp")}
    linux["namespaces"] = [{"type": kind} for kind in ("pid", "ipc", "uts", "mount", "network")]
    if pod.security.get("procMount") == "Unmasked":
        linux["maskedPaths"], linux["readonlyPaths"] = [], []
    else:
        throttles = sorted(str(p) for p in
                           Path("/sys/devices/system/cpu").glob("cpu[0-9]*/thermal_throttle"))
        linux["maskedPaths"] = [*KUBELET_MASKED_PATHS, *throttles]
        linux["readonlyPaths"] = list(KUBELET_READONLY_PATHS)
    if pod.user_namespace:
        linux["namespaces"].append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": pod.host_id_base, "size": IDS_PER_POD}]
        linux["uidMappings"], linux["gidMappings"] = mapping, mapping
    seccomp = pod.seccomp_profile()
    if seccomp["type"] == "RuntimeDefault":
        linux["seccomp"] = containerd_seccomp(caps)
    elif seccomp["type"] == "Localhost":
        linux["seccomp"] = pod.localhost_profiles[seccomp["localhostProfile"]]
    elif seccomp["type"] != "Unconfined":
        raise ValueError(f"seccompProfile {seccomp['type']} is not emulated")
    config["linux"] = linux
    return config


# running it -----------------------------------------------------------------------------

def build_rootfs(rootfs: Path, binds: list[Bind], writable: list[str], owner: int) -> None:
    """The mount points of `binds`, the host's merged-/usr links, and the writable dirs
    (the image layer's), all owned by the container's root on the host (`owner`)."""
    rootfs.mkdir(parents=True)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{name}"):
            (rootfs / name).symlink_to(os.readlink(f"/{name}"))
    made = [rootfs]
    for path in [*(b.destination or b.source for b in binds), *writable,
                 "/proc", "/dev", "/sys", "/tmp"]:
        target = rootfs / path.lstrip("/")
        source = next((b.source for b in binds if (b.destination or b.source) == path), None)
        if source is not None and not os.path.isdir(source):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        else:
            target.mkdir(parents=True, exist_ok=True)
        made += [target, *(p for p in target.parents if rootfs in p.parents)]
    for path in set(made):
        os.chown(path, owner, owner, follow_symlinks=False)
    (rootfs / "tmp").chmod(0o1777)


@dataclass
class Container:
    """A runc container run from a bundle (`runc run`, in the foreground of a process
    of ours): its output is in `log`."""

    bundle: Path
    state: Path
    id: str
    process: subprocess.Popen
    log: Path
    host_id_base: int = 0  # the host id of the container's root (its user namespace's map)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def exec(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["runc", "--root", str(self.state), "exec", self.id, *argv],
                              capture_output=True, text=True, timeout=timeout)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            subprocess.run(["runc", "--root", str(self.state), "kill", self.id, "TERM"],
                           capture_output=True)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                subprocess.run(["runc", "--root", str(self.state), "kill", "--all", self.id,
                                "KILL"], capture_output=True)
                self.process.wait(timeout=10)
        subprocess.run(["runc", "--root", str(self.state), "delete", "--force", self.id],
                       capture_output=True)


@contextlib.contextmanager
def run_container(bundle: Path, config: dict) -> Iterator[Container]:
    """Run `config`'s process in a new container; stopped (SIGTERM, then SIGKILL) and
    deleted when the block ends."""
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    state = bundle / "state"
    log = bundle / "output.log"
    container_id = f"gristmill-test-{uuid.uuid4().hex[:12]}"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["runc", "--root", str(state), "run", "--bundle", str(bundle), container_id],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    mappings = config["linux"].get("uidMappings") or [{"hostID": 0}]
    container = Container(bundle, state, container_id, process, log, mappings[0]["hostID"])
    try:
        yield container
    finally:
        container.stop()


def python_binds() -> list[Bind]:
    """This interpreter with its packages, and the project's source tree."""
    prefix = Path(sys.base_prefix)
    binds = [Bind(str(prefix))]
    if Path(sys.prefix) != prefix:
        binds.append(Bind(sys.prefix))
    return binds
