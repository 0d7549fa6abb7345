"""The uffd backend: synchronous userfaultfd write-protect (Linux 5.7+).

Each first write to an armed page blocks until a native handler thread
(native/tracking.c) records it and removes the protection, which also wakes
the writer. The handler must be native: a Python one would wait for the GIL
that the faulting thread may hold.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from writewatch import kernel
from writewatch.backends import _tracked

if TYPE_CHECKING:
    from writewatch.probe import Capabilities

from writewatch.kernel import check, lib, oserror


class _Descriptor(kernel.PerProcess):
    """The backend's userfaultfd and its handler thread for this process."""

    features = 0
    kernel_faults = False  # do the kernel's own writes reach the handler thread?

    def open(self) -> tuple[int, ...]:
        # Without UFFD_USER_MODE_ONLY, faults taken by the kernel's own writes
        # (read(2) into watched memory) reach the handler thread too; it needs
        # privilege (or vm.unprivileged_userfaultfd = 1), so fall back to it.
        try:
            uffd = kernel.open_uffd(user_mode_only=False)
            self.kernel_faults = True
        except PermissionError:
            uffd = kernel.open_uffd()
            self.kernel_faults = False
        try:
            offered = kernel.uffd_offered_features()
            # THREAD_ID lets the handler thread see that a lock holder is itself
            # stopped in a fault, and not wait for it (native/tracking.c).
            wanted = (lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
                      | offered & (lib.UFFD_FEATURE_WP_UNPOPULATED | lib.UFFD_FEATURE_THREAD_ID))
            self.features = kernel.uffd_enable_features(uffd, wanted) & wanted
            check(lib.ww_uffd_handler_start(uffd), "pthread_create")
            lib.ww_memwatch_use_uffd(uffd, self.features)
        except OSError:
            os.close(uffd)
            raise
        return (uffd,)


class UffdBackend(kernel.Backend):
    """userfaultfd synchronous write-protect (Linux 5.7+) with a native handler
    thread: each first write blocks until the thread records it and removes
    the protection."""

    name = "uffd"
    summary = "userfaultfd write-protect + handler thread (native)"
    preference = 2

    def __init__(self) -> None:
        self.descriptor = _Descriptor()

    def unavailable_reason(self, caps: Capabilities) -> str:
        if not caps.userfaultfd:
            return caps.userfaultfd_detail
        if not caps.uffd_features & lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            return "userfaultfd has no write-protect mode (needs Linux 5.7 or newer)"
        return ""

    def attach(self, base: int, size: int) -> kernel.Watcher:
        return _UffdWatcher(self, base, size)

    def kernel_writes_fault(self) -> bool:
        self.descriptor.get()
        return not self.descriptor.kernel_faults

    def forget_process_state(self) -> None:
        self.descriptor.forget()

    def watches(self, address: int) -> bool:
        return _tracked.watches(lib.WW_MODE_UFFD, address)

    def region_memwatch(self, start: int, end: int, get: bool, clear: bool, out: Any,
                        capacity: int) -> int:
        return _tracked.region_memwatch(lib.WW_MODE_UFFD, start, end, get, clear, out,
                                        capacity)

    def process_memwatch(self, start: int, end: int, flags: int, out: Any,
                         capacity: int) -> int:
        self.descriptor.get()  # this process's descriptor and handler thread
        result = _tracked.memwatch_any(lib.WW_MODE_UFFD, start, end, flags, out, capacity)
        if result == -errno.EBUSY and _release_from_pagemap(start, end):
            # The pagemap backend watched this memory (freed since and reused,
            # or watched through both): it stops, and this backend starts afresh.
            result = _tracked.memwatch_any(lib.WW_MODE_UFFD, start, end, flags, out, capacity)
        if result == -errno.EBUSY:
            raise oserror(errno.EINVAL, _tracked.refusal_reason("process_memwatch"))
        return result

    def memwatch_unwatch(self, start: int, end: int) -> None:
        self.descriptor.get()
        _tracked.memwatch_unwatch(lib.WW_MODE_UFFD, start, end)


def _release_from_pagemap(start: int, end: int) -> bool:
    """Have the pagemap backend stop watching [start, end) if it runs here."""
    from writewatch import backends  # the registry imports this module

    if backends.backend_status().get("pagemap"):
        return False
    try:
        backends.backend("pagemap").memwatch_unwatch(start, end)
    except OSError:
        return False
    return True


class _UffdWatcher(_tracked.TrackedWatcher):
    def __init__(self, backend: UffdBackend, base: int, size: int) -> None:
        super().__init__(base, size, lib.WW_MODE_UFFD)
        self.backend = backend

    def watch(self, start: int, length: int, prot: int, *, clean: bool = True) -> None:
        (uffd,) = self.backend.descriptor.get()
        kernel.uffd_register_write_protect(uffd, start, length)
        if not self.backend.descriptor.features & lib.UFFD_FEATURE_WP_UNPOPULATED:
            # Write-protecting an empty page table entry does nothing before
            # Linux 6.4: fault the pages in first so the protection sticks, now
            # or at a later reset (pages committed already written, clean=False,
            # are armed by their first reset: a latched page recommitted).
            kernel.protect(start, length, kernel.PROT_READ | kernel.PROT_WRITE)
            if lib.ww_madvise(start, length, kernel.MADV_POPULATE_WRITE) < 0:
                lib.ww_touch_for_write(start, length)
        super().watch(start, length, prot, clean=clean)

    def unwatch(self, start: int, length: int) -> None:
        super().unwatch(start, length)
        (uffd,) = self.backend.descriptor.get()
        check(lib.ww_uffd_unregister(uffd, start, length), "UFFDIO_UNREGISTER")
