"""Scale: many live regions and many protection runs (counts, never timings).

The native tables (native/ctable.h: tracking.c's ranges, index.c's regions and
their page runs) are chunked: these tests cross chunk boundaries (256 items)
with lookups at region boundaries, with alloc/free churn beside native writer
threads that fault into the tables, and with 100,000 live regions on every
backend (no cap). The timings are in the bench (scenario 6).
"""

from __future__ import annotations

import numpy as np
import pytest
from forking import scaled_work
from native_writers import NativeWriters

import writewatch as ww
from writewatch import index, views

P = ww.PAGE_SIZE
REGION = 0x10000
NOACCESS = 998  # ERROR_NOACCESS
INVALID_PARAMETER = 87

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def _written(base: int, size: int, flags: int = 0) -> list[int] | None:
    out = np.empty(size // P, np.uintp)
    result, count, _ = ww.GetWriteWatch(flags, base, size, out)
    return None if result else [int(a) - base for a in out[:count]]


def _adjacent_regions(count: int, allocation_type: int) -> list[int]:
    """count reservations of 64 KiB side by side, in a free range found by
    reserving and releasing it. The process's own mappings (the allocator's,
    the tables') may take part of that range before it is filled: the kernel
    places them at the top of the highest hole, so the regions go in the lower
    half of a range twice their size, and a collision still means a retry."""
    for _attempt in range(10):
        probe = ww.VirtualAlloc(0, 2 * count * REGION, ww.MEM_RESERVE, ww.PAGE_NOACCESS)
        assert probe
        assert ww.VirtualFree(probe, 0, ww.MEM_RELEASE)
        bases = []
        for i in range(count):
            base = ww.VirtualAlloc(probe + i * REGION, REGION, allocation_type,
                                   ww.PAGE_READWRITE)
            if base != probe + i * REGION:
                break
            bases.append(base)
        else:
            return bases
        for base in bases:
            assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    raise AssertionError(f"no free range for {count} adjacent regions stayed free")


def test_lookups_at_region_boundaries_across_chunks():
    """600 adjacent regions (three chunks of the tables): each page written at a
    region's first and last page is found in that region, no other; a range
    that crosses into the next region is refused."""
    bases = _adjacent_regions(600, ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH)
    try:
        for base in bases:
            assert ww.ResetWriteWatch(base, REGION) == 0
        for i, base in enumerate(bases):
            view = _view(base)
            view[0] = i & 0xFF
            view[REGION - 1] = 1
        for base in bases:
            assert _written(base, REGION) == [0, REGION - P]
            assert _written(base + REGION - P, P) == [0]
            assert _written(base + REGION - P, 2 * P) is None  # leaves the region
            assert ww.GetLastError() == INVALID_PARAMETER
    finally:
        for base in bases:
            assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)


def _view(base: int) -> np.ndarray:
    return views.as_array(base, REGION)


def test_churn_beside_faulting_writers_keeps_every_region_exact():
    """Native threads write (and fault, on the fallbacks) into one region while
    thousands of regions come and go around it, splitting and merging table chunks:
    every region reports exactly its own writes, and the writers' region
    still tracks every page afterwards."""
    npages = 64
    watched = ww.WatchedMemory(npages * P)
    keep: list[int] = []
    try:
        with NativeWriters(watched.address, npages, nthreads=2, seed=5, pause_ns=2000):
            # 1,500 rounds keep more than one chunk (256) of regions alive.
            for round_ in range(scaled_work(3000, at_least=1500)):
                base = ww.VirtualAlloc(0, REGION, ww.MEM_RESERVE | ww.MEM_COMMIT
                                       | ww.MEM_WRITE_WATCH, ww.PAGE_READWRITE)
                assert base, ww.GetLastError()
                page = round_ % (REGION // P)
                _view(base)[page * P] = 1
                assert _written(base, REGION) == [page * P]
                if round_ % 3:
                    assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
                else:
                    keep.append(base)
                if round_ % 7 == 0 and keep:
                    assert ww.VirtualFree(keep.pop(len(keep) // 2), 0, ww.MEM_RELEASE)
                if round_ % 50 == 0:
                    ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, watched.address, watched.size,
                                     np.empty(npages, np.uintp))
        assert ww.ResetWriteWatch(watched.address, watched.size) == 0
        watched.array[::P] = 7
        assert _written(watched.address, watched.size) == [i * P for i in range(npages)]
        for base in keep:
            assert len(_written(base, REGION) or []) == 1
    finally:
        for base in keep:
            ww.VirtualFree(base, 0, ww.MEM_RELEASE)
        watched.close()


def test_writable_pages_follow_protection_page_by_page():
    """VirtualProtect changes the index's page runs incrementally: after
    1,000 alternating runs and changes back and forth, the output-array check
    agrees with VirtualQuery on every page."""
    npages = 1200
    mem = ww.WatchedMemory(npages * P)
    try:
        rng = np.random.default_rng(3)
        for page in range(1, npages, 2):
            assert ww.VirtualProtect(mem.address + page * P, P, ww.PAGE_READONLY)[0]
        for page in rng.integers(0, npages - 4, 300):
            protect = ww.PAGE_READWRITE if page % 3 else ww.PAGE_READONLY
            length = int(page % 4 + 1) * P
            assert ww.VirtualProtect(mem.address + int(page) * P, length, protect)[0]
        expected = [ww.VirtualQuery(mem.address + page * P).Protect == ww.PAGE_READWRITE
                    for page in range(npages)]
        array = mem.array.view(np.uint64)
        for page in range(npages):
            out = array[page * P // 8:]
            assert index.output_writable(out, 1) == expected[page], page
        # Spans of two pages: writable only when both are.
        for page in range(npages - 1):
            out = array[page * P // 8 + P // 8 - 1:]
            assert index.output_writable(out, 2) == (expected[page] and expected[page + 1])
    finally:
        mem.close()


def test_100k_live_regions_on_every_backend(write_watch_backend, soak):
    """No cap: 100,000 write-watch regions alive at once (--soak; 20,000, past
    the old cap of 16,384, otherwise: the allocations take ~10-20 s per backend
    at 100k on two cores), each found by address (a write into some of them,
    and GetWriteWatch on them)."""
    count = 100_000 if soak else 20_000
    bases: list[int] = []
    try:
        for _ in range(count):
            base = ww.VirtualAlloc(0, REGION, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                                   ww.PAGE_READWRITE)
            assert base, (len(bases), ww.GetLastError())
            bases.append(base)
        bases.sort()
        for i in (0, 1, 255, 256, 257, count // 2, count - 2, count - 1):
            base = bases[i]
            assert ww.VirtualAlloc(base, P, ww.MEM_COMMIT, ww.PAGE_READWRITE) == base
            assert ww.ResetWriteWatch(base, REGION) == 0
            views.as_array(base, P)[5] = 1
            assert _written(base, REGION) == [0]
            assert ww.VirtualQuery(base + P).State == ww.MEM_RESERVE
    finally:
        for base in bases:
            assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
