"""GetWriteWatch(WRITE_WATCH_FLAG_RESET) is atomic per page (docs/semantics.md
rule 17), checked under real concurrency: native writer threads store into a
watched region while the main thread polls with RESET and copies each reported
page into a shadow buffer. A write that a poll resets without reporting is lost
to the shadow for good, so after the writers stop (and one last poll) the shadow
equals the memory byte for byte exactly when no write was ever dropped.

The copy is made AFTER the GetWriteWatch that reported the page: a write that
lands after the page's reset dirties it again and is copied by a later poll.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from native_writers import NativeWriters

import writewatch as ww

P = ww.PAGE_SIZE
NPAGES = 256
RUN_SECONDS = 0.5  # bounds the polling loop only; nothing asserts on time
SETTLE_LIMIT = 10.0  # the most a run goes on past RUN_SECONDS to be exercised
# Each writer pauses this long after a store. Without a pause every page is
# re-written continuously and a dropped write is simply written again, which
# hides it; with ~1 us the last write of each page lands at a random moment.
# (Measured here: a poller that resets the whole range after copying, or that
# resets past its cap, leaves 10-250 stale pages at this rate.)
PAUSE_NS = 1000



# The committed parts of the 256-page region, as [first, last) page ranges.
WHOLE = [(0, NPAGES)]
# Pages 96..127 decommitted: two committed spans, so a capped poll may stop in
# the first, in the second, or at the boundary between them.
WITH_HOLE = [(0, 96), (128, NPAGES)]


@pytest.fixture
def region() -> Iterator[int]:
    base = ww.VirtualAlloc(0, NPAGES * P, ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                           ww.PAGE_READWRITE)
    assert base, ww.GetLastError()
    yield base
    assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)


class ShadowCopier:
    """Polls GetWriteWatch(RESET) with a given capacity over the whole region
    and copies every reported page into a shadow buffer."""

    def __init__(self, base: int, capacity: int, spans: list[tuple[int, int]]) -> None:
        self.base = base
        self.capacity = capacity
        self.spans = spans
        self.views = [ww.as_array(base + first * P, (last - first) * P)
                      for first, last in spans]
        self.shadow = np.zeros(NPAGES * P, np.uint8)  # a fresh region reads as zeros
        self.out = np.zeros(NPAGES, np.uintp)
        self.polls = 0
        self.pages_copied = 0
        self.full_polls = 0  # polls that filled the capacity (capping exercised)

    def copy_page(self, page: int) -> None:
        for (first, last), view in zip(self.spans, self.views, strict=True):
            if first <= page < last:
                at = (page - first) * P
                self.shadow[page * P:(page + 1) * P] = view[at:at + P]
                return
        pytest.fail(f"GetWriteWatch reported page {page}, which is not committed")

    def poll(self) -> int:
        ret, found, granularity = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, self.base,
                                                   NPAGES * P, self.out, self.capacity)
        assert (ret, granularity) == (0, P), ww.GetLastError()
        assert 0 <= found <= self.capacity
        pages = (self.out[:found].astype(np.int64) - self.base) // P
        assert (np.diff(pages) > 0).all(), "addresses not ascending"
        for page in pages.tolist():
            self.copy_page(page)  # after the reset that reported it
        self.polls += 1
        self.pages_copied += found
        self.full_polls += found == self.capacity
        return found

    def drain(self) -> None:
        """Poll until a poll comes back short: everything written has been copied
        (only valid once nothing writes any more)."""
        for _ in range(NPAGES + 2):
            if self.poll() < self.capacity:
                return
        pytest.fail("GetWriteWatch(RESET) kept reporting pages after the writers stopped")

    def stale_pages(self) -> list[int]:
        """Committed pages whose shadow differs from the memory."""
        stale: list[int] = []
        for (first, last), view in zip(self.spans, self.views, strict=True):
            differ = self.shadow[first * P:last * P] != view
            stale += (first + np.flatnonzero(differ.reshape(-1, P).any(axis=1))).tolist()
        return stale

    def pages_with_data(self) -> int:
        return sum(int(view.reshape(-1, P).any(axis=1).sum()) for view in self.views)


def run_writers_and_poll(base: int, capacity: int, seed: int,
                         spans: list[tuple[int, int]] = WHOLE) -> ShadowCopier:
    """Decommit what spans leave out, run two writer threads on each committed
    span while polling, stop them, drain. Returns the copier."""
    kept = {page for first, last in spans for page in range(first, last)}
    for page in sorted(set(range(NPAGES)) - kept):
        assert ww.VirtualFree(base + page * P, P, ww.MEM_DECOMMIT), ww.GetLastError()
    copier = ShadowCopier(base, capacity, spans)
    writers = [NativeWriters(base + first * P, last - first, nthreads=2, seed=seed + i,
                             pause_ns=PAUSE_NS) for i, (first, last) in enumerate(spans)]
    try:
        capped = capacity < NPAGES

        def exercised() -> bool:
            """The run tested something: a capped poll filled its capacity,
            and the writers reached most pages."""
            return ((not capped or copier.full_polls > 0)
                    and copier.pages_with_data() > NPAGES // 2)

        deadline = time.monotonic() + RUN_SECONDS
        # Past the deadline until the run was exercised (under a loaded CPU the
        # writers may lag the poller), for at most SETTLE_LIMIT more seconds.
        while True:
            now = time.monotonic()
            if now >= deadline and (exercised() or now >= deadline + SETTLE_LIMIT):
                break
            if copier.poll() < capacity and capped:
                time.sleep(0.001)  # let the writers dirty more pages than the cap
        concurrent_pages = copier.pages_copied
    finally:
        writes = sum(each.stop() for each in writers)
    copier.drain()
    # The run was not vacuous: the threads wrote, and polls found pages while
    # they were writing.
    assert writes > 0
    assert concurrent_pages > 0
    return copier


def describe(stale: list[int]) -> str:
    return (f"{len(stale)} pages differ from their shadow (first {stale[:8]}): "
            "a write was reset without being reported")


def test_item17_reset_poll_with_full_capacity_loses_no_write(region):
    """Rule 17: get+reset in one step per page; a full-capacity poll misses nothing."""
    copier = run_writers_and_poll(region, capacity=NPAGES, seed=17)
    assert copier.polls > 1
    stale = copier.stale_pages()
    assert stale == [], describe(stale)
    # The writers touched (nearly) every page, so the comparison covered them.
    assert copier.pages_with_data() > NPAGES // 2


@pytest.mark.parametrize("spans", [WHOLE, WITH_HOLE], ids=["one-span", "two-spans"])
def test_item17_and_9_capped_reset_poll_under_concurrency_loses_no_write(region, spans):
    """Rules 17 + 9: with count=7 only the 7 reported pages are reset; the pages
    past the cap (in the same committed span or a later one) keep their dirty
    state while threads keep writing."""
    copier = run_writers_and_poll(region, capacity=7, seed=9, spans=spans)
    assert copier.full_polls > 0, "no poll hit the cap: capping was not exercised"
    stale = copier.stale_pages()
    assert stale == [], describe(stale)
    assert copier.pages_with_data() > NPAGES // 2


def test_reset_then_poll_after_writers_stop_reports_nothing(region):
    """Rule 4 after concurrency: once drained with RESET, the region reads clean."""
    copier = run_writers_and_poll(region, capacity=NPAGES, seed=4)
    out = np.zeros(NPAGES, np.uintp)
    assert ww.GetWriteWatch(0, region, NPAGES * P, out)[:2] == (0, 0)
    assert copier.pages_copied >= NPAGES // 2
