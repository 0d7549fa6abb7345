"""The region table: what VirtualAlloc made.

A region is one reservation (64 KiB aligned, PROT_NONE, MAP_NORESERVE). Its
pages' state (commit, protection, the latch) lives in one place, the native
index (index.py), as runs of equal state: bookkeeping costs one entry per run,
never one per page, and nothing is paid for reserved memory. A Region asks the
index and changes it there, and keeps no copy. Only committed pages of
write-watch regions are handed to the region's watcher: the kernel never walks
or allocates page tables for the reservation as a whole. The index serves
GetWriteWatch and ResetWriteWatch in one call and makes their range checks.

The calls that change it (VirtualAlloc, VirtualFree, VirtualProtect) are in
memory.py; GetWriteWatch and ResetWriteWatch in watch.py.
"""

from __future__ import annotations

import contextlib
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterator

from writewatch import index, kernel
from writewatch.constants import (
    PAGE_NOACCESS,
    PAGE_READONLY,
    PAGE_READWRITE,
)

PAGE_SIZE = kernel.PAGE_SIZE
ALLOCATION_GRANULARITY = 0x10000
# x86_64 user space ends one page below 2**47 (TASK_SIZE with four-level page
# tables; five-level needs an opt-in mmap hint).
USER_SPACE_END = (1 << 47) - PAGE_SIZE
RESERVED = 0  # a reserved page's protection; a committed page has its PAGE_* value

POSIX_PROT: dict[int, int] = {
    PAGE_NOACCESS: kernel.PROT_NONE,
    PAGE_READONLY: kernel.PROT_READ,
    PAGE_READWRITE: kernel.PROT_READ | kernel.PROT_WRITE,
}


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
    """One VirtualAlloc reservation, entered in the index (index.add) first."""

    __slots__ = ("allocation_protect", "backend", "base", "listed", "lock", "mapping", "size",
                 "watcher", "write_watch")

    def __init__(self, base: int, size: int, allocation_protect: int,
                 watcher: kernel.Watcher | None, backend: kernel.Backend | None = None) -> None:
        self.base = base
        self.backend = backend
        self.size = size
        self.allocation_protect = allocation_protect
        self.watcher = watcher
        self.write_watch = watcher is not None
        self.lock = threading.Lock()
        # In the table: False from the moment a release takes it out, so that
        # whatever holds this object (a WatchedMemory, a finalizer) sees it is
        # gone even once a new region owns the same addresses.
        self.listed = False
        self.mapping: Mapping | None = Mapping(base, size)

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def released(self) -> bool:
        return self.mapping is None

    # -- the pages' state, as the index keeps it. Lock held.

    def spans(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, protection) address spans of [first, last) with one
        protection each, RESERVED for reserved pages."""
        return index.pages(self.base, first, last, index.PAGES_PROTECTION)

    def committed_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        """Address spans of committed pages in [first, last), adjacent runs merged."""
        spans: list[tuple[int, int]] = []
        for start, end, value in self.spans(first, last):
            if value == RESERVED:
                continue
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        return spans

    def reserved_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        return [(s, e) for s, e, value in self.spans(first, last) if value == RESERVED]

    def protection_at(self, address: int) -> tuple[int, int]:
        """The protection of the page at address (RESERVED if reserved), and the
        end of the run of pages sharing it."""
        _, end, value = next(self.spans(address, self.end))
        return value, end

    def writable_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        """Address spans of the committed read-write pages in [first, last): the
        pages the kernel may write for a caller (prepare_kernel_write) and
        where GetWriteWatch's output array may lie."""
        return [(start, end)
                for start, end, value in index.pages(self.base, first, last,
                                                     index.PAGES_WRITABLE)
                if value]

    def assign(self, first: int, last: int, protection: int) -> None:
        """Give pages [first, last) the protection (RESERVED: decommitted), and
        end a change forbid_output began. New calls see it at once: the index
        changes only the runs around the range."""
        writable = index.PAGES_WRITABLE if protection == PAGE_READWRITE else 0
        index.set_pages(self.base, first, last,
                        index.PAGES_PROTECTION | index.PAGES_WRITABLE | index.PAGES_CHANGING,
                        protection | writable)

    def forbid_output(self, first: int, last: int) -> None:
        """Before pages [first, last) stop being writable (a protection
        change, a decommit): the index refuses them as an output array from
        now on, and the calls storing into them already have finished. Lock
        held; restore_output undoes it if the change fails, assign ends it."""
        index.set_pages(self.base, first, last, index.PAGES_CHANGING, index.PAGES_CHANGING)
        index.quiesce(self.base)

    def restore_output(self, first: int, last: int) -> None:
        """A change after forbid_output failed: pages [first, last) may hold
        an output array again as far as their protection allows. Lock held."""
        index.set_pages(self.base, first, last, index.PAGES_CHANGING, 0)

    # -- the VirtualProtect latch (docs/semantics.md rule 11; latch.py). Lock held.

    def latched_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        """Address spans of the latched pages in [first, last)."""
        return [(start, end)
                for start, end, value in index.pages(self.base, first, last,
                                                     index.PAGES_LATCHED)
                if value]

    def set_latched(self, first: int, last: int, latched: bool) -> None:
        """Latch or unlatch [first, last); the index hands this region's calls
        to latch.py while any page is latched."""
        index.set_pages(self.base, first, last, index.PAGES_LATCHED,
                        index.PAGES_LATCHED if latched else 0)

    def sync_after_fork(self) -> None:
        """In a forked child, register the committed pages with the child's own
        kernel objects. The child's page tables carry no dirty state, so every page
        that may have been written reads written until it is reset. Lock held."""
        if self.watcher is None or index.current(self.base):
            return
        if not self.watcher.survives_fork:
            for start, end, value in list(self.spans(self.base, self.end)):
                if value != RESERVED:
                    self.watcher.watch(start, end - start, POSIX_PROT[value], clean=False)
        index.refresh(self.base, self.watcher)


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
            region.listed = True

    def remove(self, region: Region, blocking: bool = True) -> bool | None:
        """Take this very region out (never whatever now lies at its base):
        True, False if it is not in the table, None if the lock was busy and
        blocking is False."""
        if not self.lock.acquire(blocking):
            return None
        try:
            if self.regions.get(region.base) is not region:
                return False
            del self.regions[region.base]
            self.bases.remove(region.base)
            region.listed = False
            return True
        finally:
            self.lock.release()

    def snapshot(self) -> list[Region]:
        with self.lock:
            return list(self.regions.values())


_table = _Table()


def find(address: int) -> Region | None:
    """The region holding address, if writewatch allocated it."""
    return _table.find(address)


def overlapping(start: int, end: int) -> list[Region]:
    """The regions holding any byte of [start, end), by ascending base."""
    found = []
    region = _table.find(start)
    if region is not None:
        found.append(region)
    at = start
    while (base := _table.next_base_after(at)) < end:
        region = _table.find(base)
        if region is not None:
            found.append(region)
        at = base
    return found


def next_base_after(address: int) -> int:
    """The base of the first region above address (or the end of user space)."""
    return _table.next_base_after(address)


def insert(region: Region) -> None:
    _table.insert(region)


def remove(region: Region, blocking: bool = True) -> bool | None:
    """Take this region out of the table: True, False if it is not there (a
    release took it out already), None if blocking is False and the table
    was busy."""
    return _table.remove(region, blocking)


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
