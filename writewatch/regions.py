"""The region table: what VirtualAlloc made, page by page, and the checks
Windows makes before it touches any of it.

A region is one reservation (64 KiB aligned, PROT_NONE, MAP_NORESERVE). Its
pages are stored as runs of equal state (reserved, or committed with a
protection), so bookkeeping costs one entry per run, never one per page, and
nothing is paid for reserved memory. Only committed pages of write-watch
regions are handed to the kernel backend: the kernel never walks or allocates
page tables for the reservation as a whole.

Errors are raised as WriteWatchError carrying the Windows error code; api.py
turns them into return values and the thread's last error.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from writewatch import kernel
from writewatch.constants import (
    ERROR_INVALID_ADDRESS,
    ERROR_INVALID_PARAMETER,
    ERROR_NOACCESS,
    ERROR_NOT_ENOUGH_MEMORY,
    ERROR_NOT_SUPPORTED,
    MEM_COMMIT,
    MEM_DECOMMIT,
    MEM_FREE,
    MEM_PRIVATE,
    MEM_RELEASE,
    MEM_RESERVE,
    MEM_WRITE_WATCH,
    PAGE_NOACCESS,
    PAGE_READONLY,
    PAGE_READWRITE,
    WRITE_WATCH_FLAG_RESET,
)

PAGE_SIZE = kernel.PAGE_SIZE
ALLOCATION_GRANULARITY = 0x10000
_PAGE_MASK = PAGE_SIZE - 1
# x86_64 user space ends one page below 2**47 (TASK_SIZE with four-level page
# tables; five-level needs an opt-in mmap hint).
USER_SPACE_END = (1 << 47) - PAGE_SIZE

_RESERVED = 0  # page state value of a reserved (uncommitted) page; else its protection
_POSIX_PROT = {
    PAGE_NOACCESS: kernel.PROT_NONE,
    PAGE_READONLY: kernel.PROT_READ,
    PAGE_READWRITE: kernel.PROT_READ | kernel.PROT_WRITE,
}
_ERRNO_OF = {
    ERROR_NOT_ENOUGH_MEMORY: errno.ENOMEM,
    ERROR_NOT_SUPPORTED: errno.EOPNOTSUPP,
    ERROR_INVALID_PARAMETER: errno.EINVAL,
    ERROR_INVALID_ADDRESS: errno.EFAULT,
    ERROR_NOACCESS: errno.EFAULT,
}


class WriteWatchError(OSError):
    """A write-watch or virtual-memory call failed; .winerror is the Windows code
    GetLastError() would return."""

    def __init__(self, winerror: int, message: str) -> None:
        super().__init__(_ERRNO_OF.get(winerror, errno.EINVAL), message)
        self.winerror = winerror

    def __str__(self) -> str:
        return f"[WinError {self.winerror}] {self.strerror}"


class MEMORY_BASIC_INFORMATION(NamedTuple):  # noqa: N801 - the Windows name
    BaseAddress: int
    AllocationBase: int
    AllocationProtect: int
    RegionSize: int
    State: int
    Protect: int
    Type: int


def _page_floor(address: int) -> int:
    return address & ~_PAGE_MASK


def _page_ceil(address: int) -> int:
    return (address + _PAGE_MASK) & ~_PAGE_MASK


def _uint(value: Any, name: str) -> int:
    """An address, size or count: an integer (TypeError otherwise) in 0..2**64-1
    (ERROR_INVALID_PARAMETER otherwise, as a C caller could not pass it)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not 0 <= number < 1 << 64:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, f"{name} {number} is out of range")
    return number


class PageRuns:
    """Per-page values of one region, stored as runs.

    starts[i] is the first page of run i and values[i] its value; adjacent runs
    have different values, so the lists grow with the number of distinct runs,
    not with the number of pages.
    """

    __slots__ = ("npages", "starts", "values")

    def __init__(self, npages: int, value: int = _RESERVED) -> None:
        self.npages = npages
        self.starts = [0]
        self.values = [value]

    def value_at(self, page: int) -> int:
        return self.values[bisect_right(self.starts, page) - 1]

    def runs(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, value) for each run overlapping pages [first, last), clipped."""
        i = bisect_right(self.starts, first) - 1
        starts, values = self.starts, self.values
        while i < len(starts) and starts[i] < last:
            end = starts[i + 1] if i + 1 < len(starts) else self.npages
            yield max(starts[i], first), min(end, last), values[i]
            i += 1

    def assign(self, first: int, last: int, value: int) -> None:
        """Give pages [first, last) the value."""
        if first >= last:
            return
        starts, values = self.starts, self.values
        new_starts, new_values = [first], [value]
        lo = bisect_left(starts, first)
        hi = bisect_left(starts, last)
        if last < self.npages and (hi == len(starts) or starts[hi] != last):
            new_starts.append(last)
            new_values.append(values[hi - 1])  # the run that covered page `last`
        starts[lo:hi] = new_starts
        values[lo:hi] = new_values
        # Merge equal neighbours around the edit, from the right so indices hold.
        for i in range(min(lo + len(new_starts), len(starts) - 1), max(lo, 1) - 1, -1):
            if values[i] == values[i - 1]:
                del starts[i], values[i]


class _Mapping:
    """Owns a reservation's address space: unmapped when the last owner (the
    region, or a numpy view that outlived VirtualFree) lets go of it."""

    __slots__ = ("base", "size")

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size

    def __del__(self) -> None:
        kernel.unmap(self.base, self.size)


class Region:
    """One VirtualAlloc reservation."""

    __slots__ = ("_scan_spans", "allocation_protect", "base", "epoch", "lock", "mapping",
                 "pages", "size", "watcher", "write_watch")

    def __init__(self, base: int, size: int, allocation_protect: int,
                 watcher: kernel.Watcher | None) -> None:
        self.base = base
        self.size = size
        self.allocation_protect = allocation_protect
        self.watcher = watcher
        self.write_watch = watcher is not None
        self.lock = threading.Lock()
        self.mapping: _Mapping | None = _Mapping(base, size)
        self.pages = PageRuns(size // PAGE_SIZE)
        self.epoch = kernel.process_epoch()
        self._scan_spans: kernel.Spans | None = None

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def released(self) -> bool:
        return self.mapping is None

    def committed_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        """Address spans of committed pages in [first, last), adjacent runs merged."""
        spans: list[tuple[int, int]] = []
        base = self.base
        for start, end, value in self.pages.runs((first - base) // PAGE_SIZE,
                                                 (last - base) // PAGE_SIZE):
            if value == _RESERVED:
                continue
            s, e = base + start * PAGE_SIZE, base + end * PAGE_SIZE
            if spans and spans[-1][1] == s:
                spans[-1] = (spans[-1][0], e)
            else:
                spans.append((s, e))
        return spans

    def spans(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, page state) address spans of runs in [first, last)."""
        base = self.base
        for start, end, value in self.pages.runs((first - base) // PAGE_SIZE,
                                                 (last - base) // PAGE_SIZE):
            yield base + start * PAGE_SIZE, base + end * PAGE_SIZE, value

    def reserved_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        return [(s, e) for s, e, value in self.spans(first, last) if value == _RESERVED]

    def assign(self, first: int, last: int, value: int) -> None:
        self.pages.assign((first - self.base) // PAGE_SIZE, (last - self.base) // PAGE_SIZE,
                          value)
        self._scan_spans = None
        if self.watcher is not None:
            kernel.index_update(self.base, self.watcher, self.scan_spans())

    def scan_spans(self) -> kernel.Spans:
        """The committed spans as the kernel layer scans them, rebuilt only when
        pages are committed, decommitted or re-protected. Lock held."""
        if self._scan_spans is None:
            self._scan_spans = kernel.Spans(self.committed_spans(self.base, self.end))
        return self._scan_spans

    def sync_after_fork(self) -> None:
        """In a forked child, register the committed pages with the child's own
        kernel objects. The child's page tables carry no dirty state, so every page
        that may have been written reads written until it is reset. Lock held."""
        if self.watcher is None or self.epoch == kernel.process_epoch():
            return
        if not self.watcher.survives_fork:
            for start, end, value in self.spans(self.base, self.end):
                if value != _RESERVED:
                    self.watcher.watch(start, end - start, _POSIX_PROT[value], clean=False)
        kernel.index_update(self.base, self.watcher, self.scan_spans())
        self.epoch = kernel.process_epoch()


class _Table:
    """Regions by base address. The table lock guards only the index; each
    region's own lock guards its pages, so threads working on different regions
    do not wait for each other."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bases: list[int] = []
        self.regions: dict[int, Region] = {}

    def find(self, address: int) -> Region | None:
        with self.lock:
            i = bisect_right(self.bases, address) - 1
            if i < 0:
                return None
            region = self.regions[self.bases[i]]
            return region if address < region.end else None

    def next_base_after(self, address: int) -> int:
        with self.lock:
            i = bisect_right(self.bases, address)
            return self.bases[i] if i < len(self.bases) else USER_SPACE_END

    def insert(self, region: Region) -> None:
        with self.lock:
            i = bisect_left(self.bases, region.base)
            self.bases.insert(i, region.base)
            self.regions[region.base] = region

    def remove(self, region: Region) -> None:
        with self.lock:
            del self.regions[region.base]
            self.bases.remove(region.base)

    def snapshot(self) -> list[Region]:
        with self.lock:
            return list(self.regions.values())


_table = _Table()


def _before_fork() -> None:
    _table.lock.acquire()


def _after_fork_in_parent() -> None:
    _table.lock.release()


def _after_fork_in_child() -> None:
    # A region lock held by another thread at fork time would never be released
    # in the child, where that thread does not exist.
    _table.lock = threading.Lock()
    for region in _table.regions.values():
        region.lock = threading.Lock()
    # Watch the child's memory again now (kernel.py's hook, registered first, has
    # dropped the parent's descriptors), so that it is watched whichever call
    # comes first, process_memwatch included. A failure here is retried lazily.
    for region in _table.regions.values():
        with contextlib.suppress(OSError):
            region.sync_after_fork()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# VirtualAlloc / VirtualFree / VirtualProtect / VirtualQuery


def _check_protect(protect: Any) -> int:
    protect = _uint(protect, "protect")
    if protect not in _POSIX_PROT:
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              f"protection {protect:#x} is not PAGE_NOACCESS, PAGE_READONLY "
                              "or PAGE_READWRITE")
    return protect


def _mapping_error(exc: OSError, what: str) -> WriteWatchError:
    code = ERROR_NOT_ENOUGH_MEMORY if exc.errno == errno.ENOMEM else ERROR_INVALID_ADDRESS
    return WriteWatchError(code, f"{what}: {exc.strerror}")


def allocate(address: Any, size: Any, allocation_type: Any, protect: Any,
             backend: str = "auto") -> int:
    """VirtualAlloc: reserve and/or commit; returns the base of what was allocated.

    backend names the write-watch mechanism for a MEM_WRITE_WATCH reservation
    ("auto" picks the best this machine has)."""
    address = _uint(address, "address")
    size = _uint(size, "size")
    allocation_type = _uint(allocation_type, "allocation_type")
    protect = _check_protect(protect)
    if allocation_type & ~(MEM_COMMIT | MEM_RESERVE | MEM_WRITE_WATCH):
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              f"unsupported allocation type bits {allocation_type:#x}")
    if not allocation_type & (MEM_COMMIT | MEM_RESERVE):
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              "allocation type needs MEM_RESERVE or MEM_COMMIT")
    if allocation_type & MEM_WRITE_WATCH and not allocation_type & MEM_RESERVE:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, "MEM_WRITE_WATCH needs MEM_RESERVE")
    if size == 0:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, "size is 0")
    if address + size > USER_SPACE_END:
        raise WriteWatchError(ERROR_INVALID_ADDRESS if address else ERROR_NOT_ENOUGH_MEMORY,
                              "the range does not fit in the user address space")

    if allocation_type & MEM_RESERVE and 0 < address < ALLOCATION_GRANULARITY:
        # Rounded down, the address would be 0, which means "anywhere": Windows
        # refuses the first 64 KiB instead.
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              f"cannot reserve at {address:#x}: the first 64 KiB are off limits")
    if allocation_type & MEM_RESERVE or address == 0:
        # MEM_COMMIT with no address reserves too, as on Windows.
        region = _reserve(address, size, protect, bool(allocation_type & MEM_WRITE_WATCH),
                          backend)
        if allocation_type & MEM_COMMIT:
            first, last = ((_page_floor(address), _page_ceil(address + size)) if address
                           else (region.base, region.end))
            try:
                _commit(region, first, last, protect)
            except WriteWatchError:
                release_region(region)
                raise
        return region.base

    reservation = _table.find(address)
    first, last = _page_floor(address), _page_ceil(address + size)
    if reservation is None or last > reservation.end:
        raise WriteWatchError(ERROR_INVALID_ADDRESS,
                              f"[{first:#x}, {last:#x}) is not inside one reservation")
    _commit(reservation, first, last, protect)
    return first


def _reserve(address: int, size: int, protect: int, write_watch: bool,
             backend_name: str) -> Region:
    base = address & ~(ALLOCATION_GRANULARITY - 1)
    length = _page_ceil(address + size) - base if address else _page_ceil(size)
    mechanism = None
    if write_watch:
        try:
            mechanism = kernel.backend(backend_name)
        except kernel.BackendUnavailableError as exc:
            raise WriteWatchError(ERROR_NOT_SUPPORTED, str(exc)) from exc
    try:
        base = kernel.map_reserved(base, length, ALLOCATION_GRANULARITY)
    except OSError as exc:
        raise _mapping_error(exc, f"cannot reserve {length:#x} bytes at {base:#x}") from exc
    watcher = None
    if mechanism is not None:
        try:
            # Once for the whole reservation: every VMA later split off inherits it.
            kernel.no_huge_pages(base, length)
            watcher = mechanism.attach(base, length)
        except OSError as exc:
            kernel.unmap(base, length)
            raise _mapping_error(exc, "cannot watch the reservation") from exc
    try:
        kernel.index_add(base, length, watcher)
    except OSError as exc:
        if watcher is not None:
            watcher.detach()
        kernel.unmap(base, length)
        raise _mapping_error(exc, "cannot index the reservation") from exc
    region = Region(base, length, protect, watcher)
    _table.insert(region)
    return region


def _commit(region: Region, first: int, last: int, protect: int) -> None:
    with region.lock:
        if region.released:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
        region.sync_after_fork()
        prot = _POSIX_PROT[protect]
        watcher = region.watcher
        done: list[tuple[int, int, int]] = []
        try:
            if watcher is None:
                kernel.protect(first, last - first, prot)
            else:
                # Fresh pages start watched and clean (the watcher makes them
                # accessible only once armed, so no write slips in between);
                # committed ones only change protection and keep their state.
                for start, end, value in list(region.spans(first, last)):
                    if value == _RESERVED:
                        watcher.watch(start, end - start, prot)
                    else:
                        watcher.protect(start, end - start, prot)
                    done.append((start, end, value))
        except OSError as exc:
            if watcher is not None:
                _undo_commit(watcher, done)
            raise _mapping_error(exc, "cannot commit") from exc
        region.assign(first, last, protect)


def _undo_commit(watcher: kernel.Watcher, done: list[tuple[int, int, int]]) -> None:
    """Put back what a failed commit changed, span by span. Lock held."""
    for start, end, value in done:
        if value == _RESERVED:
            watcher.unwatch(start, end - start)
            kernel.protect(start, end - start, kernel.PROT_NONE)
        else:
            watcher.protect(start, end - start, _POSIX_PROT[value])


def free(address: Any, size: Any, free_type: Any) -> None:
    """VirtualFree: MEM_DECOMMIT a range, or MEM_RELEASE a whole region."""
    address = _uint(address, "address")
    size = _uint(size, "size")
    free_type = _uint(free_type, "free_type")
    if free_type not in (MEM_DECOMMIT, MEM_RELEASE):
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              "free_type must be MEM_DECOMMIT or MEM_RELEASE")
    region = _table.find(address)
    if region is None:
        raise WriteWatchError(ERROR_INVALID_ADDRESS, f"{address:#x} is not allocated")
    # Size 0 means the whole allocation, named by any address in its first page.
    at_base = _page_floor(address) == region.base
    if free_type == MEM_RELEASE:
        if size != 0:
            raise WriteWatchError(ERROR_INVALID_PARAMETER, "MEM_RELEASE needs size 0")
        if not at_base:
            raise WriteWatchError(ERROR_INVALID_ADDRESS,
                                  f"{address:#x} is not the base of its allocation")
        release_region(region)
        return
    if size == 0:
        if not at_base:
            raise WriteWatchError(ERROR_INVALID_ADDRESS,
                                  f"{address:#x} is not the base of its allocation")
        first, last = region.base, region.end
    else:
        first, last = _page_floor(address), _page_ceil(address + size)
        if last > region.end:
            raise WriteWatchError(ERROR_INVALID_ADDRESS,
                                  f"[{first:#x}, {last:#x}) is not inside the allocation")
    with region.lock:
        if region.released:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
        region.sync_after_fork()
        committed = region.committed_spans(first, last)
        if not committed:
            return
        try:
            # Windows drops the dirty state of decommitted pages: unwatching
            # forgets it and keeps the pages out of every scan, and dropping the
            # pages leaves nothing behind.
            if region.watcher is not None:
                for start, end in committed:
                    region.watcher.unwatch(start, end - start)
            kernel.discard(first, last - first)
            kernel.protect(first, last - first, kernel.PROT_NONE)
        except OSError as exc:
            raise _mapping_error(exc, "cannot decommit") from exc
        region.assign(first, last, _RESERVED)


def release_region(region: Region) -> None:
    """Remove the region from the table at once. Its address space stays mapped
    while a numpy view over it lives, so the view never faults."""
    try:
        _table.remove(region)
    except (KeyError, ValueError):
        raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released") from None
    with region.lock:
        kernel.index_remove(region.base)
        watcher = region.watcher
        if watcher is not None:
            if watcher.survives_fork or region.epoch == kernel.process_epoch():
                # A view may outlive the release: leave its pages plainly
                # accessible, not armed for a tracker that is about to go.
                for start, end, value in list(region.spans(region.base, region.end)):
                    if value != _RESERVED:
                        watcher.unwatch(start, end - start)
                        kernel.protect(start, end - start, _POSIX_PROT[value])
            watcher.detach()
        region.mapping = None


def set_protection(address: Any, size: Any, new_protect: Any) -> int:
    """VirtualProtect: returns the old protection of the first page."""
    address = _uint(address, "address")
    size = _uint(size, "size")
    new_protect = _check_protect(new_protect)
    if size == 0:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, "size is 0")
    first, last = _page_floor(address), _page_ceil(address + size)
    region = _table.find(first)
    if region is None or last > region.end:
        raise WriteWatchError(ERROR_INVALID_ADDRESS,
                              f"[{first:#x}, {last:#x}) is not inside one allocation")
    with region.lock:
        if region.released:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
        if region.reserved_spans(first, last):
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the range is not all committed")
        old = region.pages.value_at((first - region.base) // PAGE_SIZE)
        region.sync_after_fork()
        try:
            if region.watcher is None:
                kernel.protect(first, last - first, _POSIX_PROT[new_protect])
            else:
                region.watcher.protect(first, last - first, _POSIX_PROT[new_protect])
        except OSError as exc:
            raise _mapping_error(exc, "cannot change protection") from exc
        region.assign(first, last, new_protect)
    return old


def query(address: Any) -> MEMORY_BASIC_INFORMATION:
    """VirtualQuery. Memory writewatch did not allocate reads as MEM_FREE, up to
    the next region writewatch knows of."""
    address = _uint(address, "address")
    if address >= USER_SPACE_END:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, f"{address:#x} is above user space")
    page = _page_floor(address)
    region = _table.find(page)
    if region is None:
        return MEMORY_BASIC_INFORMATION(page, 0, 0, _table.next_base_after(page) - page,
                                        MEM_FREE, PAGE_NOACCESS, 0)
    with region.lock:
        index = (page - region.base) // PAGE_SIZE
        _, run_end, value = next(region.pages.runs(index, region.pages.npages))
    committed = value != _RESERVED
    return MEMORY_BASIC_INFORMATION(
        BaseAddress=page,
        AllocationBase=region.base,
        AllocationProtect=region.allocation_protect,
        RegionSize=region.base + run_end * PAGE_SIZE - page,
        State=MEM_COMMIT if committed else MEM_RESERVE,
        Protect=value if committed else 0,
        Type=MEM_PRIVATE,
    )


def committed_size(address: Any) -> int:
    """Bytes committed in the region that contains address."""
    region = _table.find(_uint(address, "address"))
    if region is None:
        raise WriteWatchError(ERROR_INVALID_ADDRESS, f"{address:#x} is not allocated")
    with region.lock:
        return sum(end - start for start, end in region.committed_spans(region.base, region.end))


# ---------------------------------------------------------------------------
# GetWriteWatch / ResetWriteWatch


def _watched_region(base: int, size: int) -> tuple[Region, int, int]:
    """The write-watch region holding [base, base+size) once rounded out to pages."""
    first, last = _page_floor(base), _page_ceil(base + size)
    region = _table.find(first)
    if region is None or not region.write_watch:
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              f"{base:#x} is not in a write-watch region")
    if last > region.end:
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              f"[{first:#x}, {last:#x}) leaves the write-watch region "
                              f"[{region.base:#x}, {region.end:#x})")
    return region, first, last


_UINTP = np.dtype(np.uintp)


def _check_output_array(addresses: Any) -> None:
    """The addresses array must be what a PVOID* is: 1-D contiguous uintp."""
    if not isinstance(addresses, np.ndarray):
        raise TypeError("addresses must be a numpy array of uintp (or None)")
    if addresses.dtype != _UINTP or addresses.ndim != 1:
        raise TypeError(f"addresses must be a 1-D uintp array, not {addresses.ndim}-D "
                        f"{addresses.dtype}")
    if not addresses.flags.c_contiguous:
        raise TypeError("addresses must be contiguous")


def get_written(flags: Any, base: Any, size: Any, addresses: Any, count: Any = None) -> int:
    """GetWriteWatch: write the addresses of written pages in [base, base+size)
    into addresses[:count], ascending; returns how many. With
    WRITE_WATCH_FLAG_RESET exactly the returned pages are reset, atomically
    with the read (a write racing the call is reported now or next time).

    count=None means len(addresses). Checks in Wine's order: count 0 ->
    ERROR_INVALID_PARAMETER; no array (or one too short or read-only) ->
    ERROR_NOACCESS; flags, size 0, a range leaving the region ->
    ERROR_INVALID_PARAMETER. This is the per-frame call of a game loop, so the
    common case runs few Python operations and one native call."""
    if (type(addresses) is np.ndarray and addresses.dtype is _UINTP
            and addresses.flags.c_contiguous and addresses.flags.writeable
            and addresses.ndim == 1 and (count is None or type(count) is int)):
        # The common call: a usable array. cffi converts the integers (and
        # refuses what is not one in 0..2**64-1); the index checks the rest.
        capacity = len(addresses) if count is None else count
        if 0 < capacity <= len(addresses):
            try:
                found = kernel.get_write_watch(flags, base, size, addresses, capacity)
            except (TypeError, OverflowError):
                found = None
            if found is not None:
                return found
    return _get_written_checked(flags, base, size, addresses, count)


def _get_written_checked(flags: Any, base: Any, size: Any, addresses: Any, count: Any) -> int:
    """get_written for every other call: each check in Wine's order with its
    own error, and the scan of a forked child's region."""
    if addresses is not None and not (type(addresses) is np.ndarray
                                      and addresses.dtype is _UINTP
                                      and addresses.flags.c_contiguous
                                      and addresses.ndim == 1):
        _check_output_array(addresses)
    capacity = 0 if addresses is None else len(addresses)
    count = capacity if count is None else _uint(count, "count")
    if count == 0:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, "count is 0")
    if addresses is None:
        raise WriteWatchError(ERROR_NOACCESS, "no addresses array for a nonzero count")
    if count > capacity:
        raise WriteWatchError(ERROR_NOACCESS, f"count {count} is larger than the addresses "
                              f"array ({capacity})")
    if not addresses.flags.writeable:
        raise WriteWatchError(ERROR_NOACCESS, "the addresses array is read-only")
    flags = _uint(flags, "flags")
    base = _uint(base, "base")
    size = _uint(size, "size")
    found = kernel.get_write_watch(flags, base, size, addresses, count)
    if found is not None:
        return found
    # The native index declined: find out why (raising the precise error), or
    # refresh a forked child's region and scan here.
    if flags & ~WRITE_WATCH_FLAG_RESET:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, f"invalid flags {flags:#x}")
    with _watching(base, size) as (watcher, spans, first, last):
        if not kernel.output_writable(addresses, count):
            raise WriteWatchError(ERROR_NOACCESS, "the addresses array lies in memory that "
                                  "cannot be written")
        # The walk stops where the array fills: later pages are neither reported
        # nor reset (Windows' capped RESET).
        return watcher.written(spans, first, last, bool(flags), addresses, count)


def reset_written(base: Any, size: Any) -> None:
    """ResetWriteWatch: mark every page of [base, base+size) unwritten."""
    with _watching(_uint(base, "base"), _uint(size, "size")) as (watcher, spans, first, last):
        watcher.reset(spans, first, last)


@contextlib.contextmanager
def _watching(base: int, size: int) -> Iterator[tuple[kernel.Watcher, kernel.Spans, int, int]]:
    """The watcher, committed spans and page bounds of the write-watch region
    holding [base, base+size), under the region's lock and current in this
    process; ERROR_INVALID_PARAMETER for size 0 or a range outside one."""
    if size == 0:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, "size is 0")
    region, first, last = _watched_region(base, size)
    with region.lock:
        if region.released:
            raise WriteWatchError(ERROR_INVALID_PARAMETER, "the region was released")
        region.sync_after_fork()
        assert region.watcher is not None
        yield region.watcher, region.scan_spans(), first, last


def prepare_kernel_write(address: Any, size: Any) -> None:
    """Call before the kernel writes into [address, address+size) of a
    write-watch region (os.readv, readinto, recv_into into a view): the pages
    are marked written and made writable, so that the kernel's write succeeds
    on every backend. Needed by the mprotect backend (armed pages are
    read-only and the kernel does not fault into a signal handler) and by the
    uffd backend without privilege; harmless elsewhere. Memory outside
    write-watch regions is left alone."""
    address = _uint(address, "address")
    size = _uint(size, "size")
    if size == 0:
        return
    region = _table.find(address)
    if region is None or region.watcher is None:
        return
    first, last = _page_floor(address), min(_page_ceil(address + size), region.end)
    with region.lock:
        if region.released:
            return
        region.sync_after_fork()
        for start, end in region.committed_spans(first, last):
            region.watcher.prepare_kernel_write(start, end - start)


# ---------------------------------------------------------------------------
# numpy views


class _ViewAnchor:
    """The base object of a view: numpy reads the memory's address from
    __array_interface__, and the view keeps this (and so the mapping) alive."""

    __slots__ = ("__array_interface__", "mapping")

    def __init__(self, address: int, size: int, readonly: bool, mapping: _Mapping) -> None:
        self.__array_interface__ = {
            "version": 3,
            "shape": (size,),
            "typestr": "|u1",
            "data": (address, readonly),
        }
        self.mapping = mapping


def as_array(address: Any, size: Any, dtype: npt.DTypeLike = np.uint8) -> np.ndarray:
    """A numpy view of [address, address+size) of a VirtualAlloc region.

    Every page must be committed and accessible; the view is read-only where a
    page is PAGE_READONLY. The view keeps the memory mapped even after
    VirtualFree(MEM_RELEASE). Decommitting or making its pages PAGE_NOACCESS
    while the view is in use makes them fault, as on Windows."""
    address = _uint(address, "address")
    size = _uint(size, "size")
    dtype = np.dtype(dtype)
    if size == 0 or dtype.itemsize == 0 or size % dtype.itemsize:
        raise ValueError(f"size {size} is not a positive multiple of {dtype} "
                         f"({dtype.itemsize} bytes)")
    region = _table.find(address)
    if region is None or address + size > region.end:
        raise WriteWatchError(ERROR_INVALID_ADDRESS,
                              f"[{address:#x}, {address + size:#x}) is not inside one "
                              "VirtualAlloc region")
    first, last = _page_floor(address), _page_ceil(address + size)
    with region.lock:
        if region.mapping is None:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
        base_page = region.base // PAGE_SIZE
        states = {value for _, _, value in region.pages.runs(first // PAGE_SIZE - base_page,
                                                             last // PAGE_SIZE - base_page)}
        if states & {_RESERVED, PAGE_NOACCESS}:
            raise WriteWatchError(ERROR_INVALID_ADDRESS,
                                  "the range is not all committed and accessible")
        anchor = _ViewAnchor(address, size, PAGE_READONLY in states, region.mapping)
    return np.asarray(anchor).view(dtype)
