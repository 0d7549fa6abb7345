"""process_memwatch: the system call proposed for write watch (see
docs/semantics.md, rules M1-M20): on any memory of the calling process, and on
memory another process watches.

It was proposed on the Linux kernel mailing list in 2022 and never merged; its
ideas landed in Linux 6.7 as PAGEMAP_SCAN with userfaultfd async write-protect,
which the pagemap backend uses. Here it works on every backend for the calling
process, and through /proc/PID/pagemap for another process.
"""

from __future__ import annotations

import errno
import operator
import os
import re
import signal
from enum import IntFlag
from typing import Any

import numpy as np

from writewatch import backends, kernel
from writewatch.backends.pagemap import memwatch_scan, refusal_struct, refusal_text
from writewatch.kernel import PAGE_MASK, check, ffi, lib, oserror


class MemwatchFlags(IntFlag):
    """process_memwatch flags, as the proposal's uapi/linux/memwatch.h has them."""

    MEMWATCH_SD_GET = 0x1
    MEMWATCH_SD_CLEAR = 0x2
    MEMWATCH_SD_NO_REUSED_REGIONS = 0x4


MEMWATCH_SD_GET = MemwatchFlags.MEMWATCH_SD_GET
MEMWATCH_SD_CLEAR = MemwatchFlags.MEMWATCH_SD_CLEAR
MEMWATCH_SD_NO_REUSED_REGIONS = MemwatchFlags.MEMWATCH_SD_NO_REUSED_REGIONS
# Plain ints: IntFlag arithmetic costs a Python call per operator.
_GET = int(MEMWATCH_SD_GET)
_CLEAR = int(MEMWATCH_SD_CLEAR)

def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to (EINVAL if it is none, ESRCH if it exited)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as info:
            match = re.search(r"^Pid:\s*(-?\d+)", info.read(), re.MULTILINE)
    except OSError as exc:
        raise oserror(errno.EINVAL, f"pidfd {pidfd} is not an open descriptor") from exc
    if match is None:
        raise oserror(errno.EINVAL, f"descriptor {pidfd} is not a pidfd")
    pid = int(match.group(1))
    if pid <= 0:
        raise oserror(errno.ESRCH, f"the process of pidfd {pidfd} has exited")
    return pid


def _target_pagemap(pidfd: int) -> int:
    """Open the pagemap of the process pidfd refers to; ESRCH if it is gone or the
    caller may not inspect it (the kernel checks ptrace read access)."""
    pid = _pidfd_pid(pidfd)
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise oserror(errno.ESRCH, f"cannot access process {pid} ({exc.strerror})") from exc
    try:
        # The process was alive after the open, so pid was not reused meanwhile.
        signal.pidfd_send_signal(pidfd, 0)
    except OSError as exc:
        os.close(fd)
        raise oserror(errno.ESRCH, f"process {pid} exited") from exc
    return fd


_INT64 = np.dtype(np.int64)
_UINT64S = ffi.typeof("uint64_t[]")
_from_buffer = ffi.from_buffer
_2_32, _2_64 = 1 << 32, 1 << 64


def _vec_pointer(vec: Any, vec_len: int | None) -> tuple[Any, int]:
    if (not isinstance(vec, np.ndarray) or vec.ndim != 1
            or (vec.dtype is not _INT64 and vec.dtype != _INT64)):
        raise oserror(errno.EINVAL, "vec must be a 1-D numpy int64 array")
    if vec_len is None:
        vec_len = len(vec)
    if not 0 < vec_len <= len(vec):
        raise oserror(errno.EINVAL, f"vec_len {vec_len} must be 1..len(vec) ({len(vec)})")
    try:
        # cffi checks contiguity and writability (the third argument) in one step.
        return _from_buffer(_UINT64S, vec, True), vec_len
    except (TypeError, ValueError, BufferError) as exc:  # cffi's words for either
        raise oserror(errno.EINVAL, "vec must be contiguous and writable") from exc


# Words for the native checks' refusals (all EINVAL, rule M11).
_BAD_ARGUMENTS = {
    lib.WW_MEMWATCH_BAD_FLAGS: "invalid process_memwatch flags {flags!r}",
    lib.WW_MEMWATCH_NO_VEC: "GET needs a vec with room",
    lib.WW_MEMWATCH_UNALIGNED: "start {start:#x} is not page aligned",
    lib.WW_MEMWATCH_NEGATIVE_LENGTH: "negative length {length}",
    lib.WW_MEMWATCH_PAST_USER_SPACE: "[{start:#x}, +{length:#x}) reaches past the end of "
                                     "user space",
    lib.WW_MEMWATCH_BAD_VEC: "vec lies in memory that cannot be written",
}
_IN_REGION = lib.WW_MEMWATCH_IN_REGION
_INT64_MAX = (1 << 63) - 1
_checked = lib.ww_memwatch_checked
_call = lib.ww_memwatch_call
_common = kernel.process_memwatch_common
_REFUSED_BASE = lib.WW_MEMWATCH_REFUSED_BASE
_NATIVE_KIND = lib.WW_INDEX_PAGEMAP  # the backend ww_memwatch_call serves itself


def _refused(bad: int, start: int, length: int, flags: int) -> OSError:
    return oserror(errno.EINVAL, _BAD_ARGUMENTS[bad].format(flags=flags, start=start,
                                                            length=length))


def _checked_range(start: int, length: int, flags: int, out: Any, capacity: int) -> tuple[int,
                                                                                         bool]:
    """(end, in_region): the page-aligned end of [start, start+length) and
    whether it overlaps a write-watch region; EINVAL otherwise. The checks are
    native (index_calls.c, memwatch.c): the same for Python and for C callers."""
    if not (0 <= start < 1 << 64 and 0 <= flags < 1 << 32):
        bad = lib.WW_MEMWATCH_PAST_USER_SPACE if flags < 1 << 32 else lib.WW_MEMWATCH_BAD_FLAGS
        raise _refused(bad, start, length, flags)
    end = _checked(start, max(min(length, _INT64_MAX), -1), flags, capacity, out)
    if end >= 0:
        return end, False
    if end != -_IN_REGION:
        raise _refused(-end, start, length, flags)
    return start + ((length + PAGE_MASK) & ~PAGE_MASK), True


# os.environ.get encodes the key and decodes the value on every call (the
# largest cost of a small call); its dict of bytes is a plain lookup.
_environ: dict[bytes, bytes] | None = getattr(os.environ, "_data", None)
_BACKEND_KEY = os.fsencode(backends.BACKEND_ENV)
_selected: tuple[bytes | str | None, int, kernel.Backend, tuple[int, int, int]] | None = None


def _backend() -> kernel.Backend:
    return _selection()[2]


def _selection() -> tuple[bytes | str | None, int, kernel.Backend, tuple[int, int, int]]:
    """(WRITEWATCH_BACKEND, process epoch, backend, its memwatch_handle()),
    remembered until either changes: the fast path costs one dict lookup, not a
    probe-table copy and a descriptor check."""
    global _selected
    env = (_environ.get(_BACKEND_KEY) if _environ is not None
           else os.environ.get(backends.BACKEND_ENV))
    selected = _selected
    if selected is None or selected[0] != env or selected[1] != kernel.process_epoch():
        backend = backends.backend()
        # The epoch first: a fork after this line makes the entry stale, never the reverse.
        epoch = kernel.process_epoch()
        selected = _selected = (env, epoch, backend, backend.memwatch_handle())
    return selected


def process_memwatch(pidfd: int, start: int, length: int, flags: int,
                     vec: np.ndarray | None = None, vec_len: int | None = None) -> int:
    """process_memwatch, the proposed system call (rules M1-M20), on any memory
    of the calling process or, through a pidfd, on another process's.

    pidfd 0 (or a pidfd of the caller) is the calling process: any of its
    memory (an mmap, the malloc heap, a numpy array's buffer, transparent
    huge pages, shared memory) on whichever backend is selected, and memory of
    a write-watch region (VirtualAlloc with MEM_WRITE_WATCH) on its region's
    backend. The first GET or CLEAR on memory never watched starts watching
    it; until its first CLEAR it reads all written, or with
    MEMWATCH_SD_NO_REUSED_REGIONS only the pages written since it was mapped.
    Unmapped holes hold nothing. A mapping that cannot be watched (the vdso,
    VM_PFNMAP device memory, ...) fails with EINVAL naming it, before anything
    is read or cleared. Another process (a pidfd from os.pidfd_open, which the
    caller may ptrace-read) is served through its /proc/PID/pagemap, on memory
    that process watches (pagemap backend).

    MEMWATCH_SD_GET writes the byte offsets from start of the written pages of
    [start, start+length) into vec (numpy int64), ascending, and stops when
    vec_len entries are filled; with MEMWATCH_SD_CLEAR too, exactly the
    reported pages are re-armed in the same step and nothing past the stop is
    cleared. CLEAR alone re-arms the whole range. Returns the number of offsets
    written.

    Errors (OSError): EINVAL (bad flags, unaligned start, negative length, a
    range past the end of user space, GET without room or with a vec in memory
    that cannot be written, a mapping that cannot be watched), ESRCH (the
    process is gone or may not be inspected), EIO (the kernel failed the scan).
    A non-integer argument raises TypeError.
    """
    if type(pidfd) is int and pidfd == 0 and vec_len is None:
        # The common call: one CPython function (native/python_calls.c) on the
        # backend ww_memwatch_call serves itself. It answers None for any
        # other call, and nothing is read or cleared before a refusal (EINVAL,
        # no words asked for here), so either goes to the general path
        # below, which words it.
        kind, uffd, pagemap_fd = _selection()[3]
        if kind == _NATIVE_KIND:
            result = _common(kind, uffd, pagemap_fd, start, length, flags, vec)
            if result is not None:
                if result >= 0:
                    return result
                if result > -_REFUSED_BASE and result not in _SERVED_ELSEWHERE:
                    return _memwatch_check(result, _selection()[2].operation)  # not repeated
    return _process_memwatch(pidfd, start, length, flags, vec, vec_len)


# Results the general path serves: a refusal it words (EINVAL), a backend
# Python serves (EOPNOTSUPP).
_SERVED_ELSEWHERE = (-errno.EINVAL, -errno.EOPNOTSUPP)


def _call_selected(start: int, length: int, flags: int, capacity: int, out: Any) -> int:
    """The native call (checks and walk, native/index_calls.c) on the selected
    backend, its refusals raised worded; -EOPNOTSUPP (a backend Python serves)
    and -(REFUSED_BASE + IN_REGION) (write-watch region memory) for the caller
    to serve."""
    why = refusal_struct()
    kind, uffd, pagemap_fd = _selection()[3]
    result: int = _call(kind, uffd, pagemap_fd, start, length, flags, capacity, out, why)
    if result >= 0 or result == -errno.EOPNOTSUPP or result == -_REFUSED_BASE - _IN_REGION:
        return result
    if result == -errno.EINVAL:
        raise oserror(errno.EINVAL, refusal_text(why))
    if result > -_REFUSED_BASE:
        return _memwatch_check(result, _selection()[2].operation)
    raise _refused(-_REFUSED_BASE - result, start, length, flags)


def _process_memwatch(pidfd: Any, start: Any, length: Any, flags: Any, vec: Any,
                      vec_len: Any) -> int:
    """process_memwatch for every call: arguments converted and checked one
    by one, then the native call, or another process, or region memory."""
    # numpy integers are integers too, but their fixed-width arithmetic would wrap.
    pidfd = operator.index(pidfd)
    start = operator.index(start)
    length = operator.index(length)
    flags = operator.index(flags)
    if flags & _GET:
        out, capacity = _vec_pointer(vec, None if vec_len is None else operator.index(vec_len))
    else:
        out, capacity = ffi.NULL, 0
    if pidfd == 0 and 0 <= start < _2_64 and 0 <= flags < _2_32:
        result = _call_selected(start, max(min(length, _INT64_MAX), -1), flags, capacity, out)
        if result >= 0:
            return int(result)
    end, in_region = _checked_range(start, length, flags, out, capacity)
    if end == start:
        return 0
    if pidfd != 0 and _pidfd_pid(pidfd) == os.getpid():
        pidfd = 0  # a pidfd of the calling process is the calling process
    if pidfd != 0:
        fd = _target_pagemap(pidfd)
        try:
            return _memwatch_check(memwatch_scan(fd, start, end, bool(flags & _GET),
                                                 bool(flags & _CLEAR), out, capacity),
                                   "PAGEMAP_SCAN")
        finally:
            os.close(fd)
    if in_region:
        # Memory of write-watch regions keeps the regions' rules (M12): the
        # tracked backends know their ranges; the pagemap backend, asked last,
        # lets the kernel say whether the range is registered.
        for each in backends.available_backends()[::-1]:
            if each.watches(start):
                return _memwatch_check(each.region_memwatch(
                    start, end, bool(flags & _GET), bool(flags & _CLEAR), out, capacity),
                    each.operation)
        raise oserror(errno.EINVAL, f"[{start:#x}, {end:#x}) is not watched memory")
    backend = _backend()
    result = backend.process_memwatch(start, end, flags, out, capacity)
    return result if result >= 0 else _memwatch_check(result, backend.operation)


def memwatch_unwatch(start: int, length: int) -> None:
    """Stop watching [start, start+length) (rounded out to pages) of memory that
    process_memwatch watched on the selected backend: its contents and
    protection stay as they are, and it reads as never watched again (rule
    M19). Memory of write-watch regions is the regions' (EINVAL)."""
    start, length = operator.index(start), operator.index(length)
    first = start & ~PAGE_MASK
    end, in_region = _checked_range(first, start + length - first, _CLEAR, ffi.NULL, 0)
    if in_region:
        raise oserror(errno.EINVAL, f"[{first:#x}, {end:#x}) holds write-watch region memory")
    _backend().memwatch_unwatch(first, end)


def _memwatch_check(result: int, operation: str) -> int:
    """The proposal's errors: EINVAL and ESRCH pass through, any other failure is
    EIO, worded by the operation of the mechanism that failed."""
    if result < 0 and -result not in (errno.EINVAL, errno.ESRCH):
        raise oserror(errno.EIO, f"{operation} failed", cause=-result)
    return check(result, "process_memwatch")
