"""Shared test setup.

Every test runs once per write-watch backend available here (ids [pagemap],
[uffd], [mprotect]): the autouse fixture sets WRITEWATCH_BACKEND for the test,
so "auto" allocations and child processes use that backend. Setting
WRITEWATCH_BACKEND before pytest restricts the run to that one backend. Tests
marked any_backend (they name backends themselves, or use none) run once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import writewatch as ww
from writewatch import backends

P = ww.PAGE_SIZE


def backends_under_test() -> list[str]:
    requested = backends.requested_backend()
    if requested != "auto":
        return [requested]
    return [name for name, reason in backends.backend_status().items() if not reason]


# Which test files can come out differently on another kernel, and so run on
# Linux 6.1 under tools/kernel-matrix (`pytest --kernel-dependent`; README,
# "Testing on older kernels"). Every test file is in exactly one of the two
# (tests/test_test_selection.py checks it): a new file must say which.
KERNEL_DEPENDENT = frozenset({
    # the Windows functions and process_memwatch on each backend the kernel offers
    "test_write_watch.py", "test_regions.py", "test_latch.py", "test_recommit.py",
    "test_reserve_cost.py", "test_prepare_kernel_write.py", "test_output_in_watched_memory.py",
    "test_kernel_writes.py", "test_kernel_copies.py", "test_buffers.py", "test_pythonic.py",
    "test_process_memwatch.py", "test_foreign_memory.py", "test_foreign_fallbacks.py",
    "test_memwatch_selftest.py", "test_fallback_backends.py", "test_map_count_exhaustion.py",
    "test_failures.py", "test_error_reasons.py", "test_sandbox_info.py",
    # faults, signals, fork, threads, lifetimes and races: the kernel's side of each
    "test_signals.py", "test_fork.py", "test_threads.py", "test_lifetime.py",
    "test_changing_memory.py", "test_concurrency.py", "test_concurrency_changes.py",
    "test_atomic_reset.py",
})
SAME_ON_EVERY_KERNEL = {
    "test_bench.py": "the benchmark's reports (timings are never asserted)",
    "test_bench_buffers.py": "the benchmark's scenario 7 report",
    "test_bench_foreign.py": "the benchmark's scenario 8 report",
    "test_cli.py": "the command line's words and options, a child interpreter per case "
                   "(`info` itself opens every kernel-matrix log)",
    "test_conformance.py": "the differential tester's model, shrinking and command line "
                           "(test_model.py drives the backends against the model)",
    "test_examples.py": "programs over the public API, a child interpreter per case",
    "test_readme.py": "README's blocks, a child interpreter per block",
    "test_layering.py": "imports, file sizes and where facts live: the source's shape",
    "test_types.py": "mypy, reprs and docstrings",
    "test_packaging.py": "licence, links, wheel instructions",
    "test_page_states.py": "writewatch's own native table of page states",
    "test_scale.py": "the sizes of writewatch's own native tables (chunks, 20,000 regions)",
    # Kernel-dependent in part, but too slow under TCG for CI's budget: the
    # kernel's side of each rule they draw on is tested one rule at a time above.
    "test_model.py": "random sequences against the model (rules 1-17, per backend)",
    "test_hostile_inputs.py": "hostile arguments (rule 15), checked before any system call "
                              "for the most part",
    "test_test_selection.py": "this classification",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "any_backend: run once, not once per backend")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (metafunc.definition.get_closest_marker("any_backend") is None
            and "write_watch_backend" in metafunc.fixturenames):
        metafunc.parametrize("write_watch_backend", backends_under_test(), indirect=True)


@pytest.fixture(autouse=True)
def write_watch_backend(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The backend this test runs on (None for any_backend tests)."""
    name: str | None = getattr(request, "param", None)
    if name is not None:
        monkeypatch.setenv(backends.BACKEND_ENV, name)
    return name


class WatchedRegion:
    """A MEM_WRITE_WATCH region of npages under test, released by the fixture."""

    def __init__(self, npages: int, allocation_type: int, protect: int) -> None:
        self.npages = npages
        self.size = npages * P
        self.base = ww.VirtualAlloc(0, self.size, allocation_type, protect)
        assert self.base, f"VirtualAlloc failed: {ww.GetLastError()}"

    def view(self) -> np.ndarray:
        return ww.as_array(self.base, self.size)

    def written(self, flags: int = 0, offset: int = 0, size: int | None = None,
                count: int | None = None) -> list[int]:
        """Page numbers GetWriteWatch reports, asserting that it succeeds and
        writes nothing past the count it returns."""
        out = np.full(self.npages + 1, 0xDEAD, np.uintp)
        ret, found, granularity = ww.GetWriteWatch(
            flags, self.base + offset, self.size - offset if size is None else size, out,
            count)
        assert (ret, granularity) == (0, P), f"GetWriteWatch failed: {ww.GetLastError()}"
        assert (out[found:] == 0xDEAD).all(), "wrote past the reported count"
        return [(int(a) - self.base) // P for a in out[:found]]


@pytest.fixture
def watched() -> Iterator[Callable[..., WatchedRegion]]:
    """Factory: watched(npages=16, allocation_type=RESERVE|COMMIT|WRITE_WATCH,
    protect=PAGE_READWRITE) -> WatchedRegion, released after the test."""
    made: list[WatchedRegion] = []

    def make(npages: int = 16,
             allocation_type: int = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
             protect: int = ww.PAGE_READWRITE) -> WatchedRegion:
        made.append(WatchedRegion(npages, allocation_type, protect))
        return made[-1]

    yield make
    for region in made:
        assert ww.VirtualFree(region.base, 0, ww.MEM_RELEASE), ww.GetLastError()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--kernel-dependent", action="store_true", default=False,
                     help="collect only the test files whose outcome can differ by kernel "
                          "(KERNEL_DEPENDENT in tests/conftest.py): what tools/kernel-matrix "
                          "runs on Linux 6.1 by default")
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the reliability tests (model, hostile inputs, concurrency) "
                          "for minutes instead of seconds; WRITEWATCH_SOAK=1 does the same")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if (config.getoption("--kernel-dependent") and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")):
        return collection_path.name not in KERNEL_DEPENDENT
    return None


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """True for the long reliability runs (--soak or WRITEWATCH_SOAK=1)."""
    import os

    return bool(request.config.getoption("--soak")
                or os.environ.get("WRITEWATCH_SOAK", "").strip() not in ("", "0"))


@pytest.fixture
def busy_cpus() -> Iterator[None]:
    """One busy-looping process per CPU for the test's duration, so that the
    test's threads get preempted mid-call as they do on a loaded machine."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for each in spinners:
            each.kill()
            each.wait()
