"""A region's page states in the native index (native/index.c): the only home
of each page's commit, protection and latch state, stored as runs of equal
state. Random changes are checked against a plain per-page numpy array, and
so is everything the index reads from the runs: the states regions.py asks
for, where an output array may lie, and whether the region's calls go to the
latch walk."""

from __future__ import annotations

import errno
from itertools import pairwise

import numpy as np
import pytest
from forking import scaled_work
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from writewatch import index
from writewatch.kernel import PAGE_SIZE as P
from writewatch.kernel import ffi, lib

pytestmark = pytest.mark.any_backend  # bookkeeping only: no memory is touched

# Above user space: no region writewatch makes can overlap it. The entry is a
# pagemap one with no descriptor, so a GetWriteWatch it does not refuse fails
# with EBADF (or finds nothing when no page is committed).
BASE = 1 << 48
PROTECTIONS = (0, 1, 2, 4)  # reserved, then Windows' PAGE_* values
FLAGS = (index.PAGES_WRITABLE, index.PAGES_LATCHED, index.PAGES_CHANGING)
EVERYTHING = index.PAGES_PROTECTION | sum(FLAGS)
MASKS = st.sets(st.sampled_from((index.PAGES_PROTECTION, *FLAGS)), min_size=1).map(sum)


def add(base: int, npages: int) -> None:
    assert lib.ww_index_add(base, npages * P, lib.WW_INDEX_PAGEMAP, -1) == 0


@pytest.fixture
def entry():
    """A fresh index entry of `npages` pages at BASE, removed afterwards."""
    made = []

    def make(npages: int) -> int:
        add(BASE, npages)
        made.append(BASE)
        return BASE

    yield make
    for base in made:
        index.remove(base)


def page_states(base: int, first: int, last: int, mask: int) -> list[int]:
    """Pages [first, last) expanded from the index's runs, checking that the
    runs tile the range and that equal neighbours were merged."""
    runs = list(index.pages(base, base + first * P, base + last * P, mask))
    assert [run[0] for run in runs[1:]] == [run[1] for run in runs[:-1]], \
        "the runs of a range must tile it: no gap, no overlap"
    assert all(start < end for start, end, _ in runs), "a run must hold at least one page"
    assert all(a[2] != b[2] for a, b in pairwise(runs)), "adjacent runs must differ"
    if runs:
        assert (runs[0][0], runs[-1][1]) == (base + first * P, base + last * P), \
            "the runs must cover exactly the range asked for"
    return [value for start, end, value in runs for _ in range((end - start) // P)]


def output_allowed(base: int, first: int, last: int) -> bool:
    return lib.ww_output_check(ffi.cast("void *", base + first * P), (last - first) * P) == 0


def latched(base: int, npages: int) -> bool:
    """Does the index hand the region's calls to the latch walk?"""
    out = np.zeros(1, np.uintp)
    try:
        index.get_write_watch_as(0, base, npages * P, out, 1)
    except index.RefusedError as refused:
        return refused.reason == index.REFUSED_LATCHED
    except OSError as failed:
        assert failed.errno == errno.EBADF, "only the scan of the fake entry may fail"
    return False


class PageStatesMachine(RuleBasedStateMachine):
    """Random set_pages() sequences against a numpy per-page model."""

    @initialize(npages=st.integers(1, 300))
    def make(self, npages: int) -> None:
        self.npages = npages
        self.model = np.zeros(npages, dtype=np.int64)
        add(BASE, npages)

    def teardown(self) -> None:
        if hasattr(self, "model"):
            index.remove(BASE)

    @precondition(lambda self: hasattr(self, "model"))
    @rule(data=st.data(), mask=MASKS)
    def set_pages(self, data: st.DataObject, mask: int) -> None:
        first = data.draw(st.integers(0, self.npages), label="first")
        last = data.draw(st.integers(first, self.npages), label="last")
        bits = sum(flag for flag in FLAGS if mask & flag and data.draw(st.booleans()))
        if mask & index.PAGES_PROTECTION:
            bits |= data.draw(st.sampled_from(PROTECTIONS), label="protection")
        index.set_pages(BASE, BASE + first * P, BASE + last * P, mask, bits)
        self.model[first:last] = (self.model[first:last] & ~mask) | bits

    @precondition(lambda self: hasattr(self, "model"))
    @rule(data=st.data(), mask=MASKS)
    def read_a_slice(self, data: st.DataObject, mask: int) -> None:
        first = data.draw(st.integers(0, self.npages - 1), label="first")
        last = data.draw(st.integers(first + 1, self.npages), label="last")
        assert page_states(BASE, first, last, mask) == (self.model[first:last] & mask).tolist()

    @precondition(lambda self: hasattr(self, "model"))
    @rule(data=st.data())
    def output_check(self, data: st.DataObject) -> None:
        first = data.draw(st.integers(0, self.npages - 1), label="first")
        last = data.draw(st.integers(first + 1, self.npages), label="last")
        states = self.model[first:last] & (index.PAGES_WRITABLE | index.PAGES_CHANGING)
        assert output_allowed(BASE, first, last) == bool((states == index.PAGES_WRITABLE).all()), \
            "an output array may lie only in writable pages with no change under way"

    @invariant()
    def every_page_matches(self) -> None:
        if not hasattr(self, "model"):
            return
        assert page_states(BASE, 0, self.npages, EVERYTHING) == self.model.tolist()
        assert latched(BASE, self.npages) == bool((self.model & index.PAGES_LATCHED).any()), \
            "a region's calls go to the latch walk exactly while a page is latched"


PageStatesMachine.TestCase.settings = settings(
    max_examples=scaled_work(150, at_least=50), stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_page_states_match_per_page_model = PageStatesMachine.TestCase


# -- named examples

RW = 4 | index.PAGES_WRITABLE


def test_a_fresh_region_is_one_reserved_run(entry):
    base = entry(10)
    assert list(index.pages(base, base, base + 10 * P, EVERYTHING)) == [(base, base + 10 * P, 0)]


def test_a_change_in_the_middle_splits_in_three(entry):
    base = entry(10)
    index.set_pages(base, base + 3 * P, base + 5 * P, EVERYTHING, RW)
    assert page_states(base, 0, 10, EVERYTHING) == [0, 0, 0, RW, RW, 0, 0, 0, 0, 0]


def test_equal_neighbours_merge(entry):
    base = entry(12)
    index.set_pages(base, base, base + 4 * P, EVERYTHING, RW)
    index.set_pages(base, base + 8 * P, base + 12 * P, EVERYTHING, RW)
    index.set_pages(base, base + 4 * P, base + 8 * P, EVERYTHING, RW)
    assert list(index.pages(base, base, base + 12 * P, EVERYTHING)) == [(base, base + 12 * P, RW)]


def test_a_mask_merges_runs_that_differ_outside_it(entry):
    """VirtualQuery's run: pages of one protection, latched or not."""
    base = entry(8)
    index.set_pages(base, base, base + 8 * P, EVERYTHING, RW)
    index.set_pages(base, base + 2 * P, base + 4 * P, index.PAGES_LATCHED, index.PAGES_LATCHED)
    assert list(index.pages(base, base, base + 8 * P, index.PAGES_PROTECTION)) == \
        [(base, base + 8 * P, 4)]
    assert list(index.pages(base, base + P, base + 5 * P, index.PAGES_LATCHED)) == \
        [(base + P, base + 2 * P, 0), (base + 2 * P, base + 4 * P, index.PAGES_LATCHED),
         (base + 4 * P, base + 5 * P, 0)]


def test_more_runs_than_one_call_answers(entry):
    """index.pages asks again from where a full answer stopped."""
    npages = 301
    base = entry(npages)
    for page in range(0, npages, 2):
        index.set_pages(base, base + page * P, base + (page + 1) * P, EVERYTHING, RW)
    assert page_states(base, 0, npages, EVERYTHING) == [RW, 0] * (npages // 2) + [RW]


@pytest.mark.parametrize(("first", "last", "mask", "bits", "why"), [
    (0, P, index.PAGES_LATCHED, index.PAGES_WRITABLE, "bits outside the mask"),
    (1, P, EVERYTHING, RW, "a range that is not whole pages"),
    (0, 5 * P, EVERYTHING, RW, "a range past the region's end"),
    (P, 0, EVERYTHING, RW, "a range that ends before it starts"),
])
def test_a_bad_change_is_refused_and_changes_nothing(entry, first, last, mask, bits, why):
    base = entry(4)
    index.set_pages(base, base + P, base + 2 * P, EVERYTHING, RW)
    with pytest.raises(OSError) as refused:
        index.set_pages(base, base + first, base + last, mask, bits)
    assert refused.value.errno == errno.EINVAL, why
    assert page_states(base, 0, 4, EVERYTHING) == [0, RW, 0, 0], why


def test_an_unknown_region_is_refused():
    with pytest.raises(OSError) as refused:
        index.set_pages(BASE, BASE, BASE + P, EVERYTHING, RW)
    assert refused.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        list(index.pages(BASE, BASE, BASE + P, EVERYTHING))
    with pytest.raises(OSError):
        index.current(BASE)
