"""GetWriteWatch / ResetWriteWatch conformance: docs/semantics.md rules 1-17,
as Windows does them and Wine's conformance tests assert them."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import writewatch as ww

P = ww.PAGE_SIZE


def expect_failure(result: object, failed: object, error: int) -> None:
    assert result == failed
    assert ww.GetLastError() == error


# -- rule 1: allocation flags


def test_item1_reserve_commit_write_watch_succeeds(watched):
    assert watched().base % ww.ALLOCATION_GRANULARITY == 0


def test_item1_reserve_only_write_watch_succeeds(watched):
    region = watched(allocation_type=ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                     protect=ww.PAGE_NOACCESS)
    assert ww.VirtualQuery(region.base).State == ww.MEM_RESERVE


def test_item1_write_watch_alone_fails_87():
    expect_failure(ww.VirtualAlloc(0, 16 * P, ww.MEM_WRITE_WATCH, ww.PAGE_READWRITE), 0,
                   ww.ERROR_INVALID_PARAMETER)


# -- rules 2-9: what gets reported


def test_item2_fresh_region_reports_nothing(watched):
    assert watched().written() == []


def test_item2_committing_does_not_dirty(watched):
    region = watched(allocation_type=ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                     protect=ww.PAGE_NOACCESS)
    assert ww.VirtualAlloc(region.base, 8 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE) == region.base
    assert region.written() == []


def test_item3_one_write_reports_its_page_with_page_granularity(watched):
    region = watched()
    region.view()[P + 1] = 1
    out = np.zeros(16, np.uintp)
    assert ww.GetWriteWatch(0, region.base, region.size, out) == (0, 1, P)
    assert out[0] == region.base + P


def test_item4_reset_flag_resets_reported_pages(watched):
    region = watched()
    region.view()[P + 1] = 1
    assert region.written(ww.WRITE_WATCH_FLAG_RESET) == [1]
    assert region.written() == []


def test_item5_addresses_ascend_whatever_the_write_order(watched):
    region = watched()
    view = region.view()
    for page in (9, 2, 14, 0, 5):
        view[page * P] = 1
    assert region.written() == [0, 2, 5, 9, 14]


def test_item6_sub_range_reports_only_pages_inside(watched):
    region = watched()
    view = region.view()
    for page in (2, 3, 4, 5, 6):
        view[page * P] = 1
    assert region.written(offset=3 * P, size=2 * P) == [3, 4]


def test_item6_sub_range_reset_leaves_the_rest(watched):
    region = watched()
    view = region.view()
    for page in (2, 3, 4, 5):
        view[page * P] = 1
    assert region.written(ww.WRITE_WATCH_FLAG_RESET, offset=3 * P, size=2 * P) == [3, 4]
    assert region.written() == [2, 5]


def test_item7_reset_write_watch_resets_only_its_range(watched):
    region = watched()
    view = region.view()
    for page in range(6):
        view[page * P] = 1
    assert ww.ResetWriteWatch(region.base + P, 3 * P) == 0
    assert region.written() == [0, 4, 5]


def test_item8_write_straddling_a_page_boundary_dirties_both(watched):
    region = watched()
    region.view()[4 * P - 2:4 * P + 2] = 7
    assert region.written() == [3, 4]


def test_item9_capped_reset_resets_only_returned_pages(watched):
    region = watched()
    view = region.view()
    for page in (1, 4, 7):
        view[page * P] = 1
    assert region.written(ww.WRITE_WATCH_FLAG_RESET, count=1) == [1]
    assert region.written() == [4, 7]


def test_item9_capped_without_reset_returns_the_first_pages(watched):
    region = watched()
    view = region.view()
    for page in (1, 4, 7):
        view[page * P] = 1
    assert region.written(count=2) == [1, 4]
    assert region.written() == [1, 4, 7]


def test_item9_cap_across_committed_runs_stops_the_walk(watched):
    """Capacity spent in one committed run: later runs are neither walked nor reset."""
    region = watched(allocation_type=ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                     protect=ww.PAGE_NOACCESS)
    for first in (0, 6, 12):
        assert ww.VirtualAlloc(region.base + first * P, 3 * P, ww.MEM_COMMIT,
                               ww.PAGE_READWRITE)
    for page in (1, 2, 7, 13):
        ww.as_array(region.base + page * P, P)[0] = 1
    assert region.written(ww.WRITE_WATCH_FLAG_RESET, count=3) == [1, 2, 7]
    assert region.written() == [13]


# -- rules 10-12: protection and decommit


def test_item10_protection_changes_neither_dirty_nor_reset(watched):
    region = watched()
    region.view()[2 * P] = 1
    assert ww.VirtualProtect(region.base, region.size, ww.PAGE_READONLY) == (True,
                                                                            ww.PAGE_READWRITE)
    assert ww.VirtualProtect(region.base, region.size, ww.PAGE_READWRITE) == (True,
                                                                             ww.PAGE_READONLY)
    assert region.written() == [2]
    assert region.written(ww.WRITE_WATCH_FLAG_RESET) == [2]
    assert ww.VirtualProtect(region.base, region.size, ww.PAGE_NOACCESS)[0]
    assert ww.VirtualProtect(region.base, region.size, ww.PAGE_READWRITE)[0]
    assert region.written() == []


def test_item11_decommit_clears_dirty_state_and_recommit_starts_clean(watched):
    region = watched()
    view = region.view()
    for page in (1, 2, 3):
        view[page * P] = 0x5A
    del view
    assert ww.VirtualFree(region.base + 2 * P, 2 * P, ww.MEM_DECOMMIT)
    assert region.written() == [1]
    assert ww.VirtualAlloc(region.base + 2 * P, 2 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE)
    assert region.written() == [1]
    recommitted = ww.as_array(region.base + 2 * P, 2 * P)
    assert not recommitted.any(), "recommitted pages must read as zero"
    recommitted[P] = 1
    assert region.written() == [1, 3]


def test_item11_decommit_whole_region_then_recommit_reports_nothing(watched):
    region = watched()
    region.view()[::P] = 1
    assert ww.VirtualFree(region.base, region.size, ww.MEM_DECOMMIT)
    assert region.written() == []
    assert ww.VirtualAlloc(region.base, region.size, ww.MEM_COMMIT, ww.PAGE_READWRITE)
    assert region.written() == []


def test_item12_pages_written_through_a_protection_change_are_reported(watched):
    region = watched(protect=ww.PAGE_NOACCESS)
    assert ww.VirtualProtect(region.base, 6 * P, ww.PAGE_READWRITE) == (True,
                                                                       ww.PAGE_NOACCESS)
    ww.as_array(region.base + 2 * P, P)[10] = 1
    assert ww.VirtualProtect(region.base, 6 * P, ww.PAGE_NOACCESS) == (True,
                                                                      ww.PAGE_READWRITE)
    assert region.written() == [2]


# -- rule 13: a large region


def test_item13_every_other_page_of_2048(watched):
    region = watched(2048)
    region.view()[::2 * P] = 1
    expected = list(range(0, 2048, 2))
    assert region.written() == expected
    assert region.written(ww.WRITE_WATCH_FLAG_RESET, count=1024) == expected
    assert region.written() == []


# -- rule 14 is in test_kernel_writes.py; rule 16: reserve-only


def test_item16_reserve_only_region_reports_nothing_and_resets(watched):
    region = watched(allocation_type=ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                     protect=ww.PAGE_NOACCESS)
    assert region.written() == []
    assert ww.ResetWriteWatch(region.base, region.size) == 0


def test_item17_reset_flag_is_one_atomic_step(watched):
    """Without RESET a second call sees the same pages; with RESET the pages
    reported are the ones re-armed (the concurrent proof is in
    test_atomic_reset.py)."""
    region = watched()
    region.view()[5 * P] = 1
    assert region.written() == [5]
    assert region.written(ww.WRITE_WATCH_FLAG_RESET) == [5]
    region.view()[5 * P] = 2
    assert region.written(ww.WRITE_WATCH_FLAG_RESET) == [5]


# -- rule 15: parameter errors, in the order rule 15 fixes


def test_item15_count_zero_fails_87(watched):
    region = watched()
    out = np.zeros(4, np.uintp)
    expect_failure(ww.GetWriteWatch(0, region.base, region.size, out, 0)[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_INVALID_PARAMETER)
    expect_failure(ww.GetWriteWatch(0, region.base, region.size, np.zeros(0, np.uintp))[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_INVALID_PARAMETER)


def test_item15_count_zero_is_checked_before_the_missing_array(watched):
    region = watched()
    expect_failure(ww.GetWriteWatch(0, region.base, region.size, None, 0)[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_INVALID_PARAMETER)


def test_item15_missing_array_with_count_fails_998(watched):
    region = watched()
    expect_failure(ww.GetWriteWatch(0, region.base, region.size, None, 64)[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_NOACCESS)


def test_item15_missing_array_is_checked_before_flags(watched):
    region = watched()
    expect_failure(ww.GetWriteWatch(0xDEADBEEF, region.base, region.size, None, 64)[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_NOACCESS)


@pytest.mark.parametrize("flags", [2, 3, 0xDEADBEEF])
def test_item15_bad_flags_fail_87(watched, flags):
    region = watched()
    expect_failure(ww.GetWriteWatch(flags, region.base, region.size,
                                    np.zeros(16, np.uintp))[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_INVALID_PARAMETER)


def test_item15_size_zero_fails_87(watched):
    region = watched()
    expect_failure(ww.GetWriteWatch(0, region.base, 0, np.zeros(16, np.uintp))[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_INVALID_PARAMETER)
    expect_failure(ww.ResetWriteWatch(region.base, 0), ww.WRITE_WATCH_FAILED,
                   ww.ERROR_INVALID_PARAMETER)


@pytest.mark.parametrize("offset, size", [(0, 32 * P), (15 * P, P + 1), (P, 16 * P)],
                         ids=["size-x2", "base+size-P-with-P+1", "shifted-past-end"])
def test_item15_range_leaving_the_region_fails_87(watched, offset, size):
    region = watched()
    region.view()[0] = 1
    expect_failure(ww.GetWriteWatch(0, region.base + offset, size,
                                    np.zeros(16, np.uintp))[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_INVALID_PARAMETER)
    expect_failure(ww.ResetWriteWatch(region.base + offset, size), ww.WRITE_WATCH_FAILED,
                   ww.ERROR_INVALID_PARAMETER)
    assert region.written() == [0], "a failed call must not reset anything"


def test_item15_base_not_in_a_write_watch_region_fails_87():
    out = np.zeros(16, np.uintp)
    plain = ww.VirtualAlloc(0, 16 * P, ww.MEM_RESERVE | ww.MEM_COMMIT, ww.PAGE_READWRITE)
    try:
        for base in (0, plain, out.ctypes.data):
            expect_failure(ww.GetWriteWatch(0, base, P, out)[0], ww.WRITE_WATCH_FAILED,
                           ww.ERROR_INVALID_PARAMETER)
            expect_failure(ww.ResetWriteWatch(base, P), ww.WRITE_WATCH_FAILED,
                           ww.ERROR_INVALID_PARAMETER)
    finally:
        ww.VirtualFree(plain, 0, ww.MEM_RELEASE)


def test_item15_unaligned_base_inside_the_region_rounds_down(watched):
    region = watched()
    region.view()[3 * P] = 1
    out = np.zeros(16, np.uintp)
    assert ww.GetWriteWatch(0, region.base + 3 * P + 123, 10, out) == (0, 1, P)
    assert out[0] == region.base + 3 * P


def test_failure_leaves_count_as_given(watched):
    region = watched()
    assert ww.GetWriteWatch(7, region.base, region.size, np.zeros(16, np.uintp), 5) == (
        ww.WRITE_WATCH_FAILED, 5, 0)


# -- the addresses array: nothing is ever written past its end


def test_count_larger_than_the_array_is_refused_998(watched):
    region = watched()
    region.view()[::P] = 1
    backing = np.full(24, 0xDEAD, np.uintp)
    out = backing[:8]
    expect_failure(ww.GetWriteWatch(0, region.base, region.size, out, 9)[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_NOACCESS)
    assert (backing == 0xDEAD).all()


def test_read_only_array_is_refused_998(watched):
    region = watched()
    out = np.zeros(16, np.uintp)
    out.flags.writeable = False
    expect_failure(ww.GetWriteWatch(0, region.base, region.size, out)[0],
                   ww.WRITE_WATCH_FAILED, ww.ERROR_NOACCESS)


@pytest.mark.parametrize("bad", [np.zeros(16, np.int32), np.zeros((4, 4), np.uintp),
                                 np.zeros(32, np.uintp)[::2], [0] * 16],
                         ids=["int32", "2-D", "strided", "list"])
def test_wrong_kind_of_array_raises_type_error(watched, bad):
    region = watched()
    with pytest.raises(TypeError):
        ww.GetWriteWatch(0, region.base, region.size, bad)


def test_capacity_exactly_filled(watched):
    region = watched()
    region.view()[::P] = 1
    out = np.zeros(16, np.uintp)
    assert ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, region.base, region.size, out) == (
        0, 16, P)
    assert list(out) == [region.base + i * P for i in range(16)]
    assert region.written() == []


def test_last_error_is_per_thread(watched):
    import threading

    region = watched()
    ww.SetLastError(0)
    seen = []

    def other() -> None:
        ww.GetWriteWatch(0, region.base, 0, np.zeros(1, np.uintp))
        seen.append(ww.GetLastError())

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [ww.ERROR_INVALID_PARAMETER]
    assert ww.GetLastError() == 0


# -- the common call (native/python_calls.c): one native call, or None


class _IntSubclass(int):
    pass


def _array(dtype: str, n: int = 16) -> np.ndarray:
    return np.zeros(n, dtype)


# What the common call serves itself: a GetWriteWatch that would be slow here
# is a GetWriteWatch whose game loop runs slow.
SERVED = {
    "uintp array": lambda r: (0, r.base, r.size, _array("uintp"), None),
    "uint64 array": lambda r: (0, r.base, r.size, _array("uint64"), None),
    "ulonglong array": lambda r: (0, r.base, r.size, _array("Q"), None),
    "RESET as IntFlag": lambda r: (ww.WRITE_WATCH_FLAG_RESET, r.base, r.size, _array("uintp"),
                                   None),
    "bool flags and int subclasses": lambda r: (True, _IntSubclass(r.base), r.size,
                                                _array("uintp"), _IntSubclass(3)),
    "count below the length": lambda r: (0, r.base, r.size, _array("uintp"), 2),
    "refused: bad flags": lambda r: (2, r.base, r.size, _array("uintp"), None),
    "refused: size 0": lambda r: (0, r.base, 0, _array("uintp"), None),
    "refused: not watched": lambda r: (0, 4096, P, _array("uintp"), None),
    "refused: leaves the region": lambda r: (0, r.base, r.size + P, _array("uintp"), None),
}
# What it leaves to the checked path, which words the refusal (or serves it).
DECLINED = {
    "count 0": lambda r: (0, r.base, r.size, _array("uintp"), 0),
    "count above the length": lambda r: (0, r.base, r.size, _array("uintp", 2), 3),
    "negative count": lambda r: (0, r.base, r.size, _array("uintp"), -1),
    "count past 64 bits": lambda r: (0, r.base, r.size, _array("uintp"), 1 << 64),
    "float count": lambda r: (0, r.base, r.size, _array("uintp"), 2.0),
    "empty array": lambda r: (0, r.base, r.size, _array("uintp", 0), None),
    "negative base": lambda r: (0, -r.base, r.size, _array("uintp"), None),
    "numpy integer base": lambda r: (0, np.uint64(r.base), r.size, _array("uintp"), None),
    "string flags": lambda r: ("0", r.base, r.size, _array("uintp"), None),
    "int64 array": lambda r: (0, r.base, r.size, _array("int64"), None),
    "uint32 array": lambda r: (0, r.base, r.size, _array("uint32"), None),
    "big-endian array": lambda r: (0, r.base, r.size, _array(">u8"), None),
    "2-D array": lambda r: (0, r.base, r.size, np.zeros((4, 4), np.uintp), None),
    "strided array": lambda r: (0, r.base, r.size, _array("uintp", 32)[::2], None),
    "read-only array": lambda r: (0, r.base, r.size, _read_only(_array("uintp")), None),
    "ndarray subclass": lambda r: (0, r.base, r.size, _array("uintp").view(np.memmap), None),
    "memoryview": lambda r: (0, r.base, r.size, memoryview(_array("uintp")), None),
    "list": lambda r: (0, r.base, r.size, [0] * 16, None),
    "no array": lambda r: (0, r.base, r.size, None, None),
}


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _outcome(call, args) -> tuple:
    """What a call answers: its count and the array's contents, or its error."""
    out = args[3]
    try:
        found = call(*args)
    except ww.WriteWatchError as exc:
        return ("error", exc.winerror, str(exc))
    except TypeError:
        return ("TypeError",)
    return ("found", found, None if not isinstance(out, np.ndarray) else out.tolist())


@pytest.mark.parametrize("case", [*SERVED, *DECLINED])
def test_the_common_call_answers_as_the_checked_path_does(watched, case):
    """Rule 15 is decided once: the common call serves only what it
    recognises, with the same answer as the checked path, and declines the rest."""
    from writewatch import index, watch

    region = watched()
    make = SERVED.get(case) or DECLINED[case]
    region.view()[3 * P] = 1
    common = index.get_write_watch_common(*make(region))
    assert (common is None) == (case in DECLINED), (
        f"{case}: the common call must {'decline' if case in DECLINED else 'serve'} it")
    region.view()[3 * P] = 1
    via_common = _outcome(watch.get_write_watch, make(region))
    region.view()[3 * P] = 1
    checked = _outcome(watch._get_write_watch_checked, make(region))
    assert via_common == checked, f"{case}: the common call answered otherwise"


@pytest.mark.parametrize("case", [*SERVED, *DECLINED])
def test_the_common_call_lets_go_of_every_array(watched, case):
    """No reference or buffer export outlives a call, on any path: the
    array can still be resized in place afterwards."""
    from writewatch import index

    region = watched()
    args = (SERVED.get(case) or DECLINED[case])(region)
    out = args[3]
    before = sys.getrefcount(out)
    for _ in range(100):
        index.get_write_watch_common(*args)
    assert sys.getrefcount(out) == before
    if isinstance(out, np.ndarray) and out.base is None and out.flags.writeable:
        out.resize(out.size + 1, refcheck=False)  # BufferError while an export is held
