"""The pagemap backend: userfaultfd async write-protect + PAGEMAP_SCAN (Linux 6.7+).

The kernel keeps the written state in the page tables: a page reads written
once its page-table entry lost the write-protect bit, a first write costs one
minor fault and no context switch, and PAGEMAP_SCAN reads and re-arms pages in
one walk (native/pagemap.c).
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from writewatch import kernel

if TYPE_CHECKING:
    from writewatch.kernel import Capabilities

from writewatch.kernel import check, ffi, lib, oserror

FEATURES = lib.UFFD_FEATURE_WP_ASYNC | lib.UFFD_FEATURE_WP_UNPOPULATED


class _Descriptors(kernel.PerProcess):
    """This process's async userfaultfd and its /proc/self/pagemap."""

    def open(self) -> tuple[int, ...]:
        uffd = kernel.open_uffd()
        try:
            kernel.uffd_enable_features(uffd, FEATURES)
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(uffd)
            raise
        return uffd, pagemap


class PagemapBackend(kernel.Backend):
    """userfaultfd async write-protect + PAGEMAP_SCAN (Linux 6.7+): the kernel
    keeps the written state in the page tables; a first write costs one minor
    fault and no context switch."""

    name = "pagemap"
    summary = "userfaultfd async write-protect + PAGEMAP_SCAN"
    preference = 3
    operation = "PAGEMAP_SCAN"

    def __init__(self) -> None:
        self.descriptors = _Descriptors()

    def unavailable_reason(self, caps: Capabilities) -> str:
        return "" if caps.pagemap_backend else caps.pagemap_backend_detail

    @property
    def uffd(self) -> int:
        return self.descriptors.get()[0]

    @property
    def pagemap_fd(self) -> int:
        return self.descriptors.get()[1]

    def attach(self, base: int, size: int) -> kernel.Watcher:
        return _PagemapWatcher(self)

    def forget_process_state(self) -> None:
        self.descriptors.forget()

    def watches(self, address: int) -> bool:
        # Asked last (memwatch.py): the tracked backends know their ranges,
        # the kernel knows this backend's, and region_memwatch asks it.
        return True

    def region_memwatch(self, start: int, end: int, get: bool, clear: bool, out: Any,
                        capacity: int) -> int:
        return memwatch_scan(self.pagemap_fd, start, end, get, clear, out, capacity)

    def process_memwatch(self, start: int, end: int, flags: int, out: Any,
                         capacity: int) -> int:
        uffd, pagemap_fd = self.descriptors.get()
        why = refusal_struct()
        result = int(lib.ww_memwatch(uffd, pagemap_fd, start, end, flags, out, capacity, why))
        if result == -errno.EINVAL:
            raise oserror(errno.EINVAL, refusal_text(why))
        return result

    def memwatch_handle(self) -> tuple[int, int, int]:
        uffd, pagemap_fd = self.descriptors.get()
        return lib.WW_INDEX_PAGEMAP, uffd, pagemap_fd

    def memwatch_unwatch(self, start: int, end: int) -> None:
        uffd, pagemap_fd = self.descriptors.get()
        check(lib.ww_memwatch_unwatch(uffd, pagemap_fd, start, end), "UFFDIO_UNREGISTER")


_per_thread = threading.local()


def refusal_struct() -> Any:
    """This thread's struct ww_memwatch_refusal (one allocation per thread,
    not per call: the fast path is one native call)."""
    why = getattr(_per_thread, "why", None)
    if why is None:
        why = _per_thread.why = ffi.new("struct ww_memwatch_refusal *")
    return why


def refusal_text(why: Any) -> str:
    """Words for a mapping process_memwatch refused (docs/semantics.md rule M17)."""
    name = ffi.string(why.name).decode(errors="replace") or "[unknown]"
    where = f"{name} at [{why.start:#x}, {why.end:#x})"
    if why.err == 0:
        return (f"{where} cannot be watched: the kernel's page walk skips it (VM_PFNMAP "
                "device memory keeps no write state), or it was mapped during the call")
    if why.err == -errno.EAGAIN:
        return f"{where}: the mappings kept changing during the call"
    return (f"{where} cannot be watched: the kernel refused to register it for "
            f"write-protect ({kernel.errno_words(-why.err)})")


def memwatch_scan(pagemap_fd: int, start: int, end: int, get: bool, clear: bool, out: Any,
                  capacity: int) -> int:
    """process_memwatch through a pagemap descriptor (this process's, or another
    one's): EINVAL unless every mapping of [start, end) is registered for async
    write-protect, checked before anything is read or cleared (docs/semantics.md
    rules M12, K13); then the scan's count or -errno."""
    checked = lib.ww_pagemap_check_watched(pagemap_fd, start, end)
    if checked == -errno.EPERM:
        raise oserror(errno.EINVAL, f"[{start:#x}, {end:#x}) is not all watched memory")
    if checked < 0:
        return int(checked)
    if get:
        walk_end = ffi.new("uint64_t *")
        return int(lib.ww_pagemap_scan(pagemap_fd, start, end, clear, out, capacity, start,
                                       walk_end))
    return int(lib.ww_pagemap_reset(pagemap_fd, start, end))



class _PagemapWatcher(kernel.Watcher):
    def __init__(self, backend: PagemapBackend) -> None:
        self.backend = backend

    def watch(self, start: int, length: int, prot: int, *, clean: bool = True) -> None:
        uffd = self.backend.uffd
        kernel.uffd_register_write_protect(uffd, start, length)
        if clean:
            # Only this range: write-protecting unpopulated memory allocates page
            # tables for all of it, so cost follows what the caller asks to watch.
            check(lib.ww_uffd_writeprotect(uffd, start, length, 1), "UFFDIO_WRITEPROTECT")
        self.protect(start, length, prot)

    def unwatch(self, start: int, length: int) -> None:
        check(lib.ww_uffd_unregister(self.backend.uffd, start, length), "UFFDIO_UNREGISTER")

    def protect(self, start: int, length: int, prot: int) -> None:
        # The write-protect bit survives mprotect, so the written state does too.
        kernel.protect(start, length, prot)

    def get_write_watch(self, spans: kernel.Spans, first: int, last: int, reset: bool,
                        out: np.ndarray, capacity: int) -> int:
        return check(lib.ww_pagemap_get_write_watch(
            self.backend.pagemap_fd, spans.array, spans.count, first, last, reset,
            kernel.output_pointer(out, capacity), capacity), "PAGEMAP_SCAN")

    def native_handle(self) -> tuple[int, int]:
        return lib.WW_INDEX_PAGEMAP, self.backend.pagemap_fd

    def prepare_kernel_write(self, start: int, length: int) -> None:
        # The kernel resolves async write-protect faults of its own writes, but
        # only for the bytes it writes; a read marks its whole buffer (rule 14).
        # MADV_POPULATE_WRITE write-faults every page without changing a byte:
        # the fault clears the uffd-wp bit (or the marker of an unpopulated
        # page), so the page reads as written.
        check(lib.ww_madvise(start, length, kernel.MADV_POPULATE_WRITE),
              "madvise(MADV_POPULATE_WRITE)")
