"""The VirtualProtect latch (docs/semantics.md rule 11): VirtualProtect latches
the written state of the pages written at that moment; a later decommit does not
clear latched pages, a reset does. Each case runs on the model and on every
backend, and both must give the rule's answers."""

from __future__ import annotations

import numpy as np
import pytest

import writewatch as ww
from writewatch import index, regions
from writewatch.testing.winmodel import WinModel

P = ww.PAGE_SIZE
RW, NA = ww.PAGE_READWRITE, ww.PAGE_NOACCESS
RESERVE_COMMIT_WW = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH


class Real:
    """writewatch, one region of 16 pages."""

    def __init__(self, protect: int) -> None:
        self.base = ww.VirtualAlloc(0, 16 * P, RESERVE_COMMIT_WW, protect)
        assert self.base

    def write(self, page: int) -> None:
        ww.as_array(self.base + page * P, 1)[0] = 1

    def protect(self, first: int, npages: int, protect: int) -> None:
        assert ww.VirtualProtect(self.base + first * P, npages * P, protect)[0]

    def decommit(self, first: int = 0, npages: int = 16) -> None:
        assert ww.VirtualFree(self.base + first * P, npages * P, ww.MEM_DECOMMIT)

    def commit(self, first: int = 0, npages: int = 16) -> None:
        assert ww.VirtualAlloc(self.base + first * P, npages * P, ww.MEM_COMMIT, RW)

    def written(self, flags: int = 0, count: int = 16) -> list[int]:
        out = np.zeros(16, np.uintp)
        ret, found, _ = ww.GetWriteWatch(flags, self.base, 16 * P, out, count)
        assert ret == 0, ww.last_error_reason()
        return [(int(a) - self.base) // P for a in out[:found]]

    def reset(self, first: int = 0, npages: int = 16) -> None:
        assert ww.ResetWriteWatch(self.base + first * P, npages * P) == 0

    def close(self) -> None:
        assert ww.VirtualFree(self.base, 0, ww.MEM_RELEASE)


class Model(Real):
    """The same calls on writewatch.testing.winmodel."""

    def __init__(self, protect: int) -> None:
        self.model = WinModel()
        self.base = self.model.virtual_alloc(0, 16 * P, RESERVE_COMMIT_WW, protect,
                                             pick=lambda length: 0x10000).value
        assert self.base

    def write(self, page: int) -> None:
        self.model.write(self.base + page * P, b"\1")

    def protect(self, first: int, npages: int, protect: int) -> None:
        assert self.model.virtual_protect(self.base + first * P, npages * P, protect).ok

    def decommit(self, first: int = 0, npages: int = 16) -> None:
        assert self.model.virtual_free(self.base + first * P, npages * P, ww.MEM_DECOMMIT).ok

    def commit(self, first: int = 0, npages: int = 16) -> None:
        assert self.model.virtual_alloc(self.base + first * P, npages * P, ww.MEM_COMMIT,
                                        RW, pick=lambda length: 0).ok

    def written(self, flags: int = 0, count: int = 16) -> list[int]:
        expect = self.model.get_write_watch(flags, self.base, 16 * P, 16, count)
        assert expect.ok
        return [(a - self.base) // P for a in expect.value[3]]

    def reset(self, first: int = 0, npages: int = 16) -> None:
        assert self.model.reset_write_watch(self.base + first * P, npages * P).ok

    def close(self) -> None:
        pass


@pytest.fixture(params=["model", "writewatch"])
def make(request):
    made: list[Real] = []

    def factory(protect: int = RW) -> Real:
        memory = (Model if request.param == "model" else Real)(protect)
        made.append(memory)
        return memory

    yield factory
    for memory in made:
        memory.close()


def test_first_worked_sequence(make):
    m = make(RW)
    m.write(3)
    m.protect(0, 6, RW)
    m.write(5)
    assert m.written() == [3, 5]
    m.decommit()
    assert m.written() == [3]
    m.commit()
    assert m.written() == [3]
    for page in (2, 4, 6):
        m.write(page)
    assert m.written() == [2, 3, 4, 6]


def test_second_worked_sequence(make):
    m = make(NA)
    m.protect(0, 6, RW)
    m.write(3)
    m.write(5)
    m.decommit()
    assert m.written() == []


def test_a_reset_clears_the_latch(make):
    m = make(RW)
    m.write(3)
    m.protect(0, 6, RW)
    m.reset(3, 1)
    m.write(3)  # written after the latch was cleared: a decommit clears it
    m.decommit()
    assert m.written() == []


def test_get_write_watch_with_reset_clears_only_what_it_returns(make):
    m = make(RW)
    for page in (1, 2, 9):
        m.write(page)
    m.protect(0, 16, ww.PAGE_READONLY)
    m.decommit(0, 3)
    assert m.written() == [1, 2, 9]
    assert m.written(ww.WRITE_WATCH_FLAG_RESET, count=1) == [1]  # decommitted and latched
    m.commit(0, 3)
    m.decommit(0, 16)
    assert m.written() == [2, 9]  # still latched
    assert m.written(ww.WRITE_WATCH_FLAG_RESET) == [2, 9]
    assert m.written() == []


def test_a_latched_page_recommitted_is_tracked_again_after_its_reset(make):
    """A latched page decommitted and committed again reads written; once a
    reset re-arms it, its next write is reported. (On kernels without
    UFFD_FEATURE_WP_UNPOPULATED the uffd backend must populate such a page
    before it can write-protect it: it lost this write on Linux 6.1.)"""
    m = make(RW)
    m.write(0)
    m.protect(0, 1, RW)
    m.decommit(0, 1)
    m.commit(0, 1)
    assert m.written(ww.WRITE_WATCH_FLAG_RESET) == [0]
    m.write(0)
    assert m.written(ww.WRITE_WATCH_FLAG_RESET) == [0]
    assert m.written() == []


def test_protection_change_of_clean_pages_latches_nothing(make):
    m = make(RW)
    m.protect(0, 16, ww.PAGE_READONLY)
    m.protect(0, 16, RW)
    m.write(4)
    m.decommit()
    assert m.written() == []


def test_untouched_regions_stay_on_the_native_path(watched):
    """No latch, no cost: a region whose VirtualProtect met no written page is
    never handed to the Python walk."""
    region = watched(16)
    assert ww.VirtualProtect(region.base, 16 * P, ww.PAGE_READONLY)[0]
    assert regions.find(region.base).latched_spans(region.base, region.base + 16 * P) == []
    assert ww.VirtualProtect(region.base, 16 * P, RW)[0]
    region.view()[P] = 1
    assert regions.find(region.base).latched_spans(region.base, region.base + 16 * P) == []
    out = np.zeros(16, np.uintp)
    assert index.get_write_watch_as(0, region.base, 16 * P, out, 16) == 1
    # Latched, then reset: back on the native path.
    assert ww.VirtualProtect(region.base, 16 * P, RW)[0]
    with pytest.raises(index.RefusedError):
        index.get_write_watch_as(0, region.base, 16 * P, out, 16)
    assert region.written(ww.WRITE_WATCH_FLAG_RESET) == [1]
    assert regions.find(region.base).latched_spans(region.base, region.base + 16 * P) == []
    assert index.get_write_watch_as(0, region.base, 16 * P, out, 16) == 0


def test_latched_pages_do_not_cut_virtual_querys_region_size():
    """VirtualQuery's RegionSize counts the pages that share a state and a
    protection; latched pages among them (rule 11) are no different to it,
    committed or decommitted."""
    memory = Real(RW)
    try:
        memory.write(3)
        memory.protect(0, 16, RW)  # latches page 3
        info = ww.VirtualQuery(memory.base)
        assert (info.RegionSize, info.Protect) == (16 * P, RW), \
            "a latched page inside a run of one protection must not split the run"
        memory.decommit(2, 4)  # page 3 stays latched while decommitted
        info = ww.VirtualQuery(memory.base + 2 * P)
        assert (info.RegionSize, info.State) == (4 * P, ww.MEM_RESERVE), \
            "a latched decommitted page must not split the reserved run"
        assert memory.written() == [3]
    finally:
        memory.close()
