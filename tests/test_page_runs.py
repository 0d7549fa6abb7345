"""writewatch.regions.PageRuns: per-page values stored as runs, checked against a
plain per-page numpy array (the region table's bookkeeping: every VirtualQuery /
commit / protect answer is read from these runs)."""

from __future__ import annotations

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

from writewatch.regions import PageRuns

pytestmark = pytest.mark.any_backend  # pure bookkeeping, no memory watched

VALUES = st.integers(min_value=0, max_value=4)


def check_invariants(runs: PageRuns) -> None:
    starts, values = runs.starts, runs.values
    assert len(starts) == len(values) >= 1
    assert starts[0] == 0
    assert all(a < b for a, b in pairwise(starts)), starts
    assert all(a != b for a, b in pairwise(values)), values
    assert all(s < runs.npages for s in starts), (starts, runs.npages)


def expand(runs: PageRuns, first: int, last: int) -> list[int]:
    """Rebuild pages [first, last) from runs(), checking the runs tile the range."""
    out: list[int] = []
    expected_start = first
    for start, end, value in runs.runs(first, last):
        assert start == expected_start, "runs() left a gap or overlapped"
        assert start < end, "runs() yielded an empty run"
        out.extend([value] * (end - start))
        expected_start = end
    assert expected_start == last, "runs() stopped short of the range end"
    return out


class PageRunsMachine(RuleBasedStateMachine):
    """Random assign() sequences against a numpy per-page model."""

    @initialize(npages=st.integers(1, 300), initial=VALUES)
    def make(self, npages: int, initial: int) -> None:
        self.runs = PageRuns(npages, initial)
        self.model = np.full(npages, initial, dtype=np.int64)

    @precondition(lambda self: hasattr(self, "runs"))
    @rule(data=st.data(), value=VALUES)
    def assign(self, data: st.DataObject, value: int) -> None:
        n = self.runs.npages
        first = data.draw(st.integers(0, n), label="first")
        last = data.draw(st.integers(0, n), label="last")
        self.runs.assign(first, last, value)
        if first < last:
            self.model[first:last] = value

    @precondition(lambda self: hasattr(self, "runs"))
    @rule(data=st.data())
    def runs_slice(self, data: st.DataObject) -> None:
        n = self.runs.npages
        first = data.draw(st.integers(0, n - 1), label="first")
        last = data.draw(st.integers(first + 1, n), label="last")
        assert expand(self.runs, first, last) == self.model[first:last].tolist()

    @invariant()
    def every_page_matches(self) -> None:
        if not hasattr(self, "runs"):
            return
        check_invariants(self.runs)
        got = [self.runs.value_at(page) for page in range(self.runs.npages)]
        assert got == self.model.tolist()
        assert expand(self.runs, 0, self.runs.npages) == self.model.tolist()


PageRunsMachine.TestCase.settings = settings(
    max_examples=scaled_work(150, at_least=50), stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_page_runs_match_per_page_model = PageRunsMachine.TestCase


# -- named examples


def state(runs: PageRuns) -> list[tuple[int, int]]:
    check_invariants(runs)
    return list(zip(runs.starts, runs.values, strict=True))


def test_fresh_runs_are_one_run():
    runs = PageRuns(10, 7)
    assert state(runs) == [(0, 7)]
    assert list(runs.runs(0, 10)) == [(0, 10, 7)]
    assert list(runs.runs(3, 5)) == [(3, 5, 7)]


def test_assign_at_the_start():
    runs = PageRuns(10)
    runs.assign(0, 3, 4)
    assert state(runs) == [(0, 4), (3, 0)]
    assert list(runs.runs(0, 10)) == [(0, 3, 4), (3, 10, 0)]


def test_assign_at_the_end():
    runs = PageRuns(10)
    runs.assign(7, 10, 4)
    assert state(runs) == [(0, 0), (7, 4)]
    assert list(runs.runs(5, 10)) == [(5, 7, 0), (7, 10, 4)]
    assert runs.value_at(9) == 4


def test_assign_in_the_middle_splits_in_three():
    runs = PageRuns(10)
    runs.assign(3, 5, 2)
    assert state(runs) == [(0, 0), (3, 2), (5, 0)]
    assert [runs.value_at(p) for p in range(10)] == [0, 0, 0, 2, 2, 0, 0, 0, 0, 0]


def test_assign_whole_range_collapses_to_one_run():
    runs = PageRuns(10)
    runs.assign(2, 4, 1)
    runs.assign(6, 8, 2)
    runs.assign(0, 10, 4)
    assert state(runs) == [(0, 4)]


def test_assign_merges_with_both_neighbours():
    runs = PageRuns(12)
    runs.assign(0, 4, 4)
    runs.assign(8, 12, 4)
    assert state(runs) == [(0, 4), (4, 0), (8, 4)]
    runs.assign(4, 8, 4)
    assert state(runs) == [(0, 4)]


def test_assign_merges_with_left_neighbour_only():
    runs = PageRuns(12)
    runs.assign(0, 4, 4)
    runs.assign(4, 6, 4)
    assert state(runs) == [(0, 4), (6, 0)]


def test_assign_merges_with_right_neighbour_only():
    runs = PageRuns(12)
    runs.assign(6, 12, 2)
    runs.assign(3, 6, 2)
    assert state(runs) == [(0, 0), (3, 2)]


def test_assign_same_value_is_a_no_op():
    runs = PageRuns(12)
    runs.assign(3, 6, 2)
    runs.assign(4, 5, 2)
    assert state(runs) == [(0, 0), (3, 2), (6, 0)]


def test_assign_over_several_runs():
    runs = PageRuns(12)
    for first, value in ((2, 1), (4, 2), (6, 1), (8, 2)):
        runs.assign(first, first + 2, value)
    runs.assign(3, 9, 4)
    assert state(runs) == [(0, 0), (2, 1), (3, 4), (9, 2), (10, 0)]


@pytest.mark.parametrize(("first", "last"), [(5, 5), (6, 2), (0, 0), (10, 10)])
def test_empty_range_is_a_no_op(first, last):
    runs = PageRuns(10)
    runs.assign(2, 4, 1)
    before = state(runs)
    runs.assign(first, last, 3)
    assert state(runs) == before


def test_single_page_region():
    runs = PageRuns(1)
    runs.assign(0, 1, 2)
    assert state(runs) == [(0, 2)]
    assert list(runs.runs(0, 1)) == [(0, 1, 2)]


def test_runs_clips_to_the_asked_range():
    runs = PageRuns(10)
    runs.assign(2, 8, 1)
    assert list(runs.runs(3, 5)) == [(3, 5, 1)]
    assert list(runs.runs(1, 9)) == [(1, 2, 0), (2, 8, 1), (8, 9, 0)]
