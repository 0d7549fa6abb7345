"""Scenario 8 of the benchmark (opt-in: ``--scenarios 8``): process_memwatch
over memory writewatch did not allocate, against a raw PAGEMAP_SCAN of the
same range. scenarios.py builds the table and report.py judges the target;
this module measures (and imports neither).

An anonymous ``mmap`` of ``--size-mib`` (1 GiB), every page present, has 0.1%,
1% and 10% of its pages written (one byte each, by C code) between two calls;
each call is ``process_memwatch(0, start, size, GET | CLEAR, vec)`` into a
preallocated int64 vec, timed in Python around the call. A last case is the
small call: a 16-page mmap with one page written before each call, the median
of ``--small-calls`` calls each timed alone, timer floor subtracted.

- pagemap, and raw C: the raw reference is the same PAGEMAP_SCAN loop
  (written pages as offsets from start, re-protected in the same walk) on the
  very range writewatch watches, timed in C and called from Python, each raw
  call right before writewatch's with the same pages written again: same
  pages, same mapping, same page tables.
- uffd and mprotect: each on a mapping of its own, against its own mechanism
  in raw C on a region of the same size with the same pages written. That
  reference owns its memory and keeps a dirty byte per page; on memory it did
  not allocate a fallback also reads the process's mappings and pagemap on
  every call, to see memory unmapped, mapped again or newly mapped (rules M13,
  M16): the ratio shows that price, it has no target.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

import writewatch as ww
from writewatch import memwatch
from writewatch.backends import BACKEND_ENV
from writewatch.bench.buffers import PERCENTS, RawRegion
from writewatch.kernel import oserror

P = ww.PAGE_SIZE
SMALL_PAGES = 16
SMALL = f"{SMALL_PAGES} pages, 1 written (us)"
GET_CLEAR = int(ww.MEMWATCH_SD_GET | ww.MEMWATCH_SD_CLEAR)
RESET = ww.WRITE_WATCH_FLAG_RESET

# A look: (pages found, ns it took).
Look = Callable[[], tuple[int, int]]


def case(pct: float) -> str:
    return f"{pct:g}% written (ms)"


def cases() -> list[str]:
    return [*(case(pct) for pct in PERCENTS), SMALL]


@contextmanager
def selected(backend: str) -> Iterator[None]:
    """process_memwatch on backend meanwhile (it follows WRITEWATCH_BACKEND)."""
    before = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = backend
    try:
        yield
    finally:
        if before is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = before


@dataclass
class Member:
    """One column on one range: how to write its pages (indices) and look."""

    impl: str
    write: Callable[[np.ndarray], object]
    look: Look
    c_timed: bool  # timed in C (raw C) rather than in Python


class Mapping:
    """An anonymous mmap writewatch did not allocate, every page present,
    watched by backend from a first CLEAR on (which is not timed)."""

    def __init__(self, ref: ModuleType, size: int, backend: str) -> None:
        self.ref, self.backend, self.size = ref, backend, size
        self.map = mmap.mmap(-1, size)
        self._data = ref.ffi.from_buffer(self.map)
        self.start = int(ref.ffi.cast("uintptr_t", self._data))
        ref.lib.wwb_touch(self.start, ref.ffi.NULL, size // P)
        with selected(backend):
            ww.process_memwatch(0, self.start, size, ww.MEMWATCH_SD_CLEAR)

    def write(self, pages: np.ndarray) -> None:
        self.ref.lib.wwb_touch(self.start, self.ref.ffi.from_buffer("uint32_t[]", pages),
                               len(pages))

    def look(self, vec: np.ndarray) -> Look:
        """writewatch's call, timed in Python (on this mapping's backend)."""
        call, clock, start, size = ww.process_memwatch, time.perf_counter_ns, self.start, self.size

        def look() -> tuple[int, int]:
            t0 = clock()
            found = call(0, start, size, GET_CLEAR, vec)
            t1 = clock()
            return found, t1 - t0
        return look

    def raw_look(self, vec: np.ndarray, in_python: bool = False) -> Look:
        """The raw PAGEMAP_SCAN loop on the same range, timed in C, or in
        Python around its cffi call (in_python: the cffi boundary included,
        as writewatch's call is timed)."""
        ffi, lib, clock = self.ref.ffi, self.ref.lib, time.perf_counter_ns
        pointer, elapsed = ffi.from_buffer("int64_t[]", vec), ffi.new("uint64_t *")
        start, end, room, scan = self.start, self.start + self.size, len(vec), \
            lib.wwb_memwatch_timed

        def look() -> tuple[int, int]:
            t0 = clock()
            found = scan(start, end, 1, pointer, room, elapsed)
            t1 = clock()
            if found < 0:
                raise oserror(-found, "raw PAGEMAP_SCAN failed")
            return int(found), t1 - t0 if in_python else int(elapsed[0])
        return look

    def close(self) -> None:
        with selected(self.backend):
            memwatch.memwatch_unwatch(self.start, self.size)
        self.ref.ffi.release(self._data)
        self.map.close()


def _raw_member(impl: str, raw: RawRegion) -> Member:
    out = np.empty(raw.size // P, np.uintp)
    raw.prepare()
    return Member(impl, raw.touch, lambda: raw.scan(RESET, raw.start, raw.size, out), True)


def groups(ref: ModuleType, impls: list[str], size: int, raw_of: dict[str, str],
           raw_region: Callable[[str, int], RawRegion], raw: str, raw_cffi: str
           ) -> Iterator[tuple[str, list[Member], Callable[[], None]]]:
    """The columns measured side by side, by range: raw C and pagemap on one
    mapping; each fallback beside its own raw mechanism. Yields (the backend
    process_memwatch follows meanwhile, members, close)."""
    shared = [impl for impl in impls if impl in (raw, raw_cffi, "pagemap")]
    if shared:
        vec = np.empty(size // P, np.int64)
        mapping = Mapping(ref, size, "pagemap")
        looks = {raw: mapping.raw_look(vec), raw_cffi: mapping.raw_look(vec, in_python=True),
                 "pagemap": mapping.look(vec)}
        members = [Member(impl, mapping.write, looks[impl], impl == raw) for impl in shared]
        yield "pagemap", members, mapping.close
    for backend, own in raw_of.items():
        if backend not in impls:
            continue
        made: list[Member] = []
        closers: list[Callable[[], None]] = []
        if own in impls:
            region = raw_region(own, size)
            closers.append(region.close)
            made.append(_raw_member(own, region))
        vec = np.empty(size // P, np.int64)
        mapping = Mapping(ref, size, backend)
        closers.append(mapping.close)
        made.append(Member(backend, mapping.write, mapping.look(vec), False))

        def close(closers: list[Callable[[], None]] = closers) -> None:
            for each in closers:
                each()
        yield backend, made, close


def measure(ref: ModuleType, impls: list[str], size: int, repetitions: int, calls: int,
            page_sets: dict[float, np.ndarray], floors: dict[str, float],
            raw_of: dict[str, str], raw_region: Callable[[str, int], RawRegion], raw: str,
            raw_cffi: str, progress: Callable[[str, str], None]
            ) -> dict[tuple[str, str], tuple[list[float], int, int]]:
    """{(case, impl): (samples, pages found, pages expected)}: ms per look at
    each percent, and the small call's us (median of calls, floor subtracted)."""
    made: dict[tuple[str, str], tuple[list[float], int, int]] = {}
    for backend, members, close in groups(ref, impls, size, raw_of, raw_region, raw,
                                          raw_cffi):
        try:
            with selected(backend):
                for pct, pages in page_sets.items():
                    for rep in range(repetitions):
                        for member in members:
                            progress("8 process_memwatch", f"{case(pct)}, {member.impl}, "
                                     f"repetition {rep + 1}/{repetitions}")
                            member.write(pages)
                            found, elapsed = member.look()
                            samples, total, expected = made.get((case(pct), member.impl),
                                                                ([], 0, 0))
                            made[case(pct), member.impl] = ([*samples, elapsed / 1e6],
                                                            total + found, expected + len(pages))
        finally:
            close()
    one = np.array([1], np.uint32)
    for backend, members, close in groups(ref, impls, SMALL_PAGES * P, raw_of, raw_region,
                                          raw, raw_cffi):
        try:
            with selected(backend):
                for rep in range(repetitions):
                    for member in members:
                        progress("8 process_memwatch", f"{SMALL}, {member.impl}, "
                                 f"repetition {rep + 1}/{repetitions}")
                        times, right = [], 0
                        for _ in range(calls):
                            member.write(one)
                            found, elapsed = member.look()
                            times.append(elapsed)
                            right += found == 1
                        floor = floors["c" if member.c_timed else "python"]
                        samples, total, expected = made.get((SMALL, member.impl), ([], 0, 0))
                        made[SMALL, member.impl] = (
                            [*samples, max(0.0, float(np.median(times)) - floor) / 1e3],
                            total + right, expected + calls)
        finally:
            close()
    return made


def describe(size: int, repetitions: int, calls: int, floors: dict[str, Any]) -> str:
    return (f"process_memwatch(GET | CLEAR) over an anonymous mmap writewatch did not "
            f"allocate: {size >> 20} MiB ({size // P} pages, every page present) with a share "
            f"of its pages written since the last call, median of {repetitions}; and "
            f"{SMALL_PAGES} pages with one written before each call, median of {calls} calls "
            f"each timed alone, timer floor subtracted (Python {floors['python']:.0f} ns, "
            f"C {floors['c']:.0f} ns)")


NOTES = (
    "raw C: the same PAGEMAP_SCAN loop (offsets from start, re-protected in the same walk) "
    "on the very range pagemap watches, timed in C, called from Python right before "
    "writewatch's call with the same pages written again; 'raw C, one cffi call': the "
    "same, timed in Python around its cffi call as writewatch's call is.",
    "uffd and mprotect: each beside its own mechanism in raw C on a region it owns; on "
    "memory it did not allocate a fallback reads the process's mappings and pagemap on "
    "every call (rules M13, M16), which that reference does not: no target.",
    "found/expected: pages reported over the repetitions (small call: calls that reported "
    "exactly the one page written).",
)
