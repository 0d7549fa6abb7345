"""The benchmarks (python -m writewatch bench) at reduced sizes: the reports
must be sane (every scenario and backend present, positive numbers, ratios to
the raw reference, and as many pages found as were written). Timings are
never asserted: they belong to the bench's own targets, not to tests."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from forking import patience

from writewatch import backends, kernel
from writewatch.bench import model, scenarios
from writewatch.bench import runner as bench
from writewatch.bench.report import figure

pytestmark = pytest.mark.any_backend  # the bench runs every backend itself


def best_backend() -> str:
    """The backend every scenario has here (pagemap where it runs; under a
    sandbox that denies userfaultfd, the best fallback)."""
    return next(name for name, why in backends.backend_status().items() if not why)


@pytest.fixture(scope="module")
def report() -> bench.Report:
    return bench.run(bench.Config.quick())


def test_every_scenario_backend_and_case_is_reported(report):
    assert [s.number for s in report.scenarios] == [1, 2, 3, 4, 5]
    here = [name for name, why in backends.backend_status().items() if not why]
    assert report.meta["backends"] == here
    raw_here = not backends.backend_status()["pagemap"]
    for scenario in report.scenarios:
        assert (bench.RAW in scenario.impls) == raw_here
        assert set(here) <= set(scenario.impls)
        assert scenario.title and scenario.description and scenario.cases
        for case in scenario.cases:
            present = [impl for impl in scenario.impls if scenario.result(case, impl)]
            if case.startswith("heap peak"):  # measured on writewatch's side only
                assert set(present) == set(here), case
            else:
                assert present == scenario.impls, case


def test_numbers_are_positive_medians_with_ratios_to_raw(report):
    for scenario in report.scenarios:
        for result in scenario.results:
            assert result.samples, (scenario.number, result.case, result.impl)
            assert all(math.isfinite(s) and s >= 0 for s in result.samples)
            assert min(result.samples) <= result.value <= max(result.samples)
            if result.unit in ("B", "KiB"):  # memory may legitimately not grow
                continue
            # Scenario 4's average write has the C timer's floor subtracted: most
            # of its writes find the page written already and cost less than the
            # floor, so the average may read 0 (below the timer), never less.
            below_timer = scenario.number == 4 and result.case.endswith("write, average (ns)")
            assert result.value > 0 or below_timer, (scenario.number, result.case, result.impl)
            if result.impl == bench.RAW:
                assert result.ratio is None
                continue
            own = model.reference_of(result.impl)
            raw = scenario.result(result.case, own)
            if raw is not None and raw.value == 0:
                assert result.ratio is None, "no ratio to a reference below the timer"
            elif raw is not None:
                assert result.reference == own
                assert result.ratio == pytest.approx(result.value / raw.value)
    scenario = report.scenario(1)
    assert scenario is not None
    assert len(scenario.result("random", best_backend()).samples) == bench.Config.quick(
    ).write_repetitions


def fallbacks_here() -> list[str]:
    return [name for name, why in backends.backend_status().items()
            if not why and name in bench.RAW_BASELINE_OF]


def test_each_fallback_is_measured_beside_its_own_raw_mechanism(report):
    """Every fallback backend run here has a raw C reference of its own
    mechanism (reference.c) in every scenario, in the column before it, and its
    ratios are to that reference, not to the kernel's."""
    assert set(bench.RAW_BASELINE_OF) == {"uffd", "mprotect"}
    assert model.reference_of("pagemap") == bench.RAW
    for scenario in report.scenarios:
        for fallback in fallbacks_here():
            own = bench.RAW_BASELINE_OF[fallback]
            at = scenario.impls.index(fallback)
            assert scenario.impls[at - 1] == own, scenario.impls
            for case in scenario.cases:
                mine, raw = scenario.result(case, fallback), scenario.result(case, own)
                if case.startswith("heap peak"):  # Python heap: writewatch's side only
                    assert raw is None
                    continue
                assert mine is not None and raw is not None, (scenario.number, case)
                assert mine.reference == own
    assert report.meta["raw_fallback_references"] == [bench.RAW_BASELINE_OF[b]
                                                      for b in fallbacks_here()]


def test_raw_fallback_references_find_the_pages_written(report):
    """The raw mechanisms are checked like the backends: as many pages found
    as were written, in every scenario that knows how many."""
    cfg = bench.Config.quick()
    pages = cfg.size // kernel.PAGE_SIZE
    for fallback in fallbacks_here():
        own = bench.RAW_BASELINE_OF[fallback]
        for order in ("sequential", "random"):
            result = report.scenario(1).result(order, own)
            assert result.found == result.expected == pages * cfg.write_repetitions
        scan = report.scenario(2)
        for case in scan.cases:
            result = scan.result(case, own)
            if result is not None and result.expected is not None:
                assert result.found == result.expected, (case, own)
        assert scan.result("100% RESET", own).expected == pages * cfg.repetitions
        small = report.scenario(3)
        for case in small.cases:
            result = small.result(case, own)
            assert result.found == result.expected == cfg.repetitions * cfg.small_calls
        reserve = report.scenario(5)
        result = reserve.result(reserve.cases[3], own)
        assert result.found == result.expected == (cfg.commit // kernel.PAGE_SIZE
                                                   * cfg.repetitions)
        for result in report.scenario(4).results:
            if result.impl == own:
                assert result.found and result.found > 0, result.case


def test_pages_found_equal_pages_written(report):
    checked: dict[str, int] = {}
    for scenario in report.scenarios:
        for result in scenario.results:
            if result.expected is not None:
                assert result.found == result.expected, (scenario.number, result.case,
                                                         result.impl)
                checked[result.impl] = checked.get(result.impl, 0) + 1
    here = [name for name, why in backends.backend_status().items() if not why]
    # Every backend's counts were checked, in many cases (16 each when written).
    assert all(checked.get(name, 0) > 10 for name in here), checked
    best = best_backend()
    cfg = bench.Config.quick()
    pages = cfg.size // kernel.PAGE_SIZE
    best = report.meta["backends"][0]  # pagemap where the kernel has it
    write_cost = report.scenario(1)
    assert write_cost.result("sequential", best).expected == (
        pages * cfg.write_repetitions)
    scan = report.scenario(2)
    assert scan.result("100% RESET", best).expected == pages * cfg.repetitions
    assert scan.result("0% 0", best).expected == 0
    reserve = report.scenario(5)
    assert reserve.result(reserve.cases[3], best).expected == (
        cfg.commit // kernel.PAGE_SIZE * cfg.repetitions)
    # Wine's shape: the writers wrote, and GetWriteWatch saw some of it.
    wine = report.scenario(4)
    for result in wine.results:
        assert result.found and result.found > 0, (result.case, result.impl)


def test_get_write_watch_makes_no_per_page_python_objects(report):
    peaks = {t.name: t for t in report.targets if t.name.startswith("no per-page")}
    assert peaks
    for target in peaks.values():
        assert target.met, target


def test_tables_json_and_targets(report):
    text = bench.format_report(report)
    for scenario in report.scenarios:
        assert f"{scenario.number}. {scenario.title}" in text
    assert "OPENBLAS_NUM_THREADS" in text
    assert "Targets:" in text
    assert "WRONG" not in text
    loaded = json.loads(report.to_json())
    assert [s["number"] for s in loaded["scenarios"]] == [1, 2, 3, 4, 5]
    assert loaded["meta"]["timer_floor_ns"]["python"] > 0
    assert {t["met"] for t in loaded["targets"]} <= {True, False, None}
    names = " | ".join(t.name for t in report.targets)
    for what in ("1% written", "100% written", "small call", "first write",
                 "mprotect/pagemap", "reservation/committed", "page tables"):
        assert what in names
    for fallback in fallbacks_here():
        own = bench.RAW_BASELINE_OF[fallback]
        for what in (f"first write, sequential: {fallback}/{own}",
                     f"10% written, RESET: {fallback}/{own}",
                     f"median GetWriteWatch(RESET): {fallback}/pagemap"):
            assert what in names
        assert own in text


def test_progress_line_goes_to_its_stream():
    stream = io.StringIO()
    progress = bench.Progress(stream)
    progress("1/5 write cost", "pagemap")
    progress("2/5 GetWriteWatch cost", "uffd")
    progress.done()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "write cost: pagemap" in lines[0]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_line_rebuilds_the_options():
    args = parse("--quick", "--scenarios", "1,3", "--repetitions", "2", "--json", "x.json",
                 "--wine-shapes", "2x64")
    assert parse(*bench.command_line(args)) == args
    cfg = bench.config_from_args(args)
    assert (cfg.scenarios, cfg.repetitions, cfg.wine_shapes) == ((1, 3), 2, ((2, 64),))
    with pytest.raises(bench.BenchError):
        bench.config_from_args(parse("--scenarios", "9"))
    with pytest.raises(bench.BenchError):
        bench.config_from_args(parse("--wine-shapes", "six"))


def test_cli_sets_openblas_threads_and_writes_json(tmp_path):
    """Started without OPENBLAS_NUM_THREADS, the bench restarts itself with it."""
    env = {k: v for k, v in os.environ.items() if k != bench.BLAS_ENV}
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "writewatch", "bench", "--quick", "--scenarios", "3",
         "--small-calls", "50", "--repetitions", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=patience(120), env=env)
    assert result.returncode == 0, result.stderr
    assert "3. Small call" in result.stdout
    assert "[bench" in result.stderr  # the progress line
    loaded = json.loads(out.read_text())
    assert loaded["meta"][bench.BLAS_ENV] == "1"
    assert [s["number"] for s in loaded["scenarios"]] == [3]


def test_plot_without_matplotlib_fails_clearly(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(bench.BLAS_ENV, "1")
    monkeypatch.setattr(bench, "plot_available", lambda: "--plot needs matplotlib")
    code = bench.main(parse("--quick", "--plot", str(tmp_path / "b.png")))
    assert code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_plot_draws_a_png(report, tmp_path):
    if bench.plot_available():
        pytest.skip("matplotlib is not installed (the optional 'plot' extra)")
    path = tmp_path / "bench.png"
    bench.plot(report, path)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_targets_are_not_judged_and_say_so(report):
    """Targets defined at full sizes would miss at --quick sizes for the size alone."""
    text = bench.format_report(report)
    assert "MISSED" not in text
    assert "not judged" in text and "run without --quick" in text
    sized = [t for t in report.targets if not t.name.startswith("no per-page")]
    assert sized and all(t.met is None for t in sized)
    assert bench.Config().at_full_sizes() and not bench.Config.quick().at_full_sizes()


def test_scenarios_help_names_the_five_scenarios():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for name in ("1 write cost", "2 GetWriteWatch cost", "3 small call",
                 "4 Wine's microbenchmark shape", "5 reserve-heavy"):
        assert name in text


def test_each_backend_has_one_colour_in_every_panel(report):
    if bench.plot_available():
        pytest.skip("matplotlib is not installed (the optional 'plot' extra)")
    import matplotlib.pyplot as plt

    fig = figure(report)
    try:
        colours: dict[str, set[tuple[float, ...]]] = {}
        for ax in fig.axes:
            for container in ax.containers:
                label = container.get_label()
                colours.setdefault(label, set()).update(
                    tuple(patch.get_facecolor()) for patch in container.patches)
        # A label with no bars (a raw C column with nothing to compare it to)
        # has no colour to keep.
        drawn = {label: each for label, each in colours.items() if each}
        assert len(fig.axes) > 1 and drawn, colours
        assert all(len(each) == 1 for each in drawn.values()), colours
        assert len({next(iter(each)) for each in drawn.values()}) == len(drawn)
    finally:
        plt.close(fig)


def test_cli_says_where_it_wrote(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    command = [sys.executable, "-m", "writewatch", "bench", "--quick", "--scenarios", "3",
               "--small-calls", "50", "--repetitions", "1", "--no-progress", "--json", str(out)]
    if not bench.plot_available():
        command += ["--plot", str(png)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, bench.BLAS_ENV: "1"})
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    if not bench.plot_available():
        assert f"wrote {png}" in result.stdout and png.exists()


def test_first_write_has_a_second_raw_region_beside_the_first(report):
    """Scenario 1's A/A column: a second raw C region, ratioed to the first,
    shows the spread identical regions have here; the first-write targets
    quote it."""
    scenario = report.scenario(1)
    if bench.RAW not in scenario.impls:
        pytest.skip("no raw C reference here")
    assert scenario.impls[:2] == [bench.RAW, scenarios.RAW_AGAIN]
    for case in scenario.cases:
        again = scenario.result(case, scenarios.RAW_AGAIN)
        assert again.reference == bench.RAW and again.found == again.expected > 0
    details = [t.detail for t in report.targets if t.name.startswith("first write")
               and t.name.endswith("pagemap/raw")]
    assert len(details) == 2 and all("a 2nd raw C region: " in d for d in details)


def test_small_call_shows_the_cffi_boundary_floor(report):
    """Scenario 3 times the raw scan as one cffi call too, in Python as
    GetWriteWatch is timed, and the small-call targets quote it."""
    scenario = report.scenario(3)
    if bench.RAW not in scenario.impls:
        pytest.skip("no raw C reference here")
    assert scenario.impls[:3] == [bench.RAW, scenarios.RAW_FROM_PYTHON, scenarios.RAW_CFFI]
    for case in scenario.cases:
        floor = scenario.result(case, scenarios.RAW_CFFI)
        assert floor.reference == bench.RAW and floor.found == floor.expected > 0
    assert all(f"{scenarios.RAW_CFFI}: " in t.detail for t in report.targets
               if t.name.startswith("small call"))
