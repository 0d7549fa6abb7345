"""PageRuns: per-page values of one region, stored as runs of equal value, so
that bookkeeping costs one entry per run and nothing per reserved page."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

RESERVED = 0  # the value of a reserved (uncommitted) page; else its protection


class PageRuns:
    """Per-page values of one region, stored as runs.

    starts[i] is the first page of run i and values[i] its value; adjacent runs
    have different values, so the lists grow with the number of distinct runs,
    not with the number of pages.
    """

    __slots__ = ("npages", "starts", "values")

    def __init__(self, npages: int, value: int = RESERVED) -> None:
        self.npages = npages
        self.starts = [0]
        self.values = [value]

    def value_at(self, page: int) -> int:
        return self.values[bisect_right(self.starts, page) - 1]

    def runs(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, value) for each run overlapping pages [first, last), clipped."""
        i = bisect_right(self.starts, first) - 1
        starts, values = self.starts, self.values
        while i < len(starts) and starts[i] < last:
            end = starts[i + 1] if i + 1 < len(starts) else self.npages
            yield max(starts[i], first), min(end, last), values[i]
            i += 1

    def assign(self, first: int, last: int, value: int) -> None:
        """Give pages [first, last) the value."""
        if first >= last:
            return
        starts, values = self.starts, self.values
        new_starts, new_values = [first], [value]
        lo = bisect_left(starts, first)
        hi = bisect_left(starts, last)
        if last < self.npages and (hi == len(starts) or starts[hi] != last):
            new_starts.append(last)
            new_values.append(values[hi - 1])  # the run that covered page `last`
        starts[lo:hi] = new_starts
        values[lo:hi] = new_values
        # Merge equal neighbours around the edit, from the right so indices hold.
        for i in range(min(lo + len(new_starts), len(starts) - 1), max(lo, 1) - 1, -1):
            if values[i] == values[i - 1]:
                del starts[i], values[i]
