"""The native index of write-watch regions (native/index.c), from Python.

regions.py mirrors every reservation here: its bounds, its watcher's native
handle and its committed spans. The index then serves GetWriteWatch and
ResetWriteWatch in one native call each, with Windows' checks on the range
made there and only there: a refused call comes back as a reason code that
regions.py words.
"""

from __future__ import annotations

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


def update(base: int, watcher: kernel.Watcher | None, spans: kernel.Spans) -> None:
    """Tell the index a reservation's committed spans and, after fork, its new
    handle."""
    handle = -1 if watcher is None else watcher.native_handle()[1]
    check(lib.ww_index_update(base, handle, spans.array, spans.count), "write-watch index")


def set_writable(base: int, first: int, last: int, writable: bool) -> None:
    """Mark pages [first, last) of a reservation committed read-write (where
    GetWriteWatch's output array may lie) or not. The index changes only
    around that range: the cost does not grow with the region's runs."""
    check(lib.ww_index_set_writable(base, first, last, int(writable)), "write-watch index")


def set_latched(base: int, latched: bool) -> None:
    """Mark a reservation as having latched pages (docs/semantics.md rule 11):
    the index then refuses its GetWriteWatch and ResetWriteWatch with
    REFUSED_LATCHED, for watch.py to serve."""
    check(lib.ww_index_set_latched(base, int(latched)), "write-watch index")


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


def get_write_watch(flags: int, base: int, size: int, out: np.ndarray, capacity: int) -> int:
    """GetWriteWatch in one native call: the count of addresses written into
    out[:capacity]. out must be a writable contiguous 64-bit array holding
    capacity entries (the caller checks). Raises RefusedError, or OSError for a
    kernel failure."""
    found: int = lib.ww_index_get_write_watch(flags, base, size, _from_buffer(_UINT64S, out),
                                              capacity)
    return found if found >= 0 else verdict(found, "GetWriteWatch scan")


def get_write_watch_as(flags: int, base: int, size: int, out: np.ndarray, capacity: int,
                       origin: int, shift: int) -> int:
    """get_write_watch with each address stored as (address - origin) >> shift."""
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
