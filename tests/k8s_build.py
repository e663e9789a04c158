"""kube-apiserver, kube-controller-manager, kubectl and etcd, built from the Go module
proxy and cached outside the repository, once per machine and version.

`k8s.io/kubernetes` cannot be `go install`ed: its go.mod replaces the staging modules
(k8s.io/api, k8s.io/client-go, ...) with local paths. A module of our own requires it
and replaces each staging module with its published version instead, the list read
from kubernetes' own go.mod. The version ldflags make the server report its version
(without them it says v0.0.0 and Helm refuses a chart's kubeVersion).

Run it on its own to build ahead of the tests (`.ci/run` does): python3 tests/k8s_build.py
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KUBERNETES = "1.37.2"
ETCD = "3.6.16"
CACHE = Path(os.environ.get("GRISTMILL_K8S_CACHE") or Path.home() / ".cache" / "gristmill"
             / "control-plane")


KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kubectl")


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path  # of the same version: a client of another may not speak its API
    etcd: Path


class BuildUnavailable(RuntimeError):
    """What is missing to build the control plane here, and how to get it."""


def _bin_dir() -> Path:
    return CACHE / f"kubernetes-{KUBERNETES}-etcd-{ETCD}" / "bin"


def cached() -> Binaries | None:
    bin_dir = _bin_dir()
    found = Binaries(*(bin_dir / command for command in KUBERNETES_COMMANDS), bin_dir / "etcd")
    return found if all(p.exists() for p in vars(found).values()) else None


def _go(*args: str, cwd: Path, log) -> str:
    result = subprocess.run(["go", *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"})
    log.write(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise BuildUnavailable(f"go {' '.join(args[:2])} failed in {cwd}:\n{tail}")
    return result.stdout


def _staging_modules(work: Path, log) -> list[str]:
    """The modules kubernetes' go.mod replaces with ./staging paths."""
    info = json.loads(_go("mod", "download", "-json", f"k8s.io/kubernetes@v{KUBERNETES}",
                          cwd=work, log=log))
    go_mod = Path(info["GoMod"]).read_text()
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", go_mod, re.M)))


def _version_ldflags() -> str:
    major, minor, _ = KUBERNETES.split(".")
    pkg = "k8s.io/component-base/version"
    values = {"gitVersion": f"v{KUBERNETES}", "gitMajor": major, "gitMinor": minor,
              "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z"}
    return " ".join(["-s", "-w", *(f"-X {pkg}.{key}={value}" for key, value in values.items())])


def _build_kubernetes(work: Path, bin_dir: Path, log) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text("module gristmill.test/kubernetes\n\ngo 1.26.0\n")
    replaces = "".join(f"\t{m} => {m} v0.{KUBERNETES.split('.', 1)[1]}\n"
                       for m in _staging_modules(work, log))
    (work / "go.mod").write_text(
        f"module gristmill.test/kubernetes\n\ngo 1.26.0\n\n"
        f"require k8s.io/kubernetes v{KUBERNETES}\n\nreplace (\n{replaces})\n")
    (work / "tools.go").write_text(
        '//go:build tools\n\npackage tools\n\nimport (\n'
        + "".join(f'\t_ "k8s.io/kubernetes/cmd/{command}"\n' for command in KUBERNETES_COMMANDS)
        + ")\n")
    _go("mod", "tidy", cwd=work, log=log)
    for command in KUBERNETES_COMMANDS:
        if not (bin_dir / command).exists():
            _go("build", "-trimpath", "-ldflags", _version_ldflags(), "-o",
                str(bin_dir / command), f"k8s.io/kubernetes/cmd/{command}", cwd=work, log=log)


def _build_etcd(work: Path, bin_dir: Path, log) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(f"module gristmill.test/etcd\n\ngo 1.26.0\n\n"
                                 f"require go.etcd.io/etcd/server/v3 v{ETCD}\n")
    _go("mod", "tidy", cwd=work, log=log)
    _go("build", "-trimpath", "-o", str(bin_dir / "etcd"), "go.etcd.io/etcd/server/v3",
        cwd=work, log=log)


def ensure_binaries(say=print) -> Binaries:
    """The cached binaries, building what is missing (minutes on 2 cores; once)."""
    found = cached()
    if found:
        return found
    if shutil.which("go") is None:
        raise BuildUnavailable("Go is not installed: the control plane is built from the Go "
                               "module proxy (a polyglot machine has Go 1.26)")
    bin_dir = _bin_dir()
    bin_dir.mkdir(parents=True, exist_ok=True)
    with open(bin_dir.parent / "build.lock", "w") as lock, \
            open(bin_dir.parent / "build.log", "a") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per machine, whoever asks first
        if (found := cached()) is not None:
            return found
        started = time.monotonic()
        if not (bin_dir / "etcd").exists():
            say(f"building etcd {ETCD} (about a minute)...")
            _build_etcd(bin_dir.parent / "etcd-module", bin_dir, log)
        say(f"building {', '.join(KUBERNETES_COMMANDS)} {KUBERNETES} "
            f"(10-20 minutes on 2 cores, once per machine)...")
        _build_kubernetes(bin_dir.parent / "kubernetes-module", bin_dir, log)
        say(f"built the control plane in {time.monotonic() - started:.0f}s into {bin_dir}")
    return cached()


if __name__ == "__main__":
    try:
        ensure_binaries()
    except BuildUnavailable as exc:
        print(f"cannot build the control plane: {exc}", file=sys.stderr)
        sys.exit(1)
