"""Helpers for tests against the real control plane (the `cluster` fixture)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from k8s_cluster import environment

ROOT = Path(__file__).parent.parent


def kubectl(cluster, *args: str, input: str | None = None, check: bool = True,
            kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    """kubectl as the admin (or as the user of `kubeconfig`)."""
    env = environment(cluster.control_plane)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    binary = str(cluster.control_plane.binaries.kubectl)  # the API server's own version
    result = subprocess.run([binary, *args], input=input, capture_output=True, text=True,
                            env=env, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result


def get(cluster, *args: str) -> dict | None:
    """An object as JSON, or None when it is not there."""
    found = kubectl(cluster, "get", *args, "-o", "json", check=False)
    return json.loads(found.stdout) if found.returncode == 0 else None


def apply(cluster, manifest: dict | str, *args: str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    kubectl(cluster, "apply", *args, "-f", "-", input=text)


def wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.3)


def condition(obj: dict | None, kind: str = "Ready") -> dict:
    for found in ((obj or {}).get("status") or {}).get("conditions") or []:
        if found.get("type") == kind:
            return found
    return {}
