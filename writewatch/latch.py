"""The VirtualProtect latch (docs/semantics.md rule 11).

On Windows, VirtualProtect (even to the protection pages already have) latches
the written state of the pages written at that moment: a later decommit does
not clear them, a reset does. While a region's pages are committed its
backend holds their written state; once a latched page is decommitted only
its latched flag in the index remembers it. While a region has latched pages
the native index hands its GetWriteWatch and ResetWriteWatch back to walk()
and reset() here; a region that never had a VirtualProtect over written pages
pays nothing. Which pages are latched is the region's page state, kept by
the index (Region.latched_spans, Region.set_latched); this module calls down
into regions.py, never the other way. Every function runs with the
region's lock held.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from writewatch import index, kernel
from writewatch.kernel import PAGE_SIZE
from writewatch.regions import RESERVED

if TYPE_CHECKING:
    from writewatch.regions import Region


@contextmanager
def latching(region: Region) -> Iterator[None]:
    """Around a VirtualProtect's latch (latch_written): the index sends this
    region's GetWriteWatch and ResetWriteWatch to the region's lock meanwhile,
    and the calls that began before have finished, so the latch and a reset
    are ordered one way or the other (a reset interleaved with the latch's
    scan once left a page latched that the reset had just cleared, reported
    after a decommit). Afterwards the index walks the region only if it has
    latched pages."""
    index.set_latching(region.base, True)
    try:
        index.quiesce(region.base)
        yield
    finally:
        index.set_latching(region.base, False)


def latch_written(region: Region, first: int, last: int) -> None:
    """VirtualProtect over [first, last) (all committed): latch the pages
    written now. One scan without reset; nothing more unless some are."""
    assert region.watcher is not None
    npages = (last - first) // PAGE_SIZE
    found = np.empty(npages, np.uintp)
    n = region.watcher.get_write_watch(kernel.Spans([(first, last)]), first, last, False,
                                       found, npages)
    for start, end in _address_runs(found[:n]):
        region.set_latched(start, end, True)


def walk(region: Region, first: int, last: int, reset: bool, capacity: int) -> np.ndarray:
    """GetWriteWatch over [first, last) of a region with latched pages: the
    written committed pages (the backend's scan) and the latched
    decommitted ones, ascending, at most capacity; with reset, exactly the
    reported pages are reset and unlatched (rule 9)."""
    assert region.watcher is not None
    room = min(capacity, (last - first) // PAGE_SIZE)
    found = np.empty(room, np.uintp)
    count = 0
    for start, end, value in list(region.spans(first, last)):
        if count == room:
            break
        if value == RESERVED:
            for span_start, span_end in region.latched_spans(start, end):
                n = min((span_end - span_start) // PAGE_SIZE, room - count)
                found[count:count + n] = np.arange(span_start, span_start + n * PAGE_SIZE,
                                                   PAGE_SIZE, dtype=np.uintp)
                count += n
                if reset:
                    region.set_latched(span_start, span_start + n * PAGE_SIZE, False)
                if count == room:
                    break
            continue
        n = region.watcher.get_write_watch(kernel.Spans([(start, end)]), start, end, reset,
                                           found[count:], room - count)
        if reset and n:
            # The walk passed [start, walked); every latched page there was
            # written, so was reported and reset.
            walked = end if count + n < room else int(found[count + n - 1]) + PAGE_SIZE
            region.set_latched(start, walked, False)
        count += n
    return found[:count]


def reset(region: Region, first: int, last: int) -> None:
    """ResetWriteWatch over [first, last) of a region with latched pages."""
    assert region.watcher is not None
    for start, end in region.committed_spans(first, last):
        npages = (end - start) // PAGE_SIZE
        region.watcher.get_write_watch(kernel.Spans([(start, end)]), start, end, True,
                                       np.empty(npages, np.uintp), npages)
    region.set_latched(first, last, False)


def _address_runs(addresses: np.ndarray) -> list[tuple[int, int]]:
    """Ascending page addresses as [start, end) spans of consecutive pages."""
    if len(addresses) == 0:
        return []
    breaks = np.flatnonzero(np.diff(addresses) != PAGE_SIZE) + 1
    starts = addresses[np.r_[0, breaks]]
    ends = addresses[np.r_[breaks - 1, len(addresses) - 1]] + PAGE_SIZE
    return [(int(start), int(end)) for start, end in zip(starts, ends, strict=True)]


def split(start: int, end: int,
          spans: list[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
    """[start, end) cut at the given spans inside it: (start, end, outside)."""
    at = start
    for span_start, span_end in spans:
        if at < span_start:
            yield at, span_start, True
        yield span_start, span_end, False
        at = span_end
    if at < end:
        yield at, end, True
