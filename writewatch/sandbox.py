"""Why userfaultfd is denied here, by what, and how to allow it.

Three things can stand between a process and userfaultfd(2), and each is
lifted in a different place:

- a seccomp filter (``Seccomp: 2`` in /proc/self/status): container runtimes'
  default profiles deny the call (Docker's and Podman's answer EPERM, and
  Docker's allows it for no capability); other sandboxes answer ENOSYS. The
  filter answers before the kernel looks at the arguments, which is how it is
  told apart: userfaultfd with an invalid flag fails with EINVAL when the
  kernel runs it, and with the filter's errno when a filter stops it.
- vm.unprivileged_userfaultfd = 0 without CAP_SYS_PTRACE: since Linux 5.11
  (UFFD_USER_MODE_ONLY) this only keeps faults taken by the kernel's own
  writes away from the handler; before 5.11 it denies userfaultfd outright.
- a security module (SELinux can deny the userfaultfd anon inode), or a
  kernel built without CONFIG_USERFAULTFD.

Nothing here changes the process: every check opens and closes descriptors.
"""

from __future__ import annotations

import errno
import os
from dataclasses import asdict, dataclass
from typing import Any

from writewatch import kernel
from writewatch.kernel import lib, oserror

SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
CAP_SYS_PTRACE = 19
_INVALID_FLAG = os.O_WRONLY  # never a valid userfaultfd flag: the kernel answers EINVAL

SECCOMP_REMEDY = (
    "run the container with a seccomp profile that allows userfaultfd: "
    "docker run --security-opt seccomp=PROFILE.json (podman run takes the same option; "
    "PROFILE.json is the runtime's default profile with userfaultfd added to its allowed "
    "calls; in Kubernetes, a Localhost securityContext.seccompProfile), or without a "
    "filter (--security-opt seccomp=unconfined); adding CAP_SYS_PTRACE does not help, "
    "Docker's default profile allows userfaultfd for no capability. Outside containers, "
    "find the sandbox that installs the filter (systemd SystemCallFilter=, bubblewrap, "
    "...) and allow userfaultfd there"
)
SYSCTL_REMEDY = (
    "sysctl -w vm.unprivileged_userfaultfd=1 (as root; keep it with a file in "
    "/etc/sysctl.d/), or grant the process CAP_SYS_PTRACE"
)


@dataclass(frozen=True)
class Facts:
    """What the diagnosis looks at (gathered by facts(); tests build their own)."""

    kernel_version: tuple[int, ...]
    seccomp_mode: int | None
    unprivileged_userfaultfd: int | None  # None: no such sysctl (no userfaultfd in the kernel)
    cap_sys_ptrace: bool
    invalid_flag_errno: int  # what userfaultfd(UFFD_USER_MODE_ONLY | invalid flag) answered


@dataclass(frozen=True)
class Denial:
    """Something this process may not do with userfaultfd."""

    what: str  # "userfaultfd" or "kernel-mode faults"
    by: str  # "seccomp", "sysctl", "lsm", "kernel" or "unknown"
    detail: str  # one sentence: what is denied, by what
    remedy: str  # how to allow it ("" when nothing can)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def facts() -> Facts:
    seccomp = kernel.proc_status_field("Seccomp")
    capabilities = kernel.proc_status_field("CapEff")
    return Facts(
        kernel_version=kernel.kernel_version(),
        seccomp_mode=int(seccomp) if seccomp is not None else None,
        unprivileged_userfaultfd=kernel.read_proc_int(SYSCTL),
        cap_sys_ptrace=bool(capabilities and int(capabilities, 16) >> CAP_SYS_PTRACE & 1),
        invalid_flag_errno=kernel.uffd_open_errno(
            kernel.UFFD_OPEN_FLAGS | lib.UFFD_USER_MODE_ONLY | _INVALID_FLAG),
    )


def explain(err: int, seen: Facts) -> Denial:
    """Why opening a userfaultfd failed with errno err, given what was seen."""
    name = errno.errorcode.get(err, str(err))
    old_kernel = bool(seen.kernel_version) and seen.kernel_version < (5, 11)
    sysctl_denies = seen.unprivileged_userfaultfd == 0 and not seen.cap_sys_ptrace
    kernel_ran_it = seen.invalid_flag_errno == errno.EINVAL
    if err == errno.ENOSYS and seen.unprivileged_userfaultfd is None and not kernel_ran_it:
        return Denial("userfaultfd", "kernel",
                      "the kernel has no userfaultfd system call (built without "
                      "CONFIG_USERFAULTFD)",
                      "use a kernel built with CONFIG_USERFAULTFD=y")
    if err == errno.EPERM and old_kernel and sysctl_denies:
        return Denial("userfaultfd", "sysctl",
                      "userfaultfd is denied to unprivileged processes: "
                      "vm.unprivileged_userfaultfd = 0, this process lacks CAP_SYS_PTRACE, and "
                      f"Linux {'.'.join(map(str, seen.kernel_version[:2]))} predates "
                      "UFFD_USER_MODE_ONLY (5.11)",
                      SYSCTL_REMEDY + ", or upgrade to Linux 5.11 or newer")
    if not kernel_ran_it and seen.seccomp_mode == 2:
        return Denial("userfaultfd", "seccomp",
                      f"userfaultfd is blocked by a seccomp filter (it fails with {name} "
                      "before the kernel looks at it), as container runtimes' default "
                      "profiles do",
                      SECCOMP_REMEDY)
    if kernel_ran_it and err in (errno.EACCES, errno.EPERM):
        return Denial("userfaultfd", "lsm",
                      f"userfaultfd is denied ({name}) by a security module such as SELinux "
                      "(the kernel accepted the call itself)",
                      "allow this program to create userfaultfd descriptors in the security "
                      "policy (SELinux: see 'ausearch -m avc' for the denial)")
    return Denial("userfaultfd", "unknown", str(oserror(err, "userfaultfd failed").strerror), "")


def userfaultfd_denial(err: int) -> Denial:
    """explain() for this process."""
    return explain(err, facts())


def kernel_faults_denial(seen: Facts | None = None) -> Denial | None:
    """When userfaultfd works here but only for user-mode faults: why, and how
    to allow the kernel's own writes to reach a handler too (None otherwise)."""
    if kernel.uffd_open_errno(kernel.UFFD_OPEN_FLAGS) != errno.EPERM:
        return None
    if kernel.uffd_open_errno(kernel.UFFD_OPEN_FLAGS | lib.UFFD_USER_MODE_ONLY):
        return None  # userfaultfd is denied altogether: userfaultfd_denial says why
    seen = seen or facts()
    if seen.unprivileged_userfaultfd == 0 and not seen.cap_sys_ptrace:
        detail = ("userfaultfd handles user-mode faults only: vm.unprivileged_userfaultfd = 0 "
                  "and this process lacks CAP_SYS_PTRACE")
    else:
        detail = "userfaultfd handles user-mode faults only (opening it without " \
                 "UFFD_USER_MODE_ONLY fails with EPERM)"
    return Denial("kernel-mode faults", "sysctl",
                  detail + "; the uffd backend then cannot track the kernel's own writes "
                  "(read(2) into watched memory needs prepare_kernel_write first)",
                  SYSCTL_REMEDY)


def denials(userfaultfd_errno: int | None) -> list[Denial]:
    """Everything denied here: userfaultfd_errno is how opening it failed
    (None when it opened)."""
    if userfaultfd_errno:
        return [userfaultfd_denial(userfaultfd_errno)]
    limited = kernel_faults_denial()
    return [limited] if limited else []


FALLBACK_MEANS = {
    "uffd": "each first write after a reset blocks until a handler thread records it "
            "(a context switch per page, no PAGEMAP_SCAN); when opened with "
            "UFFD_USER_MODE_ONLY, kernel writes into watched memory (read(2) and friends) "
            "fail with EFAULT unless prepare_kernel_write comes first",
    "mprotect": "watched pages are read-only until written: each first write costs a "
                "SIGSEGV and an mprotect, and kernel writes into watched memory (read(2) "
                "and friends) fail with EFAULT unless prepare_kernel_write comes first; "
                "a thread that blocks SIGSEGV (as many native worker threads block every "
                "signal) dies on its first write to a watched page, so such threads need "
                "the uffd or pagemap backend, or SIGSEGV unblocked",
}


def current_denials() -> list[Denial]:
    """denials() for this process, opening userfaultfd the way the backends do."""
    try:
        os.close(kernel.open_uffd())
    except OSError as exc:
        return denials(exc.errno)
    return denials(None)
