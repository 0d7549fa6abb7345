"""VirtualAlloc, VirtualFree, VirtualProtect and VirtualQuery on the region
table: Windows' checks on each call, then the work on the region's pages and
its watcher. Errors are raised as WriteWatchError with the Windows code;
api.py turns them into return values and the thread's last error.
"""

from __future__ import annotations

import errno
from typing import Any, NamedTuple

from writewatch import backends, index, kernel, latch, regions
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
    PAGE_READWRITE,
    allocation_type_name,
    protection_name,
)
from writewatch.errors import WriteWatchError, uint
from writewatch.kernel import page_ceil, page_floor
from writewatch.regions import RESERVED


def _named(value: int, names: dict[int, str]) -> str:
    """A constant by its Windows name (its hex value if it has none here)."""
    return names.get(value, f"{value:#x}")


_STATE_NAMES: dict[int, str] = {MEM_COMMIT: "MEM_COMMIT", MEM_RESERVE: "MEM_RESERVE",
                                 MEM_FREE: "MEM_FREE"}
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
                f"AllocationProtect={protection_name(self.AllocationProtect)}, "
                f"RegionSize={self.RegionSize:#x}, State={_named(self.State, _STATE_NAMES)}, "
                f"Protect={protection_name(self.Protect)}, "
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





def _check_protect(protect: Any) -> int:
    protect = uint(protect, "protect")
    if protect not in regions.POSIX_PROT:
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
    if _collected:
        release_collected()
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
    if address + size > regions.USER_SPACE_END:
        raise WriteWatchError(ERROR_INVALID_ADDRESS if address else ERROR_NOT_ENOUGH_MEMORY,
                              "the range does not fit in the user address space")

    if allocation_type & MEM_RESERVE and 0 < address < regions.ALLOCATION_GRANULARITY:
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

    reservation = regions.find(address)
    first, last = page_floor(address), page_ceil(address + size)
    if reservation is None or last > reservation.end:
        raise WriteWatchError(ERROR_INVALID_ADDRESS,
                              f"[{first:#x}, {last:#x}) is not inside one reservation")
    _commit(reservation, first, last, protect)
    return first


def _reserve(address: int, size: int, protect: int, write_watch: bool,
             backend_name: str) -> regions.Region:
    base = address & ~(regions.ALLOCATION_GRANULARITY - 1)
    length = page_ceil(address + size) - base if address else page_ceil(size)
    backend = None
    if write_watch:
        try:
            backend = backends.backend(backend_name)
        except backends.BackendUnavailableError as exc:
            raise WriteWatchError(ERROR_NOT_SUPPORTED, str(exc)) from exc
    try:
        base = kernel.map_reserved(base, length, regions.ALLOCATION_GRANULARITY)
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
    region = regions.Region(base, length, protect, watcher, backend)
    regions.insert(region)
    return region


def _commit(region: regions.Region, first: int, last: int, protect: int) -> None:
    with region.lock:
        if region.released:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
        region.sync_after_fork()
        prot = regions.POSIX_PROT[protect]
        watcher = region.watcher
        done: list[tuple[int, int, int]] = []
        if protect != PAGE_READWRITE:
            region.forbid_output(first, last)  # committed pages among them may change
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
                        for span_start, span_end, clean in latch.split(start, end, latched):
                            watcher.watch(span_start, span_end - span_start, prot, clean=clean)
                    else:
                        watcher.protect(start, end - start, prot)
                    done.append((start, end, value))
        except OSError as exc:
            if watcher is not None:
                _undo_commit(watcher, done)
            region.restore_output(first, last)
            raise _mapping_error(exc, "cannot commit") from exc
        region.assign(first, last, protect)


def _undo_commit(watcher: kernel.Watcher, done: list[tuple[int, int, int]]) -> None:
    """Put back what a failed commit changed, span by span. Lock held."""
    for start, end, value in done:
        if value == RESERVED:
            watcher.unwatch(start, end - start)
            kernel.protect(start, end - start, kernel.PROT_NONE)
        else:
            watcher.protect(start, end - start, regions.POSIX_PROT[value])


def free(address: Any, size: Any, free_type: Any) -> None:
    """VirtualFree: MEM_DECOMMIT a range, or MEM_RELEASE a whole region."""
    if _collected:
        release_collected()
    address = uint(address, "address")
    size = uint(size, "size")
    free_type = uint(free_type, "free_type")
    if free_type not in (MEM_DECOMMIT, MEM_RELEASE):
        raise WriteWatchError(ERROR_INVALID_PARAMETER,
                              f"free type {allocation_type_name(free_type)} is not "
                              "MEM_DECOMMIT or MEM_RELEASE")
    region = regions.find(address)
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
        before = list(region.spans(first, last))
        # The index learns first, and the calls that began before have
        # finished: no scan walks pages while they are unregistered (the
        # pagemap backend would read every one written), and no call stores
        # its output into them once they are gone.
        region.assign(first, last, RESERVED)
        index.quiesce(region.base)
        try:
            # Windows drops the dirty state of decommitted pages: unwatching
            # forgets it, and dropping the pages leaves nothing behind.
            if region.watcher is not None:
                for start, end in committed:
                    region.watcher.unwatch(start, end - start)
            kernel.discard(first, last - first)
            kernel.protect(first, last - first, kernel.PROT_NONE)
        except OSError as exc:
            for start, end, value in before:
                region.assign(start, end, value)
            raise _mapping_error(exc, "cannot decommit") from exc


def release_region(region: regions.Region) -> None:
    """Release this region object (never whatever region owns its addresses
    now): out of the table at once, then its index entry and watcher. Its
    address space stays mapped while a numpy view over it lives, so the view
    never faults."""
    if not regions.remove(region):
        raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
    with region.lock:
        _release_removed(region)


# Regions of collected WatchedMemory objects whose release had to wait: a
# finalizer runs wherever the garbage collector does, possibly in a thread that
# holds the region table's or the region's lock, so it never blocks on them.
_collected: list[regions.Region] = []


def release_collected(region: regions.Region | None = None) -> None:
    """Release a collected object's region (and any whose release was put
    off) without ever waiting for a lock: a busy one puts the release off to
    the next VirtualAlloc, VirtualFree or collection. A region already
    released is left alone (a later region may own its addresses)."""
    if region is not None:
        _collected.append(region)
    for _ in range(len(_collected)):
        try:
            each = _collected.pop(0)
        except IndexError:
            return
        if not each.lock.acquire(blocking=False):
            _collected.append(each)
            continue
        try:
            removed = regions.remove(each, blocking=False)
            if removed is None:
                _collected.append(each)
            elif removed:
                _release_removed(each)
        finally:
            each.lock.release()


def _release_removed(region: regions.Region) -> None:
    """The rest of a release, once the region left the table. Lock held."""
    watcher = region.watcher
    # Asked before the index forgets the region: a parent's registrations
    # are not this process's to undo.
    ours = watcher is not None and (watcher.survives_fork or index.current(region.base))
    spans = list(region.spans(region.base, region.end)) if ours else []
    index.remove(region.base)
    if watcher is not None:
        if ours:
            # A view may outlive the release: leave its pages plainly
            # accessible, not armed for a tracker that is about to go.
            for start, end, value in spans:
                if value != RESERVED:
                    watcher.unwatch(start, end - start)
                    kernel.protect(start, end - start, regions.POSIX_PROT[value])
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
    region = regions.find(first)
    if region is None or last > region.end:
        raise WriteWatchError(ERROR_INVALID_ADDRESS,
                              f"[{first:#x}, {last:#x}) is not inside one allocation")
    with region.lock:
        if region.released:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
        if region.reserved_spans(first, last):
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the range is not all committed")
        old, _ = region.protection_at(first)
        region.sync_after_fork()
        watcher = region.watcher
        if new_protect != PAGE_READWRITE:
            region.forbid_output(first, last)  # quiesces
        try:
            if watcher is None:
                kernel.protect(first, last - first, regions.POSIX_PROT[new_protect])
            else:
                with latch.latching(region):
                    watcher.protect(first, last - first, regions.POSIX_PROT[new_protect])
                    latch.latch_written(region, first, last)
        except OSError as exc:
            region.restore_output(first, last)
            raise _mapping_error(exc, "cannot change protection") from exc
        # The range is all committed: only protections change.
        region.assign(first, last, new_protect)
    return old


def query(address: Any) -> MEMORY_BASIC_INFORMATION:
    """VirtualQuery. Memory writewatch did not allocate reads as MEM_FREE, up to
    the next region writewatch knows of."""
    address = uint(address, "address")
    if address >= regions.USER_SPACE_END:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, f"{address:#x} is above user space")
    page = page_floor(address)
    region = regions.find(page)
    if region is None:
        return MEMORY_BASIC_INFORMATION(page, 0, 0, regions.next_base_after(page) - page,
                                        MEM_FREE, PAGE_NOACCESS, 0)
    with region.lock:
        if region.released:  # the index forgot it: as if VirtualQuery came first
            return query(address)
        value, run_end = region.protection_at(page)
    committed = value != RESERVED
    return MEMORY_BASIC_INFORMATION(
        BaseAddress=page,
        AllocationBase=region.base,
        AllocationProtect=region.allocation_protect,
        RegionSize=run_end - page,
        State=MEM_COMMIT if committed else MEM_RESERVE,
        Protect=value if committed else 0,
        Type=MEM_PRIVATE,
    )


def committed_size(address: Any) -> int:
    """Bytes committed in the region that contains address."""
    region = regions.find(uint(address, "address"))
    if region is None:
        raise WriteWatchError(ERROR_INVALID_ADDRESS, f"{address:#x} is not allocated")
    with region.lock:
        if region.released:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
        return sum(end - start for start, end in region.committed_spans(region.base, region.end))


def info(address: Any) -> RegionInfo:
    """The region that contains address: its bounds and write-watch backend."""
    address = uint(address, "address")
    region = regions.find(address)
    if region is None or region.released:
        raise WriteWatchError(ERROR_INVALID_ADDRESS, f"{address:#x} is not allocated")
    backend = region.backend
    return RegionInfo(region.base, region.size, None if backend is None else backend.name,
                      backend is not None and backend.kernel_writes_fault())
