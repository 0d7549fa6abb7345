"""Scenario 7 of the benchmark (opt-in: ``--scenarios 7``): what changed in a
numpy array, with write watch and without. scenarios.py builds the table and
report.py judges the targets; this module measures (and imports neither).

A page-aligned numpy array of ``--size-mib`` (1 GiB) has 0.1%, 1% and 10% of its
pages written (random pages, one byte each) between two looks; each look finds
which pages changed since the last:

- each backend: ``WatchedBuffer.written(reset=True)`` (byte offsets, the
  default unit: page indices cost one more numpy call), timed in Python around
  the call, its output array included;
- raw C: one PAGEMAP_SCAN with its reset over a region of the same size with
  the same pages written (reference.c), and each fallback's own mechanism in
  raw C, timed in C;
- compare: the array against a full copy, page by page, 8 bytes at a time,
  copying the changed pages over (what keeps the copy usable next time);
- hash: a hashlib sha1 of every page against the last look's digests.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

import writewatch as ww
from writewatch.backends import checked_name

P = ww.PAGE_SIZE
PERCENTS = (0.1, 1, 10)
COMPARE, HASH = "compare", "hash"
CHUNK = 4096  # pages per numpy comparison: no temporary the size of the array

# A look: the number of pages that changed and the ns it took to find them.
Look = Callable[[], tuple[int, int]]


class RawRegion(Protocol):
    """What this scenario uses of the runner's raw C reference (RawTarget)."""

    start: int
    size: int

    def prepare(self) -> None: ...
    def touch(self, pages: np.ndarray | None = None) -> int: ...
    def scan(self, flags: int, start: int, size: int, out: np.ndarray) -> tuple[int, int]: ...
    def close(self) -> None: ...


def case(pct: float) -> str:
    return f"{pct:g}% written"


def cases() -> list[str]:
    return [case(pct) for pct in PERCENTS]


def _compare(array: np.ndarray) -> tuple[Look, Callable[[], None]]:
    now = array.reshape(-1).view(np.uint64).reshape(-1, P // 8)
    copy = now.copy()

    def look() -> tuple[int, int]:
        t0 = time.perf_counter_ns()
        changed = np.concatenate([start + np.flatnonzero((now[start:start + CHUNK] !=
                                                          copy[start:start + CHUNK]).any(axis=1))
                                  for start in range(0, len(now), CHUNK)])
        copy[changed] = now[changed]
        return len(changed), time.perf_counter_ns() - t0
    return look, lambda: None


def _hash(array: np.ndarray) -> tuple[Look, Callable[[], None]]:
    pages = [page.data for page in array.reshape(-1, P)]  # memoryviews: what hashlib takes
    known = [hashlib.sha1(page).digest() for page in pages]

    def look() -> tuple[int, int]:
        t0 = time.perf_counter_ns()
        changed = 0
        for i, page in enumerate(pages):
            digest = hashlib.sha1(page).digest()
            if digest != known[i]:
                known[i] = digest
                changed += 1
        return changed, time.perf_counter_ns() - t0
    return look, lambda: None


def _watched(array: np.ndarray, backend: str) -> tuple[Look, Callable[[], None]]:
    watched = ww.WatchedBuffer(array, backend=checked_name(backend))

    def look() -> tuple[int, int]:
        t0 = time.perf_counter_ns()
        found = watched.written(reset=True)
        return len(found), time.perf_counter_ns() - t0
    return look, watched.close


def _raw_looks(raw: RawRegion) -> Callable[[np.ndarray], tuple[int, int]]:
    out = np.empty(raw.size // P, np.uintp)
    raw.prepare()

    def write_and_look(pages: np.ndarray) -> tuple[int, int]:
        raw.touch(pages)
        return raw.scan(ww.WRITE_WATCH_FLAG_RESET, raw.start, raw.size, out)
    return write_and_look


def measure(impl: str, size: int, repetitions: int, page_sets: dict[float, np.ndarray],
            progress: Callable[[str, str], None],
            raw: RawRegion | None = None) -> dict[float, tuple[list[float], int]]:
    """{percent: (ms per look, pages found over the repetitions)} for impl: a
    backend, COMPARE, HASH, or the raw reference region raw (then closed)."""
    found: dict[float, tuple[list[float], int]] = {}
    stop: Callable[[], None]
    if raw is not None:
        write_and_look = _raw_looks(raw)
        stop = raw.close
    else:
        array = ww.aligned_empty(size, np.uint8)
        array[::P] = 1  # present: what is timed is finding the changes, not first touches
        make = {COMPARE: _compare, HASH: _hash}.get(impl)
        look, stop = make(array) if make else _watched(array, impl)

        def write_and_look(pages: np.ndarray) -> tuple[int, int]:
            array[pages.astype(np.intp) * P] += 1  # a change every look can see
            return look()
    try:
        for pct, pages in page_sets.items():
            samples, total = [], 0
            for rep in range(repetitions):
                progress("7 numpy buffers", f"{case(pct)}, {impl}, repetition {rep + 1}")
                count, elapsed = write_and_look(pages)
                samples.append(elapsed / 1e6)
                total += count
            found[pct] = samples, total
    finally:
        stop()
    return found


def page_sets(npages: int, seed: int) -> dict[float, np.ndarray]:
    """The pages written at each percent (uint32, ascending), the same for every impl."""
    rng = np.random.default_rng(seed)
    return {pct: np.sort(rng.choice(npages, max(1, round(npages * pct / 100)),
                                    replace=False)).astype(np.uint32) for pct in PERCENTS}


def targets(times: dict[str, float], ratio_to_raw: dict[str, float | None]
            ) -> list[tuple[str, float | None, str, bool | None]]:
    """At 1% written: (name, value, limit, met) for each backend's compare/backend
    (>= 50) and for pagemap/raw (<= 1.1). times and ratio_to_raw are each
    implementation's at 1%."""
    compare = times.get(COMPARE)
    made: list[tuple[str, float | None, str, bool | None]] = []
    for impl, mine in times.items():
        if impl in (COMPARE, HASH) or impl not in ratio_to_raw:
            continue
        value = compare / mine if compare and mine > 0 else None
        made.append((f"compare/{impl}", value, ">= 50", None if value is None else value >= 50))
    ratio = ratio_to_raw.get("pagemap")
    made.append(("pagemap/raw", ratio, "<= 1.1", None if ratio is None else ratio <= 1.1))
    return made


def describe(size: int, repetitions: int) -> str:
    return (f"{size >> 20} MiB page-aligned numpy array ({size // P} pages) with a share of "
            "its pages written since the last look; one look finds them: "
            "WatchedBuffer.written(reset=True) per backend, raw C, a compare with a full "
            f"copy, sha1 per page; median of {repetitions}")


NOTE = ("compare keeps a full copy (twice the memory) and hash a digest per page; both read "
        "the whole array on every look. The ratios of compare and hash are to raw C.")

