"""The uffd backend: synchronous userfaultfd write-protect (Linux 5.7+).

Each first write to an armed page blocks until a native handler thread
(native/tracking_faults.c) records it and removes the protection, which also wakes
the writer. The handler must be native: a Python one would wait for the GIL
that the faulting thread may hold.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from writewatch import kernel
from writewatch.backends import _tracked

if TYPE_CHECKING:
    from writewatch.kernel import Capabilities

from writewatch.kernel import check, ffi, lib, oserror


class _Descriptor(kernel.PerProcess):
    """The backend's userfaultfd and its handler thread for this process."""

    features = 0
    kernel_faults = False  # do the kernel's own writes reach the handler thread?

    def open(self) -> tuple[int, ...]:
        # The userfaultfd, its features and the handler thread, started as
        # libprocess_memwatch starts them (native/mechanism.c).
        features = ffi.new("uint64_t *")
        kernel_faults = ffi.new("int *")
        uffd = check(lib.ww_uffd_mechanism_start(features, kernel_faults), "userfaultfd")
        self.features = int(features[0])
        self.kernel_faults = bool(kernel_faults[0])
        return (uffd,)


class UffdBackend(kernel.Backend):
    """userfaultfd synchronous write-protect (Linux 5.7+) with a native handler
    thread: each first write blocks until the thread records it and removes
    the protection."""

    name = "uffd"
    summary = "userfaultfd write-protect + handler thread (native)"
    preference = 2
    operation = "userfaultfd write-protect tracking"

    def __init__(self, release_foreign: Callable[[int, int], bool] | None = None) -> None:
        self.descriptor = _Descriptor()
        # Has the backend that registered [start, end) with userfaultfd before
        # (pagemap) stop watching it: True if it did. The registry supplies it,
        # so this backend knows no other.
        self.release_foreign = release_foreign

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
        if (result == -errno.EBUSY and self.release_foreign is not None
                and self.release_foreign(start, end)):
            # The pagemap backend watched this memory (freed since and reused,
            # or watched through both): it stops, and this backend starts afresh.
            result = _tracked.memwatch_any(lib.WW_MODE_UFFD, start, end, flags, out, capacity)
        if result == -errno.EBUSY:
            raise oserror(errno.EINVAL, _tracked.refusal_reason("process_memwatch"))
        return result

    def memwatch_unwatch(self, start: int, end: int) -> None:
        self.descriptor.get()
        _tracked.memwatch_unwatch(lib.WW_MODE_UFFD, start, end)


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
            check(lib.ww_populate_for_write(start, length), "populating pages to protect")
        super().watch(start, length, prot, clean=clean)

    def unwatch(self, start: int, length: int) -> None:
        super().unwatch(start, length)
        (uffd,) = self.backend.descriptor.get()
        check(lib.ww_uffd_unregister(uffd, start, length), "UFFDIO_UNREGISTER")


# Around os.fork(): when the handler thread is the only other thread, it stops
# before the fork and starts again after it in the parent, so the process forks
# single-threaded (Python 3.12 warns "This process is multi-threaded, use of
# fork() may lead to deadlocks" for any thread alive, native ones too; with
# other threads alive the warning is due anyway, and one of them could fault
# while the handler is away: native/tracking.c). The child has no handler to
# restart: it forgets the parent's userfaultfd (docs/semantics.md rule K17).
#
# Python 3.13 counts the threads after the after-fork hooks, when the handler
# runs again, and so warns although the fork ran single-threaded. The handler
# cannot start later than those hooks instead: whatever runs between them and
# that later point (C code that forked, another hook) could write armed memory
# and wait forever for a handler. So when the fork itself ran alone (checked
# inside fork(): ww_uffd_forked_alone), a filter ignores exactly that false
# warning: this process's pid, fork() or forkpty(). The next fork removes it
# first, since its warning may be true (docs/semantics.md rule K24).
_COUNTS_THREADS_AFTER_HOOKS = sys.version_info >= (3, 13)


def _false_fork_warning() -> str:
    """The message of Python's fork warning in this process, as a filter's regex."""
    return (re.escape(f"This process (pid={os.getpid()}) is multi-threaded, use of ")
            + r"fork(pty)?\(\) may lead to deadlocks in the child\.$")


def pause_handler() -> None:
    filters = warnings.filters
    if _COUNTS_THREADS_AFTER_HOOKS and isinstance(filters, list):
        ours = _false_fork_warning()
        filters[:] = [each for each in filters if getattr(each[1], "pattern", None) != ours]
    check(lib.ww_uffd_handler_pause(), "stopping the userfaultfd handler thread")


def resume_handler() -> None:
    check(lib.ww_uffd_handler_resume(), "pthread_create")
    if (_COUNTS_THREADS_AFTER_HOOKS and isinstance(warnings.filters, list)
            and lib.ww_uffd_forked_alone()):
        warnings.filterwarnings("ignore", _false_fork_warning(), DeprecationWarning)
