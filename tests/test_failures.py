"""A kernel call failing half-way through a Windows call: a clear error, and
nothing the call had already changed is left behind."""

from __future__ import annotations

import errno

import pytest

import writewatch as ww
from writewatch import kernel

P = ww.PAGE_SIZE


def test_commit_failing_on_its_last_span_undoes_the_others(watched, monkeypatch):
    region = watched(12, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH, ww.PAGE_NOACCESS)
    # Pages 4-7 committed and one written; 0-3 and 8-11 reserved.
    assert ww.VirtualAlloc(region.base + 4 * P, 4 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE)
    ww.as_array(region.base + 5 * P, P)[0] = 1
    instance = ww.regions.find(region.base).watcher  # this region's watcher
    assert isinstance(instance, kernel.Watcher)
    real_watch = instance.watch

    def watch_fails_past_page_8(start: int, length: int, prot: int, **kw: object) -> None:
        if start >= region.base + 8 * P:
            raise OSError(errno.ENOMEM, "no memory for the last span")
        real_watch(start, length, prot, **kw)

    monkeypatch.setattr(instance, "watch", watch_fails_past_page_8)
    # Commit everything read-only: span 0-3 is watched, 4-7 re-protected, then 8-11 fails.
    assert ww.VirtualAlloc(region.base, 12 * P, ww.MEM_COMMIT, ww.PAGE_READONLY) == 0
    assert ww.GetLastError() == ww.ERROR_NOT_ENOUGH_MEMORY
    monkeypatch.undo()

    first = ww.VirtualQuery(region.base)
    assert (first.State, first.RegionSize) == (ww.MEM_RESERVE, 4 * P)
    middle = ww.VirtualQuery(region.base + 4 * P)
    assert (middle.State, middle.Protect, middle.RegionSize) == (ww.MEM_COMMIT,
                                                                ww.PAGE_READWRITE, 4 * P)
    assert ww.VirtualQuery(region.base + 8 * P).State == ww.MEM_RESERVE
    assert region.written() == [5]  # the dirty page kept its state
    ww.as_array(region.base + 6 * P, P)[0] = 1  # and is writable again, still tracked
    assert region.written() == [5, 6]
    with pytest.raises(ww.WriteWatchError):  # the undone span is not accessible
        ww.as_array(region.base, P)
