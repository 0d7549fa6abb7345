"""What this machine supports, as data: probe() finds out without changing
anything, for backend selection and for `python -m writewatch info`. The
answer's shape (Capabilities, KernelFeature) is the kernel layer's, which the
backend contract reads."""

from __future__ import annotations

import errno
import os

from writewatch import kernel, sandbox
from writewatch.kernel import Capabilities, KernelFeature, ffi, lib


def _probe_userfaultfd(seen: sandbox.Facts) -> tuple[bool, str, int]:
    try:
        fd = kernel.open_uffd()
    except OSError as exc:
        # What denies it (a seccomp filter, the sysctl, a security module) and
        # how to allow it: sandbox.py.
        return False, sandbox.explain(exc.errno or 0, seen).detail, 0
    os.close(fd)
    try:
        features = kernel.uffd_offered_features()
    except OSError as exc:
        return False, f"UFFDIO_API failed: {exc.strerror}", 0
    return True, "userfaultfd available", features


def _empty_scan(category: int) -> int:
    """PAGEMAP_SCAN over no memory, asking for category: 0, or -errno (ENOTTY
    without the ioctl, EINVAL for category bits it does not know). OSError
    when /proc/self/pagemap cannot be opened."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        arg = ffi.new("struct pm_scan_arg *")  # zeroed: start = end = 0
        arg.size = ffi.sizeof("struct pm_scan_arg")
        arg.category_mask = arg.return_mask = category
        return int(lib.ww_pagemap_raw(fd, arg))
    finally:
        os.close(fd)


def _probe_pagemap_scan() -> tuple[bool, str]:
    try:
        result = _empty_scan(lib.PAGE_IS_WRITTEN)
    except OSError as exc:
        return False, f"/proc/self/pagemap cannot be opened: {exc.strerror}"
    if result == -errno.ENOTTY:
        return False, "no PAGEMAP_SCAN ioctl (needs Linux 6.7 or newer)"
    if result < 0:
        return False, str(kernel.oserror(-result, "PAGEMAP_SCAN failed").strerror)
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
        return _empty_scan(category) >= 0
    except OSError:
        return False


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
        KernelFeature("UFFD_USER_MODE_ONLY", uffd_ok and not kernel.uffd_open_errno(
                          kernel.UFFD_OPEN_FLAGS | lib.UFFD_USER_MODE_ONLY), "5.11", (),
                      ("uffd",), "opens userfaultfd without privilege (then the kernel's own "
                      "writes need prepare_kernel_write)"),
        KernelFeature("UFFD THREAD_ID", uffd(lib.UFFD_FEATURE_THREAD_ID), "4.14", (), ("uffd",),
                      "tells the handler thread which thread faulted, so a signal handler's "
                      "store during a call never waits for its own thread"),
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
    seen = sandbox.facts()
    uffd_ok, uffd_detail, features = _probe_userfaultfd(seen)
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
        kernel_version=seen.kernel_version,
        userfaultfd=uffd_ok,
        userfaultfd_detail=uffd_detail,
        wp_async=wp_async,
        wp_unpopulated=wp_unpopulated,
        pagemap_scan=scan_ok,
        pagemap_scan_detail=scan_detail,
        soft_dirty=sd_ok,
        soft_dirty_detail=sd_detail,
        unprivileged_userfaultfd=seen.unprivileged_userfaultfd,
        seccomp_mode=seen.seccomp_mode,
        pagemap_backend=backend_ok,
        pagemap_backend_detail=backend_detail,
        uffd_features=features,
        features=_features(uffd_ok, features, scan_ok),
        max_map_count=kernel.read_proc_int("/proc/sys/vm/max_map_count"),
    )
