"""process_memwatch: the system call proposed for write watch (see
docs/semantics.md, rules M1-M12), on whichever backend watches the range.

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

from writewatch import backends, index
from writewatch.backends.pagemap import memwatch_scan
from writewatch.kernel import PAGE_MASK, check, ffi, oserror


class MemwatchFlags(IntFlag):
    """process_memwatch flags, as the proposal's uapi/linux/memwatch.h has them."""

    MEMWATCH_SD_GET = 0x1
    MEMWATCH_SD_CLEAR = 0x2
    MEMWATCH_SD_NO_REUSED_REGIONS = 0x4


MEMWATCH_SD_GET = MemwatchFlags.MEMWATCH_SD_GET
MEMWATCH_SD_CLEAR = MemwatchFlags.MEMWATCH_SD_CLEAR
MEMWATCH_SD_NO_REUSED_REGIONS = MemwatchFlags.MEMWATCH_SD_NO_REUSED_REGIONS
# A plain int: ~ on an IntFlag complements only within its defined bits.
_MEMWATCH_ALL = int(MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR | MEMWATCH_SD_NO_REUSED_REGIONS)

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


def _vec_pointer(vec: Any, vec_len: int | None) -> tuple[Any, int]:
    if not isinstance(vec, np.ndarray) or vec.dtype != np.int64 or vec.ndim != 1:
        raise oserror(errno.EINVAL, "vec must be a 1-D numpy int64 array")
    if not vec.flags.c_contiguous or not vec.flags.writeable:
        raise oserror(errno.EINVAL, "vec must be contiguous and writable")
    if vec_len is None:
        vec_len = len(vec)
    if not 0 < vec_len <= len(vec):
        raise oserror(errno.EINVAL, f"vec_len {vec_len} must be 1..len(vec) ({len(vec)})")
    if not index.output_writable(vec, vec_len):
        raise oserror(errno.EINVAL, "vec lies in memory that cannot be written")
    return ffi.from_buffer("uint64_t[]", vec), vec_len


def process_memwatch(pidfd: int, start: int, length: int, flags: int,
                     vec: np.ndarray | None = None, vec_len: int | None = None) -> int:
    """process_memwatch (rules M1-M12), on whichever backend watches the range.

    pidfd 0 (or a pidfd of the caller) is the calling process, on any backend;
    otherwise a pidfd (os.pidfd_open) of a process the caller may ptrace-read,
    served through its /proc/PID/pagemap (pagemap backend only: the fallbacks
    keep their state in the target's own memory). MEMWATCH_SD_GET writes the byte offsets from start
    of the written pages of [start, start+length) into vec (numpy int64),
    ascending, and stops when vec_len entries are filled; with MEMWATCH_SD_CLEAR
    too, exactly the reported pages are re-armed in the same step and nothing past
    the stop is cleared. CLEAR alone re-arms the whole range. Returns the number
    of offsets written.

    Memory that is not being watched is never reported clean: a range that
    touches a mapping not registered for write watch fails with EINVAL before
    anything is read or cleared. Unmapped gaps hold no pages and report nothing.
    MEMWATCH_SD_NO_REUSED_REGIONS is accepted and has no effect: async
    write-protect has no per-mapping dirty flag to ignore.

    Errors (OSError): EINVAL (bad flags, unaligned start, negative length, GET
    without room or with a vec in memory that cannot be written, range not
    watched), ESRCH (the process is gone or may not be inspected), EIO (the
    kernel failed the scan). A non-integer argument raises TypeError.
    """
    # numpy integers are integers too, but their fixed-width arithmetic would wrap.
    pidfd, start, length, flags = (operator.index(each) for each in (pidfd, start, length, flags))
    if vec_len is not None:
        vec_len = operator.index(vec_len)
    if (flags & ~_MEMWATCH_ALL
            or not flags & (MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR)):
        raise oserror(errno.EINVAL, f"invalid process_memwatch flags {flags!r}")
    if start < 0 or start & PAGE_MASK:
        raise oserror(errno.EINVAL, f"start {start:#x} is not page aligned")
    if length < 0:
        raise oserror(errno.EINVAL, f"negative length {length}")
    end = start + ((length + PAGE_MASK) & ~PAGE_MASK)
    if end >= 1 << 64:
        raise oserror(errno.EINVAL, "range wraps the address space")
    get = bool(flags & MEMWATCH_SD_GET)
    clear = bool(flags & MEMWATCH_SD_CLEAR)
    out, capacity = _vec_pointer(vec, vec_len) if get else (ffi.NULL, 0)
    if end == start:
        return 0

    if pidfd != 0 and _pidfd_pid(pidfd) == os.getpid():
        pidfd = 0  # a pidfd of the calling process is the calling process
    if pidfd != 0:
        fd = _target_pagemap(pidfd)
        try:
            return _memwatch_check(memwatch_scan(fd, start, end, get, clear, out, capacity))
        finally:
            os.close(fd)
    # The tracked backends know their ranges; the pagemap backend, asked last,
    # lets the kernel say whether the range is registered.
    for each in backends.available_backends()[::-1]:
        if each.watches(start):
            return _memwatch_check(each.process_memwatch(start, end, get, clear, out,
                                                         capacity))
    raise oserror(errno.EINVAL, f"[{start:#x}, {end:#x}) is not watched memory")


def _memwatch_check(result: int) -> int:
    """The proposal's errors: EINVAL and ESRCH pass through, any other failure is EIO."""
    if result < 0 and -result not in (errno.EINVAL, errno.ESRCH):
        raise oserror(errno.EIO, "PAGEMAP_SCAN failed", cause=-result)
    return check(result, "process_memwatch")
