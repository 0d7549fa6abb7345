"""Scenario 7 of the bench (what changed in a numpy array) at a reduced size:
every method finds exactly the pages written, and its targets are reported
but not judged. Timings are never asserted."""

from __future__ import annotations

import argparse

import pytest

from writewatch import backends
from writewatch.bench import buffers
from writewatch.bench import runner as bench
from writewatch.bench.report import format_scenario

pytestmark = pytest.mark.any_backend  # the bench runs every backend itself


@pytest.fixture(scope="module")
def report() -> bench.Report:
    return bench.run(bench.Config(scenarios=(7,), size=8 * bench.MiB, repetitions=2))


def test_every_method_finds_exactly_the_written_pages(report):
    scenario = report.scenario(7)
    assert scenario is not None and scenario.cases == ["0.1% written", "1% written",
                                                       "10% written"]
    here = [name for name, why in backends.backend_status().items() if not why]
    assert set(here) | {buffers.COMPARE, buffers.HASH} <= set(scenario.impls)
    for case in scenario.cases:
        for impl in scenario.impls:
            result = scenario.result(case, impl)
            assert result is not None and result.value > 0, (case, impl)
            assert result.found == result.expected > 0, (case, impl)
    assert "WRONG" not in format_scenario(scenario)


def test_its_targets_are_shown_and_not_judged_below_full_size(report):
    names = [t.name for t in report.targets]
    assert any("1% written: compare/" in name for name in names)
    assert any("1% written: pagemap/raw" in name for name in names)
    assert all(t.met is None for t in report.targets)


def test_it_runs_only_when_named():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert 7 not in bench.Config().scenarios
    assert bench.config_from_args(parser.parse_args(["--scenarios", "7"])).scenarios == (7,)
    assert "7 what changed in a numpy array" in " ".join(parser.format_help().split())
