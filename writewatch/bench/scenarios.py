"""Scenarios 1 to 5 (runner.py's docstring says what each measures), and
the opt-in 6 to 8, whose measuring lives in scale.py, buffers.py and
foreign.py."""

from __future__ import annotations

import os
import statistics
import time
import tracemalloc

import numpy as np

import writewatch as ww
from writewatch import kernel, regions
from writewatch.bench import buffers, foreign, scale
from writewatch.bench.model import (
    RAW,
    RAW_BASELINE_OF,
    RAW_MODES,
    RESET,
    WINE_FIGURES,
    BenchError,
    Config,
    GiB,
    KiB,
    MiB,
    P,
    Progress,
    Result,
    Scenario,
    reference,
)
from writewatch.bench.targets import ApiTarget, BenchTarget, RawTarget, made_targets

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
    with made_targets([RAW if impl == RAW_AGAIN else impl for impl in impls], cfg.size, 0,
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
    with made_targets(impls, cfg.size, 0, cfg.size) as targets:
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
    with made_targets(impls, size, 0, size) as made:
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


def wine_cases(threads: int, pages: int) -> tuple[str, str, str]:
    shape = f"{threads}x{pages}"
    return (f"{shape} write, average (ns)", f"{shape} GetWriteWatch, average (us)",
            f"{shape} GetWriteWatch, median (us)")


def scenario_wine_shape(cfg: Config, impls: list[str], progress: Progress,
                        floors: dict[str, float]) -> Scenario:
    cases = [case for shape in cfg.wine_shapes for case in wine_cases(*shape)]
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
        write_case, average_case, median_case = wine_cases(threads, npages)
        if (threads, npages) in WINE_FIGURES:
            scenario.references[average_case] = WINE_FIGURES[threads, npages]
        out = np.empty(npages, np.uintp)
        with made_targets(impls, npages * P, 0, npages * P) as made:
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
# Scenarios 6 to 8 (opt-in): measured by scale.py, buffers.py and foreign.py


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
