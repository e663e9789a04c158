"""The Pod Security Standards `restricted` profile, as a check on pod specs."""

from __future__ import annotations

SAFE_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod_spec: dict) -> list[str]:
    """What breaks the Pod Security Standards `restricted` profile (baseline included), as
    kubernetes.io/docs/concepts/security/pod-security-standards lists it for v1.29+."""
    problems = []
    pod_security = pod_spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            problems.append(f"{key} is set")
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= SAFE_VOLUMES:
            problems.append(f"volume {volume['name']} is {kinds - SAFE_VOLUMES}")
    if pod_security.get("sysctls"):
        problems.append("sysctls are set")
    for container in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        name = container["name"]
        security = container.get("securityContext") or {}
        if security.get("privileged"):
            problems.append(f"{name}: privileged")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = security.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if security.get("runAsUser", pod_security.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as uid 0")
        seccomp = (security.get("seccompProfile") or pod_security.get("seccompProfile")
                   or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp profile is {seccomp}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: uses a host port")
        if security.get("procMount") not in (None, "Default"):
            problems.append(f"{name}: procMount")
    return problems
