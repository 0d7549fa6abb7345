"""What this machine supports, as data: probe() finds out without changing
anything, for backend selection and for `python -m writewatch info`."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from writewatch import kernel, sandbox
from writewatch.kernel import ffi, lib


@dataclass(frozen=True)
class KernelFeature:
    """One kernel feature a backend relies on, and whether this machine has it."""

    name: str
    present: bool
    since: str                      # the mainline Linux version that brought it
    required_by: tuple[str, ...]    # backends that are off without it
    optional_for: tuple[str, ...]   # backends that work without it, as purpose says
    purpose: str

    @property
    def role(self) -> str:
        parts = []
        if self.required_by:
            parts.append("required by " + ", ".join(self.required_by))
        if self.optional_for:
            parts.append("optional for " + ", ".join(self.optional_for))
        return "; ".join(parts) or "used by no backend"


@dataclass(frozen=True)
class Capabilities:
    """What the running kernel and sandbox allow. Each *_detail says why."""

    kernel_release: str
    kernel_version: tuple[int, ...]
    userfaultfd: bool
    userfaultfd_detail: str
    wp_async: bool
    wp_unpopulated: bool
    pagemap_scan: bool
    pagemap_scan_detail: str
    soft_dirty: bool
    soft_dirty_detail: str
    unprivileged_userfaultfd: int | None
    seccomp_mode: int | None
    pagemap_backend: bool
    pagemap_backend_detail: str
    uffd_features: int = 0
    features: tuple[KernelFeature, ...] = ()
    max_map_count: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (what `python -m writewatch info --json` prints)."""
        return asdict(self)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _seccomp_mode() -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^Seccomp:\s*(\d+)", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _kernel_version(release: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    return tuple(int(part or 0) for part in match.groups()) if match else ()


def _probe_userfaultfd(unprivileged: int | None, seccomp: int | None) -> tuple[bool, str, int]:
    try:
        fd = kernel.open_uffd()
    except OSError as exc:
        # What denies it (a seccomp filter, the sysctl, a security module) and
        # how to allow it: sandbox.py.
        return False, sandbox.userfaultfd_denial(exc.errno or 0).detail, 0
    os.close(fd)
    try:
        features = kernel.uffd_offered_features()
    except OSError as exc:
        return False, f"UFFDIO_API failed: {exc.strerror}", 0
    return True, "userfaultfd available", features


def _probe_pagemap_scan() -> tuple[bool, str]:
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/proc/self/pagemap cannot be opened: {exc.strerror}"
    try:
        arg = ffi.new("struct pm_scan_arg *")
        arg.size = ffi.sizeof("struct pm_scan_arg")
        arg.start = arg.end = 0
        arg.category_mask = arg.return_mask = lib.PAGE_IS_WRITTEN
        result = lib.ww_pagemap_raw(fd, arg)
    finally:
        os.close(fd)
    if result == -errno.ENOTTY:
        return False, "no PAGEMAP_SCAN ioctl (needs Linux 6.7 or newer)"
    if result < 0:
        return False, f"PAGEMAP_SCAN failed: {os.strerror(-result)}"
    return True, "PAGEMAP_SCAN available"


def _probe_soft_dirty() -> tuple[bool, str]:
    # Every new mapping carries VM_SOFTDIRTY, shown as "sd" in smaps' VmFlags only
    # when the kernel has CONFIG_MEM_SOFT_DIRTY: a probe with no side effect
    # (clearing soft-dirty bits would touch the whole process).
    try:
        with open("/proc/self/smaps") as f:
            flags = [line for line in f if line.startswith("VmFlags:")]
    except OSError as exc:
        return False, f"/proc/self/smaps cannot be read: {exc.strerror}"
    if any(" sd" in line for line in flags):
        return True, "soft-dirty bits available (CONFIG_MEM_SOFT_DIRTY)"
    return False, "kernel built without CONFIG_MEM_SOFT_DIRTY"


def _probe_madvise(advice: int) -> bool:
    """Does madvise know this advice? Tried on a page of our own, never touched."""
    size = kernel.PAGE_SIZE
    address = lib.ww_mmap(0, size, kernel.PROT_READ | kernel.PROT_WRITE,
                          0x22)  # MAP_PRIVATE | MAP_ANONYMOUS
    if address < 0:
        return False
    try:
        return bool(lib.ww_madvise(address, size, advice) == 0)
    finally:
        lib.ww_munmap(address, size)


def _probe_scan_category(category: int) -> bool:
    """Does PAGEMAP_SCAN accept this category bit? Unknown bits are EINVAL."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        arg = ffi.new("struct pm_scan_arg *")
        arg.size = ffi.sizeof("struct pm_scan_arg")
        arg.category_mask = arg.return_mask = category
        return bool(lib.ww_pagemap_raw(fd, arg) >= 0)
    finally:
        os.close(fd)


def _user_mode_only() -> bool:
    fd = lib.ww_uffd_open(kernel.UFFD_OPEN_FLAGS | lib.UFFD_USER_MODE_ONLY)
    if fd < 0:
        return False
    os.close(fd)
    return True


def _features(uffd_ok: bool, offered: int, scan_ok: bool) -> tuple[KernelFeature, ...]:
    """The kernel features each backend relies on (docs/semantics.md K26)."""
    def uffd(bit: int) -> bool:
        return uffd_ok and bool(offered & bit)

    return (
        KernelFeature("userfaultfd", uffd_ok, "4.3", ("pagemap", "uffd"), (),
                      "the page faults both userfaultfd backends are built on"),
        KernelFeature("UFFD write-protect", uffd(lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP), "5.7",
                      ("pagemap", "uffd"), (), "write-protected pages fault on their first write"),
        KernelFeature("UFFD WP_UNPOPULATED", uffd(lib.UFFD_FEATURE_WP_UNPOPULATED), "6.4",
                      ("pagemap",), ("uffd",),
                      "protects never-touched pages; without it the uffd backend populates "
                      "pages before protecting them"),
        KernelFeature("UFFD WP_ASYNC", uffd(lib.UFFD_FEATURE_WP_ASYNC), "6.7", ("pagemap",), (),
                      "the kernel resolves write-protect faults itself, with no handler"),
        KernelFeature("PAGEMAP_SCAN", scan_ok, "6.7", ("pagemap",), (),
                      "reads and re-arms written pages in one page-table walk"),
        KernelFeature("UFFD_USER_MODE_ONLY", uffd_ok and _user_mode_only(), "5.11", (),
                      ("uffd",), "opens userfaultfd without privilege (then the kernel's own "
                      "writes need prepare_kernel_write)"),
        KernelFeature("UFFD THREAD_ID", uffd(lib.UFFD_FEATURE_THREAD_ID), "4.14", (), ("uffd",),
                      "tells the handler thread which thread faulted, so a signal handler's "
                      "store never waits for a thread stopped in a fault"),
        KernelFeature("MADV_POPULATE_WRITE", _probe_madvise(kernel.MADV_POPULATE_WRITE), "5.14",
                      (), ("pagemap", "uffd"),
                      "prepare_kernel_write marks pages without changing them (pagemap); "
                      "populates pages before protecting them (uffd, else touched one by one)"),
        KernelFeature("PAGE_IS_SOFT_DIRTY category", scan_ok
                      and _probe_scan_category(lib.PAGE_IS_SOFT_DIRTY), "6.8", (), (),
                      "probed, not assumed, and not used: soft-dirty clears whole processes"),
        KernelFeature("SIGSEGV handlers", True, "any", ("mprotect",), (),
                      "the first write to a read-only page is recorded by a signal handler"),
    )


def probe() -> Capabilities:
    """Find out, without changing anything, what this machine supports."""
    release = os.uname().release
    version = _kernel_version(release)
    unprivileged = _read_int("/proc/sys/vm/unprivileged_userfaultfd")
    seccomp = _seccomp_mode()
    uffd_ok, uffd_detail, features = _probe_userfaultfd(unprivileged, seccomp)
    wp_async = bool(features & lib.UFFD_FEATURE_WP_ASYNC)
    wp_unpopulated = bool(features & lib.UFFD_FEATURE_WP_UNPOPULATED)
    scan_ok, scan_detail = _probe_pagemap_scan()
    sd_ok, sd_detail = _probe_soft_dirty()

    missing = []
    if not uffd_ok:
        missing.append(uffd_detail)
    elif not (wp_async and wp_unpopulated):
        missing.append("userfaultfd lacks WP_ASYNC/WP_UNPOPULATED (needs Linux 6.7 or newer)")
    if not scan_ok:
        missing.append(scan_detail)
    backend_ok = not missing
    backend_detail = ("userfaultfd async write-protect + PAGEMAP_SCAN" if backend_ok
                      else "; ".join(missing))
    return Capabilities(
        kernel_release=release,
        kernel_version=version,
        userfaultfd=uffd_ok,
        userfaultfd_detail=uffd_detail,
        wp_async=wp_async,
        wp_unpopulated=wp_unpopulated,
        pagemap_scan=scan_ok,
        pagemap_scan_detail=scan_detail,
        soft_dirty=sd_ok,
        soft_dirty_detail=sd_detail,
        unprivileged_userfaultfd=unprivileged,
        seccomp_mode=seccomp,
        pagemap_backend=backend_ok,
        pagemap_backend_detail=backend_detail,
        uffd_features=features,
        features=_features(uffd_ok, features, scan_ok),
        max_map_count=_read_int("/proc/sys/vm/max_map_count"),
    )
