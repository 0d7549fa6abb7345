"""The region table: what VirtualAlloc made, page by page, and the checks
Windows makes before it touches any of it.

A region is one reservation (64 KiB aligned, PROT_NONE, MAP_NORESERVE). Its
pages are stored as runs of equal state (pageruns.py), so bookkeeping costs one
entry per run, never one per page, and nothing is paid for reserved memory.
Only committed pages of write-watch regions are handed to the region's watcher:
the kernel never walks or allocates page tables for the reservation as a whole.
Every reservation is mirrored into the native index (index.py), which serves
GetWriteWatch and ResetWriteWatch in one call and makes their range checks.

Errors are raised as WriteWatchError carrying the Windows error code; api.py
turns them into return values and the thread's last error.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from writewatch import backends, index, kernel
from writewatch.constants import (
    ERROR_INVALID_ADDRESS,
    ERROR_INVALID_PARAMETER,
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
    allocation_type_name,
    protection_name,
)
from writewatch.errors import WriteWatchError, uint
from writewatch.kernel import page_ceil, page_floor
from writewatch.pageruns import RESERVED, PageRuns

PAGE_SIZE = kernel.PAGE_SIZE
ALLOCATION_GRANULARITY = 0x10000
# x86_64 user space ends one page below 2**47 (TASK_SIZE with four-level page
# tables; five-level needs an opt-in mmap hint).
USER_SPACE_END = (1 << 47) - PAGE_SIZE

_POSIX_PROT = {
    PAGE_NOACCESS: kernel.PROT_NONE,
    PAGE_READONLY: kernel.PROT_READ,
    PAGE_READWRITE: kernel.PROT_READ | kernel.PROT_WRITE,
}


def _named(value: int, names: dict[int, str]) -> str:
    """A constant by its Windows name (its hex value if it has none here)."""
    return names.get(value, f"{value:#x}")


_STATE_NAMES = {MEM_COMMIT: "MEM_COMMIT", MEM_RESERVE: "MEM_RESERVE", MEM_FREE: "MEM_FREE"}
_PROTECT_NAMES = {0: "0", PAGE_NOACCESS: "PAGE_NOACCESS", PAGE_READONLY: "PAGE_READONLY",
                  PAGE_READWRITE: "PAGE_READWRITE"}
_TYPE_NAMES = {0: "0", MEM_PRIVATE: "MEM_PRIVATE"}


class MEMORY_BASIC_INFORMATION(NamedTuple):  # noqa: N801 - the Windows name
    """What VirtualQuery reports, with the Windows field names; printed with
    hex addresses and the constants' names."""

    BaseAddress: int
    AllocationBase: int
    AllocationProtect: int
    RegionSize: int
    State: int
    Protect: int
    Type: int

    def __repr__(self) -> str:
        return (f"MEMORY_BASIC_INFORMATION(BaseAddress={self.BaseAddress:#x}, "
                f"AllocationBase={self.AllocationBase:#x}, "
                f"AllocationProtect={_named(self.AllocationProtect, _PROTECT_NAMES)}, "
                f"RegionSize={self.RegionSize:#x}, State={_named(self.State, _STATE_NAMES)}, "
                f"Protect={_named(self.Protect, _PROTECT_NAMES)}, "
                f"Type={_named(self.Type, _TYPE_NAMES)})")


class RegionInfo(NamedTuple):
    """What writewatch knows of the VirtualAlloc region holding an address.

    backend is the write-watch backend's name (None for a region without
    MEM_WRITE_WATCH); kernel_writes_fault says whether the kernel's own writes
    into it (read(2), readinto, recv_into) fail with EFAULT unless
    prepare_kernel_write comes first (writewatch.read_into and recv_into do)."""

    base: int
    size: int
    backend: str | None
    kernel_writes_fault: bool

    def __repr__(self) -> str:
        return (f"RegionInfo(base={self.base:#x}, size={self.size:#x}, "
                f"backend={self.backend!r}, kernel_writes_fault={self.kernel_writes_fault})")


class Mapping:
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

    __slots__ = ("_scan_spans", "allocation_protect", "backend", "base",
                 "epoch", "latched", "lock", "mapping", "pages", "size", "watcher",
                 "write_watch")

    def __init__(self, base: int, size: int, allocation_protect: int,
                 watcher: kernel.Watcher | None, backend: kernel.Backend | None = None) -> None:
        self.base = base
        self.backend = backend
        self.size = size
        self.allocation_protect = allocation_protect
        self.watcher = watcher
        self.write_watch = watcher is not None
        self.lock = threading.Lock()
        self.mapping: Mapping | None = Mapping(base, size)
        self.pages = PageRuns(size // PAGE_SIZE)
        self.epoch = kernel.process_epoch()
        self._scan_spans: kernel.Spans | None = None
        # Pages a VirtualProtect latched (docs/semantics.md rule 11) as runs of
        # 1, or None while there are none (the common case, which costs nothing).
        self.latched: PageRuns | None = None

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
            if value == RESERVED:
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
        return [(s, e) for s, e, value in self.spans(first, last) if value == RESERVED]

    def assign(self, first: int, last: int, value: int, *, commit_changes: bool = True) -> None:
        """Give pages [first, last) the value and tell the index. A protection
        change of committed pages (commit_changes False) leaves the committed
        spans as they are: only the read-write spans around the range change,
        so its cost does not grow with the region's runs."""
        self.pages.assign((first - self.base) // PAGE_SIZE, (last - self.base) // PAGE_SIZE,
                          value)
        index.set_writable(self.base, first, last, value == PAGE_READWRITE)
        if commit_changes:
            self._scan_spans = None
            self._update_index()

    def writable_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        """Address spans of the committed read-write pages in [first, last): the
        pages the kernel may write for a caller (prepare_kernel_write) and
        where GetWriteWatch's output array may lie."""
        return [(start, end) for start, end, value in self.spans(first, last)
                if value == PAGE_READWRITE]

    # -- the VirtualProtect latch (docs/semantics.md rule 11). Latched pages are
    # written pages that a decommit keeps written until a reset: while
    # committed the backend holds their written state, once decommitted only
    # self.latched does. While any exist the index refuses this region's
    # GetWriteWatch/ResetWriteWatch and watch.py serves them through walk()
    # and reset(). Lock held for all of these.

    def latched_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        """Address spans of the latched pages in [first, last)."""
        if self.latched is None:
            return []
        base = self.base
        return [(base + start * PAGE_SIZE, base + end * PAGE_SIZE)
                for start, end, value in self.latched.runs((first - base) // PAGE_SIZE,
                                                           (last - base) // PAGE_SIZE)
                if value]

    def _set_latched(self, first: int, last: int, latched: bool) -> None:
        if self.latched is None:
            if not latched:
                return
            self.latched = PageRuns(self.size // PAGE_SIZE)
            index.set_latched(self.base, True)
        self.latched.assign((first - self.base) // PAGE_SIZE,
                            (last - self.base) // PAGE_SIZE, int(latched))
        if not any(self.latched.values):
            self.latched = None
            index.set_latched(self.base, False)

    def latch_written(self, first: int, last: int) -> None:
        """VirtualProtect over [first, last) (all committed): latch the pages
        written now. One scan without reset; nothing more unless some are."""
        assert self.watcher is not None
        npages = (last - first) // PAGE_SIZE
        found = np.empty(npages, np.uintp)
        n = self.watcher.get_write_watch(kernel.Spans([(first, last)]), first, last, False,
                                         found, npages)
        for start, end in _address_runs(found[:n]):
            self._set_latched(start, end, True)

    def walk(self, first: int, last: int, reset: bool, capacity: int) -> np.ndarray:
        """GetWriteWatch over [first, last) of a region with latched pages: the
        written committed pages (the backend's scan) and the latched
        decommitted ones, ascending, at most capacity; with reset, exactly the
        reported pages are reset and unlatched (rule 9)."""
        assert self.watcher is not None
        room = min(capacity, (last - first) // PAGE_SIZE)
        found = np.empty(room, np.uintp)
        count = 0
        for start, end, value in list(self.spans(first, last)):
            if count == room:
                break
            if value == RESERVED:
                for span_start, span_end in self.latched_spans(start, end):
                    n = min((span_end - span_start) // PAGE_SIZE, room - count)
                    found[count:count + n] = np.arange(span_start, span_start + n * PAGE_SIZE,
                                                       PAGE_SIZE, dtype=np.uintp)
                    count += n
                    if reset:
                        self._set_latched(span_start, span_start + n * PAGE_SIZE, False)
                    if count == room:
                        break
                continue
            n = self.watcher.get_write_watch(kernel.Spans([(start, end)]), start, end, reset,
                                             found[count:], room - count)
            if reset and n:
                # The walk passed [start, walked); every latched page there was
                # written, so was reported and reset.
                walked = end if count + n < room else int(found[count + n - 1]) + PAGE_SIZE
                self._set_latched(start, walked, False)
            count += n
        return found[:count]

    def reset(self, first: int, last: int) -> None:
        """ResetWriteWatch over [first, last) of a region with latched pages."""
        assert self.watcher is not None
        for start, end in self.committed_spans(first, last):
            npages = (end - start) // PAGE_SIZE
            self.watcher.get_write_watch(kernel.Spans([(start, end)]), start, end, True,
                                         np.empty(npages, np.uintp), npages)
        self._set_latched(first, last, False)

    def _update_index(self) -> None:
        """Tell the native index the committed spans (and the handle). Lock held.
        The read-write spans are kept there by assign, range by range."""
        index.update(self.base, self.watcher, self.scan_spans())

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
                if value != RESERVED:
                    self.watcher.watch(start, end - start, _POSIX_PROT[value], clean=False)
        self._update_index()
        self.epoch = kernel.process_epoch()


def _address_runs(addresses: np.ndarray) -> list[tuple[int, int]]:
    """Ascending page addresses as [start, end) spans of consecutive pages."""
    if len(addresses) == 0:
        return []
    breaks = np.flatnonzero(np.diff(addresses) != PAGE_SIZE) + 1
    starts = addresses[np.r_[0, breaks]]
    ends = addresses[np.r_[breaks - 1, len(addresses) - 1]] + PAGE_SIZE
    return [(int(start), int(end)) for start, end in zip(starts, ends, strict=True)]


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


def find(address: int) -> Region | None:
    """The region holding address, if writewatch allocated it."""
    return _table.find(address)


def live_regions() -> list[Region]:
    """Every region not yet released."""
    return _table.snapshot()


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
    # Watch the child's memory again now (the lower layers' steps have dropped
    # the parent's descriptors), so that it is watched whichever call comes
    # first, process_memwatch included. A failure here is retried lazily.
    for region in _table.regions.values():
        with contextlib.suppress(OSError):
            region.sync_after_fork()


kernel.on_fork("regions", before=_before_fork, parent=_after_fork_in_parent,
               child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# VirtualAlloc / VirtualFree / VirtualProtect / VirtualQuery


def _check_protect(protect: Any) -> int:
    protect = uint(protect, "protect")
    if protect not in _POSIX_PROT:
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              f"protection {protection_name(protect)} is not supported "
                              "(only PAGE_NOACCESS, PAGE_READONLY and PAGE_READWRITE are)")
    return protect


def _mapping_error(exc: OSError, what: str) -> WriteWatchError:
    code = ERROR_NOT_ENOUGH_MEMORY if exc.errno == errno.ENOMEM else ERROR_INVALID_ADDRESS
    return WriteWatchError(code, f"{what}: {exc.strerror}")


def allocate(address: Any, size: Any, allocation_type: Any, protect: Any,
             backend: backends.BackendName = "auto") -> int:
    """VirtualAlloc: reserve and/or commit; returns the base of what was allocated.

    backend names the write-watch backend of a MEM_WRITE_WATCH reservation
    ("auto" picks the best this machine has)."""
    address = uint(address, "address")
    size = uint(size, "size")
    allocation_type = uint(allocation_type, "allocation_type")
    protect = _check_protect(protect)
    unsupported = allocation_type & ~(MEM_COMMIT | MEM_RESERVE | MEM_WRITE_WATCH)
    if unsupported:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, f"allocation type "
                              f"{allocation_type_name(unsupported)} is not supported")
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
            first, last = ((page_floor(address), page_ceil(address + size)) if address
                           else (region.base, region.end))
            try:
                _commit(region, first, last, protect)
            except WriteWatchError:
                release_region(region)
                raise
        return region.base

    reservation = _table.find(address)
    first, last = page_floor(address), page_ceil(address + size)
    if reservation is None or last > reservation.end:
        raise WriteWatchError(ERROR_INVALID_ADDRESS,
                              f"[{first:#x}, {last:#x}) is not inside one reservation")
    _commit(reservation, first, last, protect)
    return first


def _reserve(address: int, size: int, protect: int, write_watch: bool,
             backend_name: str) -> Region:
    base = address & ~(ALLOCATION_GRANULARITY - 1)
    length = page_ceil(address + size) - base if address else page_ceil(size)
    backend = None
    if write_watch:
        try:
            backend = backends.backend(backend_name)
        except backends.BackendUnavailableError as exc:
            raise WriteWatchError(ERROR_NOT_SUPPORTED, str(exc)) from exc
    try:
        base = kernel.map_reserved(base, length, ALLOCATION_GRANULARITY)
    except OSError as exc:
        raise _mapping_error(exc, f"cannot reserve {length:#x} bytes at {base:#x}") from exc
    watcher = None
    if backend is not None:
        try:
            # Once for the whole reservation: every VMA later split off inherits it.
            kernel.no_huge_pages(base, length)
            watcher = backend.attach(base, length)
        except OSError as exc:
            kernel.unmap(base, length)
            raise _mapping_error(exc, "cannot watch the reservation") from exc
    try:
        index.add(base, length, watcher)
    except OSError as exc:
        if watcher is not None:
            watcher.detach()
        kernel.unmap(base, length)
        raise _mapping_error(exc, "cannot index the reservation") from exc
    region = Region(base, length, protect, watcher, backend)
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
                    if value == RESERVED:
                        # A latched page decommitted and committed again is
                        # still written (rule 11).
                        latched = region.latched_spans(start, end)
                        for span_start, span_end, clean in _split(start, end, latched):
                            watcher.watch(span_start, span_end - span_start, prot, clean=clean)
                    else:
                        watcher.protect(start, end - start, prot)
                    done.append((start, end, value))
        except OSError as exc:
            if watcher is not None:
                _undo_commit(watcher, done)
            raise _mapping_error(exc, "cannot commit") from exc
        region.assign(first, last, protect)


def _split(start: int, end: int,
           spans: list[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
    """[start, end) cut at the given spans inside it: (start, end, outside)."""
    at = start
    for span_start, span_end in spans:
        if at < span_start:
            yield at, span_start, True
        yield span_start, span_end, False
        at = span_end
    if at < end:
        yield at, end, True


def _undo_commit(watcher: kernel.Watcher, done: list[tuple[int, int, int]]) -> None:
    """Put back what a failed commit changed, span by span. Lock held."""
    for start, end, value in done:
        if value == RESERVED:
            watcher.unwatch(start, end - start)
            kernel.protect(start, end - start, kernel.PROT_NONE)
        else:
            watcher.protect(start, end - start, _POSIX_PROT[value])


def free(address: Any, size: Any, free_type: Any) -> None:
    """VirtualFree: MEM_DECOMMIT a range, or MEM_RELEASE a whole region."""
    address = uint(address, "address")
    size = uint(size, "size")
    free_type = uint(free_type, "free_type")
    if free_type not in (MEM_DECOMMIT, MEM_RELEASE):
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              f"free type {allocation_type_name(free_type)} is not "
                              "MEM_DECOMMIT or MEM_RELEASE")
    region = _table.find(address)
    if region is None:
        raise WriteWatchError(ERROR_INVALID_ADDRESS, f"{address:#x} is not allocated")
    # Size 0 means the whole allocation, named by any address in its first page.
    at_base = page_floor(address) == region.base
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
        first, last = page_floor(address), page_ceil(address + size)
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
        region.assign(first, last, RESERVED)


def release_region(region: Region) -> None:
    """Remove the region from the table at once. Its address space stays mapped
    while a numpy view over it lives, so the view never faults."""
    try:
        _table.remove(region)
    except (KeyError, ValueError):
        raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released") from None
    with region.lock:
        index.remove(region.base)
        watcher = region.watcher
        if watcher is not None:
            if watcher.survives_fork or region.epoch == kernel.process_epoch():
                # A view may outlive the release: leave its pages plainly
                # accessible, not armed for a tracker that is about to go.
                for start, end, value in list(region.spans(region.base, region.end)):
                    if value != RESERVED:
                        watcher.unwatch(start, end - start)
                        kernel.protect(start, end - start, _POSIX_PROT[value])
            watcher.detach()
        region.mapping = None


def set_protection(address: Any, size: Any, new_protect: Any) -> int:
    """VirtualProtect: returns the old protection of the first page."""
    address = uint(address, "address")
    size = uint(size, "size")
    new_protect = _check_protect(new_protect)
    if size == 0:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, "size is 0")
    first, last = page_floor(address), page_ceil(address + size)
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
                region.latch_written(first, last)
        except OSError as exc:
            raise _mapping_error(exc, "cannot change protection") from exc
        # The range is all committed: only protections change.
        region.assign(first, last, new_protect, commit_changes=False)
    return old


def query(address: Any) -> MEMORY_BASIC_INFORMATION:
    """VirtualQuery. Memory writewatch did not allocate reads as MEM_FREE, up to
    the next region writewatch knows of."""
    address = uint(address, "address")
    if address >= USER_SPACE_END:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, f"{address:#x} is above user space")
    page = page_floor(address)
    region = _table.find(page)
    if region is None:
        return MEMORY_BASIC_INFORMATION(page, 0, 0, _table.next_base_after(page) - page,
                                        MEM_FREE, PAGE_NOACCESS, 0)
    with region.lock:
        index = (page - region.base) // PAGE_SIZE
        _, run_end, value = next(region.pages.runs(index, region.pages.npages))
    committed = value != RESERVED
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
    region = _table.find(uint(address, "address"))
    if region is None:
        raise WriteWatchError(ERROR_INVALID_ADDRESS, f"{address:#x} is not allocated")
    with region.lock:
        return sum(end - start for start, end in region.committed_spans(region.base, region.end))


def info(address: Any) -> RegionInfo:
    """The region that contains address: its bounds and write-watch backend."""
    address = uint(address, "address")
    region = _table.find(address)
    if region is None or region.released:
        raise WriteWatchError(ERROR_INVALID_ADDRESS, f"{address:#x} is not allocated")
    backend = region.backend
    return RegionInfo(region.base, region.size, None if backend is None else backend.name,
                      backend is not None and backend.kernel_writes_fault())
