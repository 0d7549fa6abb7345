"""The report: the issue's targets judged from the results, the tables,
the plot."""

from __future__ import annotations

import os
from typing import Any

from writewatch.bench import buffers, foreign
from writewatch.bench.model import (
    BLAS_ENV,
    RAW,
    RAW_BASELINE_OF,
    RAW_MODES,
    RAW_MPROTECT,
    RAW_UFFD,
    BenchError,
    Config,
    GiB,
    KiB,
    MiB,
    Report,
    Result,
    Scenario,
    Target,
)
from writewatch.bench.scenarios import RAW_AGAIN, RAW_CFFI, RAW_FROM_PYTHON, wine_cases

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
            case = wine_cases(threads, npages)[2]
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
