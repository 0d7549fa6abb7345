"""Scenario 8 of the bench (process_memwatch over memory writewatch did not
allocate, against a raw PAGEMAP_SCAN of the same range) at a reduced size:
every column finds exactly the pages written, each ratio is to the right
reference, and its targets are reported but not judged. Timings are never
asserted."""

from __future__ import annotations

import argparse
import os

import pytest

from writewatch import backends
from writewatch.bench import foreign, model, scenarios
from writewatch.bench import runner as bench
from writewatch.bench.report import format_scenario

pytestmark = pytest.mark.any_backend  # the bench runs every backend itself


@pytest.fixture(scope="module")
def report() -> bench.Report:
    return bench.run(bench.Config(scenarios=(8,), size=8 * bench.MiB, repetitions=2,
                                  small_calls=50))


def test_every_column_finds_exactly_the_written_pages(report):
    scenario = report.scenario(8)
    assert scenario is not None and scenario.cases == ["0.1% written (ms)", "1% written (ms)",
                                                       "10% written (ms)",
                                                       "16 pages, 1 written (us)"]
    here = [name for name, why in backends.backend_status().items() if not why]
    assert set(here) <= set(scenario.impls)
    for case in scenario.cases:
        for impl in scenario.impls:
            result = scenario.result(case, impl)
            assert result is not None and result.value >= 0, (case, impl)
            assert result.found == result.expected > 0, (case, impl)
    assert "WRONG" not in format_scenario(scenario)


def test_each_backend_is_compared_with_its_own_reference(report):
    scenario = report.scenario(8)
    for case in scenario.cases:
        for impl in scenario.impls:
            result = scenario.result(case, impl)
            if impl in model.RAW_MODES:
                continue
            expected = bench.RAW_BASELINE_OF.get(impl, bench.RAW)
            if result.value and expected in scenario.impls:
                assert result.reference == expected, (case, impl)


def test_the_cffi_floor_is_measured_beside_raw_c(report):
    """The raw scan is timed in Python around its cffi call too, as
    writewatch's call is, and the small-call target quotes it."""
    scenario = report.scenario(8)
    if bench.RAW not in scenario.impls:
        pytest.skip("no raw C reference here")
    assert scenario.impls[:2] == [bench.RAW, scenarios.RAW_CFFI]
    for case in scenario.cases:
        floor = scenario.result(case, scenarios.RAW_CFFI)
        assert floor.reference == bench.RAW and floor.found == floor.expected > 0
    small = [t for t in report.targets if t.name.startswith("process_memwatch 16 pages")]
    assert len(small) == 1 and f"{scenarios.RAW_CFFI}: " in small[0].detail


def test_the_raw_scan_reads_the_range_pagemap_watches(report):
    """Raw C and pagemap share one mapping: each finds the pages written just
    before it, so the one's reset never hides a page from the other."""
    if "pagemap" not in report.meta["backends"]:
        pytest.skip("the pagemap backend is not available here")
    scenario = report.scenario(8)
    for case in scenario.cases:
        raw, mine = scenario.result(case, bench.RAW), scenario.result(case, "pagemap")
        assert raw.found == mine.found == raw.expected, case


def test_the_backend_selection_is_restored(monkeypatch):
    """process_memwatch follows WRITEWATCH_BACKEND: a column sets it for its
    range and leaves it as it found it, set or not."""
    for before in (None, "mprotect"):
        if before is None:
            monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
        else:
            monkeypatch.setenv(backends.BACKEND_ENV, before)
        with foreign.selected("pagemap"):
            assert os.environ[backends.BACKEND_ENV] == "pagemap"
        assert os.environ.get(backends.BACKEND_ENV) == before


def test_its_targets_are_shown_and_not_judged_below_full_size(report):
    names = [t.name for t in report.targets if t.name.startswith("process_memwatch")]
    assert names == ["process_memwatch 8 MiB, 1% written, GET|CLEAR: pagemap/raw",
                     f"process_memwatch {foreign.SMALL_PAGES} pages, 1 written, GET|CLEAR: "
                     "pagemap/raw"]
    assert all(t.met is None for t in report.targets)


def test_it_runs_only_when_named():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert 8 not in bench.Config().scenarios
    assert bench.config_from_args(parser.parse_args(["--scenarios", "8"])).scenarios == (8,)
    assert "8 process_memwatch over memory writewatch did not allocate" in " ".join(
        parser.format_help().split())
