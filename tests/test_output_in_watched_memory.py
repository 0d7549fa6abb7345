"""GetWriteWatch's addresses array may lie in watched memory: checking that it
can be written (docs/semantics.md rule 15) marks nothing, and afterwards only
the pages the call stored addresses into read as written."""

from __future__ import annotations

import numpy as np

import writewatch as ww

P = ww.PAGE_SIZE
ENTRIES = P // 8  # addresses per page of the array


def test_only_pages_that_received_addresses_read_written(watched):
    region = watched(16)
    out = ww.as_array(region.base + 8 * P, 8 * P, np.uintp)  # pages 8-15
    region.view()[2 * P] = 1
    ret, count, _ = ww.GetWriteWatch(0, region.base, 8 * P, out)
    assert (ret, count) == (0, 1) and out[0] == region.base + 2 * P
    assert region.written() == [2, 8]


def test_a_full_page_of_addresses_marks_two_pages_at_most(watched):
    region = watched(1024 + 16)
    out = ww.as_array(region.base + 1024 * P, 16 * P, np.uintp)  # pages 1024-1039
    region.view()[:600 * P:P] = 1  # 600 pages: the array's first page and part of its second
    ret, count, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, region.base, 1024 * P, out)
    assert (ret, count) == (0, 600)
    assert [int(a) for a in out[:count]] == [region.base + i * P for i in range(600)]
    assert region.written() == [1024, 1025]


def test_array_inside_the_range_it_reports(watched):
    """The array lies in the range being scanned, with RESET: the call reports
    and resets what was written before it; its own stores come after and are
    reported by the next call."""
    region = watched(16)
    out = ww.as_array(region.base + 12 * P, 4 * P, np.uintp)
    region.view()[3 * P] = 1
    ret, count, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, region.base, 16 * P, out)
    assert (ret, count) == (0, 1) and out[0] == region.base + 3 * P
    ret, count, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, region.base, 16 * P, out)
    assert (ret, count) == (0, 1) and out[0] == region.base + 12 * P
    assert region.written() == [12]


def test_refused_array_marks_nothing(watched):
    region = watched(16)
    out = ww.as_array(region.base + 8 * P, 8 * P, np.uintp)
    region.view()[2 * P] = 1
    assert ww.VirtualProtect(region.base + 15 * P, P, ww.PAGE_READONLY)[0]
    ret, _, _ = ww.GetWriteWatch(0, region.base, 8 * P, out)
    assert ret == ww.WRITE_WATCH_FAILED and ww.GetLastError() == ww.ERROR_NOACCESS
    assert region.written() == [2]
    # A capacity that stays clear of the read-only page is fine.
    assert ww.GetWriteWatch(0, region.base, 8 * P, out, 7 * ENTRIES)[:2] == (0, 1)
    assert region.written() == [2, 8]


def test_array_in_plain_virtual_alloc_memory(watched):
    region = watched(16)
    plain = ww.VirtualAlloc(0, 4 * P, ww.MEM_RESERVE | ww.MEM_COMMIT, ww.PAGE_READWRITE)
    try:
        out = ww.as_array(plain, 4 * P, np.uintp)
        region.view()[5 * P] = 1
        assert ww.GetWriteWatch(0, region.base, 16 * P, out)[:2] == (0, 1)
        assert out[0] == region.base + 5 * P
        assert ww.VirtualProtect(plain + 3 * P, P, ww.PAGE_NOACCESS)[0]
        assert ww.GetWriteWatch(0, region.base, 16 * P, out)[0] == ww.WRITE_WATCH_FAILED
        assert ww.GetWriteWatch(0, region.base, 16 * P, out, 3 * ENTRIES)[:2] == (0, 1)
    finally:
        assert ww.VirtualFree(plain, 0, ww.MEM_RELEASE)


def test_memwatch_vec_check_marks_nothing(watched):
    region = watched(16)
    vec = ww.as_array(region.base + 8 * P, 8 * P, np.int64)
    region.view()[P] = 1
    got = ww.process_memwatch(0, region.base, 8 * P, ww.MEMWATCH_SD_GET, vec)
    assert (got, vec[0]) == (1, P)
    assert region.written() == [1, 8]
