"""The watcher of the two fallback backends: per-page state kept in user space
by native/tracking.c (one range per reservation, one state byte per page)."""

from __future__ import annotations

import errno
from typing import Any

import numpy as np

from writewatch import kernel
from writewatch.kernel import check, ffi, lib, oserror


class TrackedWatcher(kernel.Watcher):
    def __init__(self, base: int, size: int, mode: int) -> None:
        # An opaque 64-bit handle (no cap on how many ranges there are).
        self.handle = check(lib.ww_track_attach(base, size, mode), "write-watch range table")

    def watch(self, start: int, length: int, prot: int, *, clean: bool = True) -> None:
        check(lib.ww_track_watch(self.handle, start, length, prot, clean), "watch")

    def unwatch(self, start: int, length: int) -> None:
        check(lib.ww_track_unwatch(self.handle, start, length), "unwatch")

    def protect(self, start: int, length: int, prot: int) -> None:
        check(lib.ww_track_protect(self.handle, start, length, prot), "mprotect")

    def get_write_watch(self, spans: kernel.Spans, first: int, last: int, reset: bool,
                        out: np.ndarray, capacity: int) -> int:
        return check(lib.ww_track_get_write_watch(
            self.handle, spans.array, spans.count, first, last, reset,
            kernel.output_pointer(out, capacity), capacity), "GetWriteWatch scan")

    def prepare_kernel_write(self, start: int, length: int) -> None:
        check(lib.ww_track_prepare_write(self.handle, start, length), "prepare_kernel_write")

    def detach(self) -> None:
        check(lib.ww_track_detach(self.handle), "detach")

    def native_handle(self) -> tuple[int, int]:
        return lib.WW_INDEX_TRACKED, self.handle


def watches(mode: int, address: int) -> bool:
    """Is address in a range tracked in mode (WW_MODE_MPROTECT or WW_MODE_UFFD)?"""
    return bool(lib.ww_track_mode_at(address) == mode)


def region_memwatch(mode: int, start: int, end: int, get: bool, clear: bool, out: Any,
                    capacity: int) -> int:
    """process_memwatch on memory tracked in mode, found, checked and scanned in
    one native access (a release racing it waits for it); the result is a
    count or -errno, for memwatch.py to word."""
    result = int(lib.ww_track_memwatch(mode, start, end, get, clear, out, capacity))
    if result == -errno.EINVAL:
        raise oserror(errno.EINVAL, f"[{start:#x}, {end:#x}) is not all watched memory")
    return result


def memwatch_any(mode: int, start: int, end: int, flags: int, out: Any, capacity: int) -> int:
    """process_memwatch (the proposal's flags) over any private anonymous memory
    of this process in [start, end), watched in mode from its first call on
    (native/foreign.c): the count, or -errno for memwatch.py to decode; a
    refusal raises OSError(EINVAL) with its reason."""
    result = int(lib.ww_track_memwatch_any(mode, start, end, flags, out, capacity))
    if result == -errno.EINVAL:
        check(result, _reason(result, "process_memwatch"))
    return result


def memwatch_unwatch(mode: int, start: int, end: int) -> None:
    """Stop watching [start, end): armed pages get back the protection their
    mapping had, and the memory is left as it was."""
    result = int(lib.ww_track_memwatch_unwatch(mode, start, end))
    check(result, _reason(result, "process_memwatch unwatch"))


def _reason(result: int, what: str) -> str:
    return refusal_reason(what) if result == -errno.EINVAL else what


def refusal_reason(what: str) -> str:
    """Why this thread's last foreign-memory call was refused (what, if unsaid)."""
    return ffi.string(lib.ww_memwatch_reason()).decode() or what
