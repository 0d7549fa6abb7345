"""The mprotect backend: armed pages are read-only, and a native SIGSEGV handler
(native/tracking.c) records the first write and gives write access back.

Works on any Linux and in any sandbox; each first write costs a signal and an
mprotect. The kernel cannot write into armed pages (read(2) fails with EFAULT
instead of faulting into a signal handler): call prepare_kernel_write first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from writewatch import kernel
from writewatch.backends import _tracked
from writewatch.kernel import check, lib

if TYPE_CHECKING:
    from writewatch.probe import Capabilities


class MprotectBackend(kernel.Backend):
    """Armed pages are read-only; a native SIGSEGV handler records the first
    write and gives write access back. Works on any Linux; each first write
    costs a signal and an mprotect. The kernel cannot write into armed pages
    (read(2) fails with EFAULT): call prepare_kernel_write first."""

    name = "mprotect"
    summary = "mprotect + SIGSEGV handler (native)"
    preference = 1

    def unavailable_reason(self, caps: Capabilities) -> str:
        return ""

    def kernel_writes_fault(self) -> bool:
        return True  # the kernel does not fault into a signal handler

    def attach(self, base: int, size: int) -> kernel.Watcher:
        check(lib.ww_segv_install(), "sigaction(SIGSEGV)")
        watcher = _tracked.TrackedWatcher(base, size, lib.WW_MODE_MPROTECT)
        # A forked child inherits the handler, the state and the protections.
        watcher.survives_fork = True
        return watcher

    def watches(self, address: int) -> bool:
        return _tracked.watches(lib.WW_MODE_MPROTECT, address)

    def process_memwatch(self, start: int, end: int, get: bool, clear: bool, out: Any,
                         capacity: int) -> int:
        return _tracked.process_memwatch(start, end, get, clear, out, capacity)
