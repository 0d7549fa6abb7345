"""The region table through the public API: VirtualAlloc, VirtualFree,
VirtualProtect, VirtualQuery, as_array and WatchedMemory (REFERENCE section 1:
constants, error codes, 64 KiB reservations, 4096-byte pages)."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from forking import patience

import writewatch as ww

P = ww.PAGE_SIZE
G = ww.ALLOCATION_GRANULARITY
RESERVE = ww.MEM_RESERVE
COMMIT = ww.MEM_COMMIT
RW = ww.PAGE_READWRITE
RO = ww.PAGE_READONLY
NA = ww.PAGE_NOACCESS
INVALID_PARAMETER = ww.ERROR_INVALID_PARAMETER
INVALID_ADDRESS = ww.ERROR_INVALID_ADDRESS


def expect_failure(result: object, failed: object, error: int) -> None:
    assert result == failed
    assert ww.GetLastError() == error


def fresh_error() -> None:
    """Make a stale last error impossible to mistake for the expected one."""
    ww.SetLastError(0xDEAD)


@pytest.fixture
def alloc() -> Iterator[Callable[..., int]]:
    """alloc(size, type=MEM_RESERVE, protect=RW, address=0) -> base; every
    allocation still in the table is released after the test."""
    bases: list[int] = []

    def make(size: int, allocation_type: int = RESERVE, protect: int = RW,
             address: int = 0) -> int:
        base = ww.VirtualAlloc(address, size, allocation_type, protect)
        assert base, f"VirtualAlloc failed: {ww.GetLastError()}"
        bases.append(base)
        return base

    yield make
    for base in bases:
        info = ww.VirtualQuery(base)
        if info is not None and info.State != ww.MEM_FREE and info.AllocationBase == base:
            assert ww.VirtualFree(base, 0, ww.MEM_RELEASE), ww.GetLastError()


def freed_address() -> int:
    """An address that was just released, so the table has nothing there."""
    base = ww.VirtualAlloc(0, G, RESERVE, RW)
    assert base
    assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    return base


# -- VirtualQuery


def test_query_reserve_only_region(alloc):
    base = alloc(16 * P, RESERVE, RW)
    assert ww.VirtualQuery(base) == ww.MEMORY_BASIC_INFORMATION(
        BaseAddress=base, AllocationBase=base, AllocationProtect=RW, RegionSize=16 * P,
        State=ww.MEM_RESERVE, Protect=0, Type=ww.MEM_PRIVATE)


def test_query_reserve_only_keeps_allocation_protect_as_given(alloc):
    base = alloc(16 * P, RESERVE, NA)
    info = ww.VirtualQuery(base)
    assert (info.AllocationProtect, info.Protect, info.State) == (NA, 0, ww.MEM_RESERVE)


def test_query_after_committing_the_first_page(alloc):
    base = alloc(16 * P, RESERVE, RW)
    assert ww.VirtualAlloc(base, P, COMMIT, RW) == base
    first = ww.VirtualQuery(base)
    assert (first.BaseAddress, first.RegionSize, first.State, first.Protect) == (
        base, P, ww.MEM_COMMIT, RW)
    assert (first.AllocationBase, first.Type) == (base, ww.MEM_PRIVATE)
    rest = ww.VirtualQuery(base + P)
    assert (rest.BaseAddress, rest.RegionSize, rest.State, rest.Protect) == (
        base + P, 15 * P, ww.MEM_RESERVE, 0)
    assert rest.AllocationBase == base


def test_query_protection_runs_split_and_merge_again(alloc):
    base = alloc(16 * P, RESERVE | COMMIT, RW)
    assert ww.VirtualQuery(base).RegionSize == 16 * P
    assert ww.VirtualProtect(base + 4 * P, 3 * P, RO) == (True, RW)
    head, mid, tail = (ww.VirtualQuery(base + off) for off in (0, 4 * P, 7 * P))
    assert (head.RegionSize, head.Protect) == (4 * P, RW)
    assert (mid.RegionSize, mid.Protect, mid.State) == (3 * P, RO, ww.MEM_COMMIT)
    assert (tail.RegionSize, tail.Protect) == (9 * P, RW)
    assert ww.VirtualProtect(base + 4 * P, 3 * P, RW) == (True, RO)
    assert ww.VirtualQuery(base).RegionSize == 16 * P
    assert ww.VirtualQuery(base + 5 * P).RegionSize == 11 * P


def test_query_unaligned_address_rounds_down(alloc):
    base = alloc(16 * P, RESERVE | COMMIT, RW)
    info = ww.VirtualQuery(base + 5 * P + 123)
    assert (info.BaseAddress, info.RegionSize, info.AllocationBase) == (
        base + 5 * P, 11 * P, base)


def test_query_free_address():
    address = freed_address()
    info = ww.VirtualQuery(address + 7)
    assert info is not None
    assert (info.BaseAddress, info.State, info.AllocationBase, info.AllocationProtect,
            info.Type) == (address, ww.MEM_FREE, 0, 0, 0)
    assert info.RegionSize > 0 and info.RegionSize % P == 0


def test_query_free_address_stops_at_the_next_region(alloc):
    base = alloc(2 * G, RESERVE)
    assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    assert alloc(G, RESERVE, address=base + G) == base + G
    info = ww.VirtualQuery(base + P)
    assert (info.BaseAddress, info.State, info.RegionSize) == (base + P, ww.MEM_FREE, G - P)


@pytest.mark.parametrize("address", [1 << 47, (1 << 47) + P, (1 << 64) - 1])
def test_query_above_user_space_fails_87(address):
    fresh_error()
    expect_failure(ww.VirtualQuery(address), None, INVALID_PARAMETER)


# -- VirtualAlloc


@pytest.mark.parametrize("size", [1, 3 * P, 17 * P + 5, G + 1])
def test_alloc_bases_are_64k_aligned(alloc, size):
    base = alloc(size, RESERVE | COMMIT)
    assert base % G == 0
    info = ww.VirtualQuery(base)
    assert info.RegionSize == -(-size // P) * P  # whole pages, committed


def test_alloc_commit_with_address_zero_reserves_too(alloc):
    base = alloc(3 * P, COMMIT, RW)
    assert base % G == 0
    info = ww.VirtualQuery(base)
    assert (info.AllocationBase, info.State, info.Protect, info.RegionSize) == (
        base, ww.MEM_COMMIT, RW, 3 * P)
    ww.as_array(base, 3 * P)[:] = 5  # really committed


def test_alloc_commit_inside_reservation_returns_page_rounded_address(alloc):
    base = alloc(16 * P, RESERVE, NA)
    fresh_error()
    assert ww.VirtualAlloc(base + 2 * P + 100, 10, COMMIT, RW) == base + 2 * P
    info = ww.VirtualQuery(base + 2 * P)
    assert (info.State, info.RegionSize) == (ww.MEM_COMMIT, P)
    # 200 bytes straddling the boundary between pages 4 and 5 commit both.
    assert ww.VirtualAlloc(base + 5 * P - 100, 200, COMMIT, RO) == base + 4 * P
    info = ww.VirtualQuery(base + 4 * P)
    assert (info.State, info.Protect, info.RegionSize) == (ww.MEM_COMMIT, RO, 2 * P)
    assert ww.VirtualQuery(base + 3 * P).State == ww.MEM_RESERVE


def test_alloc_commit_past_reservation_end_fails_487(alloc):
    base = alloc(16 * P, RESERVE)
    fresh_error()
    expect_failure(ww.VirtualAlloc(base + 15 * P, 2 * P, COMMIT, RW), 0, INVALID_ADDRESS)
    assert ww.VirtualQuery(base + 15 * P).State == ww.MEM_RESERVE  # nothing half done


def test_alloc_commit_outside_any_reservation_fails_487():
    address = freed_address()
    fresh_error()
    expect_failure(ww.VirtualAlloc(address, P, COMMIT, RW), 0, INVALID_ADDRESS)


@pytest.mark.parametrize("offset", [0, G, G + 3 * P])
def test_alloc_reserve_at_an_address_in_use_fails_487(alloc, offset):
    base = alloc(4 * G, RESERVE)
    fresh_error()
    expect_failure(ww.VirtualAlloc(base + offset, G, RESERVE, RW), 0, INVALID_ADDRESS)
    assert ww.VirtualQuery(base).RegionSize == 4 * G  # the old region is untouched


def test_alloc_reserve_over_memory_not_ours_fails_487_and_clobbers_nothing():
    """MAP_FIXED_NOREPLACE: a reservation never replaces a foreign mapping."""
    data = np.full(4 * G, 0x5A, np.uint8)
    address = (data.ctypes.data + G) & ~(G - 1)  # 64 KiB aligned, inside the array
    fresh_error()
    expect_failure(ww.VirtualAlloc(address, G, RESERVE, RW), 0, INVALID_ADDRESS)
    expect_failure(ww.VirtualAlloc(address, G, RESERVE | COMMIT, RW), 0, INVALID_ADDRESS)
    assert (data == 0x5A).all()
    assert ww.VirtualQuery(address).State == ww.MEM_FREE


def test_alloc_too_large_fails_8():
    fresh_error()
    expect_failure(ww.VirtualAlloc(0, 1 << 47, RESERVE, RW), 0, ww.ERROR_NOT_ENOUGH_MEMORY)


def test_operations_spanning_two_adjacent_reservations_fail_487(alloc):
    first = alloc(2 * G, RESERVE)
    assert ww.VirtualFree(first, 0, ww.MEM_RELEASE)
    a = alloc(G, RESERVE | COMMIT, RW, address=first)
    b = alloc(G, RESERVE | COMMIT, RW, address=first + G)
    assert b == a + G
    span = (a + G - P, 2 * P)
    fresh_error()
    expect_failure(ww.VirtualAlloc(*span, COMMIT, RO), 0, INVALID_ADDRESS)
    fresh_error()
    expect_failure(ww.VirtualProtect(*span, RO), (False, 0), INVALID_ADDRESS)
    fresh_error()
    expect_failure(ww.VirtualFree(*span, ww.MEM_DECOMMIT), False, INVALID_ADDRESS)
    with pytest.raises(ww.WriteWatchError):
        ww.as_array(*span)
    assert ww.VirtualQuery(a).RegionSize == G and ww.VirtualQuery(b).RegionSize == G
    assert ww.VirtualQuery(a).Protect == RW and ww.VirtualQuery(b).Protect == RW


def test_alloc_size_zero_fails_87():
    fresh_error()
    expect_failure(ww.VirtualAlloc(0, 0, RESERVE | COMMIT, RW), 0, INVALID_PARAMETER)


@pytest.mark.parametrize("protect", [0, RO | RW, 0x10, 0x20, 0x40, 0x104])
def test_alloc_invalid_protection_fails_87(protect):
    fresh_error()
    expect_failure(ww.VirtualAlloc(0, P, RESERVE | COMMIT, protect), 0, INVALID_PARAMETER)


def test_alloc_write_watch_alone_fails_87():
    fresh_error()
    expect_failure(ww.VirtualAlloc(0, 16 * P, ww.MEM_WRITE_WATCH, RW), 0, INVALID_PARAMETER)


def test_alloc_commit_write_watch_without_reserve_fails_87(alloc):
    fresh_error()
    expect_failure(ww.VirtualAlloc(0, 16 * P, COMMIT | ww.MEM_WRITE_WATCH, RW), 0,
                   INVALID_PARAMETER)
    base = alloc(16 * P, RESERVE)
    fresh_error()
    expect_failure(ww.VirtualAlloc(base, P, COMMIT | ww.MEM_WRITE_WATCH, RW), 0,
                   INVALID_PARAMETER)
    assert ww.VirtualQuery(base).State == ww.MEM_RESERVE


@pytest.mark.parametrize("extra", [0x1, 0x800, ww.MEM_DECOMMIT, ww.MEM_RELEASE, 1 << 30])
def test_alloc_unknown_type_bits_fail_87(extra):
    fresh_error()
    expect_failure(ww.VirtualAlloc(0, P, RESERVE | COMMIT | extra, RW), 0, INVALID_PARAMETER)


def test_alloc_no_reserve_or_commit_fails_87():
    fresh_error()
    expect_failure(ww.VirtualAlloc(0, P, 0, RW), 0, INVALID_PARAMETER)


def test_recommit_with_other_protection_keeps_content(alloc):
    base = alloc(4 * P, RESERVE | COMMIT, RW)
    ww.as_array(base, 4 * P)[:] = np.arange(4 * P, dtype=np.uint64).astype(np.uint8)
    assert ww.VirtualAlloc(base + P, 2 * P, COMMIT, RO) == base + P
    info = ww.VirtualQuery(base + P)
    assert (info.State, info.Protect, info.RegionSize) == (ww.MEM_COMMIT, RO, 2 * P)
    view = ww.as_array(base + P, 2 * P)
    assert view.flags.writeable is False
    expected = np.arange(P, 3 * P, dtype=np.uint64).astype(np.uint8)
    assert np.array_equal(view, expected)


def test_decommitted_then_recommitted_pages_read_zero(alloc):
    base = alloc(4 * P, RESERVE | COMMIT, RW)
    ww.as_array(base, 4 * P)[:] = 0xAB
    assert ww.VirtualFree(base + P, 2 * P, ww.MEM_DECOMMIT)
    assert ww.VirtualQuery(base + P).State == ww.MEM_RESERVE
    assert ww.VirtualAlloc(base + P, 2 * P, COMMIT, RW) == base + P
    view = ww.as_array(base, 4 * P)
    assert (view[P:3 * P] == 0).all()
    assert (view[:P] == 0xAB).all() and (view[3 * P:] == 0xAB).all()


def test_reserve_at_a_chosen_address(alloc):
    address = freed_address()
    assert alloc(G, RESERVE, RW, address=address) == address
    info = ww.VirtualQuery(address)
    assert (info.AllocationBase, info.State, info.RegionSize) == (address, ww.MEM_RESERVE, G)
    assert ww.VirtualFree(address, 0, ww.MEM_RELEASE)
    assert ww.VirtualQuery(address).State == ww.MEM_FREE
    assert alloc(G, RESERVE | COMMIT, RW, address=address) == address
    assert ww.VirtualQuery(address).State == ww.MEM_COMMIT


def test_reserve_at_an_unaligned_address_rounds_down_to_64k(alloc):
    address = freed_address()
    assert alloc(P, RESERVE, RW, address=address + 0x1234) == address
    assert ww.VirtualQuery(address).AllocationBase == address


# -- VirtualFree


def test_release_with_nonzero_size_fails_87(alloc):
    base = alloc(4 * P, RESERVE | COMMIT)
    fresh_error()
    expect_failure(ww.VirtualFree(base, 4 * P, ww.MEM_RELEASE), False, INVALID_PARAMETER)
    assert ww.VirtualQuery(base).State == ww.MEM_COMMIT


def test_release_not_at_the_base_page_fails_487(alloc):
    base = alloc(4 * P, RESERVE | COMMIT)
    fresh_error()
    expect_failure(ww.VirtualFree(base + 0x1001, 0, ww.MEM_RELEASE), False, INVALID_ADDRESS)
    assert ww.VirtualQuery(base).State == ww.MEM_COMMIT


def test_release_at_an_address_inside_the_base_page_succeeds():
    base = ww.VirtualAlloc(0, 4 * P, RESERVE | COMMIT, RW)
    assert ww.VirtualFree(base + 0x10, 0, ww.MEM_RELEASE)
    assert ww.VirtualQuery(base).State == ww.MEM_FREE


def test_decommit_size_zero_at_base_decommits_everything(alloc):
    base = alloc(16 * P, RESERVE | COMMIT)
    assert ww.VirtualProtect(base + 3 * P, P, RO)[0]
    assert ww.VirtualFree(base, 0, ww.MEM_DECOMMIT)
    info = ww.VirtualQuery(base)
    assert (info.State, info.RegionSize, info.Protect) == (ww.MEM_RESERVE, 16 * P, 0)


def test_decommit_size_zero_not_at_base_fails_487(alloc):
    base = alloc(16 * P, RESERVE | COMMIT)
    fresh_error()
    expect_failure(ww.VirtualFree(base + P, 0, ww.MEM_DECOMMIT), False, INVALID_ADDRESS)
    assert ww.VirtualQuery(base).RegionSize == 16 * P
    assert ww.VirtualQuery(base).State == ww.MEM_COMMIT


@pytest.mark.parametrize("free_type", [0, ww.MEM_DECOMMIT | ww.MEM_RELEASE, COMMIT, 0x10000])
def test_free_invalid_type_fails_87(alloc, free_type):
    base = alloc(4 * P, RESERVE | COMMIT)
    fresh_error()
    expect_failure(ww.VirtualFree(base, 0, free_type), False, INVALID_PARAMETER)
    assert ww.VirtualQuery(base).State == ww.MEM_COMMIT


@pytest.mark.parametrize("free_type", [ww.MEM_RELEASE, ww.MEM_DECOMMIT])
def test_free_unallocated_address_fails_487(free_type):
    address = freed_address()
    fresh_error()
    expect_failure(ww.VirtualFree(address, 0, free_type), False, INVALID_ADDRESS)


def test_decommit_range_past_the_end_fails_487(alloc):
    base = alloc(4 * P, RESERVE | COMMIT)
    fresh_error()
    expect_failure(ww.VirtualFree(base + 3 * P, 2 * P, ww.MEM_DECOMMIT), False,
                   INVALID_ADDRESS)
    assert ww.VirtualQuery(base + 3 * P).State == ww.MEM_COMMIT


def test_double_release_fails_487():
    base = ww.VirtualAlloc(0, 4 * P, RESERVE | COMMIT, RW)
    assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    fresh_error()
    expect_failure(ww.VirtualFree(base, 0, ww.MEM_RELEASE), False, INVALID_ADDRESS)


def test_decommit_of_reserved_pages_succeeds(alloc):
    base = alloc(4 * P, RESERVE)
    assert ww.VirtualFree(base + P, P, ww.MEM_DECOMMIT)
    assert ww.VirtualQuery(base).RegionSize == 4 * P


# -- VirtualProtect


def test_protect_returns_the_first_pages_old_protection(alloc):
    base = alloc(4 * P, RESERVE | COMMIT, RW)
    assert ww.VirtualProtect(base, P, RO) == (True, RW)
    assert ww.VirtualProtect(base, 4 * P, NA) == (True, RO)
    info = ww.VirtualQuery(base)
    assert (info.Protect, info.RegionSize) == (NA, 4 * P)
    assert ww.VirtualProtect(base + 2 * P + 5, 1, RW) == (True, NA)
    assert ww.VirtualQuery(base + 2 * P).RegionSize == P


@pytest.mark.parametrize(("offset", "size"), [(0, 5 * P), (3 * P, 2 * P), (5 * P, P)])
def test_protect_reserved_pages_fails_487(alloc, offset, size):
    base = alloc(8 * P, RESERVE, NA)
    assert ww.VirtualAlloc(base, 4 * P, COMMIT, RW) == base
    fresh_error()
    expect_failure(ww.VirtualProtect(base + offset, size, RO), (False, 0), INVALID_ADDRESS)
    assert ww.VirtualQuery(base).Protect == RW  # nothing changed


@pytest.mark.parametrize("protect", [0, 0x10, 0x40, RO | RW])
def test_protect_invalid_protection_fails_87(alloc, protect):
    base = alloc(4 * P, RESERVE | COMMIT, RW)
    fresh_error()
    expect_failure(ww.VirtualProtect(base, P, protect), (False, 0), INVALID_PARAMETER)
    assert ww.VirtualQuery(base).Protect == RW


def test_protect_size_zero_fails_87(alloc):
    base = alloc(4 * P, RESERVE | COMMIT, RW)
    fresh_error()
    expect_failure(ww.VirtualProtect(base, 0, RO), (False, 0), INVALID_PARAMETER)


def test_readonly_page_really_is_read_only(alloc):
    base = alloc(2 * P, RESERVE | COMMIT, RW)
    ww.as_array(base, 2 * P)[:] = 3
    assert ww.VirtualProtect(base, P, RO) == (True, RW)
    view = ww.as_array(base, P)
    assert view.flags.writeable is False
    with pytest.raises(ValueError):
        view[0] = 1
    assert ww.as_array(base + P, P).flags.writeable is True
    # A view spanning a read-only page is read-only as a whole.
    assert ww.as_array(base, 2 * P).flags.writeable is False
    assert (view == 3).all()
    assert ww.VirtualProtect(base, P, RW) == (True, RO)
    assert ww.as_array(base, P).flags.writeable is True


# -- as_array


def test_views_are_writable_and_alias_memory(alloc):
    base = alloc(4 * P, RESERVE | COMMIT, RW)
    one = ww.as_array(base, 4 * P)
    two = ww.as_array(base + P, P)
    assert one.flags.writeable and two.flags.writeable
    one[P + 10] = 42
    assert two[10] == 42
    two[20] = 43
    assert one[P + 20] == 43


def test_as_array_refuses_addresses_outside_any_region():
    address = freed_address()
    with pytest.raises(ww.WriteWatchError) as info:
        ww.as_array(address, P)
    assert info.value.winerror == INVALID_ADDRESS
    assert isinstance(info.value, OSError)


def test_as_array_refuses_a_range_leaving_the_region(alloc):
    base = alloc(4 * P, RESERVE | COMMIT, RW)
    with pytest.raises(ww.WriteWatchError) as info:
        ww.as_array(base + 3 * P, 2 * P)
    assert info.value.winerror == INVALID_ADDRESS


def test_as_array_refuses_reserved_pages(alloc):
    base = alloc(4 * P, RESERVE, NA)
    assert ww.VirtualAlloc(base, P, COMMIT, RW) == base
    with pytest.raises(ww.WriteWatchError) as info:
        ww.as_array(base, 2 * P)
    assert info.value.winerror == INVALID_ADDRESS
    assert isinstance(info.value, OSError)
    assert len(ww.as_array(base, P)) == P


def test_as_array_refuses_noaccess_pages(alloc):
    base = alloc(4 * P, RESERVE | COMMIT, RW)
    assert ww.VirtualProtect(base + 2 * P, P, NA)[0]
    with pytest.raises(ww.WriteWatchError) as info:
        ww.as_array(base + P, 2 * P)
    assert info.value.winerror == INVALID_ADDRESS
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize(("size", "dtype"), [(6, np.uint32), (0, np.uint8), (12, np.float64)])
def test_as_array_size_not_a_multiple_of_dtype_is_value_error(alloc, size, dtype):
    base = alloc(P, RESERVE | COMMIT, RW)
    with pytest.raises(ValueError):
        ww.as_array(base, size, dtype)


def test_dtype_views_index_the_right_bytes(alloc):
    base = alloc(P, RESERVE | COMMIT, RW)
    words = ww.as_array(base + 8, 16, np.uint32)
    assert words.shape == (4,) and words.dtype == np.uint32
    words[:] = [0x04030201, 0x08070605, 0x0C0B0A09, 0x100F0E0D]
    raw = ww.as_array(base, 32)
    assert raw[:8].tolist() == [0] * 8
    assert raw[8:24].tolist() == list(range(1, 17))
    assert raw[24:].tolist() == [0] * 8
    assert ww.as_array(base + 12, 4, np.uint32)[0] == 0x08070605


def _maps_ranges() -> list[tuple[int, int]]:
    """(start, end) of every mapping in /proc/self/maps, read into a buffer made
    beforehand, so that no allocation of ours lands in the range meanwhile."""
    buf = bytearray(8 << 20)
    mv = memoryview(buf)
    n = 0
    fd = os.open("/proc/self/maps", os.O_RDONLY)
    try:
        while got := os.readv(fd, [mv[n:]]):  # seq_file: a page or so per read
            n += got
    finally:
        os.close(fd)
    assert n < len(buf)
    ranges = []
    for line in bytes(mv[:n]).decode().splitlines():
        start, end = line.split()[0].split("-")
        ranges.append((int(start, 16), int(end, 16)))
    mv.release()
    return ranges


def _covered(first: int, last: int, ranges: list[tuple[int, int]]) -> bool:
    pos = first
    for start, end in sorted(ranges):
        if start <= pos < end:
            pos = end
    return pos >= last


def test_view_outlives_release():
    base = ww.VirtualAlloc(0, 16 * P, RESERVE | COMMIT, RW)
    assert base
    view = ww.as_array(base, 16 * P)
    view[:] = 7
    assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    # The region is gone from the table at once ...
    assert ww.VirtualQuery(base).State == ww.MEM_FREE
    fresh_error()
    out = np.zeros(16, np.uintp)
    assert ww.GetWriteWatch(0, base, 16 * P, out)[0] == ww.WRITE_WATCH_FAILED
    assert ww.GetLastError() == INVALID_PARAMETER
    with pytest.raises(ww.WriteWatchError):
        ww.as_array(base, P)
    # ... but the view still reads and writes its memory ...
    assert (view == 7).all()
    view[::P] = 9
    assert view[5 * P] == 9 and view[5 * P + 1] == 7
    # ... and the range stays mapped until the view is collected.
    assert _covered(base, base + 16 * P, _maps_ranges())
    del view
    gc.collect()
    assert not any(start < base + 16 * P and base < end for start, end in _maps_ranges())


def test_watched_view_outlives_release():
    """A released write-watch region is disarmed: a surviving view writes freely."""
    size = 8 * P
    base = ww.VirtualAlloc(0, size, RESERVE | COMMIT | ww.MEM_WRITE_WATCH, RW)
    assert base
    view = ww.as_array(base, size)
    view[P] = 1
    out = np.zeros(8, np.uintp)
    assert ww.GetWriteWatch(0, base, size, out)[:2] == (0, 1)
    assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    view[::P] = 5  # must not fault
    assert view[3 * P] == 5 and view[P] == 5
    assert ww.VirtualQuery(base).State == ww.MEM_FREE
    fresh_error()
    assert ww.GetWriteWatch(0, base, size, out)[0] == ww.WRITE_WATCH_FAILED
    assert ww.GetLastError() == INVALID_PARAMETER
    fresh_error()
    assert ww.ResetWriteWatch(base, size) == ww.WRITE_WATCH_FAILED
    assert ww.GetLastError() == INVALID_PARAMETER
    assert _covered(base, base + size, _maps_ranges())
    del view
    gc.collect()
    assert not any(start < base + size and base < end for start, end in _maps_ranges())


# -- argument types


@pytest.mark.parametrize("call", [
    lambda: ww.VirtualAlloc("0x10000", P, RESERVE, RW),
    lambda: ww.VirtualAlloc(0, float(P), RESERVE, RW),
    lambda: ww.VirtualAlloc(0, P, RESERVE, float(RW)),
    lambda: ww.VirtualFree("0", 0, ww.MEM_RELEASE),
    lambda: ww.VirtualProtect(0, 1.5, RW),
    lambda: ww.VirtualQuery("0x1000"),
    lambda: ww.VirtualQuery(None),
    lambda: ww.as_array(0, "10"),
], ids=["alloc-str-address", "alloc-float-size", "alloc-float-protect", "free-str-address",
        "protect-float-size", "query-str", "query-none", "as_array-str-size"])
def test_wrong_argument_types_raise_type_error(call):
    with pytest.raises(TypeError):
        call()


def test_negative_size_fails_87(alloc):
    fresh_error()
    expect_failure(ww.VirtualAlloc(0, -P, RESERVE, RW), 0, INVALID_PARAMETER)
    base = alloc(P, RESERVE | COMMIT)
    fresh_error()
    expect_failure(ww.VirtualFree(base, -1, ww.MEM_DECOMMIT), False, INVALID_PARAMETER)
    fresh_error()
    expect_failure(ww.VirtualProtect(base, -1, RO), (False, 0), INVALID_PARAMETER)
    fresh_error()
    expect_failure(ww.VirtualQuery(-1), None, INVALID_PARAMETER)


# -- threads


def test_threads_allocate_write_query_and_release():
    """4 threads x 200 rounds on their own regions: exact reports, no leaks."""
    npages, rounds = 8, 200
    errors: list[str] = []
    bases: set[int] = set()
    bases_lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        out = np.zeros(npages, np.uintp)
        mine: set[int] = set()
        start.wait()
        try:
            for i in range(rounds):
                base = ww.VirtualAlloc(0, npages * P,
                                       RESERVE | COMMIT | ww.MEM_WRITE_WATCH, RW)
                if not base:
                    raise AssertionError(f"VirtualAlloc failed: {ww.GetLastError()}")
                mine.add(base)
                pages = sorted(set(rng.choice(npages, size=int(rng.integers(1, npages)),
                                              replace=True).tolist()))
                view = ww.as_array(base, npages * P)
                for page in pages:
                    view[page * P + int(rng.integers(P))] = i % 255 + 1
                del view
                ret, found, gran = ww.GetWriteWatch(0, base, npages * P, out)
                got = [(int(a) - base) // P for a in out[:found]]
                if (ret, gran) != (0, P) or got != pages:
                    raise AssertionError(f"round {i}: written {pages}, reported {got} "
                                         f"(ret {ret:#x}, error {ww.GetLastError()})")
                if not ww.VirtualFree(base + 2 * P, 3 * P, ww.MEM_DECOMMIT):
                    raise AssertionError(f"decommit failed: {ww.GetLastError()}")
                ret, found, _ = ww.GetWriteWatch(0, base, npages * P, out)
                got = [(int(a) - base) // P for a in out[:found]]
                if ret != 0 or got != [p for p in pages if not 2 <= p < 5]:
                    raise AssertionError(f"round {i}: after decommit reported {got}")
                if not ww.VirtualFree(base, 0, ww.MEM_RELEASE):
                    raise AssertionError(f"release failed: {ww.GetLastError()}")
        except BaseException as exc:  # reported by the main thread
            errors.append(f"thread {seed}: {exc!r}")
        with bases_lock:
            bases.update(mine)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=patience(60))
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert bases
    leaked = [hex(b) for b in bases if ww.VirtualQuery(b).State != ww.MEM_FREE]
    assert leaked == []


def test_threads_share_one_region_each_with_its_own_pages(watched):
    """4 threads on disjoint 4-page slices of one region: committing,
    decommitting and capped/reset queries of one never disturb another's."""
    region = watched(16)
    errors: list[str] = []
    start = threading.Barrier(4)

    def worker(index: int) -> None:
        first = region.base + 4 * index * P
        rng = np.random.default_rng(100 + index)
        out = np.zeros(4, np.uintp)
        start.wait()
        try:
            for i in range(150):
                pages = sorted({int(p) for p in rng.integers(0, 4, size=3)})
                view = ww.as_array(first, 4 * P)
                for page in pages:
                    view[page * P + 1] = i % 250 + 1
                del view
                ret, found, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, first, 4 * P, out)
                got = [(int(a) - first) // P for a in out[:found]]
                if ret != 0 or got != pages:
                    raise AssertionError(f"round {i}: wrote {pages}, got {got}")
                if not ww.VirtualFree(first + P, 2 * P, ww.MEM_DECOMMIT):
                    raise AssertionError(f"decommit: {ww.GetLastError()}")
                if ww.VirtualAlloc(first + P, 2 * P, COMMIT, RW) != first + P:
                    raise AssertionError(f"recommit: {ww.GetLastError()}")
                if ww.as_array(first + P, 2 * P).any():
                    raise AssertionError(f"round {i}: recommitted pages not zero")
        except BaseException as exc:  # reported by the main thread
            errors.append(f"thread {index}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=patience(60))
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert region.written() == []
    info = ww.VirtualQuery(region.base)
    assert (info.State, info.RegionSize) == (ww.MEM_COMMIT, 16 * P)


# -- WatchedMemory


def test_watched_memory_context_manager_and_array():
    with ww.WatchedMemory(8 * P) as mem:
        assert mem.address % G == 0 and mem.size == 8 * P
        assert mem.array is mem.array
        assert mem.array.shape == (8 * P,) and mem.array.flags.writeable
        assert len(mem.written()) == 0
        mem.array[3 * P + 7] = 1
        mem.array[6 * P] = 1
        assert ((mem.written() - mem.address) // P).tolist() == [3, 6]
        address = mem.address
    assert ww.VirtualQuery(address).State == ww.MEM_FREE


def test_watched_memory_written_reset_and_reset():
    with ww.WatchedMemory(8 * P) as mem:
        mem.array[P] = 1
        mem.array[2 * P] = 1
        assert ((mem.written(reset=False) - mem.address) // P).tolist() == [1, 2]
        assert ((mem.written(reset=True) - mem.address) // P).tolist() == [1, 2]
        assert len(mem.written()) == 0
        mem.array[5 * P] = 1
        mem.reset()
        assert len(mem.written()) == 0


def test_watched_memory_capped_out_resets_only_returned_pages():
    with ww.WatchedMemory(8 * P) as mem:
        for page in (1, 3, 4, 7):
            mem.array[page * P] = 1
        out = np.zeros(2, np.uintp)
        got = mem.written(reset=True, out=out)
        assert np.shares_memory(got, out)
        assert ((got - mem.address) // P).tolist() == [1, 3]
        assert ((mem.written() - mem.address) // P).tolist() == [4, 7]
        big = np.zeros(8, np.uintp)
        got = mem.written(out=big)
        assert len(got) == 2 and np.shares_memory(got, big)


def test_watched_memory_uncommitted_reports_nothing_and_commit_works():
    with ww.WatchedMemory(8 * P, commit=False) as mem:
        assert len(mem.written()) == 0
        with pytest.raises(ww.WriteWatchError) as info:
            mem.view(0, P)
        assert info.value.winerror == INVALID_ADDRESS
        mem.commit(2 * P, 2 * P)
        mem.view(2 * P, 2 * P)[P] = 1
        assert ((mem.written() - mem.address) // P).tolist() == [3]


def test_watched_memory_errors_carry_winerror():
    with pytest.raises(ww.WriteWatchError) as info:
        ww.WatchedMemory(0)
    assert info.value.winerror == INVALID_PARAMETER
    assert isinstance(info.value, OSError)
    with ww.WatchedMemory(4 * P) as mem:
        with pytest.raises(ww.WriteWatchError) as info:
            mem.commit(3 * P, 2 * P)
        assert info.value.winerror == INVALID_ADDRESS
        with pytest.raises(ww.WriteWatchError) as info:
            mem.view(3 * P, 2 * P)
        assert info.value.winerror == INVALID_ADDRESS


@pytest.mark.parametrize("use", [
    lambda mem: mem.array,
    lambda mem: mem.written(),
    lambda mem: mem.written(reset=True),
    lambda mem: mem.reset(),
    lambda mem: mem.view(),
    lambda mem: mem.commit(0, P),
], ids=["array", "written", "written-reset", "reset", "view", "commit"])
def test_watched_memory_after_close_raises_value_error(use):
    mem = ww.WatchedMemory(4 * P)
    mem.close()
    mem.close()  # twice is fine
    with pytest.raises(ValueError):
        use(mem)
