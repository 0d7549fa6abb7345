"""Concurrency, continued: lifetimes, and memory that changes under a call.

The harness of test_concurrency.py (native writers, RESET pollers copying
what they are told into a shadow, the byte-for-byte check that no write was
lost) with, at the same time:

- a poller whose output array lies in VirtualAlloc memory that another thread
  keeps making PAGE_NOACCESS and PAGE_READWRITE again, and one whose array
  another thread keeps decommitting and committing again: each call succeeds
  or answers 998, and a RESET that answers 998 has reset nothing (the shadow
  would miss the page);
- a region nothing writes, decommitted and committed again in parts while
  pollers scan it: any page reported there is a phantom;
- the latch against the reset (rule 11): VirtualProtect over a region in a
  loop while another thread writes a page, resets it with GetWriteWatch(RESET),
  decommits it and checks that it is not reported;
- finalizers: WatchedMemory objects made, written and dropped (some in
  reference cycles, so that the collector releases them in whatever thread it
  runs, inside any call), some released through VirtualFree first and their
  addresses reserved again at once: the new region must stay whole, watched
  and exact, and no collection may touch it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

import numpy as np
import test_concurrency as harness
from native_writers import NativeWriters
from test_concurrency import NPAGES, PAUSE_NS, RESET, RW, WATCHED, P, Shadow, Workers

import writewatch as ww

OUT_PAGES = 1  # NPAGES addresses of 8 bytes: one page


class ChangingArray:
    """A GetWriteWatch output array in VirtualAlloc memory, and a thread body
    that changes that memory: protection (NOACCESS and back) or commitment
    (decommit and commit again). Each change pair runs under `readable`, which
    a poller holds while it reads the array."""

    def __init__(self, kind: int) -> None:
        self.size = OUT_PAGES * P
        self.base = ww.VirtualAlloc(0, self.size, ww.MEM_RESERVE | ww.MEM_COMMIT | kind, RW)
        assert self.base, ww.GetLastError()
        self.array = ww.as_array(self.base, self.size, np.uintp)
        self.readable = threading.Lock()
        self.changes = 0

    def protector(self) -> Callable[[np.random.Generator], None]:
        def body(rng: np.random.Generator) -> None:
            with self.readable:
                if ww.VirtualProtect(self.base, self.size, ww.PAGE_NOACCESS) != (True, RW):
                    raise AssertionError(f"VirtualProtect failed: {ww.GetLastError()}")
                if not ww.VirtualProtect(self.base, self.size, RW)[0]:
                    raise AssertionError(f"VirtualProtect failed: {ww.GetLastError()}")
            self.changes += 1
        return body

    def decommitter(self) -> Callable[[np.random.Generator], None]:
        def body(rng: np.random.Generator) -> None:
            with self.readable:
                if not ww.VirtualFree(self.base, self.size, ww.MEM_DECOMMIT):
                    raise AssertionError(f"decommit failed: {ww.GetLastError()}")
                if ww.VirtualAlloc(self.base, self.size, ww.MEM_COMMIT, RW) != self.base:
                    raise AssertionError(f"commit failed: {ww.GetLastError()}")
            self.changes += 1
        return body

    def release(self) -> None:
        del self.array
        assert ww.VirtualFree(self.base, 0, ww.MEM_RELEASE)


def exposed_poller(shadow: Shadow, out: ChangingArray) -> Callable[[np.random.Generator], None]:
    """RESET polls into an array whose protection changes: the shadow check
    holds for them too."""
    def body(rng: np.random.Generator) -> None:
        shadow.poll(0, shadow.npages, int(rng.integers(1, shadow.npages + 1)), out.array,
                    out_readable=out.readable)
    return body


def decommitted_array_poller(base: int, out: ChangingArray,
                             answers: dict[str, int]) -> Callable[[np.random.Generator], None]:
    """GetWriteWatch(0) into an array that is decommitted at times (its
    contents are then lost, so only the answer is checked)."""
    def body(rng: np.random.Generator) -> None:
        ret, found, _ = ww.GetWriteWatch(0, base, NPAGES * P, out.array)
        answer = "ok" if ret == 0 else str(ww.GetLastError())
        if answer not in ("ok", str(ww.ERROR_NOACCESS)) or (ret == 0 and found > NPAGES):
            raise AssertionError(f"GetWriteWatch into a changing array: {ret:#x}, {found}, "
                                 f"last error {ww.GetLastError()}")
        answers[answer] = answers.get(answer, 0) + 1
    return body


QUIET_PAGES = 64


def quiet_decommitter(base: int) -> Callable[[np.random.Generator], None]:
    """Decommit and commit again random parts of a region nothing writes."""
    def body(rng: np.random.Generator) -> None:
        first = int(rng.integers(0, QUIET_PAGES))
        count = int(rng.integers(1, QUIET_PAGES - first + 1))
        address, size = base + first * P, count * P
        if not ww.VirtualFree(address, size, ww.MEM_DECOMMIT):
            raise AssertionError(f"decommit failed: {ww.GetLastError()}")
        if ww.VirtualAlloc(address, size, ww.MEM_COMMIT, RW) != address:
            raise AssertionError(f"commit failed: {ww.GetLastError()}")
    return body


def quiet_poller(base: int) -> Callable[[np.random.Generator], None]:
    """Nothing writes the quiet region: nothing may be reported there."""
    out = np.zeros(QUIET_PAGES, np.uintp)

    def body(rng: np.random.Generator) -> None:
        flags = RESET if rng.integers(0, 2) else 0
        ret, found, _ = ww.GetWriteWatch(flags, base, QUIET_PAGES * P, out)
        if ret != 0 or found:
            raise AssertionError(f"phantom pages in a region nothing writes: "
                                 f"{((out[:found] - base) // P).tolist()} (ret {ret:#x})")
    return body


LATCH_PAGES = 8


def latcher(base: int) -> Callable[[np.random.Generator], None]:
    """VirtualProtect over a random page (the latch prober's page is
    decommitted at times: 487 then)."""
    def body(rng: np.random.Generator) -> None:
        page = int(rng.integers(0, LATCH_PAGES))
        if (not ww.VirtualProtect(base + page * P, P, RW)[0]
                and ww.GetLastError() != ww.ERROR_INVALID_ADDRESS):
            raise AssertionError(f"VirtualProtect failed: {ww.GetLastError()}")
    return body


def latch_prober(base: int) -> Callable[[np.random.Generator], None]:
    """Write a page, reset it, decommit it: in any order of the reset and a
    racing VirtualProtect the page ends unlatched, so it is not reported."""
    out = np.zeros(LATCH_PAGES, np.uintp)

    def body(rng: np.random.Generator) -> None:
        page = int(rng.integers(0, LATCH_PAGES))
        address = base + page * P
        ww.as_array(address, P)[int(rng.integers(0, P))] = 1
        ret, found, _ = ww.GetWriteWatch(RESET, base, LATCH_PAGES * P, out)
        if ret != 0 or out[:found].tolist() != [address]:
            raise AssertionError(f"wrote page {page}, RESET reported "
                                 f"{((out[:found] - base) // P).tolist()} (ret {ret:#x})")
        if not ww.VirtualFree(address, P, ww.MEM_DECOMMIT):
            raise AssertionError(f"decommit failed: {ww.GetLastError()}")
        ret, found, _ = ww.GetWriteWatch(0, base, LATCH_PAGES * P, out)
        if ret != 0 or found:
            raise AssertionError(f"page {page} reset, then decommitted, reads written: "
                                 f"{((out[:found] - base) // P).tolist()} (ret {ret:#x})")
        if ww.VirtualAlloc(address, P, ww.MEM_COMMIT, RW) != address:
            raise AssertionError(f"commit failed: {ww.GetLastError()}")
    return body


class _Cycle:
    """Keeps a WatchedMemory in a reference cycle: only the collector frees it."""

    def __init__(self, mem: ww.WatchedMemory) -> None:
        self.mem = mem
        self.me = self


def finalizer_churn(checked: list[int]) -> Callable[[np.random.Generator], None]:
    """Blocks made, written and dropped; some released through VirtualFree and
    their addresses reserved again: the new region must stay intact whenever
    and wherever the old block is collected."""
    out = np.zeros(4, np.uintp)

    def body(rng: np.random.Generator) -> None:
        mem = ww.WatchedMemory(4 * P)
        view = mem.view()  # not mem.array: the block would keep its memory mapped
        view[int(rng.integers(0, 4 * P))] = 1
        del view
        how = int(rng.integers(0, 3))
        if how == 0:
            _Cycle(mem)
            return
        if how == 1:
            del mem
            return
        address = mem.address
        if not ww.VirtualFree(address, 0, ww.MEM_RELEASE):
            raise AssertionError(f"release failed: {ww.GetLastError()}")
        new = ww.VirtualAlloc(address, 4 * P, WATCHED, RW)
        if new == 0:
            return  # another thread's reservation took the addresses first
        try:
            _Cycle(mem)  # collected whenever, by whichever thread
            del mem
            if rng.integers(0, 2):
                gc.collect()
            view = ww.as_array(new, 4 * P)
            page = int(rng.integers(0, 4))
            view[page * P] = 1
            ret, found, _ = ww.GetWriteWatch(RESET, new, 4 * P, out)
            if ret != 0 or out[:found].tolist() != [new + page * P]:
                raise AssertionError(f"the region reserved again at a dropped block's "
                                     f"address: {ret:#x}, {out[:found].tolist()}, "
                                     f"last error {ww.GetLastError()}")
            del view
            checked[0] += 1
        finally:
            if not ww.VirtualFree(new, 0, ww.MEM_RELEASE):
                raise AssertionError(f"release of the new region failed: {ww.GetLastError()}")
    return body


def scenario_changing(soak: bool) -> None:
    polled = harness.watched_region(NPAGES)
    quiet = harness.watched_region(QUIET_PAGES)
    latched = harness.watched_region(LATCH_PAGES)
    protected_out = ChangingArray(ww.MEM_WRITE_WATCH)
    decommitted_out = ChangingArray(0)
    shadow = Shadow(polled, NPAGES)
    workers = Workers()
    answers: dict[str, int] = {}
    checked = [0]
    writers = NativeWriters(polled, NPAGES, nthreads=2, seed=91, pause_ns=PAUSE_NS)
    try:
        workers.start("whole-poller", 900, harness.whole_poller(shadow))
        workers.start("sub-range-poller", 901, harness.sub_range_poller(shadow))
        workers.start("protector", 902, harness.protector(polled, NPAGES))
        workers.start("exposed-poller", 903, exposed_poller(shadow, protected_out))
        workers.start("array-protector", 904, protected_out.protector())
        workers.start("array-decommitter", 905, decommitted_out.decommitter())
        workers.start("decommitted-array-poller", 906,
                      decommitted_array_poller(polled, decommitted_out, answers))
        workers.start("quiet-decommitter", 907, quiet_decommitter(quiet))
        workers.start("quiet-poller", 908, quiet_poller(quiet))
        workers.start("latcher", 909, latcher(latched))
        workers.start("latch-prober", 910, latch_prober(latched))
        workers.start("finalizer-churn", 911, finalizer_churn(checked))
        workers.run_for(harness.run_seconds(soak),
                        until=lambda: (harness.exercised(shadow, workers) and checked[0] > 0
                                       and shadow.refused > 0 and protected_out.changes > 0
                                       and decommitted_out.changes > 0))
    finally:
        writes = writers.stop()
        workers.more_rounds("sub-range-poller", harness.TAIL_POLLS)
        workers.finish()
    harness.check_nothing_lost(shadow, writes, workers)
    assert checked[0] > 0, "no region was reserved again at a dropped block's address"
    assert set(answers) <= {"ok", str(ww.ERROR_NOACCESS)} and answers
    gc.collect()
    for base in (polled, quiet, latched):
        assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    protected_out.release()
    decommitted_out.release()


SCENARIOS = {"changing": scenario_changing}


def test_no_write_lost_while_memory_changes_under_calls(soak):
    """Output arrays made unwritable, decommits under scans, latches racing
    resets and finalizers, beside writers and RESET pollers: every call
    answers as Windows does, nothing phantom is reported, no region is
    touched by another's collection, and the shadow equals the memory."""
    harness.run_isolated("changing", soak, module="test_concurrency_changes")
