"""Committing again over decommitted and never-committed pages at once.

On Linux 6.1 the uffd backend failed such a commit (ERROR_INVALID_ADDRESS):
the range then spans two VMAs, and that kernel's UFFDIO_WRITEPROTECT covers
one VMA per call. Found by the conformance tester's random traces; this is
its shrunk trace, with the write tracking checked afterwards.
"""

from __future__ import annotations

import writewatch as ww

P = ww.PAGE_SIZE


def test_commit_over_a_decommitted_and_a_never_committed_page(watched):
    region = watched(2, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH)
    assert ww.VirtualAlloc(region.base + P, P, ww.MEM_COMMIT, ww.PAGE_READWRITE)
    assert ww.VirtualFree(region.base, 0, ww.MEM_DECOMMIT), ww.GetLastError()
    assert ww.VirtualAlloc(region.base, 2 * P, ww.MEM_COMMIT, ww.PAGE_NOACCESS) == region.base, \
        ww.GetLastError()
    ok, old = ww.VirtualProtect(region.base, 2 * P, ww.PAGE_READWRITE)
    assert ok and old == ww.PAGE_NOACCESS, ww.GetLastError()
    assert region.written() == []
    region.view()[P + 7] = 1
    region.view()[3] = 1
    assert region.written() == [0, 1]


def test_commit_readwrite_over_decommitted_pages_tracks_writes(watched):
    region = watched(8, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH)
    assert ww.VirtualAlloc(region.base + 2 * P, 3 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE)
    ww.as_array(region.base + 2 * P, 3 * P)[0] = 1
    assert ww.VirtualFree(region.base + 2 * P, 3 * P, ww.MEM_DECOMMIT), ww.GetLastError()
    assert ww.VirtualAlloc(region.base, 8 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE) == region.base, \
        ww.GetLastError()
    assert region.written() == []
    region.view()[[P, 3 * P, 7 * P]] = 1
    assert region.written() == [1, 3, 7]
