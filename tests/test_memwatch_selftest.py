"""The process_memwatch proposal's 44 selftest cases (tests/memwatch_selftest.py
restates them), on every backend, through Python and through the C entry point
process_memwatch() of libprocess_memwatch (docs/semantics.md rules M1-M20)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from forking import patience, scaled_work
from memwatch_selftest import Cases, anonymous_mmap, c_driver, huge_page, python_driver

from writewatch import clib


def _driver(kind: str, backend: str | None) -> Cases:
    if kind == "python":
        return Cases(python_driver)
    if backend in ("uffd", "mprotect"):
        # The C library is PAGEMAP_SCAN alone: the fallbacks' handler thread
        # and SIGSEGV handler live in the Python extension.
        pytest.skip(f"libprocess_memwatch serves the pagemap mechanism, not {backend}")
    path = clib.library_path()
    if not path.exists():
        pytest.skip(f"{path.name} was not built (no C compiler at install time)")
    return Cases(c_driver(ctypes.CDLL(str(path), use_errno=True)))


@pytest.fixture(params=["python", "c"])
def cases(request: pytest.FixtureRequest, write_watch_backend: str | None) -> Cases:
    return _driver(request.param, write_watch_backend)


def test_sanity(cases: Cases) -> None:
    """Cases 1-6: bad flags and pidfds fail; a GET|CLEAR with a large vec works."""
    cases.sanity()


@pytest.mark.parametrize("npages", [10, 5120], ids=["page", "large"])
def test_base(cases: Cases, npages: int) -> None:
    """Cases 7-20: the seven checks on a 10-page and a 5120-page mmap."""
    with anonymous_mmap(npages) as mem:
        cases.base(mem)


def test_base_huge_page(cases: Cases) -> None:
    """Cases 21-27: the seven checks on a transparent huge page."""
    with huge_page() as mem:
        cases.base(mem)


def test_no_reused_regions(cases: Cases) -> None:
    """Cases 28-34: the seven with MEMWATCH_SD_NO_REUSED_REGIONS on a fresh mmap."""
    with anonymous_mmap(10) as mem:
        cases.no_reused(mem)


@pytest.mark.parametrize("case", ["huge_unit_new_and_clean", "huge_unit_middle",
                                  "huge_unit_clear_first_half", "huge_unit_capped_first_half",
                                  "huge_unit_clear_second_half"])
def test_huge_page_units(cases: Cases, case: str) -> None:
    """Cases 35-41: a huge page is one 2 MiB unit until a partial CLEAR splits it."""
    getattr(cases, case)()


def test_unmapped_and_whole_low_address_space(cases: Cases) -> None:
    """Cases 42-43: GET over a hole, CLEAR over [0, 0x7FFFFFFF)."""
    cases.unmapped()


def test_simple_iterations(cases: Cases) -> None:
    """Case 44: clear / write / get on one aligned_alloc page, 10000 times."""
    cases.simple(scaled_work(10000, at_least=500))


def test_c_program_written_for_the_proposal(tmp_path: Path,
                                            write_watch_backend: str | None) -> None:
    """A C program written for the proposal builds unchanged with the one line
    `python -m writewatch cflags` prints, and its checks pass."""
    _driver("c", write_watch_backend)  # skips what the Python cases skip
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    flags = subprocess.run([sys.executable, "-m", "writewatch", "cflags"], check=True,
                           capture_output=True, text=True).stdout.split()
    program = tmp_path / "memwatch_cases"
    subprocess.run([compiler, "-Wall", "-Werror", "-o", str(program),
                    str(Path(__file__).parent / "c" / "memwatch_cases.c"), *flags], check=True)
    run = subprocess.run([str(program), str(scaled_work(10000, at_least=500))],
                         capture_output=True, text=True, timeout=patience(120))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not ok" not in run.stdout and run.stdout.rstrip().endswith("1..24"), run.stdout
