"""GetWriteWatch, ResetWriteWatch and prepare_kernel_write on the region table.

The range checks Windows makes live in the native index (native/index_calls.c) and
only there: a refused call comes back as a reason, which this module words.
Only the checks on the Python output array itself are made here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from writewatch import index, latch, regions
from writewatch.constants import ERROR_INVALID_PARAMETER, ERROR_NOACCESS, WRITE_WATCH_FLAG_RESET
from writewatch.errors import WriteWatchError, uint
from writewatch.kernel import page_ceil, page_floor

_UINTP = np.dtype(np.uintp)
# Looked up once: the per-frame path (get_write_watch) uses it on every call.
_get_write_watch_common = index.get_write_watch_common
T = TypeVar("T")


def _output_array_problem(addresses: Any) -> str:
    """Why addresses is not what a PVOID* is (a 1-D contiguous uintp array), or ""."""
    if not isinstance(addresses, np.ndarray):
        return "addresses must be a numpy array of uintp (or None)"
    if addresses.dtype != _UINTP or addresses.ndim != 1:
        return f"addresses must be a 1-D uintp array, not {addresses.ndim}-D {addresses.dtype}"
    if not addresses.flags.c_contiguous:
        return "addresses must be contiguous"
    return ""


def _refusal(reason: int, base: int, size: int) -> WriteWatchError:
    """Words the native index's verdict on a GetWriteWatch/ResetWriteWatch range."""
    if reason == index.REFUSED_OUTPUT:
        return WriteWatchError(ERROR_NOACCESS,
                               "the addresses array lies in memory that cannot be written")
    if reason == index.REFUSED_FLAGS:
        return WriteWatchError(ERROR_INVALID_PARAMETER, "flags must be 0 or "
                               "WRITE_WATCH_FLAG_RESET")
    if reason == index.REFUSED_SIZE:
        return WriteWatchError(ERROR_INVALID_PARAMETER, "size is 0")
    if reason == index.REFUSED_STALE:
        return WriteWatchError(ERROR_INVALID_PARAMETER,
                               "the region could not be watched again in this forked child")
    if reason == index.REFUSED_NOT_WATCHED:
        return WriteWatchError(ERROR_INVALID_PARAMETER,
                               f"{base:#x} is not in a write-watch region")
    first, last = page_floor(base), page_ceil(base + size)
    region = regions.find(first)
    where = f" [{region.base:#x}, {region.end:#x})" if region is not None else ""
    return WriteWatchError(ERROR_INVALID_PARAMETER,
                           f"[{first:#x}, {last:#x}) leaves the write-watch region{where}")


def _refresh_after_fork(base: int) -> None:
    """Register a forked child's region with the child's kernel objects (the
    index refused it as stale)."""
    region = regions.find(page_floor(base))
    if region is not None:
        with region.lock:
            if not region.released:
                region.sync_after_fork()


def get_write_watch(flags: Any, base: Any, size: Any, addresses: Any,
                    count: Any = None) -> int:
    """GetWriteWatch: write the addresses of written pages in [base, base+size)
    into addresses[:count], ascending; returns how many. With
    WRITE_WATCH_FLAG_RESET exactly the returned pages are reset, atomically
    with the read (a write racing the call is reported now or next time).

    count=None means len(addresses). Checks in the order of docs/semantics.md
    rule 15: count 0 -> ERROR_INVALID_PARAMETER; no array (or one too short or
    read-only) -> ERROR_NOACCESS; then flags, size 0 and the range, which the
    native index checks. This is the per-frame call of a game loop, so the
    common call (a 1-D uintp array) is one native call (index.get_write_watch_common);
    any other, and any refusal, goes to the checked path, which words it (or
    refreshes a forked child)."""
    found = _get_write_watch_common(flags, base, size, addresses, count)
    if found is not None:
        if found >= 0:
            return found
        try:
            return index.verdict(found, "GetWriteWatch scan")  # a kernel failure
        except index.RefusedError:
            pass
    return _get_write_watch_checked(flags, base, size, addresses, count)


def get_write_watch_as(flags: Any, base: Any, size: Any, addresses: Any, origin: int,
                       shift: int) -> int:
    """get_write_watch storing each address as (address - origin) >> shift
    (offsets, page indices) into addresses: converted before the store, so
    the array is stored into once, while the call still holds it."""
    return _get_write_watch_checked(flags, base, size, addresses, None, origin, shift)


def _get_write_watch_checked(flags: Any, base: Any, size: Any, addresses: Any,
                             count: Any, origin: int = 0, shift: int = 0) -> int:
    """get_write_watch for every other call: the array's checks here, with
    their own errors, then the index's verdict."""
    if addresses is not None:
        problem = _output_array_problem(addresses)
        if problem:
            raise TypeError(problem)
    capacity = 0 if addresses is None else len(addresses)
    count = capacity if count is None else uint(count, "count")
    if count == 0:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, "count is 0")
    if addresses is None:
        raise WriteWatchError(ERROR_NOACCESS, "no addresses array for a nonzero count")
    if count > capacity:
        raise WriteWatchError(ERROR_NOACCESS, f"count {count} is larger than the addresses "
                              f"array ({capacity})")
    if not addresses.flags.writeable:
        raise WriteWatchError(ERROR_NOACCESS, "the addresses array is read-only")
    flags, base, size = uint(flags, "flags"), uint(base, "base"), uint(size, "size")
    return _on_index(
        lambda: index.get_write_watch_as(flags, base, size, addresses, count, origin, shift),
        lambda: _get_latched(flags, base, size, addresses, count, origin, shift), base, size)


def _on_index(call: Callable[[], T], on_latched: Callable[[], T], base: int, size: int) -> T:
    """call() on the native index, with its refusals answered: a region with
    latched pages goes to on_latched(); a forked child's stale region is
    registered again and the call retried once; any other refusal is raised,
    worded."""
    for attempt in range(2):
        try:
            return call()
        except index.RefusedError as refused:
            if refused.reason == index.REFUSED_LATCHED:
                return on_latched()
            if refused.reason != index.REFUSED_STALE or attempt:
                raise _refusal(refused.reason, base, size) from None
        _refresh_after_fork(base)
    raise AssertionError("unreachable")


def _latched_region(base: int, size: int) -> regions.Region:
    """The region the index refused as latched (it checked the range)."""
    region = regions.find(page_floor(base))
    if region is None or region.released:
        raise _refusal(index.REFUSED_NOT_WATCHED, base, size)
    return region


def _get_latched(flags: int, base: int, size: int, addresses: np.ndarray, count: int,
                 origin: int, shift: int) -> int:
    """GetWriteWatch on a region with latched pages (docs/semantics.md rule 11),
    which the index leaves to the region's own walk."""
    first, last = page_floor(base), page_ceil(base + size)
    region = _latched_region(base, size)
    # The regions the output array lies in are locked too (all by ascending
    # base, so two such calls never wait for each other): no protection change
    # or decommit makes the array unwritable between its check and the store.
    out = addresses.ctypes.data
    held = {each.base: each for each in regions.overlapping(out, out + count * _UINTP.itemsize)}
    held[region.base] = region
    with contextlib.ExitStack() as stack:
        for base_of in sorted(held):
            stack.enter_context(held[base_of].lock)
        if region.released:
            raise _refusal(index.REFUSED_NOT_WATCHED, base, size)
        if not index.output_writable(addresses, count):
            raise _refusal(index.REFUSED_OUTPUT, base, size)
        region.sync_after_fork()
        found = latch.walk(region, first, last, bool(flags & WRITE_WATCH_FLAG_RESET), count)
        addresses[:len(found)] = (found - np.uintp(origin)) >> np.uintp(shift)
    return len(found)


def reset_write_watch(base: Any, size: Any) -> None:
    """ResetWriteWatch: mark every page of [base, base+size) unwritten."""
    base, size = uint(base, "base"), uint(size, "size")
    _on_index(lambda: index.reset_write_watch(base, size),
              lambda: _reset_latched(base, size), base, size)


def _reset_latched(base: int, size: int) -> None:
    """ResetWriteWatch on a region with latched pages: the reset clears them."""
    region = _latched_region(base, size)
    with region.lock:
        if region.released:
            raise _refusal(index.REFUSED_NOT_WATCHED, base, size)
        region.sync_after_fork()
        latch.reset(region, page_floor(base), page_ceil(base + size))


def prepare_kernel_write(address: Any, size: Any) -> None:
    """Call before the kernel writes into [address, address+size) of a
    write-watch region (os.readv, readinto, recv_into into a view), as Windows'
    ReadFile does once its handle is valid: every committed read-write page of
    the range is marked written, on every backend and whatever the kernel then
    delivers (docs/semantics.md rule 14: a read marks its whole buffer), and
    made writable so that the kernel's write succeeds (the mprotect backend,
    and the uffd backend without privilege, need that). The memory's contents
    are left alone, even while other threads write to it. A reset between this
    call and the kernel's write re-arms the pages: call it again. Memory
    outside write-watch regions is left alone."""
    address = uint(address, "address")
    size = uint(size, "size")
    if size == 0:
        return
    region = regions.find(address)
    if region is None or region.watcher is None:
        return
    first, last = page_floor(address), min(page_ceil(address + size), region.end)
    with region.lock:
        if region.released:
            return
        region.sync_after_fork()
        # Only writable pages: the kernel cannot write the others (its write
        # fails, as ReadFile's does on Windows) and nothing marks them.
        for start, end in region.writable_spans(first, last):
            region.watcher.prepare_kernel_write(start, end - start)
