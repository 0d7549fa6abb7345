"""The benchmark's vocabulary: the implementations compared, the
configuration, the results and their report, the raw C reference, progress."""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import writewatch as ww

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
