"""The mprotect backend: armed pages are read-only, and a native SIGSEGV handler
(native/tracking_faults.c) records the first write and gives write access back.

Works on any Linux and in any sandbox; each first write costs a signal and an
mprotect. Its limits, which follow from the mechanism:
- The kernel cannot write into armed pages (read(2) fails with EFAULT instead
  of faulting into a signal handler): call prepare_kernel_write first.
- A thread that blocks SIGSEGV (many native library worker threads block all
  signals), or a signal handler whose mask blocks it, cannot take the fault:
  the kernel then kills the process. Write watched memory from such threads
  only on the uffd or pagemap backend, or unblock SIGSEGV in them.
- writewatch's SIGSEGV handler must come first. It keeps that place through
  faulthandler.enable()/disable() and signal.signal(SIGSEGV, ...) at any time,
  and takes it back at the next write-watch call from a native handler
  installed later; until then that handler sees the tracked writes.
"""

from __future__ import annotations

import faulthandler
import functools
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from writewatch import kernel
from writewatch.backends import _tracked
from writewatch.kernel import check, lib

if TYPE_CHECKING:
    from writewatch.kernel import Capabilities

F = TypeVar("F", bound=Callable[..., Any])
_wrapped = False
_wrap_lock = threading.Lock()


def _then_reassert(function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        finally:
            lib.ww_segv_install()  # in front again; what was installed is chained to
    return wrapper  # type: ignore[return-value]


def _keep_handler_first() -> None:
    """Wrap the ways Python code changes the SIGSEGV disposition, so that each
    puts writewatch's handler back in front: a late faulthandler.enable() would
    otherwise make the next tracked write fatal, faulthandler.disable() would
    bring SIG_DFL back, and signal.signal(SIGSEGV, f) would make it fault
    forever."""
    global _wrapped
    with _wrap_lock:
        if _wrapped:
            return
        _wrapped = True
        faulthandler.enable = _then_reassert(faulthandler.enable)
        faulthandler.disable = _then_reassert(faulthandler.disable)
        signal.signal = _then_reassert(signal.signal)


class MprotectBackend(kernel.Backend):
    """Armed pages are read-only; a native SIGSEGV handler records the first
    write and gives write access back. Works on any Linux; each first write
    costs a signal and an mprotect. The kernel cannot write into armed pages
    (read(2) fails with EFAULT): call prepare_kernel_write first."""

    name = "mprotect"
    summary = "mprotect + SIGSEGV handler (native)"
    preference = 1
    operation = "mprotect tracking"

    def unavailable_reason(self, caps: Capabilities) -> str:
        return ""

    def kernel_writes_fault(self) -> bool:
        return True  # the kernel does not fault into a signal handler

    def attach(self, base: int, size: int) -> kernel.Watcher:
        _keep_handler_first()
        check(lib.ww_segv_install(), "sigaction(SIGSEGV)")
        watcher = _tracked.TrackedWatcher(base, size, lib.WW_MODE_MPROTECT)
        # A forked child inherits the handler, the state and the protections.
        watcher.survives_fork = True
        return watcher

    def watches(self, address: int) -> bool:
        return _tracked.watches(lib.WW_MODE_MPROTECT, address)

    def region_memwatch(self, start: int, end: int, get: bool, clear: bool, out: Any,
                        capacity: int) -> int:
        return _tracked.region_memwatch(lib.WW_MODE_MPROTECT, start, end, get, clear, out,
                                        capacity)

    def process_memwatch(self, start: int, end: int, flags: int, out: Any,
                         capacity: int) -> int:
        _keep_handler_first()
        check(lib.ww_segv_install(), "sigaction(SIGSEGV)")
        return _tracked.memwatch_any(lib.WW_MODE_MPROTECT, start, end, flags, out, capacity)

    def memwatch_unwatch(self, start: int, end: int) -> None:
        _tracked.memwatch_unwatch(lib.WW_MODE_MPROTECT, start, end)
