"""The process_memwatch proposal's 44 selftest cases (tests/memwatch_selftest.py
restates them), on every backend, through Python and through the C entry point
process_memwatch() of libprocess_memwatch (docs/semantics.md rules M1-M20)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from forking import patience, run_forked, run_python, scaled_work
from memwatch_selftest import (
    CLEAR,
    GET,
    Cases,
    P,
    anonymous_mmap,
    assert_c_cases_passed,
    build_c_cases,
    c_driver,
    huge_page,
    library,
    python_driver,
    run_c_cases,
)

from writewatch import memwatch


class _Forked:
    """The C driver's cases, each in a forked child: what the library watched
    (its userfaultfd registrations, heap pages it armed) ends with the child
    and never meets the Python cases' memory in this process."""

    def __init__(self, cases: Cases) -> None:
        self.cases = cases

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.cases, name)

        def run(*args: Any) -> None:
            def body() -> str | None:
                try:
                    method(*args)
                except pytest.skip.Exception as skipped:
                    return str(skipped)
                return None

            skipped = run_forked(body)
            if skipped is not None:
                pytest.skip(skipped)

        return run


def _driver(kind: str) -> Any:
    if kind == "python":
        return Cases(python_driver)
    return _Forked(Cases(c_driver(library()), unwatch_heap=False))


@pytest.fixture(params=["python", "c"])
def cases(request: pytest.FixtureRequest, write_watch_backend: str | None) -> Any:
    return _driver(request.param)


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
    `python -m writewatch cflags` prints, and its checks pass: no Python in
    the process, the library starts the backend's handlers itself, and a
    forked child watches its own memory (rule K17)."""
    assert_c_cases_passed(run_c_cases(build_c_cases(tmp_path)))


def test_library_and_extension_in_one_process(write_watch_backend: str | None) -> None:
    """A Python process that loads libprocess_memwatch and watches memory both
    through it and through writewatch: each keeps its own state (its own
    userfaultfd and handler thread, its own SIGSEGV handler, chained), and
    neither reports the other's writes. In a forked child, so that what the
    library starts does not outlive the test in this process."""
    through_c = c_driver(library())

    def both() -> list[list[int]]:
        vec = np.zeros(8, np.int64)
        seen = []
        with anonymous_mmap(8) as mine, anonymous_mmap(8) as theirs:
            python_driver(0, mine.base, mine.size, CLEAR, None, 0)
            through_c(0, theirs.base, theirs.size, CLEAR, None, 0)
            for rounds in range(3):
                mine.touch(1 + rounds)
                theirs.touch(5 - rounds)
                theirs.touch(7)
                n = python_driver(0, mine.base, mine.size, GET | CLEAR, vec, 8)
                seen.append([int(x) // P for x in vec[:n]])
                n = through_c(0, theirs.base, theirs.size, GET | CLEAR, vec, 8)
                seen.append([int(x) // P for x in vec[:n]])
            memwatch.memwatch_unwatch(mine.base, mine.size)
        return seen

    assert run_forked(both) == [[1], [5, 7], [2], [4, 7], [3], [3, 7]]



@pytest.mark.any_backend  # mprotect, named
def test_a_real_fault_still_kills_with_both_handlers_installed() -> None:
    """With the library's and the extension's SIGSEGV handlers both installed
    (mprotect: each chained to the one it displaced, in both orders), tracked
    writes go on, and a write to read-only memory neither watches still ends
    in the default action, not in a loop between the two."""
    library()
    code = """
        import ctypes
        from memwatch_selftest import CLEAR, anonymous_mmap, c_driver, library, python_driver
        through_c = c_driver(library())
        libc = ctypes.CDLL(None)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        read_only = libc.mmap(None, 4096, 1, 0x22, -1, 0)  # PROT_READ, private anonymous
        with anonymous_mmap(2) as mine, anonymous_mmap(2) as theirs:
            python_driver(0, mine.base, mine.size, CLEAR, None, 0)
            through_c(0, theirs.base, theirs.size, CLEAR, None, 0)  # the library in front
            mine.touch(0)
            theirs.touch(1)
            python_driver(0, mine.base, mine.size, CLEAR, None, 0)  # the extension again
            through_c(0, theirs.base, theirs.size, CLEAR, None, 0)
            mine.touch(1)
            theirs.touch(0)
            print("tracked writes went on", flush=True)
            ctypes.memset(read_only, 1, 1)
            print("a write to read-only memory went on", flush=True)
    """
    run = run_python(code, env={"WRITEWATCH_BACKEND": "mprotect"}, timeout=patience(60))
    assert run.stdout == "tracked writes went on\n", run.stdout + run.stderr
    assert run.returncode == -signal.SIGSEGV, run.stderr
