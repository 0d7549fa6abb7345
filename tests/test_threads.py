"""Threads using the Windows functions at once: each on regions of its own,
and each on its own pages of one shared region. Every report stays exact,
one thread's commits, decommits and resets never disturb another's pages, and
nothing leaks."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from forking import patience

import writewatch as ww

P = ww.PAGE_SIZE
RESERVE = ww.MEM_RESERVE
COMMIT = ww.MEM_COMMIT
RW = ww.PAGE_READWRITE


def run_threads(worker: Callable[[int], None], count: int) -> None:
    """worker(0), ..., worker(count - 1), each in a thread of its own, joined
    with a 60 s timeout (a hang guard): none may still be running."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=patience(60))
    assert not any(thread.is_alive() for thread in threads)


def test_threads_allocate_write_query_and_release():
    """4 threads x 200 rounds on their own regions: exact reports, no leaks."""
    npages, rounds = 8, 200
    errors: list[str] = []
    bases: set[int] = set()
    bases_lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        out = np.zeros(npages, np.uintp)
        mine: set[int] = set()
        start.wait()
        try:
            for i in range(rounds):
                base = ww.VirtualAlloc(0, npages * P,
                                       RESERVE | COMMIT | ww.MEM_WRITE_WATCH, RW)
                if not base:
                    raise AssertionError(f"VirtualAlloc failed: {ww.GetLastError()}")
                mine.add(base)
                pages = sorted(set(rng.choice(npages, size=int(rng.integers(1, npages)),
                                              replace=True).tolist()))
                view = ww.as_array(base, npages * P)
                for page in pages:
                    view[page * P + int(rng.integers(P))] = i % 255 + 1
                del view
                ret, found, gran = ww.GetWriteWatch(0, base, npages * P, out)
                got = [(int(a) - base) // P for a in out[:found]]
                if (ret, gran) != (0, P) or got != pages:
                    raise AssertionError(f"round {i}: written {pages}, reported {got} "
                                         f"(ret {ret:#x}, error {ww.GetLastError()})")
                if not ww.VirtualFree(base + 2 * P, 3 * P, ww.MEM_DECOMMIT):
                    raise AssertionError(f"decommit failed: {ww.GetLastError()}")
                ret, found, _ = ww.GetWriteWatch(0, base, npages * P, out)
                got = [(int(a) - base) // P for a in out[:found]]
                if ret != 0 or got != [p for p in pages if not 2 <= p < 5]:
                    raise AssertionError(f"round {i}: after decommit reported {got}")
                if not ww.VirtualFree(base, 0, ww.MEM_RELEASE):
                    raise AssertionError(f"release failed: {ww.GetLastError()}")
        except BaseException as exc:  # reported by the main thread
            errors.append(f"thread {seed}: {exc!r}")
        with bases_lock:
            bases.update(mine)

    run_threads(worker, 4)
    assert errors == []
    assert bases
    leaked = [hex(b) for b in bases if ww.VirtualQuery(b).State != ww.MEM_FREE]
    assert leaked == []


def test_threads_share_one_region_each_with_its_own_pages(watched):
    """4 threads on disjoint 4-page slices of one region: committing,
    decommitting and capped/reset queries of one never disturb another's."""
    region = watched(16)
    errors: list[str] = []
    start = threading.Barrier(4)

    def worker(index: int) -> None:
        first = region.base + 4 * index * P
        rng = np.random.default_rng(100 + index)
        out = np.zeros(4, np.uintp)
        start.wait()
        try:
            for i in range(150):
                pages = sorted({int(p) for p in rng.integers(0, 4, size=3)})
                view = ww.as_array(first, 4 * P)
                for page in pages:
                    view[page * P + 1] = i % 250 + 1
                del view
                ret, found, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, first, 4 * P, out)
                got = [(int(a) - first) // P for a in out[:found]]
                if ret != 0 or got != pages:
                    raise AssertionError(f"round {i}: wrote {pages}, got {got}")
                if not ww.VirtualFree(first + P, 2 * P, ww.MEM_DECOMMIT):
                    raise AssertionError(f"decommit: {ww.GetLastError()}")
                if ww.VirtualAlloc(first + P, 2 * P, COMMIT, RW) != first + P:
                    raise AssertionError(f"recommit: {ww.GetLastError()}")
                if ww.as_array(first + P, 2 * P).any():
                    raise AssertionError(f"round {i}: recommitted pages not zero")
        except BaseException as exc:  # reported by the main thread
            errors.append(f"thread {index}: {exc!r}")

    run_threads(worker, 4)
    assert errors == []
    assert region.written() == []
    info = ww.VirtualQuery(region.base)
    assert (info.State, info.RegionSize) == (ww.MEM_COMMIT, 16 * P)
