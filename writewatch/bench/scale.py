"""Scenario 6 of the benchmark (opt-in: ``--scenarios 6``): scale.

How the per-call costs hold up as the process grows, on every backend:

- a small GetWriteWatch (16 pages, no page written) and a first write (16
  pages, each written once after a reset; per page) with no other region
  alive and with many (100,000 at full size);
- VirtualAlloc + VirtualFree of a 64 KiB write-watch region with 1k, 10k and
  100k other regions alive;
- VirtualProtect of one page in a region whose protection is cut into 8k and
  32k runs.

The live regions are 64 KiB reservations with MEM_WRITE_WATCH, none
committed: the cost under test is the bookkeeping, not the memory (their VMAs
merge, so the mapping limit is not reached).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import writewatch as ww
from writewatch.backends import checked_name
from writewatch.constants import (
    MEM_COMMIT,
    MEM_RELEASE,
    MEM_RESERVE,
    MEM_WRITE_WATCH,
    PAGE_READONLY,
    PAGE_READWRITE,
)

P = ww.PAGE_SIZE
SMALL_PAGES = 16
REGION = 0x10000


@dataclass
class ScaleSizes:
    live: tuple[int, ...] = (1_000, 10_000, 100_000)  # alloc+free measured at each
    runs: tuple[int, ...] = (8_192, 32_768)  # VirtualProtect measured at each
    calls: int = 500  # timed calls per measurement

    @classmethod
    def quick(cls) -> ScaleSizes:
        return cls(live=(100, 1_000), runs=(256, 1_024), calls=50)


def _median_us(call: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def _small_get(base: int, out: np.ndarray, calls: int) -> float:
    return _median_us(lambda: ww.GetWriteWatch(0, base, SMALL_PAGES * P, out), calls)


def _first_write(mem: ww.WatchedMemory, calls: int) -> float:
    """us per page of writing SMALL_PAGES pages once each after a reset."""
    array = mem.array
    array[::P] = 1  # populated: the cost measured is the tracking, not the page fault
    samples = []
    for _ in range(max(1, calls // 10)):
        ww.ResetWriteWatch(mem.address, mem.size)
        t0 = time.perf_counter_ns()
        for page in range(SMALL_PAGES):
            array[page * P] = 1
        samples.append((time.perf_counter_ns() - t0) / SMALL_PAGES)
    return statistics.median(samples) / 1e3


def _alloc_free(backend: str, calls: int) -> float:
    def once() -> None:
        base = ww.VirtualAlloc(0, REGION, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                               PAGE_READWRITE, backend=checked_name(backend))
        assert base
        ww.VirtualFree(base, 0, MEM_RELEASE)
    return _median_us(once, calls)


def _protect_cost(backend: str, runs: int, calls: int) -> float:
    """us per VirtualProtect of one page once the region has `runs` runs."""
    npages = runs + 2
    mem = ww.WatchedMemory(npages * P, backend=checked_name(backend))
    try:
        for page in range(1, runs, 2):  # read-only every other page: `runs` runs
            ww.VirtualProtect(mem.address + page * P, P, PAGE_READONLY)
        middle = mem.address + (runs // 2 | 1) * P  # a read-only page
        flip = [PAGE_READWRITE, PAGE_READONLY]
        state = {"n": 0}

        def once() -> None:
            state["n"] += 1
            ww.VirtualProtect(middle, P, flip[state["n"] % 2])
        return _median_us(once, calls)
    finally:
        mem.close()


def measure(backends: list[str], sizes: ScaleSizes,
            progress: Callable[[str, str], None]) -> dict[tuple[str, str], float]:
    """{(case, backend): us} for every case of the scenario."""
    most = max(sizes.live)
    found: dict[tuple[str, str], float] = {}
    for backend in backends:
        head = "6 scale"
        target = ww.WatchedMemory(SMALL_PAGES * P, backend=checked_name(backend))
        out = np.empty(SMALL_PAGES, np.uintp)
        live: list[int] = []
        try:
            progress(head, f"{backend}, no other region")
            found["GetWriteWatch, 0 live", backend] = _small_get(target.address, out, sizes.calls)
            found["first write, 0 live", backend] = _first_write(target, sizes.calls)
            for count in sorted(sizes.live):
                progress(head, f"{backend}, {count} live regions")
                while len(live) < count:
                    base = ww.VirtualAlloc(0, REGION, MEM_RESERVE | MEM_WRITE_WATCH,
                                           PAGE_READWRITE, backend=checked_name(backend))
                    if not base:
                        break
                    live.append(base)
                found[f"alloc+free, {label_of(count)} live", backend] = _alloc_free(
                    backend, sizes.calls)
                if len(live) < count:  # a cap: VirtualAlloc failed
                    found[f"alloc+free, {label_of(count)} live", backend] = float("nan")
                    break
                if count == most:
                    found[f"GetWriteWatch, {label_of(count)} live", backend] = _small_get(
                        target.address, out, sizes.calls)
                    found[f"first write, {label_of(count)} live", backend] = _first_write(
                        target, sizes.calls)
        finally:
            for base in live:
                ww.VirtualFree(base, 0, MEM_RELEASE)
            target.close()
        for runs in sizes.runs:
            progress(head, f"{backend}, VirtualProtect at {runs} runs")
            found[f"VirtualProtect, {label_of(runs)} runs", backend] = _protect_cost(
                backend, runs, sizes.calls)
    return found


def label_of(count: int) -> str:
    if count >= 1024 and count % 1024 == 0:
        return f"{count // 1024}k"
    return f"{count // 1000}k" if count >= 1000 and count % 1000 == 0 else str(count)


def cases(sizes: ScaleSizes) -> list[str]:
    most = label_of(max(sizes.live))
    return ["GetWriteWatch, 0 live", f"GetWriteWatch, {most} live",
            "first write, 0 live", f"first write, {most} live",
            *(f"alloc+free, {label_of(n)} live" for n in sorted(sizes.live)),
            *(f"VirtualProtect, {label_of(n)} runs" for n in sizes.runs)]
