"""The native index of write-watch regions (native/index.c), from Python.

The index is the home of every reservation's state: its bounds, its
watcher's native handle, and its pages' commit, protection and latch state as
runs; regions.py asks and changes it there. The index serves GetWriteWatch and
ResetWriteWatch in one native call each, with Windows' checks on the range
made there and only there: a refused call comes back as a reason code that
regions.py words.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from writewatch import kernel
from writewatch.kernel import check, ffi, lib

# Reasons a call is refused (native/abi.h), as the negative result minus the base.
REFUSED_FLAGS = lib.WW_REFUSED_FLAGS
REFUSED_SIZE = lib.WW_REFUSED_SIZE
REFUSED_NOT_WATCHED = lib.WW_REFUSED_NOT_WATCHED
REFUSED_LEAVES_REGION = lib.WW_REFUSED_LEAVES_REGION
REFUSED_OUTPUT = lib.WW_REFUSED_OUTPUT
REFUSED_STALE = lib.WW_REFUSED_STALE
REFUSED_LATCHED = lib.WW_REFUSED_LATCHED
_REFUSED_BASE = lib.WW_REFUSED_BASE
_ERRNO_BASE = lib.WW_INDEX_ERRNO_BASE


class RefusedError(Exception):
    """The index refused a call; .reason is one of the REFUSED_* codes."""

    def __init__(self, reason: int) -> None:
        super().__init__(reason)
        self.reason = reason


def add(base: int, size: int, watcher: kernel.Watcher | None) -> None:
    """Enter a reservation (no spans yet). Plain ones are there too, so that an
    output array inside one is checked before a store."""
    kind, handle = (lib.WW_INDEX_PLAIN, -1) if watcher is None else watcher.native_handle()
    check(lib.ww_index_add(base, size, kind, handle), "write-watch index")


# A page's state in the index (native/abi.h): its Windows protection while
# committed (0 while reserved), and the flags the index reads itself.
PAGES_PROTECTION = lib.WW_PAGES_PROTECTION
PAGES_WRITABLE = lib.WW_PAGES_WRITABLE
PAGES_LATCHED = lib.WW_PAGES_LATCHED
PAGES_CHANGING = lib.WW_PAGES_CHANGING
_RUNS_PER_CALL = 64


def set_pages(base: int, first: int, last: int, mask: int, bits: int) -> None:
    """Pages [first, last) of a reservation take (state & ~mask) | bits. The
    index changes only the runs around that range: the cost does not grow
    with the region's runs."""
    check(lib.ww_index_set_pages(base, first, last, mask, bits), "write-watch index")


def pages(base: int, first: int, last: int, mask: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, state & mask) for the runs covering pages [first, last) of
    a reservation, adjacent runs of equal masked state merged."""
    runs = ffi.new("uint64_t[]", 3 * _RUNS_PER_CALL)
    while first < last:
        count = check(lib.ww_index_pages(base, first, last, mask, runs, _RUNS_PER_CALL),
                      "write-watch index")
        for i in range(0, 3 * count, 3):
            yield runs[i], runs[i + 1], runs[i + 2]
        first = runs[3 * count - 2]


def refresh(base: int, watcher: kernel.Watcher) -> None:
    """In a forked child: the reservation's new handle; it is current again."""
    check(lib.ww_index_refresh(base, watcher.native_handle()[1]), "write-watch index")


def current(base: int) -> bool:
    """Was the reservation made or refreshed in this process (not a parent)?"""
    return bool(check(lib.ww_index_current(base), "write-watch index"))


def set_latching(base: int, latching: bool) -> None:
    """Mark a VirtualProtect as latching a reservation's pages (docs/semantics.md
    rule 11): meanwhile, and while any page is latched, the index refuses its
    GetWriteWatch and ResetWriteWatch with REFUSED_LATCHED, for watch.py to
    serve."""
    check(lib.ww_index_set_latching(base, int(latching)), "write-watch index")


def remove(base: int) -> None:
    """Take a reservation out, once every call using it has finished."""
    check(lib.ww_index_remove(base), "write-watch index")


def quiesce(base: int) -> None:
    """Wait for every call using the reservation (scanning it, or storing its
    output into it) that began before now. Called after telling the index of
    a change and before changing the memory, so that no call acts on the old
    state: region lock held."""
    check(lib.ww_index_quiesce(base), "write-watch index")


def verdict(result: int, what: str) -> int:
    """A count, or a refusal (RefusedError), or a kernel failure: the index
    returns -(ERRNO_BASE + errno), which shifted back is check()'s -errno."""
    if result >= 0:
        return result
    if result <= -_ERRNO_BASE:
        return check(result + _ERRNO_BASE, what)
    raise RefusedError(-result - _REFUSED_BASE)


# GetWriteWatch's common call (the per-frame call of a game loop) as one
# CPython function (native/python_calls.c): get_write_watch_common(flags, base,
# size, addresses, count) is the index's result for a numpy uintp array that
# fits the count, or None for any other call, which watch.py checks and words.
get_write_watch_common = kernel.get_write_watch_common
_from_buffer = ffi.from_buffer
_UINT64S = ffi.typeof("uint64_t[]")


def get_write_watch_as(flags: int, base: int, size: int, out: np.ndarray, capacity: int,
                       origin: int = 0, shift: int = 0) -> int:
    """GetWriteWatch in one native call: the count of addresses written into
    out[:capacity], each stored as (address - origin) >> shift. out must be a
    writable contiguous 64-bit array holding capacity entries (the caller
    checks). Raises RefusedError, or OSError for a kernel failure."""
    found: int = lib.ww_index_get_write_watch_as(flags, base, size, _from_buffer(_UINT64S, out),
                                                 capacity, origin, shift)
    return found if found >= 0 else verdict(found, "GetWriteWatch scan")


def reset_write_watch(base: int, size: int) -> None:
    """ResetWriteWatch in one native call. Raises RefusedError, or OSError."""
    verdict(lib.ww_index_reset_write_watch(base, size), "ResetWriteWatch")


def output_writable(out: np.ndarray, count: int) -> bool:
    """Can count 64-bit entries be stored at the start of out? False when out
    lies in memory writewatch manages that was made read-only, inaccessible or
    decommitted after the array was made (numpy still calls it writable).
    Asking writes nothing (so marks no watched page written)."""
    return lib.ww_output_check(_from_buffer(_UINT64S, out), count * 8) == 0


kernel.on_fork("index", child=lib.ww_index_after_fork_child)
