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
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import writewatch as ww
from writewatch.bench.model import (
    BLAS_ENV,
    RAW,
    RAW_BASELINE_OF,
    BenchError,
    Config,
    GiB,
    MiB,
    Progress,
    Report,
    Scenario,
)
from writewatch.bench.report import evaluate_targets, format_report, plot, plot_available
from writewatch.bench.scenarios import (
    scenario_buffers,
    scenario_foreign,
    scenario_reserve,
    scenario_scale,
    scenario_scan_cost,
    scenario_small_call,
    scenario_wine_shape,
    scenario_write_cost,
)
from writewatch.bench.targets import (
    available_backends,
    c_timer_floor,
    python_timer_floor,
    raw_reference_missing,
)

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




def run(cfg: Config | None = None, progress: Progress | None = None) -> Report:
    """Run the configured scenarios; the Report holds every sample."""
    cfg = cfg or Config()
    progress = progress or Progress(enabled=False)
    backends = available_backends(cfg.backends)
    raw_missing = raw_reference_missing()
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
        print(format_report(report))
        if args.json:
            Path(args.json).write_text(report.to_json() + "\n")
            print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    wrong = [r for s in report.scenarios for r in s.results
             if r.expected is not None and r.found != r.expected]
    return 1 if wrong else 0
