"""Cost follows committed memory, not reserved memory (docs/semantics.md rules
K16 and K18: write-protecting a whole reservation allocates page tables for
all of it, and decommitted or never-committed page tables must never show up
as phantom written pages: "Scan committed ranges only"). No timing
assertions."""

from __future__ import annotations

import re

import numpy as np
import pytest

import writewatch as ww

P = ww.PAGE_SIZE
GiB = 1 << 30
MiB = 1 << 20
RESERVATION = 256 * GiB
COMMITTED = 64 * MiB
NPAGES = COMMITTED // P  # 16384



def vm_pte_kib() -> int:
    with open("/proc/self/status") as f:
        match = re.search(r"^VmPTE:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert match, "no VmPTE in /proc/self/status"
    return int(match.group(1))


@pytest.fixture
def big_reservation():
    before = vm_pte_kib()
    base = ww.VirtualAlloc(0, RESERVATION, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                           ww.PAGE_NOACCESS)
    assert base, f"cannot reserve 256 GiB: {ww.GetLastError()}"
    try:
        yield base, before
    finally:
        assert ww.VirtualFree(base, 0, ww.MEM_RELEASE), ww.GetLastError()
    assert ww.VirtualQuery(base).State == ww.MEM_FREE


def written(flags: int, base: int, size: int, capacity: int) -> np.ndarray:
    out = np.zeros(capacity, np.uintp)
    ret, found, granularity = ww.GetWriteWatch(flags, base, size, out)
    assert (ret, granularity) == (0, P), ww.GetLastError()
    return out[:found].copy()


def test_256gib_reservation_costs_what_its_64mib_commit_costs(big_reservation):
    base, pte_before = big_reservation
    middle = base + RESERVATION // 2
    info = ww.VirtualQuery(base)
    assert (info.State, info.RegionSize) == (ww.MEM_RESERVE, RESERVATION)

    assert ww.VirtualAlloc(middle, COMMITTED, ww.MEM_COMMIT, ww.PAGE_READWRITE) == middle
    # Committing dirties nothing, even scanned over the whole reservation.
    assert len(written(0, base, RESERVATION, 2 * NPAGES)) == 0
    view = ww.as_array(middle, COMMITTED)
    view[::P] = 1  # one byte per page
    del view

    grown = vm_pte_kib() - pte_before
    assert grown < 2 * 1024, f"page tables grew by {grown} KiB for 64 MiB committed"

    expected = middle + P * np.arange(NPAGES, dtype=np.uintp)
    over_commit = written(0, middle, COMMITTED, 2 * NPAGES)
    over_all = written(0, base, RESERVATION, 2 * NPAGES)
    assert len(over_commit) == NPAGES
    assert np.array_equal(over_commit, expected)
    assert np.array_equal(over_all, over_commit)

    reset = written(ww.WRITE_WATCH_FLAG_RESET, base, RESERVATION, 2 * NPAGES)
    assert np.array_equal(reset, expected)
    assert len(written(0, base, RESERVATION, 2 * NPAGES)) == 0
    assert vm_pte_kib() - pte_before < 2 * 1024


def test_decommitted_neighbours_leave_no_phantom_pages(big_reservation):
    """Pages decommitted next to committed ones (same page table) are neither
    reported nor cost anything after release (docs/semantics.md rule K18)."""
    base, _ = big_reservation
    middle = base + RESERVATION // 2
    assert ww.VirtualAlloc(middle, 4 * MiB, ww.MEM_COMMIT, ww.PAGE_READWRITE) == middle
    ww.as_array(middle, 4 * MiB)[::P] = 1
    assert ww.VirtualFree(middle, 2 * MiB, ww.MEM_DECOMMIT)
    got = written(0, base, RESERVATION, 4 * MiB // P + 1)
    expected = middle + 2 * MiB + P * np.arange(2 * MiB // P, dtype=np.uintp)
    assert np.array_equal(got, expected)
