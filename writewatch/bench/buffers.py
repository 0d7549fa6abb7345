"""Scenario 7 of the benchmark (opt-in: ``--scenarios 7``): what changed in a
numpy array, with write watch and without.

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

import numpy as np

import writewatch as ww
from writewatch.backends import checked_name
from writewatch.bench import runner

P = ww.PAGE_SIZE
PERCENTS = (0.1, 1, 10)
COMPARE, HASH = "compare", "hash"
CHUNK = 4096  # pages per numpy comparison: no temporary the size of the array

# A look: returns the pages that changed and the ns it took to find them.
Look = Callable[[], tuple[int, int]]


def _case(pct: float) -> str:
    return f"{pct:g}% written"


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


def _measure(impl: str, cfg: runner.Config, page_sets: dict[float, np.ndarray],
             progress: runner.Progress) -> dict[float, tuple[list[float], int]]:
    """{percent: (ms per look, pages found over the repetitions)} for impl."""
    found: dict[float, tuple[list[float], int]] = {}
    head = "7 numpy buffers"
    if impl in runner.RAW_MODES:
        raw = runner.RawTarget(cfg.size, 0, cfg.size, impl)
        out = np.empty(cfg.size // P, np.uintp)
        try:
            raw.prepare()
            for pct, pages in page_sets.items():
                samples, total = [], 0
                for rep in range(cfg.repetitions):
                    progress(head, f"{_case(pct)}, {impl}, repetition {rep + 1}")
                    raw.touch(pages)
                    count, elapsed = raw.scan(runner.RESET, raw.start, raw.size, out)
                    samples.append(elapsed / 1e6)
                    total += count
                found[pct] = samples, total
        finally:
            raw.close()
        return found
    array = ww.aligned_empty(cfg.size, np.uint8)
    array[::P] = 1  # present: what is timed is finding the changes, not first touches
    make = {COMPARE: _compare, HASH: _hash}.get(impl)
    look, stop = make(array) if make else _watched(array, impl)
    try:
        for pct, pages in page_sets.items():
            samples, total = [], 0
            for rep in range(cfg.repetitions):
                progress(head, f"{_case(pct)}, {impl}, repetition {rep + 1}")
                array[pages.astype(np.intp) * P] += 1  # a change every look can see
                count, elapsed = look()
                samples.append(elapsed / 1e6)
                total += count
            found[pct] = samples, total
    finally:
        stop()
    return found


def scenario(cfg: runner.Config, backends: list[str], impls: list[str],
             progress: runner.Progress) -> runner.Scenario:
    """Scenario 7 for the runner: impls are its columns for the backends (raw
    references included), to which compare and hash are added."""
    npages = cfg.size // P
    rng = np.random.default_rng(cfg.seed + 7)
    page_sets = {pct: np.sort(rng.choice(npages, max(1, round(npages * pct / 100)),
                                         replace=False)).astype(np.uint32)
                 for pct in PERCENTS}
    columns = [*impls, COMPARE, HASH]
    result = runner.Scenario(
        7, "What changed in a numpy array",
        f"{cfg.size // runner.MiB} MiB page-aligned numpy array ({npages} pages) with a "
        "share of its pages written since the last look; one look finds them: "
        "WatchedBuffer.written(reset=True) per backend, raw C, a compare with a full copy, "
        f"sha1 per page; median of {cfg.repetitions}",
        "ms", columns, [_case(pct) for pct in PERCENTS])
    for impl in columns:
        for pct, (samples, total) in _measure(impl, cfg, page_sets, progress).items():
            result.add(runner.Result(_case(pct), impl, "ms", samples, found=total,
                                     expected=len(page_sets[pct]) * cfg.repetitions))
    result.notes.append(
        "compare keeps a full copy (twice the memory) and hash a digest per page; both read "
        "the whole array on every look. The ratios of compare and hash are to raw C.")
    return result


def targets(report: runner.Report, cfg: runner.Config) -> list[runner.Target]:
    """At 1% of a 1 GiB array written: each backend finds what changed in at
    most 1/50 of compare's time, and pagemap in at most 1.1x raw PAGEMAP_SCAN."""
    found = report.scenario(7)
    if found is None:
        return []
    full = cfg.size >= runner.GiB
    case = _case(1)
    compare = found.result(case, COMPARE)
    made: list[runner.Target] = []

    def target(name: str, value: float | None, limit: str, met: bool | None) -> None:
        made.append(runner.Target(name, value, limit, met if full else None,
                                  "" if full else runner.NOT_JUDGED))

    for impl in found.impls:
        if impl in runner.RAW_MODES or impl in (COMPARE, HASH):
            continue
        mine = found.result(case, impl)
        times = compare.value / mine.value if compare and mine and mine.value > 0 else None
        target(f"numpy array {cfg.size // runner.MiB} MiB, 1% written: compare/{impl}", times,
               ">= 50", None if times is None else times >= 50)
    pagemap = found.result(case, "pagemap")
    ratio = pagemap.ratio if pagemap else None
    target(f"numpy array {cfg.size // runner.MiB} MiB, 1% written: pagemap/raw", ratio,
           "<= 1.1", None if ratio is None else ratio <= 1.1)
    return made
