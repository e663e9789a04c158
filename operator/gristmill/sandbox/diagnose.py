"""Why the sandbox cannot start a job here, said as what to change.

Read from the worker's own process: a /proc with the runtime's masked paths
(a container's default, `procMount: Default`), a seccomp filter (a
RuntimeDefault profile refuses the unshare, mount and pivot_root that the
sandbox needs), an AppArmor profile (containerd's and Docker's deny every
mount), Ubuntu's restriction of unprivileged user namespaces, or none allowed.
"""

from __future__ import annotations

from pathlib import Path

# What container runtimes and the kubelet mask or make read-only (kubelet v1.37
# pkg/securitycontext, containerd 2.x pkg/oci, runc spec): each is a mount of its own.
MASKED_PROC_PATHS = frozenset({
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
    "/proc/scsi", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"})
POD_SPEC_ADVICE = ("give the worker pod `hostUsers: false` and its container "
                   "`securityContext.procMount: Unmasked` and `seccompProfile: {type: "
                   "Unconfined}` (what the operator's process-executor pods have), or use "
                   "`executor: pod`")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def masked_proc_paths(mountinfo: str | None = None) -> list[str]:
    """The runtime's masks over this process's /proc: mount points of their own."""
    mountinfo = _read("/proc/self/mountinfo") if mountinfo is None else mountinfo
    points = {line.split()[4] for line in mountinfo.splitlines() if len(line.split()) > 4}
    return sorted(points & MASKED_PROC_PATHS)


def seccomp_filtered(status: str | None = None) -> bool:
    status = _read("/proc/self/status") if status is None else status
    return any(line.split(":")[1].strip() == "2" for line in status.splitlines()
               if line.startswith("Seccomp:"))


def apparmor_profile() -> str | None:
    """The AppArmor profile confining this process, or None (unconfined, or no AppArmor)."""
    label = (_read("/proc/self/attr/apparmor/current") or _read("/proc/self/attr/current"))
    label = label.strip().rstrip("\0")
    return None if label in ("", "unconfined") else label


def problems() -> list[str]:
    """What here keeps the sandbox from starting, each with its fix."""
    found = []
    masked = masked_proc_paths()
    if masked:
        found.append(
            f"/proc has the container runtime's masked paths ({', '.join(masked[:4])}"
            f"{', ...' if len(masked) > 4 else ''}), under which no new /proc can be mounted "
            f"for a job: the worker container needs `securityContext.procMount: Unmasked`, "
            f"which Kubernetes allows only in a pod with `hostUsers: false`")
    if seccomp_filtered():
        found.append(
            "a seccomp filter confines the worker (a RuntimeDefault profile refuses unshare, "
            "mount and pivot_root, even with CAP_SYS_ADMIN): the worker container needs "
            "`seccompProfile: {type: Unconfined}`, or a Localhost profile that allows them")
    profile = apparmor_profile()
    if profile:
        found.append(
            f"the AppArmor profile {profile} confines the worker (the runtime's default denies "
            f"every mount): give the worker container an unconfined AppArmor profile (the "
            f"annotation container.apparmor.security.beta.kubernetes.io/worker: unconfined, "
            f"or appArmorProfile: {{type: Unconfined}})")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").strip() == "1":
        found.append(
            "this kernel restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns=1, Ubuntu 23.10 and later): on the "
            "node, sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or load an "
            "AppArmor profile that allows userns for the worker (see README)")
    if _read("/proc/sys/user/max_user_namespaces").strip() == "0":
        found.append("user namespaces are off (user.max_user_namespaces=0): on the node, "
                     "sysctl -w user.max_user_namespaces=15000")
    return found


def advice() -> str:
    """One sentence on what to change, for an error message."""
    found = problems()
    if not found:
        return (f"in a container, {POD_SPEC_ADVICE}")
    return "; ".join(found) + f". In Kubernetes: {POD_SPEC_ADVICE}"
