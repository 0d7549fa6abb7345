"""Benchmarks: writewatch against the raw kernel and against the slow methods.

``python -m writewatch bench`` runs five scenarios on every backend available
here and on a raw C reference, and prints one table per scenario with each
median and its ratio to the reference (absolute times drift on shared
machines; ratios measured side by side in one run hold better):

1. Write cost: the first write to each page after a reset, sequential and
   random order, over ``--size-mib`` of committed memory.
2. GetWriteWatch cost on that region with 0/1/10/100% of its pages written,
   with and without RESET, addresses into a preallocated numpy array.
3. The small call: a 16-page region with one page written before each call.
4. Wine's microbenchmark shape: N native threads writing random pages of an
   M-page region while the main thread calls GetWriteWatch(RESET) every 3 ms.
5. Reserve-heavy: a 256 GiB reservation with 64 MiB committed.

Three more run only when named: 6 scale (bench/scale.py), 7 what changed in a
numpy array (bench/buffers.py) and 8 process_memwatch over memory writewatch
did not allocate, against a raw PAGEMAP_SCAN of the same range
(bench/foreign.py).

The raw reference (reference.c, compiled with the extension at install time,
writewatch.bench._reference) makes the pagemap backend's kernel calls on a region
set up the way that backend sets one up, with no Python in the loop. Every
benchmark write is made by C code (one byte per page), so what the backends are
compared on is their fault cost, never numpy's. GetWriteWatch through writewatch
is timed in Python with perf_counter_ns around the single call; the reference
is timed in C around its ioctl loop. Where a sample is one short call
(scenarios 3 and 4), each side's timer floor (two clock reads around nothing)
is measured and subtracted.

The same code is importable: ``run(Config.quick())`` returns a Report (tables,
JSON, targets), which is what the tests check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import writewatch as ww
from writewatch import backends, kernel, memory, regions
from writewatch.bench import buffers, foreign, scale

P = ww.PAGE_SIZE
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
RAW = "raw C"
RAW_UFFD = "raw C uffd"
RAW_MPROTECT = "raw C mprotect"
# Each raw reference's mechanism (reference.c's WWB_* modes).
RAW_MODES = {RAW: 0, RAW_MPROTECT: 1, RAW_UFFD: 2}
# What each implementation's ratio is to: its own mechanism's raw C for the
# fallbacks, the kernel's (PAGEMAP_SCAN) for the rest.
RAW_BASELINE_OF = {"uffd": RAW_UFFD, "mprotect": RAW_MPROTECT}
RESET = ww.WRITE_WATCH_FLAG_RESET
BLAS_ENV = "OPENBLAS_NUM_THREADS"

# docs/semantics.md rule P2 (Wine merge request 7871): average write-to-page ns /
# average GetWriteWatch us, 3 ms between calls, random pages, RESET.
WINE_FIGURES = {
    (6, 1080): "Windows 210 ns/40 us, Wine kernel 178/40, Wine mprotect 1800/1000",
    (8, 8192): "Windows 290 ns/290 us, Wine kernel 245/295, Wine mprotect 70000/1800",
}


class BenchError(RuntimeError):
    """A benchmark could not run or got a wrong answer."""


# ---------------------------------------------------------------------------
# The raw C reference, compiled at install time with the extension
# (build_native.py), so an installed wheel benchmarks without a compiler.


def reference() -> ModuleType:
    """The compiled reference (ffi, lib): writewatch.bench._reference."""
    try:
        import writewatch.bench._reference as _reference
    except ImportError as exc:  # a tree whose extension was built before the reference
        raise BenchError(f"the raw C reference is not built ({exc}): reinstall writewatch "
                         "(pip install -e . in a checkout) to compile it") from exc
    return _reference


# ---------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """What to run, and how big. The defaults are the issue's sizes and take a
    few minutes on two cores; quick() is the reduced run the tests use."""

    scenarios: tuple[int, ...] = (1, 2, 3, 4, 5)
    backends: tuple[str, ...] = ()  # () = every backend available here
    repetitions: int = 5
    write_repetitions: int = 3  # scenario 1 (a pass over 1 GiB is seconds on the fallbacks)
    size: int = 1 * GiB  # scenarios 1 and 2: committed bytes
    dirty_percents: tuple[float, ...] = (0, 1, 10, 100)
    small_pages: int = 16
    small_calls: int = 2000  # scenario 3: calls per repetition
    wine_shapes: tuple[tuple[int, int], ...] = ((6, 1080), (8, 8192))
    wine_seconds: float = 0.5  # scenario 4: length of one run
    wine_period_ms: float = 3.0  # between GetWriteWatch calls, as in Wine's benchmark
    wine_delay_us: float = 0.0  # each writer's sleep between two writes (0: none, as Wine's)
    # Many short runs: on two CPUs a run's calls land in one of two modes (~50 or
    # ~70 us for 6x1080, raw C and writewatch alike), and the median of runs
    # needs both modes sampled.
    wine_repetitions: int = 9
    reserve: int = 256 * GiB
    commit: int = 64 * MiB
    seed: int = 1

    @classmethod
    def quick(cls) -> Config:
        """Every scenario on every backend at small sizes (seconds, not minutes)."""
        return cls(repetitions=3, write_repetitions=2, size=8 * MiB, small_calls=200,
                   wine_shapes=((2, 64), (3, 256)), wine_seconds=0.15, wine_repetitions=1,
                   reserve=16 * GiB, commit=4 * MiB)

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def at_full_sizes(self) -> bool:
        """Are the sizes the targets are defined at used (none made smaller)?"""
        full = Config()
        return (self.size >= full.size and self.small_calls >= full.small_calls
                and self.reserve >= full.reserve and self.commit >= full.commit
                and self.wine_shapes == full.wine_shapes)


# ---------------------------------------------------------------------------
# Results


@dataclass
class Result:
    """One cell of a table: the median of samples, and its ratio to the raw
    reference's median for the same case (None where there is none)."""

    case: str
    impl: str
    unit: str
    samples: list[float]
    value: float = 0.0
    ratio: float | None = None
    reference: str | None = None  # the column ratio is to
    found: int | None = None  # pages reported (summed over the repetitions)
    expected: int | None = None  # pages written that should have been reported

    def __post_init__(self) -> None:
        if self.samples:
            self.value = statistics.median(self.samples)


@dataclass
class Scenario:
    number: int
    title: str
    description: str
    unit: str
    impls: list[str]
    cases: list[str]
    results: list[Result] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)  # case -> published figures
    notes: list[str] = field(default_factory=list)

    def result(self, case: str, impl: str) -> Result | None:
        for each in self.results:
            if each.case == case and each.impl == impl:
                return each
        return None

    def add(self, result: Result) -> None:
        self.results.append(result)

    def compute_ratios(self) -> None:
        """Each result's ratio to its reference (reference_of) in the same case."""
        for each in self.results:
            if each.impl == RAW:
                continue
            name = reference_of(each.impl)
            raw = self.result(each.case, name)
            if raw is not None and raw.value > 0 and each.value >= 0:
                each.ratio, each.reference = each.value / raw.value, name


def reference_of(impl: str) -> str:
    """The column impl's ratios are to: a fallback backend's own mechanism in
    raw C, otherwise the kernel's raw C (PAGEMAP_SCAN)."""
    return RAW_BASELINE_OF.get(impl, RAW)


@dataclass
class Target:
    name: str
    value: float | None
    limit: str
    met: bool | None  # None: not measured in this run
    detail: str = ""


@dataclass
class Report:
    meta: dict[str, Any]
    scenarios: list[Scenario]
    targets: list[Target] = field(default_factory=list)

    def scenario(self, number: int) -> Scenario | None:
        return next((s for s in self.scenarios if s.number == number), None)

    def as_dict(self) -> dict[str, Any]:
        return {"meta": self.meta,
                "scenarios": [asdict(s) for s in self.scenarios],
                "targets": [asdict(t) for t in self.targets]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def tables(self) -> str:
        return format_report(self)


# ---------------------------------------------------------------------------
# Progress (stderr)


class Progress:
    """One progress line on stderr: rewritten in place on a terminal, else a
    line per scenario and at most one every few seconds."""

    def __init__(self, stream: Any = None, enabled: bool = True) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.last_print = 0.0
        self.last_head = ""

    def __call__(self, head: str, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        text = f"[bench {now - self.started:6.1f}s] {head}" + (f": {detail}" if detail else "")
        if self.tty:
            self.stream.write("\r\x1b[K" + text[:150])
        elif head != self.last_head or now - self.last_print > 10:
            self.stream.write(text + "\n")
            self.last_print = now
        self.last_head = head
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# ---------------------------------------------------------------------------
# Implementations under test: the raw reference and writewatch's backends


class BenchTarget:
    """One implementation's write-watch region for one scenario: committed
    pages [start, start + size) of a reservation [base, base + reserved)."""

    impl = ""
    base = start = size = reserved = 0

    def __init__(self) -> None:
        self.ref = reference()

    @property
    def npages(self) -> int:
        return self.size // P

    def touch(self, pages: np.ndarray | None = None) -> int:
        """Write one byte (C code) to each page, or to the pages numbered in
        pages (uint32), in that order; the elapsed ns."""
        if pages is None:
            return int(self.ref.lib.wwb_touch(self.start, self.ref.ffi.NULL, self.npages))
        return int(self.ref.lib.wwb_touch(self.start, self.ref.ffi.from_buffer("uint32_t[]", pages),
                                          len(pages)))

    def prepare(self) -> None:
        """Make every page present and clean (what a first write after a reset means)."""
        self.touch()
        self.reset()

    def scan(self, flags: int, start: int, size: int, out: np.ndarray) -> tuple[int, int]:
        """GetWriteWatch(flags, start, size): (pages found, elapsed ns)."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class RawTarget(BenchTarget):
    """A region of reference.c: the kernel's write tracking (RAW, the pagemap
    backend's calls) or a fallback mechanism done plainly (RAW_MPROTECT,
    RAW_UFFD)."""

    impl = RAW

    def __init__(self, reserved: int, offset: int, size: int, impl: str = RAW) -> None:
        super().__init__()
        self.impl, self.mode = impl, RAW_MODES[impl]
        err = self.ref.ffi.new("int *")
        region = self.ref.lib.wwb_region_new_mode(reserved, offset, size, self.mode, err)
        if region == self.ref.ffi.NULL:
            raise BenchError(kernel.oserror(
                err[0], f"{impl} reference cannot set up {size} bytes").strerror)
        self.region = region
        self.base, self.reserved = int(region.base), reserved
        self.start, self.size = int(region.commit_start), size
        self._elapsed = self.ref.ffi.new("uint64_t *")

    def touch(self, pages: np.ndarray | None = None) -> int:
        self.before_writes()
        return super().touch(pages)

    def before_writes(self) -> None:
        """Before anything writes to the region: the mprotect reference's
        SIGSEGV handler first (writewatch's mprotect backend puts its own first
        on each call)."""
        if self.impl == RAW_MPROTECT:
            self.ref.lib.wwb_segv_first()

    def scan(self, flags: int, start: int, size: int, out: np.ndarray) -> tuple[int, int]:
        # Only the committed span, as writewatch scans: one PAGEMAP_SCAN over a
        # whole reservation reports the never-committed pages that share a page
        # table with the committed ones as written (docs/semantics.md rule K18).
        end = min(start + size, self.start + self.size)
        start = max(start, self.start)
        n = self.ref.lib.wwb_scan_timed(self.region, start, end, flags & RESET,
                                        self.ref.ffi.from_buffer("uint64_t[]", out), len(out),
                                        self._elapsed)
        if n < 0:
            raise BenchError(kernel.oserror(-n, f"{self.impl}: GetWriteWatch failed").strerror)
        return int(n), int(self._elapsed[0])

    def reset(self) -> None:
        result = self.ref.lib.wwb_reset(self.region, self.start, self.start + self.size)
        if result < 0:
            raise BenchError(kernel.oserror(-result, f"{self.impl}: reset failed").strerror)

    def close(self) -> None:
        if self.region is not None:
            self.ref.lib.wwb_region_free(self.region)
            self.region = None


class ApiTarget(BenchTarget):
    """A MEM_WRITE_WATCH region on one backend, driven through the Windows API."""

    def __init__(self, backend: str, reserved: int, offset: int, size: int) -> None:
        super().__init__()
        self.impl = backend
        whole = offset == 0 and size == reserved
        kind = ww.MEM_RESERVE | ww.MEM_WRITE_WATCH | (ww.MEM_COMMIT if whole else 0)
        self.base = memory.allocate(0, reserved, kind, ww.PAGE_READWRITE,
                                     backends.checked_name(backend))
        if not whole and ww.VirtualAlloc(self.base + offset, size, ww.MEM_COMMIT,
                                         ww.PAGE_READWRITE) != self.base + offset:
            ww.VirtualFree(self.base, 0, ww.MEM_RELEASE)
            raise BenchError(f"{backend}: commit failed: {ww.GetLastError()}")
        self.reserved, self.start, self.size = reserved, self.base + offset, size

    def prepare(self) -> None:
        # The fallbacks' armed pages would fault once each through their
        # handlers; marking them written first makes populating them cheap.
        ww.prepare_kernel_write(self.start, self.size)
        super().prepare()

    def scan(self, flags: int, start: int, size: int, out: np.ndarray) -> tuple[int, int]:
        get_write_watch, clock = ww.GetWriteWatch, time.perf_counter_ns
        t0 = clock()
        ret, found, _ = get_write_watch(flags, start, size, out)
        t1 = clock()
        if ret != 0:
            raise BenchError(f"{self.impl}: GetWriteWatch failed with {ww.GetLastError()}")
        return found, t1 - t0

    def reset(self) -> None:
        if ww.ResetWriteWatch(self.start, self.size) != 0:
            raise BenchError(f"{self.impl}: ResetWriteWatch failed with {ww.GetLastError()}")

    def close(self) -> None:
        if self.base:
            ww.VirtualFree(self.base, 0, ww.MEM_RELEASE)
            self.base = 0


def available_backends(requested: Sequence[str] = ()) -> list[str]:
    status = backends.backend_status()
    if requested:
        for name in requested:
            if name not in status:
                raise BenchError(f"unknown backend {name!r}; choose from {', '.join(status)}")
            if status[name]:
                raise BenchError(f"{name} backend unavailable here: {status[name]}")
        return list(requested)
    return [name for name in backends.backend_names() if not status[name]]


def _raw_available() -> str:
    """"" when the raw reference can run here, else why not."""
    return backends.backend_status().get("pagemap", "")


@contextmanager
def _targets(impls: Sequence[str], reserved: int, offset: int,
             size: int) -> Iterator[list[BenchTarget]]:
    made: list[BenchTarget] = []
    try:
        for impl in impls:
            made.append(RawTarget(reserved, offset, size, impl) if impl in RAW_MODES
                        else ApiTarget(impl, reserved, offset, size))
        yield made
    finally:
        for target in made:
            target.close()


# ---------------------------------------------------------------------------
# Timer floors


def python_timer_floor(samples: int = 20000) -> float:
    """Median ns of an empty perf_counter_ns interval (what each Python sample
    carries besides the call)."""
    clock = time.perf_counter_ns
    values = []
    for _ in range(samples):
        t0 = clock()
        t1 = clock()
        values.append(t1 - t0)
    return float(statistics.median(values))


def c_timer_floor(samples: int = 20000) -> float:
    ref = reference()
    out = np.empty(samples, np.uint64)
    ref.lib.wwb_timer_floor(samples, ref.ffi.from_buffer("uint64_t[]", out))
    return float(np.median(out))


# ---------------------------------------------------------------------------
# Scenario 1: write cost


RAW_AGAIN = "raw C, 2nd region"


def scenario_write_cost(cfg: Config, impls: list[str], progress: Progress) -> Scenario:
    npages = cfg.size // P
    # A second raw C region beside the first (an A/A column): its ratio to
    # raw C is the spread two identical regions show on this machine, which a
    # backend's first write, the kernel's own fault path, falls within.
    impls = [RAW, RAW_AGAIN, *impls[1:]] if impls[:1] == [RAW] else impls
    rng = np.random.default_rng(cfg.seed)
    orders: dict[str, np.ndarray | None] = {
        "sequential": None,
        "random": rng.permutation(npages).astype(np.uint32),
    }
    scenario = Scenario(
        1, "Write cost",
        f"first write to each page after a reset, {cfg.size // MiB} MiB committed "
        f"({npages} pages); one byte per page written by C code; median of "
        f"{cfg.write_repetitions}",
        "ns/page", impls, list(orders))
    out = np.empty(npages, np.uintp)
    samples: dict[tuple[str, str], list[float]] = {(c, i): [] for c in orders for i in impls}
    found: dict[tuple[str, str], int] = dict.fromkeys(samples, 0)
    head = "1/5 write cost"
    with _targets([RAW if impl == RAW_AGAIN else impl for impl in impls], cfg.size, 0,
                  cfg.size) as targets:
        for target, impl in zip(targets, impls, strict=True):
            target.impl = impl
            progress(head, f"populating {target.impl}")
            target.prepare()
        for rep in range(cfg.write_repetitions):
            for case, order in orders.items():
                # Alternate the order: the first region written after a reset
                # of all of them must not always be the same one.
                for target in targets if rep % 2 == 0 else targets[::-1]:
                    progress(head, f"{case}, {target.impl}, repetition "
                                   f"{rep + 1}/{cfg.write_repetitions}")
                    target.reset()
                    elapsed = target.touch(order)
                    count, _ = target.scan(0, target.start, target.size, out)
                    samples[case, target.impl].append(elapsed / npages)
                    found[case, target.impl] += count
    for (case, impl), values in samples.items():
        scenario.add(Result(case, impl, "ns/page", values, found=found[case, impl],
                            expected=npages * cfg.write_repetitions))
    return scenario


# ---------------------------------------------------------------------------
# Scenario 2: GetWriteWatch cost on a large region


def _python_peak(target: BenchTarget, flags: int, out: np.ndarray) -> int:
    """Bytes the Python heap grew by at most during one GetWriteWatch call."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        target.scan(flags, target.start, target.size, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return max(0, peak - before)


def scenario_scan_cost(cfg: Config, impls: list[str], progress: Progress) -> Scenario:
    npages = cfg.size // P
    rng = np.random.default_rng(cfg.seed + 1)
    cases = [f"{pct:g}% {flag}" for pct in cfg.dirty_percents for flag in ("0", "RESET")]
    scenario = Scenario(
        2, "GetWriteWatch cost",
        f"one call over {cfg.size // MiB} MiB ({npages} pages) with a share of its pages "
        "written, addresses into a preallocated numpy array; median of "
        f"{cfg.repetitions}",
        "ms", impls, cases)
    out = np.empty(npages, np.uintp)
    samples: dict[tuple[str, str], list[float]] = {(c, i): [] for c in cases for i in impls}
    found: dict[tuple[str, str], int] = dict.fromkeys(samples, 0)
    expected: dict[tuple[str, str], int] = dict.fromkeys(samples, 0)
    peaks: dict[str, dict[str, int]] = {}
    head = "2/5 GetWriteWatch cost"
    with _targets(impls, cfg.size, 0, cfg.size) as targets:
        for target in targets:
            progress(head, f"populating {target.impl}")
            target.prepare()
        for pct in cfg.dirty_percents:
            count = round(npages * pct / 100)
            pages = np.sort(rng.choice(npages, count, replace=False)).astype(np.uint32)
            for target in targets:
                target.reset()
                target.touch(pages)
            for flags, name in ((0, "0"), (RESET, "RESET")):
                case = f"{pct:g}% {name}"
                for rep in range(cfg.repetitions):
                    for target in targets:
                        progress(head, f"{case}, {target.impl}, repetition "
                                       f"{rep + 1}/{cfg.repetitions}")
                        if flags and rep:
                            target.touch(pages)  # the previous RESET cleaned them
                        got, elapsed = target.scan(flags, target.start, target.size, out)
                        samples[case, target.impl].append(elapsed / 1e6)
                        found[case, target.impl] += got
                        expected[case, target.impl] += count
                if flags == 0 and pct in (0, 100):
                    for target in targets:
                        if target.impl not in RAW_MODES:
                            peaks.setdefault(target.impl, {})[f"{pct:g}%"] = _python_peak(
                                target, 0, out)
    for (case, impl), values in samples.items():
        scenario.add(Result(case, impl, "ms", values, found=found[case, impl],
                            expected=expected[case, impl]))
    for impl, by_case in peaks.items():
        for pct_name, peak in by_case.items():
            case = f"heap peak {pct_name} (B)"
            if case not in scenario.cases:
                scenario.cases.append(case)
            scenario.add(Result(case, impl, "B", [float(peak)]))
    scenario.notes.append(
        f"heap peak: bytes the Python heap grew by during one GetWriteWatch(0) call "
        f"(tracemalloc), with 0% and 100% of the pages written; the output array "
        f"({out.nbytes // KiB} KiB) is preallocated.")
    return scenario


# ---------------------------------------------------------------------------
# Scenario 3: the small call


def _small_calls_api(target: ApiTarget, flags: int, calls: int,
                     out: np.ndarray) -> tuple[list[int], int]:
    """calls GetWriteWatch calls through the Windows API, each timed alone; with
    RESET one byte is written first (numpy, outside the timed interval)."""
    view = ww.as_array(target.start, target.size)
    get_write_watch, clock = ww.GetWriteWatch, time.perf_counter_ns
    base, size = target.start, target.size
    samples, right = [], 0
    for i in range(calls):
        if flags:
            view[P] = i & 0xFF
        t0 = clock()
        _, found, _ = get_write_watch(flags, base, size, out)
        t1 = clock()
        samples.append(t1 - t0)
        right += found == 1
    return samples, right


def _small_calls_cffi(target: ApiTarget, flags: int, calls: int,
                      out: np.ndarray) -> tuple[list[int], int]:
    """The same through one direct cffi call of the native GetWriteWatch
    (kernel.lib.ww_index_get_write_watch): no Python-level checks at all, the floor
    for a Python caller."""
    view = ww.as_array(target.start, target.size)
    native, clock = kernel.lib.ww_index_get_write_watch, time.perf_counter_ns
    pointer = kernel.ffi.from_buffer("uint64_t[]", out)
    base, size, capacity = target.start, target.size, len(out)
    samples, right = [], 0
    for i in range(calls):
        if flags:
            view[P] = i & 0xFF
        t0 = clock()
        found = native(flags, base, size, pointer, capacity)
        t1 = clock()
        samples.append(t1 - t0)
        right += found == 1
    return samples, right


def _small_calls_raw(target: RawTarget, flags: int, calls: int,
                     out: np.ndarray) -> tuple[list[int], int]:
    ref = target.ref
    samples = np.empty(calls, np.uint64)
    right = ref.lib.wwb_scan_loop(target.region, target.start, target.start + target.size,
                                  flags, target.start + P if flags else 0, calls, 1,
                                  ref.ffi.from_buffer("uint64_t[]", out), len(out),
                                  ref.ffi.from_buffer("uint64_t[]", samples))
    if right < 0:
        raise BenchError(kernel.oserror(-right, f"{target.impl}: GetWriteWatch failed").strerror)
    return [int(s) for s in samples], int(right)


def _small_calls_raw_from_python(target: RawTarget, flags: int, calls: int,
                                 out: np.ndarray) -> tuple[list[int], int]:
    """The raw reference's scan, timed in C as before, but each call made from
    a Python loop, as every Python caller makes it: the difference from the
    C loop is what the interpreter running between calls costs the kernel path
    (caches, TLB and branch predictors no longer warm)."""
    ffi, lib = target.ref.ffi, target.ref.lib
    scan, touch, elapsed = lib.wwb_scan_timed, lib.wwb_touch, ffi.new("uint64_t *")
    pointer, capacity = ffi.from_buffer("uint64_t[]", out), len(out)
    start, end, dirty = target.start, target.start + target.size, target.start + P
    samples, right = [], 0
    for _ in range(calls):
        if flags:
            touch(dirty, ffi.NULL, 1)
        found = scan(target.region, start, end, flags, pointer, capacity, elapsed)
        samples.append(int(elapsed[0]))
        right += found == 1
    return samples, right


def _small_calls_raw_cffi(target: RawTarget, flags: int, calls: int,
                          out: np.ndarray) -> tuple[list[int], int]:
    """The raw reference's scan as one cffi call, timed in Python around the
    call as GetWriteWatch is: what the cffi call itself adds (arguments
    converted, the GIL released and taken back), the floor for any binding
    made of cffi calls."""
    ffi, lib, clock = target.ref.ffi, target.ref.lib, time.perf_counter_ns
    scan, touch = lib.wwb_scan, lib.wwb_touch
    pointer, capacity = ffi.from_buffer("uint64_t[]", out), len(out)
    region, start, end, dirty = target.region, target.start, target.start + target.size, \
        target.start + P
    samples, right = [], 0
    for _ in range(calls):
        if flags:
            touch(dirty, ffi.NULL, 1)
        t0 = clock()
        found = scan(region, start, end, flags, pointer, capacity)
        t1 = clock()
        samples.append(t1 - t0)
        right += found == 1
    return samples, right


CFFI_LAYER = "pagemap, one cffi call"
RAW_FROM_PYTHON = "raw C from Python"
RAW_CFFI = "raw C, one cffi call"


def scenario_small_call(cfg: Config, impls: list[str], progress: Progress,
                        floors: dict[str, float]) -> Scenario:
    columns = list(impls)
    if RAW in impls:
        columns[1:1] = [RAW_FROM_PYTHON, RAW_CFFI]
    has_cffi_layer = "pagemap" in impls and hasattr(kernel.lib, "ww_index_get_write_watch")
    if has_cffi_layer:
        columns.insert(columns.index("pagemap") + 1, CFFI_LAYER)
    cases = ["GetWriteWatch(0)", "GetWriteWatch(RESET)"]
    scenario = Scenario(
        3, "Small call",
        f"{cfg.small_pages}-page region, one page written (before each call with RESET); "
        f"us per call, median of {cfg.repetitions} x {cfg.small_calls} calls each timed "
        f"alone, timer floor subtracted (Python {floors['python']:.0f} ns, "
        f"C {floors['c']:.0f} ns)",
        "us", columns, cases)
    size = cfg.small_pages * P
    out = np.empty(cfg.small_pages, np.uintp)
    samples: dict[tuple[str, str], list[float]] = {(c, i): [] for c in cases for i in columns}
    right: dict[tuple[str, str], int] = dict.fromkeys(samples, 0)
    head = "3/5 small call"
    with _targets(impls, size, 0, size) as made:
        by_name: dict[str, BenchTarget] = {t.impl: t for t in made}
        for target in made:
            target.prepare()
            target.touch(np.array([1], np.uint32))
        for flags, case in zip((0, RESET), cases, strict=True):
            for rep in range(cfg.repetitions):
                for column in columns:
                    progress(head, f"{case}, {column}, repetition {rep + 1}/{cfg.repetitions}")
                    if column in RAW_MODES or column in (RAW_FROM_PYTHON, RAW_CFFI):
                        raw = by_name[RAW if column in (RAW_FROM_PYTHON, RAW_CFFI) else column]
                        assert isinstance(raw, RawTarget)
                        run_raw = (_small_calls_raw if column in RAW_MODES
                                   else _small_calls_raw_from_python if column == RAW_FROM_PYTHON
                                   else _small_calls_raw_cffi)
                        times, ok = run_raw(raw, flags, cfg.small_calls, out)
                        floor = floors["python" if column == RAW_CFFI else "c"]
                    else:
                        target = by_name["pagemap" if column == CFFI_LAYER else column]
                        assert isinstance(target, ApiTarget)
                        run = _small_calls_cffi if column == CFFI_LAYER else _small_calls_api
                        times, ok = run(target, flags, cfg.small_calls, out)
                        floor = floors["python"]
                    samples[case, column].append(max(0.0, statistics.median(times) - floor) / 1e3)
                    right[case, column] += ok
    total = cfg.repetitions * cfg.small_calls
    for (case, column), values in samples.items():
        scenario.add(Result(case, column, "us", values, found=right[case, column],
                            expected=total))
    if has_cffi_layer:
        scenario.notes.append(
            f"'{CFFI_LAYER}' calls kernel.lib.ww_index_get_write_watch directly from Python with a "
            "prepared pointer: one cffi call (GIL released and re-taken) and the native index "
            "lookup, no Python checks. 'pagemap' (ww.GetWriteWatch) makes the same native call "
            "through one CPython function instead (native/python_calls.c), after two Python "
            "frames: the gap between the two is those frames.")
    if RAW in impls:
        scenario.notes.append(
            f"'{RAW_FROM_PYTHON}': the raw scan timed in C, but each call made from a Python "
            "loop: the kernel path runs colder when the interpreter runs between calls. "
            "No Python caller can go below it.")
        scenario.notes.append(
            f"'{RAW_CFFI}': the raw scan as one cffi call, timed in Python around the call as "
            "GetWriteWatch is: the cffi boundary (arguments converted, the GIL released and "
            "taken back) included, the floor for any binding made of cffi calls.")
    scenario.notes.append("found/expected: calls that reported exactly the one written page.")
    return scenario


# ---------------------------------------------------------------------------
# Scenario 4: Wine's microbenchmark shape


def _watch_loop_api(target: BenchTarget, seconds: float, period: float,
                    out: np.ndarray) -> tuple[list[int], int]:
    """GetWriteWatch(RESET) through the API every period seconds: each call's
    ns, and the pages reported in all."""
    get_write_watch, clock = ww.GetWriteWatch, time.perf_counter_ns
    base, size = target.start, target.size
    samples, pages = [], 0
    stop = clock() + int(seconds * 1e9)
    while clock() < stop:
        t0 = clock()
        ret, found, _ = get_write_watch(RESET, base, size, out)
        t1 = clock()
        if ret != 0:
            raise BenchError(f"{target.impl}: GetWriteWatch failed with {ww.GetLastError()}")
        samples.append(t1 - t0)
        pages += found
        time.sleep(period)
    return samples, pages


def _watch_loop_raw(target: RawTarget, seconds: float, period: float,
                    out: np.ndarray) -> tuple[list[int], int]:
    ffi, lib = target.ref.ffi, target.ref.lib
    room = int(seconds / period) + 16  # more than the calls that fit in seconds
    samples = np.zeros(room, np.uint64)
    pages = ffi.new("uint64_t *")
    calls = lib.wwb_watch_loop(target.region, target.start, target.start + target.size,
                               int(seconds * 1e9), int(period * 1e9),
                               ffi.from_buffer("uint64_t[]", out), len(out),
                               ffi.from_buffer("uint64_t[]", samples), room, pages)
    if calls < 0:
        raise BenchError(kernel.oserror(-calls, f"{target.impl}: GetWriteWatch failed").strerror)
    return [int(s) for s in samples[:min(calls, room)]], int(pages[0])


def _wine_cases(threads: int, pages: int) -> tuple[str, str, str]:
    shape = f"{threads}x{pages}"
    return (f"{shape} write, average (ns)", f"{shape} GetWriteWatch, average (us)",
            f"{shape} GetWriteWatch, median (us)")


def scenario_wine_shape(cfg: Config, impls: list[str], progress: Progress,
                        floors: dict[str, float]) -> Scenario:
    cases = [case for shape in cfg.wine_shapes for case in _wine_cases(*shape)]
    writers_do = (f"sleeping {cfg.wine_delay_us:g} us between writes" if cfg.wine_delay_us
                  else "as fast as they can")
    scenario = Scenario(
        4, "Wine's microbenchmark shape",
        f"N native threads write one byte to random pages of an M-page region, {writers_do}, "
        f"while the main thread calls GetWriteWatch(RESET) every {cfg.wine_period_ms:g} ms "
        f"for {cfg.wine_seconds:g} s: the average write (each timed alone, in C) and the "
        "average and median GetWriteWatch (through the Python API; in C for raw); median "
        f"of {cfg.wine_repetitions} runs",
        "", impls, cases)
    ref = reference()
    samples: dict[tuple[str, str], list[float]] = {(c, i): [] for c in cases for i in impls}
    found: dict[tuple[str, str], int] = dict.fromkeys(samples, 0)
    counters = ref.ffi.new("uint64_t[2]")
    err = ref.ffi.new("int *")
    period = cfg.wine_period_ms / 1e3
    for threads, npages in cfg.wine_shapes:
        write_case, average_case, median_case = _wine_cases(threads, npages)
        if (threads, npages) in WINE_FIGURES:
            scenario.references[average_case] = WINE_FIGURES[threads, npages]
        out = np.empty(npages, np.uintp)
        with _targets(impls, npages * P, 0, npages * P) as made:
            for target in made:
                target.prepare()
            for rep in range(cfg.wine_repetitions):
                # Alternate the order: runs drift, and this shape's swing most.
                for target in made if rep % 2 == 0 else made[::-1]:
                    progress("4/5 Wine's shape", f"{threads} threads x {npages} pages, "
                             f"{target.impl}, repetition {rep + 1}/{cfg.wine_repetitions}")
                    target.reset()
                    if isinstance(target, RawTarget):
                        target.before_writes()
                    writers = ref.lib.wwb_writers_start(target.start, npages, threads,
                                                        cfg.seed + rep,
                                                        int(cfg.wine_delay_us * 1e3), err)
                    if writers == ref.ffi.NULL:
                        raise BenchError(kernel.oserror(
                            err[0], "cannot start writer threads").strerror)
                    try:
                        if isinstance(target, RawTarget):
                            calls, pages = _watch_loop_raw(target, cfg.wine_seconds, period, out)
                        else:
                            calls, pages = _watch_loop_api(target, cfg.wine_seconds, period, out)
                    finally:
                        ref.lib.wwb_writers_stop(writers, counters, counters + 1)
                    writes, write_ns = int(counters[0]), int(counters[1])
                    if not writes or not calls:
                        raise BenchError(f"{target.impl}: no writes or no calls were made")
                    floor = floors["c" if isinstance(target, RawTarget) else "python"]
                    samples[write_case, target.impl].append(
                        max(0.0, write_ns / writes - floors["c"]))
                    samples[average_case, target.impl].append(
                        max(0.0, statistics.fmean(calls) - floor) / 1e3)
                    samples[median_case, target.impl].append(
                        max(0.0, statistics.median(calls) - floor) / 1e3)
                    found[write_case, target.impl] += writes
                    found[average_case, target.impl] += pages
                    found[median_case, target.impl] += len(calls)
    for (case, impl), values in samples.items():
        scenario.add(Result(case, impl, "ns" if "write" in case else "us", values,
                            found=found[case, impl]))
    scenario.notes.append(
        "found: writes made (write rows), pages reported (average rows) and calls made "
        "(median rows), summed over the runs. The C timer floor is subtracted from each "
        "write, each side's own from each call.")
    if (os.cpu_count() or 1) <= max(threads for threads, _ in cfg.wine_shapes):
        scenario.notes.append(
            f"Only {os.cpu_count()} CPUs for the writer threads and the main thread: a call "
            "or a write preempted inside its timed window counts in full (the averages "
            "swing from run to run; the medians do not), and the fallbacks' handlers wait "
            "for a CPU. The published figures come from bigger machines.")
    return scenario


# ---------------------------------------------------------------------------
# Scenario 5: reserve-heavy


def vm_pte_kib() -> int:
    """The process's page-table memory (VmPTE of /proc/self/status), in KiB."""
    kib = kernel.proc_status_field("VmPTE")  # "VmPTE:  124 kB"
    if kib is None:
        raise BenchError("no VmPTE in /proc/self/status")
    return int(kib)


def scenario_reserve(cfg: Config, impls: list[str], progress: Progress) -> Scenario:
    npages = cfg.commit // P
    res, com = f"{cfg.reserve // GiB} GiB reservation", f"{cfg.commit // MiB} MiB committed"
    cases = [f"clean, over {com}", f"clean, over the {res}",
             f"all written, over {com}", f"all written, over the {res}",
             "page tables added (KiB)"]
    scenario = Scenario(
        5, "Reserve-heavy",
        f"{cfg.reserve // GiB} GiB reserved, {cfg.commit // MiB} MiB committed in its middle; "
        f"GetWriteWatch(0) over the committed part and over the whole reservation (us, "
        f"median of {cfg.repetitions}); page tables: VmPTE growth from reserving, "
        "committing and writing every committed page",
        "us", impls, cases)
    offset = (cfg.reserve // 2) & ~(regions.ALLOCATION_GRANULARITY - 1)
    out = np.empty(2 * npages, np.uintp)
    samples: dict[tuple[str, str], list[float]] = {(c, i): [] for c in cases[:4] for i in impls}
    found: dict[tuple[str, str], int] = dict.fromkeys(samples, 0)
    expected: dict[tuple[str, str], int] = dict.fromkeys(samples, 0)
    head = "5/5 reserve-heavy"
    made: list[BenchTarget] = []
    try:
        for impl in impls:
            progress(head, f"reserving for {impl}")
            before = vm_pte_kib()
            target: BenchTarget = (RawTarget(cfg.reserve, offset, cfg.commit, impl)
                                   if impl in RAW_MODES
                                   else ApiTarget(impl, cfg.reserve, offset, cfg.commit))
            made.append(target)
            target.prepare()
            added = vm_pte_kib() - before
            scenario.add(Result(cases[4], impl, "KiB", [float(added)]))
        for written in (False, True):
            state = "all written" if written else "clean"
            for target in made:
                target.reset()
                if written:
                    target.touch()
            for rep in range(cfg.repetitions):
                for target in made:
                    progress(head, f"{state}, {target.impl}, repetition "
                                   f"{rep + 1}/{cfg.repetitions}")
                    for case, (start, size) in (
                            (f"{state}, over {com}", (target.start, target.size)),
                            (f"{state}, over the {res}", (target.base, target.reserved))):
                        got, elapsed = target.scan(0, start, size, out)
                        samples[case, target.impl].append(elapsed / 1e3)
                        found[case, target.impl] += got
                        expected[case, target.impl] += npages if written else 0
    finally:
        for target in made:
            target.close()
    for (case, impl), values in samples.items():
        scenario.add(Result(case, impl, "us", values, found=found[case, impl],
                            expected=expected[case, impl]))
    scenario.notes.append(
        "raw C scans only the committed span, over the reservation too, as writewatch "
        "does: one PAGEMAP_SCAN over the whole reservation reports the never-committed "
        "pages sharing a page table with the committed span as written (the WRITTEN fast "
        "path reports every PTE without the write-protect bit; seen here: 512 phantom pages "
        "when the span is not 2 MiB aligned).")
    return scenario


# ---------------------------------------------------------------------------
# Targets (the issue's), from the results


def _value(report: Report, number: int, case: str, impl: str) -> float | None:
    scenario = report.scenario(number)
    result = scenario.result(case, impl) if scenario else None
    return result.value if result else None


def _ratio(report: Report, number: int, case: str, impl: str) -> float | None:
    scenario = report.scenario(number)
    result = scenario.result(case, impl) if scenario else None
    return result.ratio if result else None


NOT_JUDGED = "not judged: the target is defined at full sizes, this run used smaller ones"


def evaluate_targets(report: Report, cfg: Config) -> list[Target]:
    """The bench's targets, judged on report. Those defined at full sizes
    (every ratio and the page-table bound) are shown but not judged (met None)
    in a run at smaller sizes (--quick): they would miss for the size alone."""
    targets: list[Target] = []
    full = cfg.at_full_sizes()

    def judged(met: bool | None) -> bool | None:
        return met if full else None

    def at_most(name: str, value: float | None, limit: float, detail: str = "") -> None:
        if not full:
            detail = f"{detail}; {NOT_JUDGED}" if detail else NOT_JUDGED
        targets.append(Target(name, value, f"<= {limit:g}",
                              judged(None if value is None else value <= limit), detail))

    for pct in (1, 100):
        for flag in ("0", "RESET"):
            at_most(f"GetWriteWatch {cfg.size // MiB} MiB, {pct}% written, {flag}: pagemap/raw",
                    _ratio(report, 2, f"{pct:g}% {flag}", "pagemap"), 1.05)
    # The limits: 1.3 for the per-frame GetWriteWatch(RESET), 1.5 without.
    for case, bound in (("GetWriteWatch(0)", 1.5), ("GetWriteWatch(RESET)", 1.3)):
        floor = _ratio(report, 3, case, RAW_FROM_PYTHON)
        cffi = _ratio(report, 3, case, RAW_CFFI)
        at_most(f"small call {case}: pagemap/raw", _ratio(report, 3, case, "pagemap"), bound,
                "; ".join(f"{name}: {value:.2f}x" for name, value in (
                    ("raw C called from Python", floor), (RAW_CFFI, cffi)) if value is not None))
    for order in ("sequential", "random"):
        again = _ratio(report, 1, order, RAW_AGAIN)
        at_most(f"first write, {order}: pagemap/raw", _ratio(report, 1, order, "pagemap"), 1.1,
                "" if again is None else f"a 2nd raw C region: {again:.2f}x")
        default = _value(report, 1, order, "pagemap")
        slow = _value(report, 1, order, "mprotect")
        speedup = slow / default if default and slow is not None else None
        targets.append(Target(f"first write, {order}: mprotect/pagemap", speedup, ">= 5",
                              judged(None if speedup is None else speedup >= 5),
                              "" if full else NOT_JUDGED))
    for fallback in (b for b in report.meta.get("backends", ()) if b in RAW_BASELINE_OF):
        own = RAW_BASELINE_OF[fallback]
        for order in ("sequential", "random"):
            at_most(f"first write, {order}: {fallback}/{own}",
                    _ratio(report, 1, order, fallback), 1.5)
        for pct in (1, 10):
            at_most(f"GetWriteWatch {cfg.size // MiB} MiB, {pct}% written, RESET: "
                    f"{fallback}/{own}", _ratio(report, 2, f"{pct:g}% RESET", fallback), 1.5)
        for threads, npages in cfg.wine_shapes:
            case = _wine_cases(threads, npages)[2]
            mine, default = _value(report, 4, case, fallback), _value(report, 4, case, "pagemap")
            at_most(f"Wine's shape {threads}x{npages}, median GetWriteWatch(RESET): "
                    f"{fallback}/pagemap",
                    mine / default if mine is not None and default else None, 5)
    scenario = report.scenario(5)
    if scenario is not None:
        res, com = scenario.cases[3], scenario.cases[2]
        for impl in scenario.impls:
            if impl in RAW_MODES:
                continue
            over_res = _value(report, 5, res, impl)
            over_com = _value(report, 5, com, impl)
            ratio = over_res / over_com if over_res is not None and over_com else None
            at_most(f"reserve-heavy {impl}: reservation/committed (all written)", ratio, 2)
            at_most(f"reserve-heavy {impl}: page tables added (KiB)",
                    _value(report, 5, scenario.cases[4], impl), 2048)
    scenario = report.scenario(2)
    if scenario is not None:
        for impl in scenario.impls:
            peak = [r.value for r in scenario.results if r.impl == impl and r.unit == "B"]
            if peak:
                targets.append(Target(
                    f"no per-page Python objects ({impl}): heap peak of a call at 0%/100%",
                    max(peak), "flat (< 4 KiB)", max(peak) < 4 * KiB,
                    " / ".join(f"{v:.0f} B" for v in peak)))
    if report.scenario(8) is not None:
        at_most(f"process_memwatch {cfg.size // MiB} MiB, 1% written, GET|CLEAR: pagemap/raw",
                _ratio(report, 8, foreign.case(1), "pagemap"), 1.1)
        cffi = _ratio(report, 8, foreign.SMALL, RAW_CFFI)
        at_most(f"process_memwatch {foreign.SMALL_PAGES} pages, 1 written, GET|CLEAR: "
                "pagemap/raw", _ratio(report, 8, foreign.SMALL, "pagemap"), 1.1,
                "" if cffi is None else f"{RAW_CFFI}: {cffi:.2f}x")
    scenario = report.scenario(7)
    if scenario is not None:
        at_one = {impl: result for impl in scenario.impls
                  if (result := scenario.result(buffers.case(1), impl)) is not None}
        big = cfg.size >= GiB  # the targets are defined at 1 GiB
        for name, value, limit, met in buffers.targets(
                {impl: result.value for impl, result in at_one.items()},
                {impl: result.ratio for impl, result in at_one.items() if impl not in RAW_MODES}):
            targets.append(Target(f"numpy array {cfg.size // MiB} MiB, 1% written: {name}",
                                  value, limit, met if big else None, "" if big else NOT_JUDGED))
    return targets


# ---------------------------------------------------------------------------
# The run


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
    except OSError:
        return ""
    return match.group(1).strip() if match else ""


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def scenario_scale(cfg: Config, impls: list[str], progress: Progress) -> Scenario:
    """Scenario 6 (opt-in; bench/scale.py measures): sizes from ScaleSizes,
    quick() ones when the run's other sizes are reduced."""
    sizes = scale.ScaleSizes() if cfg.at_full_sizes() else scale.ScaleSizes.quick()
    found = scale.measure(impls, sizes, progress)
    result = Scenario(
        6, "Scale",
        f"{scale.SMALL_PAGES}-page GetWriteWatch (nothing written) and first write (us per "
        "page) with no other region and with many alive; VirtualAlloc+VirtualFree of a 64 KiB "
        "write-watch region beside 1k..100k live ones; VirtualProtect of one page in a "
        f"region cut into 8k and 32k protection runs. Median of {sizes.calls} calls.",
        "us", list(impls), scale.cases(sizes))
    for (case, backend), value in found.items():
        result.add(Result(case, backend, "us", [value]))
    result.notes.append("nan: the backend could not hold that many live regions.")
    return result


def scenario_buffers(cfg: Config, impls: list[str], progress: Progress) -> Scenario:
    """Scenario 7 (opt-in; bench/buffers.py measures): the backends' columns
    (raw references included), then compare and hash."""
    sets = buffers.page_sets(cfg.size // P, cfg.seed + 7)
    columns = [*impls, buffers.COMPARE, buffers.HASH]
    result = Scenario(7, "What changed in a numpy array",
                      buffers.describe(cfg.size, cfg.repetitions), "ms", columns, buffers.cases())
    for impl in columns:
        raw = RawTarget(cfg.size, 0, cfg.size, impl) if impl in RAW_MODES else None
        for pct, (samples, total) in buffers.measure(impl, cfg.size, cfg.repetitions, sets,
                                                     progress, raw).items():
            result.add(Result(buffers.case(pct), impl, "ms", samples, found=total,
                              expected=len(sets[pct]) * cfg.repetitions))
    result.notes.append(buffers.NOTE)
    return result


def scenario_foreign(cfg: Config, impls: list[str], progress: Progress,
                     floors: dict[str, float]) -> Scenario:
    """Scenario 8 (opt-in; bench/foreign.py measures): process_memwatch on
    memory writewatch did not allocate, raw C on the same range."""
    columns = [RAW, RAW_CFFI, *impls[1:]] if impls[:1] == [RAW] else list(impls)
    result = Scenario(8, "process_memwatch over memory writewatch did not allocate",
                      foreign.describe(cfg.size, cfg.repetitions, cfg.small_calls, floors), "",
                      columns, foreign.cases())
    found = foreign.measure(reference(), columns, cfg.size, cfg.repetitions, cfg.small_calls,
                            buffers.page_sets(cfg.size // P, cfg.seed + 8), floors,
                            RAW_BASELINE_OF, lambda impl, size: RawTarget(size, 0, size, impl),
                            RAW, RAW_CFFI, progress)
    for (case, impl), (samples, total, expected) in found.items():
        result.add(Result(case, impl, "us" if case == foreign.SMALL else "ms", samples,
                          found=total, expected=expected))
    result.notes += foreign.NOTES
    return result


def run(cfg: Config | None = None, progress: Progress | None = None) -> Report:
    """Run the configured scenarios; the Report holds every sample."""
    cfg = cfg or Config()
    progress = progress or Progress(enabled=False)
    backends = available_backends(cfg.backends)
    raw_missing = _raw_available()
    impls = [] if raw_missing else [RAW]
    for backend in backends:
        # A fallback's own mechanism in raw C runs wherever the backend does.
        impls += [RAW_BASELINE_OF[backend], backend] if backend in RAW_BASELINE_OF else [backend]
    threads_at_start = _thread_count()
    floors = {"python": python_timer_floor(), "c": c_timer_floor()}
    meta: dict[str, Any] = {
        "command": "python -m writewatch bench",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "writewatch": ww.__version__,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        BLAS_ENV: os.environ.get(BLAS_ENV),
        "threads_at_start": threads_at_start,
        "backends": backends,
        "raw_reference": "missing: " + raw_missing if raw_missing else "PAGEMAP_SCAN in C",
        "raw_fallback_references": [RAW_BASELINE_OF[b] for b in backends if b in RAW_BASELINE_OF],
        "timer_floor_ns": floors,
        "config": cfg.describe(),
    }
    scenarios: list[Scenario] = []
    runners: dict[int, Callable[[], Scenario]] = {
        1: lambda: scenario_write_cost(cfg, impls, progress),
        2: lambda: scenario_scan_cost(cfg, impls, progress),
        3: lambda: scenario_small_call(cfg, impls, progress, floors),
        4: lambda: scenario_wine_shape(cfg, impls, progress, floors),
        5: lambda: scenario_reserve(cfg, impls, progress),
        6: lambda: scenario_scale(cfg, backends, progress),  # opt-in
        7: lambda: scenario_buffers(cfg, impls, progress),  # opt-in
        8: lambda: scenario_foreign(cfg, impls, progress, floors),  # opt-in
    }
    started = time.monotonic()
    try:
        for number in cfg.scenarios:
            scenario = runners[number]()
            scenario.compute_ratios()
            scenarios.append(scenario)
    finally:
        progress.done()
    meta["seconds"] = round(time.monotonic() - started, 1)
    report = Report(meta, scenarios)
    report.targets = evaluate_targets(report, cfg)
    return report


# ---------------------------------------------------------------------------
# Output


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(result: Result | None) -> str:
    if result is None:
        return "-"
    text = _num(result.value)
    if result.ratio is not None and result.impl != RAW:
        text += f" ({result.ratio:.2f}x)"
    if result.expected is not None and result.found != result.expected:
        text += " WRONG"
    return text


def format_scenario(scenario: Scenario) -> str:
    header = ["", *scenario.impls]
    rows = [[case, *(_cell(scenario.result(case, impl)) for impl in scenario.impls)]
            for case in scenario.cases]
    if scenario.references:
        header.append("published (semantics P2)")
        for row in rows:
            row.append(scenario.references.get(row[0], ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    unit = f" [{scenario.unit}]" if scenario.unit else ""
    lines = [f"{scenario.number}. {scenario.title}{unit}: {scenario.description}"]
    # The case and the published figures read left-aligned, numbers right-aligned.
    left = {0, len(header) - 1} if scenario.references else {0}
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) if i in left else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True))
                               ).rstrip())
    lines += [f"   {note}" for note in scenario.notes]
    return "\n".join(lines)


def format_report(report: Report) -> str:
    meta = report.meta
    lines = [
        f"writewatch {meta['writewatch']} bench on Linux {meta['kernel']}, {meta['cpus']} CPUs "
        f"({meta['cpu']}), Python {meta['python']}, numpy {meta['numpy']}",
        f"{BLAS_ENV}={meta[BLAS_ENV]} (set before numpy was imported: a spinning BLAS worker "
        "would turn each write-protect's TLB flush into a cross-CPU interrupt); "
        f"{meta['threads_at_start']} thread(s) at start",
        f"Raw reference: {meta['raw_reference']}. Cells: median (ratio to its reference: "
        f"uffd to {RAW_UFFD}, mprotect to {RAW_MPROTECT}, the rest to {RAW}). "
        f"{meta['seconds']} s.",
        "",
    ]
    for scenario in report.scenarios:
        lines += [format_scenario(scenario), ""]
    if report.targets:
        quick = any(NOT_JUDGED in target.detail for target in report.targets)
        lines.append("Targets:" + (" (most are defined at full sizes and not judged at this "
                                   "run's smaller sizes; run without --quick to judge them)"
                                   if quick else ""))
        for target in report.targets:
            mark = {True: "met   ", False: "MISSED", None: "n/a   "}[target.met]
            if target.met is None and NOT_JUDGED in target.detail:
                mark = "-     "
                target = Target(target.name, target.value, target.limit, None,
                                target.detail.replace(NOT_JUDGED, "not judged").lstrip("; "))
            value = "-" if target.value is None else _num(target.value)
            detail = f"  ({target.detail})" if target.detail else ""
            lines.append(f"  {mark} {target.name}: {value} (target {target.limit}){detail}")
    return "\n".join(lines)


def plot_available() -> str:
    """"" when --plot can work, else what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return (f"--plot needs matplotlib, which cannot be imported ({exc}): "
                "pip install 'writewatch[plot]' (or pip install matplotlib)")
    return ""


def plot(report: Report, path: str | os.PathLike[str]) -> None:
    """Draw each scenario's ratios to the raw reference as grouped horizontal
    bars (log scale, 1 = raw C), one panel per scenario, one colour per
    backend in every panel."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(report: Report) -> Any:
    """plot's matplotlib figure (the caller closes it)."""
    missing = plot_available()
    if missing:
        raise BenchError(missing)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for scenario in report.scenarios:
        impls = [i for i in scenario.impls if i != RAW]
        cases = [c for c in scenario.cases
                 if any((r := scenario.result(c, i)) and r.ratio is not None for i in impls)]
        if impls and cases:
            panels.append((scenario, impls, cases))
    if not panels:
        raise BenchError("nothing to plot: no ratios to a raw reference were measured")
    # One colour per implementation, the same in every panel.
    every_impl = sorted({impl for _, impls, _ in panels for impl in impls})
    palette = plt.get_cmap("tab10")
    colours = {impl: palette(k % 10) for k, impl in enumerate(every_impl)}
    heights = [1.0 + 0.13 * len(impls) * len(cases) for _, impls, cases in panels]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights})
    for ax, (scenario, impls, cases) in zip(axes[:, 0], panels, strict=True):
        bar = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            ys, ratios = [], []
            for j, case in enumerate(cases):
                result = scenario.result(case, impl)
                if result is not None and result.ratio is not None:
                    ys.append(j + k * bar)
                    ratios.append(result.ratio)
            ax.barh(ys, ratios, height=bar, label=impl, color=colours[impl])
        ax.set_yticks([j + 0.4 - bar / 2 for j in range(len(cases))])
        ax.set_yticklabels(cases, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{scenario.number}. {scenario.title}: time / its reference's time "
                     f"(uffd: {RAW_UFFD}, mprotect: {RAW_MPROTECT}, others: {RAW})",
                     fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# Command line (python -m writewatch bench)

# (flag, argparse keywords): also used to rebuild the command line when the
# bench must start again with OPENBLAS_NUM_THREADS=1 in its environment.
_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--json", {"metavar": "FILE", "help": "write the results as JSON to FILE ('-': stdout, "
                                           "and no tables)"}),
    ("--plot", {"metavar": "FILE.png", "help": "draw the ratios (needs matplotlib: "
                                               "pip install 'writewatch[plot]')"}),
    ("--quick", {"action": "store_true", "help": "small sizes, seconds instead of minutes"}),
    ("--scenarios", {"metavar": "LIST", "help": "which scenarios, e.g. 1,3 (default: 1-5): "
                                                "1 write cost (first write after a reset), "
                                                "2 GetWriteWatch cost over a large region, "
                                                "3 small call (a 16-page region per frame), "
                                                "4 Wine's microbenchmark shape (threads "
                                                "writing while GetWriteWatch polls), "
                                                "5 reserve-heavy (a huge reservation, "
                                                "little committed); 6 scale (100k live "
                                                "regions, 32k protection runs), 7 what "
                                                "changed in a numpy array (WatchedBuffer "
                                                "against compare and hash) and 8 "
                                                "process_memwatch over memory writewatch did "
                                                "not allocate (against a raw PAGEMAP_SCAN of "
                                                "the same range) run only when named"}),
    ("--backends", {"metavar": "LIST", "help": "which backends, e.g. pagemap,mprotect "
                                               "(default: every one available)"}),
    ("--repetitions", {"type": int, "metavar": "N", "help": "repetitions per measurement "
                                                            "(default 5)"}),
    ("--size-mib", {"type": int, "metavar": "N", "help": "committed MiB in scenarios 1 and 2 "
                                                         "(default 1024)"}),
    ("--small-calls", {"type": int, "metavar": "N", "help": "calls per repetition in "
                                                            "scenario 3 (default 2000)"}),
    ("--wine-shapes", {"metavar": "LIST", "help": "threads x pages for scenario 4 "
                                                  "(default 6x1080,8x8192)"}),
    ("--wine-seconds", {"type": float, "metavar": "S", "help": "length of one scenario 4 run "
                                                               "(default 0.5)"}),
    ("--reserve-gib", {"type": int, "metavar": "N", "help": "scenario 5 reservation "
                                                            "(default 256)"}),
    ("--commit-mib", {"type": int, "metavar": "N", "help": "scenario 5 commit (default 64)"}),
    ("--no-progress", {"action": "store_true", "help": "no progress line on stderr"}),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, keywords in _OPTIONS:
        parser.add_argument(flag, **keywords)


def command_line(args: argparse.Namespace) -> list[str]:
    """The options args was parsed from, to start the bench again."""
    argv: list[str] = []
    for flag, keywords in _OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if keywords.get("action") == "store_true":
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BenchError(f"{what} must be a comma-separated list of numbers, not {text!r}")\
            from None


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config.quick() if args.quick else Config()
    if args.scenarios:
        cfg.scenarios = _int_list(args.scenarios, "--scenarios")
        if not set(cfg.scenarios) <= {1, 2, 3, 4, 5, 6, 7, 8}:
            raise BenchError("--scenarios are numbered 1 to 8 (6, 7 and 8 only when named)")
    if args.backends:
        cfg.backends = tuple(name.strip() for name in args.backends.split(","))
    if args.repetitions is not None:
        cfg.repetitions = cfg.write_repetitions = cfg.wine_repetitions = args.repetitions
    if args.size_mib is not None:
        cfg.size = args.size_mib * MiB
    if args.small_calls is not None:
        cfg.small_calls = args.small_calls
    if args.wine_shapes:
        try:
            cfg.wine_shapes = tuple((int(t), int(p)) for t, p in
                                    (shape.split("x") for shape in args.wine_shapes.split(",")))
        except ValueError:
            raise BenchError("--wine-shapes takes THREADSxPAGES[,...], e.g. 6x1080") from None
    if args.wine_seconds is not None:
        cfg.wine_seconds = args.wine_seconds
    if args.reserve_gib is not None:
        cfg.reserve = args.reserve_gib * GiB
    if args.commit_mib is not None:
        cfg.commit = args.commit_mib * MiB
    sizes = [cfg.repetitions, cfg.size, cfg.small_calls, cfg.reserve, cfg.commit,
             *(n for shape in cfg.wine_shapes for n in shape)]
    if min(sizes) <= 0 or cfg.wine_seconds <= 0 or cfg.commit > cfg.reserve // 2:
        raise BenchError("sizes and counts must be positive, and the commit at most half "
                         "the reservation")
    return cfg


def restart_with_blas_env(args: argparse.Namespace) -> int | None:
    """numpy is imported with the writewatch package, before any command runs;
    OPENBLAS_NUM_THREADS only counts if it is in the environment then. Without
    it, run the bench again in a fresh interpreter that has it (its exit status
    is returned); None when this one has it."""
    if os.environ.get(BLAS_ENV) == "1":
        return None
    env = {**os.environ, BLAS_ENV: "1"}
    command = [sys.executable, "-m", "writewatch", "bench", *command_line(args)]
    return subprocess.call(command, env=env)


def main(args: argparse.Namespace) -> int:
    """python -m writewatch bench (args parsed with add_arguments' options)."""
    restarted = restart_with_blas_env(args)
    if restarted is not None:
        return restarted
    try:
        cfg = config_from_args(args)
        if args.plot and plot_available():
            raise BenchError(plot_available())
        report = run(cfg, Progress(enabled=not args.no_progress))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(report.to_json())
    else:
        print(report.tables())
        if args.json:
            Path(args.json).write_text(report.to_json() + "\n")
            print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    wrong = [r for s in report.scenarios for r in s.results
             if r.expected is not None and r.found != r.expected]
    return 1 if wrong else 0
