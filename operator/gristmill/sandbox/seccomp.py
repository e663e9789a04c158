"""The seccomp filter every process-sandbox job runs under, compiled by libseccomp.

Jobs never need to mount, trace other processes, load kernel modules or BPF
programs, use the kernel keyring, create namespaces, or reboot; each of those
calls fails with EPERM, so a program that probes for them carries on. A
system call made through a foreign ABI (i386 or x32 on x86_64) kills the
process: the filter only knows the native numbers.

libseccomp (Debian's libseccomp2, which apt itself depends on) resolves the
syscall names for this architecture and assembles the BPF program; this
module only declares the rules, through ctypes (the PyPI bindings are either
unmaintained or hand-assemble BPF). The program is compiled once per process
and handed to bubblewrap in a memfd for every job (`bwrap --seccomp FD`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

from gristmill.sandbox.base import SandboxUnavailable

LIBRARY = "libseccomp.so.2"

# Calls a job never needs: each fails with EPERM.
DENIED = (
    # filesystems and mounts
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "swapon", "swapoff", "quotactl",
    "quotactl_fd", "open_by_handle_at", "name_to_handle_at",
    # other processes' memory and state
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "process_madvise",
    # the kernel: keyring, BPF, perf, modules, kexec, reboot, clocks, logs, io ports
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "init_module",
    "finit_module", "delete_module", "create_module", "kexec_load", "kexec_file_load",
    "reboot", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog",
    "iopl", "ioperm", "vhangup", "uselib", "lookup_dcookie", "nfsservctl", "fanotify_init",
    "userfaultfd",
    # io_uring: a large kernel surface that runtimes fall back from
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # namespaces (unshare and clone: only with a CLONE_NEW* flag, below)
    "setns",
)
# clone3 takes its flags in memory a filter cannot read: ENOSYS makes glibc fall back to
# clone, whose flags it can.
UNSUPPORTED = ("clone3",)
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
CLONE_NEWTIME = 0x00000080  # unshare only: in clone's flags this bit is part of the signal
# ioctls that push input into the terminal of whoever started the job.
TIOCSTI, TIOCLINUX = 0x5412, 0x541C

_ACT_ALLOW = 0x7FFF0000
_ACT_KILL_PROCESS = 0x80000000
_ATTR_ACT_BADARCH = 2
_CMP_MASKED_EQ = 7
_NR_ERROR = -1


def _errno(number: int) -> int:
    return 0x00050000 | number


class _ArgCompare(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as exc:
        raise SandboxUnavailable(f"libseccomp not found ({exc}); install it with: "
                                 f"apt-get install -y libseccomp2") from None
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.restype = None
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_attr_set.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCompare)]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    return lib


class _Filter:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.ctx = lib.seccomp_init(_ACT_ALLOW)
        if not self.ctx:
            raise SandboxUnavailable("libseccomp could not create a filter (seccomp_init)")
        self._check(lib.seccomp_attr_set(self.ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS),
                    "setting the foreign-architecture action")

    def _check(self, result: int, what: str) -> None:
        if result < 0:
            raise SandboxUnavailable(f"libseccomp failed {what}: {os.strerror(-result)}")

    def deny(self, name: str, action: int, arg: int | None = None, mask: int = 0,
             value: int = 0) -> bool:
        """Add a rule; False when libseccomp does not know the name (too old, or a typo)."""
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        if number == _NR_ERROR:
            return False
        compares = (_ArgCompare * 1)()
        count = 0
        if arg is not None:
            compares[0] = _ArgCompare(arg, _CMP_MASKED_EQ, mask, value)
            count = 1
        # A call this architecture lacks has a negative pseudo-number, which libseccomp
        # accepts and leaves out of the program.
        self._check(self.lib.seccomp_rule_add_array(self.ctx, action, number, count, compares),
                    f"adding the rule for {name}")
        return True

    def export(self) -> bytes:
        fd = os.memfd_create("gristmill-seccomp")
        try:
            self._check(self.lib.seccomp_export_bpf(self.ctx, fd), "exporting the filter")
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)

    def release(self) -> None:
        self.lib.seccomp_release(self.ctx)


@functools.cache
def job_filter() -> bytes:
    """The compiled BPF program for jobs, built once per process."""
    lib = _library()
    rules = _Filter(lib)
    try:
        eperm = _errno(errno.EPERM)
        for name in DENIED:
            rules.deny(name, eperm)
        for name in UNSUPPORTED:
            rules.deny(name, _errno(errno.ENOSYS))
        for flag in NAMESPACE_FLAGS.values():
            rules.deny("unshare", eperm, arg=0, mask=flag, value=flag)
            rules.deny("clone", eperm, arg=0, mask=flag, value=flag)
        rules.deny("unshare", eperm, arg=0, mask=CLONE_NEWTIME, value=CLONE_NEWTIME)
        for request in (TIOCSTI, TIOCLINUX):
            rules.deny("ioctl", eperm, arg=1, mask=0xFFFFFFFF, value=request)
        return rules.export()
    finally:
        rules.release()


def filter_fd() -> int:
    """A file descriptor holding the job filter, for one bwrap, which reads it to its end
    (a memfd: a pipe's capacity can be as small as a page)."""
    fd = os.memfd_create("gristmill-seccomp")
    try:
        os.write(fd, job_filter())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
