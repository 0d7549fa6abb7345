"""The process_memwatch proposal's own selftest (44 TAP cases, July 2022),
restated in our words and run through a driver: writewatch.process_memwatch
from Python, or the C entry point process_memwatch() of libprocess_memwatch.

Where the original cleared the whole process through /proc/self/clear_refs,
these cases CLEAR the mapping under test (docs/semantics.md rule M20). Every
check's message states the rule it holds the implementation to.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from forking import patience, scaled_work

import writewatch as ww
from writewatch import backends, clib, memwatch

P = ww.PAGE_SIZE
HPAGE = 2 << 20
GET = int(ww.MEMWATCH_SD_GET)
CLEAR = int(ww.MEMWATCH_SD_CLEAR)
NO_REUSED = int(ww.MEMWATCH_SD_NO_REUSED_REGIONS)
MADV_HUGEPAGE = 14

# A driver: (pidfd, start, length, flags, vec or None, vec_len) -> count;
# failures raise OSError with the errno.
Driver = Callable[[int, int, int, int, "np.ndarray | None", int], int]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memalign.restype = ctypes.c_void_p
_libc.memalign.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.aligned_alloc.restype = ctypes.c_void_p
_libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def python_driver(pidfd: int, start: int, length: int, flags: int,
                  vec: np.ndarray | None, vec_len: int) -> int:
    return ww.process_memwatch(pidfd, start, length, flags, vec, vec_len if vec is not None
                               else None)


class Memory:
    """npages of memory under test at base, written through a numpy view."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size = base, size
        self.bytes = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(base))

    def touch(self, page: int) -> None:
        self.bytes[page * P] ^= 0x5A  # any change is a write

    def fill(self, first_page: int, pages: int) -> None:
        self.bytes[first_page * P:(first_page + pages) * P] = 0xFF


@contextmanager
def anonymous_mmap(npages: int) -> Iterator[Memory]:
    """mmap(PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS), as the selftest maps."""
    block = mmap.mmap(-1, npages * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = (ctypes.c_char * (npages * P)).from_buffer(block)
    try:
        yield Memory(ctypes.addressof(view), npages * P)
    finally:
        del view
        block.close()


def _is_huge(address: int) -> bool:
    """Does the mapping holding address have transparent huge pages (smaps)?"""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) >= HPAGE // 1024
    return False


@contextmanager
def huge_page(unwatch: bool = True) -> Iterator[Memory]:
    """memalign(2 MiB) + MADV_HUGEPAGE + memset, as the selftest's gethugepage().
    A heap that already holds small pages there (any long-running process,
    this test run included) gives none: then a fresh 2 MiB-aligned anonymous
    mapping, the same private anonymous memory with none of its pages touched
    yet. Skips only when the kernel gives no transparent huge page at all."""
    base = _libc.memalign(HPAGE, HPAGE)
    assert base, "memalign failed"
    _libc.madvise(base, HPAGE, MADV_HUGEPAGE)
    ctypes.memset(base, 0, HPAGE)
    if _is_huge(base):
        try:
            yield Memory(base, HPAGE)
        finally:
            _unwatch_then_free(base, HPAGE, unwatch)
        return
    _libc.free(base)  # never watched yet
    with _fresh_huge_page(unwatch) as memory:
        yield memory


@contextmanager
def _fresh_huge_page(unwatch: bool) -> Iterator[Memory]:
    block = mmap.mmap(-1, 2 * HPAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = (ctypes.c_char * (2 * HPAGE)).from_buffer(block)
    try:
        base = -ctypes.addressof(view) % HPAGE + ctypes.addressof(view)
        _libc.madvise(base, HPAGE, MADV_HUGEPAGE)
        ctypes.memset(base, 0, HPAGE)
        if not _is_huge(base):
            pytest.skip("no transparent huge page was given (THP disabled, or no free "
                        "2 MiB of memory)")
        try:
            yield Memory(base, HPAGE)
        finally:
            if unwatch and backends.backend().name in ("uffd", "mprotect"):
                memwatch.memwatch_unwatch(base, HPAGE)
    finally:
        del view
        block.close()


def _unwatch_then_free(base: int, size: int, unwatch: bool) -> None:
    """Heap memory goes back to malloc unwatched on the fallbacks: a page left
    armed would fail the kernel's writes into whatever malloc puts there (the
    pagemap mechanism's leftover registration harms nothing). Not unwatch:
    the C library watched it, in a process about to end."""
    if unwatch and backends.backend().name in ("uffd", "mprotect"):
        memwatch.memwatch_unwatch(base, size)
    _libc.free(base)


def aligned_page(unwatch: bool = True) -> tuple[int, Callable[[], None]]:
    base = _libc.aligned_alloc(P, P)
    assert base, "aligned_alloc failed"
    return base, lambda: _unwatch_then_free(base, P, unwatch)


class Cases:
    """The selftest's checks against one driver."""

    def __init__(self, driver: Driver, unwatch_heap: bool = True) -> None:
        self.driver = driver
        self.unwatch_heap = unwatch_heap  # through Python, before heap memory is freed

    def call(self, start: int, length: int, flags: int, vec: np.ndarray | None = None,
             vec_len: int = 0) -> int:
        return self.driver(0, start, length, flags, vec, vec_len)

    def get(self, start: int, length: int, flags: int, vec_len: int) -> list[int]:
        vec = np.full(max(vec_len, 1), -1, np.int64)
        count = self.call(start, length, flags, vec, vec_len)
        assert 0 <= count <= vec_len, f"rule M10: the count {count} fits vec_len {vec_len}"
        assert (vec[count:] == -1).all(), "rule M6: nothing is written past the count"
        return [int(v) // P for v in vec[:count]]

    def clear(self, mem: Memory, extra: int = 0) -> None:
        """The selftest's clear_softdirty(), on the mapping under test (rule M20)."""
        assert self.call(mem.base, mem.size, CLEAR | extra) == 0, "rule M10: CLEAR returns 0"

    # -- sanity_tests (cases 1-6)
    def sanity(self) -> None:
        with anonymous_mmap(1) as mem:
            vec = np.zeros(100, np.int64)
            for flags, rule in ((0, "no flag"), (0x01000000, "an unknown flag"),
                                (GET | 0xFF, "known flags mixed with unknown ones")):
                with pytest.raises(OSError) as raised:
                    self.call(mem.base, P, flags, vec, 100)
                assert raised.value.errno == errno.EINVAL, f"rule M2: {rule} is EINVAL"
            for pidfd, rule in ((-1, "a negative pidfd"),
                                (1, "a descriptor that is no pidfd (the selftest's 1)")):
                with pytest.raises(OSError) as raised:
                    self.driver(pidfd, mem.base, P, GET, vec, 100)
                assert raised.value.errno in (errno.EINVAL, errno.ESRCH, errno.EBADF), \
                    f"rule M11: {rule} fails"
            assert self.call(mem.base, P, GET | CLEAR, vec, 100) >= 0, \
                "rule M6: a GET|CLEAR with a vec larger than the range succeeds"

    # -- base_tests (7 cases on each kind of memory)
    def base(self, mem: Memory) -> None:
        n = mem.size // P
        first = self.get(mem.base, mem.size, GET | CLEAR, n - 2)
        rest = self.get(mem.base, mem.size, GET | CLEAR, n)
        assert first == list(range(n - 2)) and rest == [n - 2, n - 1], \
            "rule M13: all new pages read written until their first CLEAR; a GET|CLEAR " \
            "stopped by vec_len leaves the rest written"
        assert self.get(mem.base, mem.size, GET, n) == [], \
            "rule M7: no page reads written after a CLEAR"
        mem.fill(1, n - 2)
        assert self.get(mem.base, mem.size, GET, n) == list(range(1, n - 1)), \
            "rule M5: exactly the written pages (all but first and last) are reported"
        self.clear(mem)
        mem.touch(n // 2)
        assert n // 2 in self.get(mem.base, mem.size, GET, n), \
            "rule M5: the written middle page is reported"
        self.clear(mem)
        mem.touch(n // 2)
        mem.touch(n // 2 + 1)
        assert self.get(mem.base + n // 2 * P, 2 * P, GET, n) == [0, 1], \
            "rule M5: a GET over two written middle pages reports them, offsets from start"
        mem.fill(0, n)
        head = self.get(mem.base + P, 2 * P, GET | CLEAR, 2)
        after = self.get(mem.base, mem.size, GET, n)
        assert head == [0, 1] and after == [0, *range(3, n)], \
            "rule M6: GET|CLEAR of pages 1-2 clears exactly those"
        mem.fill(0, n)
        assert self.call(mem.base, mem.size, CLEAR) == 0
        assert self.get(mem.base, mem.size, GET, n) == [], \
            "rule M7: CLEAR alone clears the whole range"

    # -- performance_base_tests: the seven with NO_REUSED_REGIONS (fresh mmap)
    def no_reused(self, mem: Memory) -> None:
        n = mem.size // P
        flags = GET | CLEAR | NO_REUSED
        assert self.get(mem.base, mem.size, flags, n - 2) == [] and \
            self.get(mem.base, mem.size, flags, n) == [], \
            "rule M15: with NO_REUSED_REGIONS a new mapping's untouched pages are not written"
        assert self.get(mem.base, mem.size, GET | NO_REUSED, n) == [], \
            "rule M15: nothing is written after a CLEAR"
        mem.fill(1, n - 2)
        assert self.get(mem.base, mem.size, GET | NO_REUSED, n) == list(range(1, n - 1)), \
            "rule M5: exactly the written pages are reported"
        self.clear(mem, NO_REUSED)
        mem.touch(n // 2)
        assert n // 2 in self.get(mem.base, mem.size, GET | NO_REUSED, n), \
            "rule M5: the written middle page is reported"
        self.clear(mem, NO_REUSED)
        mem.touch(n // 2)
        mem.touch(n // 2 + 1)
        assert self.get(mem.base + n // 2 * P, 2 * P, GET | NO_REUSED, n) == [0, 1], \
            "rule M5: a GET over two written middle pages reports them"
        mem.fill(0, n)
        head = self.get(mem.base + P, 2 * P, flags, 2)
        after = self.get(mem.base, mem.size, GET | NO_REUSED, n)
        assert head == [0, 1] and after == [0, *range(3, n)], \
            "rule M6: GET|CLEAR of pages 1-2 clears exactly those"
        mem.fill(0, n)
        assert self.call(mem.base, mem.size, CLEAR | NO_REUSED) == 0
        assert self.get(mem.base, mem.size, GET | NO_REUSED, n) == [], \
            "rule M7: CLEAR alone clears the whole range"

    # -- hpage_unit_tests (cases 35-41)
    def huge_unit_new_and_clean(self) -> None:
        n = HPAGE // P
        with huge_page(self.unwatch_heap) as mem:
            assert self.get(mem.base, HPAGE, GET | CLEAR, n) == list(range(n)), \
                "rule M14: a new huge page reads as 512 written pages"
            assert self.get(mem.base, HPAGE, GET, n) == [], \
                "rule M7: none after a CLEAR"
            mem.fill(0, n)
            assert self.get(mem.base, HPAGE, GET | CLEAR, n) == list(range(n)), \
                "rule M14: a written huge page reads as 512 written pages"

    def huge_unit_middle(self) -> None:
        n = HPAGE // P
        with huge_page(self.unwatch_heap) as mem:
            self.clear(mem)
            mem.touch(n // 2)
            assert n // 2 in self.get(mem.base, HPAGE, GET, n), \
                "rule M14: the written middle page of a huge page is reported"

    def huge_unit_clear_first_half(self) -> None:
        n = HPAGE // P
        with huge_page(self.unwatch_heap) as mem:
            assert self.call(mem.base, HPAGE // 2, CLEAR) == 0
            assert self.get(mem.base, HPAGE, GET, n) == list(range(n // 2, n)), \
                "rule M14: a CLEAR of half a huge page splits it; the other half stays written"

    def huge_unit_capped_first_half(self) -> None:
        n = HPAGE // P
        with huge_page(self.unwatch_heap) as mem:
            assert self.get(mem.base, HPAGE, GET | CLEAR, n // 2) == list(range(n // 2)), \
                "rule M6: a GET|CLEAR capped at half a huge page reports that half"
            assert self.get(mem.base, HPAGE, GET, n) == list(range(n // 2, n)), \
                "rule M14: the capped GET|CLEAR clears only the half it reported"

    def huge_unit_clear_second_half(self) -> None:
        n = HPAGE // P
        with huge_page(self.unwatch_heap) as mem:
            mem.fill(0, n)
            assert self.call(mem.base + HPAGE // 2, HPAGE // 2, CLEAR) == 0
            assert self.get(mem.base, HPAGE, GET, n) == list(range(n // 2)), \
                "rule M14: a CLEAR of the second half leaves the first half written"

    # -- unmapped_region_tests (cases 42-43)
    def unmapped(self) -> None:
        with anonymous_mmap(64) as mem:
            hole = mem.base
        assert self.get(hole, 64 * P, GET, 64) == [], "rule M16: a hole holds nothing"
        assert self.call(0, 0x7FFFFFFF, CLEAR) == 0, \
            "rule M18: a CLEAR of [0, 0x7FFFFFFF) succeeds (holes hold nothing; the " \
            "program's own mappings there are watched)"

    # -- test_simple (case 44)
    def simple(self, iterations: int) -> None:
        base, release = aligned_page(self.unwatch_heap)
        try:
            vec = np.zeros(1, np.int64)
            assert self.call(base, P, CLEAR) == 0
            for i in range(iterations):
                assert self.call(base, P, GET, vec, 1) == 0, \
                    f"rule M7: the page reads clean right after a CLEAR (iteration {i})"
                assert self.call(base, P, CLEAR) == 0
                ctypes.c_uint8.from_address(base).value += 1
                assert self.call(base, P, GET, vec, 1) == 1, \
                    f"rule M5: the page reads written after a write (iteration {i})"
                assert self.call(base, P, CLEAR) == 0
        finally:
            release()


def c_driver(library: ctypes.CDLL) -> Driver:
    """A driver through the C entry point: -1 and errno become OSError."""
    entry = library.process_memwatch
    entry.restype = ctypes.c_long
    entry.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint,
                      ctypes.c_void_p, ctypes.c_int]

    def call(pidfd: int, start: int, length: int, flags: int, vec: np.ndarray | None,
             vec_len: int) -> int:
        pointer = None if vec is None else vec.ctypes.data
        result = entry(pidfd, start, min(length, 0x7FFFFFFF), flags, pointer, vec_len)
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(result)

    return call


def library() -> ctypes.CDLL:
    """libprocess_memwatch, loaded (skips when it was not built)."""
    path = clib.library_path()
    if not path.exists():
        pytest.skip(f"{path.name} was not built (no C compiler at install time)")
    return ctypes.CDLL(str(path), use_errno=True)


def build_c_cases(directory: Path) -> Path:
    """tests/c/memwatch_cases.c built with the one line `python -m writewatch
    cflags` prints (skips without a compiler or the library)."""
    library()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    flags = subprocess.run([sys.executable, "-m", "writewatch", "cflags"], check=True,
                           capture_output=True, text=True).stdout.split()
    program = directory / "memwatch_cases"
    subprocess.run([compiler, "-Wall", "-Werror", "-o", str(program),
                    str(Path(__file__).parent / "c" / "memwatch_cases.c"), *flags], check=True)
    return program


def run_c_cases(program: Path, *wrapper: str,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*wrapper, str(program), str(scaled_work(10000, at_least=500))],
                          capture_output=True, text=True, timeout=patience(120), env=env)


def assert_c_cases_passed(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not ok" not in run.stdout and run.stdout.rstrip().endswith("1..26"), run.stdout
