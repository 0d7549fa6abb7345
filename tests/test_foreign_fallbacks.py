"""process_memwatch over memory writewatch did not allocate, on the fallback
backends (uffd: synchronous userfaultfd write-protect; mprotect: PROT_READ and a
SIGSEGV handler): plain mmap, the malloc heap, aligned_alloc, numpy's buffers,
transparent huge pages; new mappings, holes, refusals, capped GET|CLEAR, a racing
writer, stopping, fork. Each backend object is called directly."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest
from forking import run_forked, run_python, scaled_work
from frame_numbers import read_pages_count
from native_writers import NativeWriters

from writewatch import backends, kernel
from writewatch.kernel import ffi, lib

P = kernel.PAGE_SIZE
GET, CLEAR, NO_REUSED = 1, 2, 4
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
MAP_FIXED = 0x10
MADV_HUGEPAGE = 14
HUGE = 2 << 20

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.aligned_alloc.restype = ctypes.c_void_p
libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


@pytest.fixture
def backend(write_watch_backend: str) -> kernel.Backend:
    if write_watch_backend not in ("uffd", "mprotect"):
        pytest.skip("the fallback backends' foreign memory; pagemap has its own tests")
    return backends.backend(write_watch_backend)


def map_anon(npages: int, at: int = 0, prot: int = PROT_RW,
             flags: int = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) -> int:
    address = libc.mmap(at or None, npages * P, prot, flags | (MAP_FIXED if at else 0), -1, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    return int(address)


class Watched:
    """[start, start + npages pages) of foreign memory under process_memwatch on
    backend; unwatch() (run by the fixture) stops watching it."""

    def __init__(self, backend: kernel.Backend, start: int, npages: int) -> None:
        self.backend, self.start, self.npages = backend, start, npages
        self.end = start + npages * P

    def call(self, flags: int, capacity: int | None = None, start: int | None = None,
             end: int | None = None) -> list[int]:
        """The page numbers (from start) a call reports; checks nothing past the
        count is written."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        size = (end - start) // P + 1
        vec = np.full(size, -1, np.int64)
        count = self.backend.process_memwatch(start, end, flags, ffi.from_buffer("uint64_t[]", vec),
                                              capacity or size)
        assert count >= 0, os.strerror(-count)
        assert (vec[count:] == -1).all(), "wrote past the count"
        return [int(offset) // P for offset in vec[:count]]

    def write(self, *pages: int) -> None:
        for page in pages:
            ctypes.c_uint8.from_address(self.start + page * P + 8).value += 1

    def unwatch(self) -> None:
        self.backend.memwatch_unwatch(self.start, self.end)


@pytest.fixture
def watch(backend: kernel.Backend) -> Iterator[object]:
    made: list[Watched] = []

    def make(start: int, npages: int) -> Watched:
        made.append(Watched(backend, start, npages))
        return made[-1]

    yield make
    for each in made:
        each.unwatch()


@pytest.fixture(params=["procmap_query", "maps_text"])
def maps_method(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both ways of reading the kernel's mappings (PROCMAP_QUERY needs 6.11)."""
    before = lib.ww_memwatch_maps_method(-1)
    if request.param == "procmap_query" and not before:
        pytest.skip("no PROCMAP_QUERY before Linux 6.11")
    lib.ww_memwatch_maps_method(int(request.param == "maps_text"))
    yield request.param
    lib.ww_memwatch_maps_method(int(not before))


def test_mmap_reads_written_until_first_clear(watch, maps_method) -> None:
    w = watch(map_anon(10), 10)
    assert w.call(GET) == list(range(10)), "a new mapping reads as all written"
    assert w.call(GET | CLEAR) == list(range(10))
    assert w.call(GET) == [], "nothing is written after a clear"
    w.write(0, 9)
    w.write(4)
    assert w.call(GET) == [0, 4, 9], "exactly the pages written since the clear"
    assert w.call(CLEAR) == []
    assert w.call(GET) == []


def test_hole_holds_nothing(watch, backend: kernel.Backend, maps_method) -> None:
    """Rule M16 with either walk of the mappings: a GET or CLEAR over memory
    just unmapped succeeds and reports nothing. (Reading /proc/self/maps into a
    mapping of its own once listed that mapping, which the kernel placed in the
    hole when it fit: ENOMEM on mprotect, EINVAL on uffd. Holes of every size
    up to 64 pages, so that one is where the next mapping goes.)"""
    watch(map_anon(1), 1).call(GET)  # the backend's own set-up is done
    for npages in range(1, 65):
        start = map_anon(npages)
        assert libc.munmap(start, npages * P) == 0
        hole = Watched(backend, start, npages)
        assert hole.call(GET) == [], f"a hole of {npages} pages holds nothing"
        assert hole.call(GET | CLEAR) == []
        hole.unwatch()


def test_no_reused_regions_reports_only_pages_written(watch, maps_method,
                                                     write_watch_backend: str) -> None:
    start = map_anon(10)
    ctypes.memset(start + 3 * P, 1, 1)
    assert ctypes.c_uint8.from_address(start + 4 * P).value == 0  # read: the zero page
    w = watch(start, 10)
    read = [4] if read_pages_count(write_watch_backend) else []
    assert w.call(GET | NO_REUSED) == sorted([3, *read]), \
        "present and not the zero page (rule M20: a read page counts without frame numbers)"
    w.write(7)
    assert w.call(GET | CLEAR | NO_REUSED) == sorted([3, 7, *read])
    w.write(4)
    assert w.call(GET | NO_REUSED) == [4]


def test_malloc_heap_and_aligned_alloc(watch) -> None:
    small = libc.malloc(40 * P)  # below the mmap threshold: the heap
    aligned = libc.aligned_alloc(P, 16 * P)
    try:
        first = kernel.page_ceil(small)
        w = watch(first, (kernel.page_floor(small + 40 * P) - first) // P)
        a = watch(aligned, 16)
        for each in (w, a):
            each.call(CLEAR)
            assert each.call(GET) == []
            each.write(2)
            assert each.call(GET | CLEAR) == [2]
            ctypes.memset(each.start + 5 * P, 7, 2 * P)
            assert each.call(GET) == [5, 6]
            assert ctypes.c_uint8.from_address(each.start + 6 * P).value == 7
    finally:
        for each in (w, a):
            each.unwatch()
        libc.free(small)
        libc.free(aligned)


def test_numpy_buffer(watch) -> None:
    array = np.zeros(64 * P, np.uint8)  # numpy's own buffer (malloc's own mmap)
    first = kernel.page_ceil(array.ctypes.data)
    w = watch(first, 60)
    w.call(CLEAR)
    array[first - array.ctypes.data + 10 * P + 100] = 1
    array[first - array.ctypes.data + 30 * P:first - array.ctypes.data + 32 * P] = 2
    assert w.call(GET | CLEAR) == [10, 30, 31]
    assert w.call(GET) == []
    assert array.sum() == 1 + 2 * 2 * P


def test_transparent_huge_pages(watch) -> None:
    raw = map_anon(2 * HUGE // P)
    start = (raw + HUGE - 1) & ~(HUGE - 1)
    libc.madvise(start, HUGE, MADV_HUGEPAGE)
    ctypes.memset(start, 1, HUGE)
    try:
        w = watch(start, HUGE // P)
        assert w.call(GET | NO_REUSED) == list(range(512)), "every written 4 KiB page"
        w.call(CLEAR)
        w.write(3, 300)
        assert w.call(GET | CLEAR, capacity=1) == [3]
        assert w.call(GET) == [300]
        assert ctypes.c_uint8.from_address(start + 300 * P + 8).value == 2
    finally:
        w.unwatch()
        libc.munmap(raw, 2 * HUGE)


@pytest.mark.parametrize("how", ["munmap_mmap", "mmap_fixed", "owner_mprotect"])
def test_replaced_mapping_is_new(watch, backend, maps_method, how) -> None:
    start = map_anon(8)
    w = watch(start, 8)
    w.call(CLEAR)
    w.write(1)
    if how == "munmap_mmap":
        libc.munmap(start, 8 * P)
        assert map_anon(8, at=start) == start
    elif how == "mmap_fixed":
        assert map_anon(8, at=start) == start
    else:  # the owner gives write access back itself: the armed state is gone
        libc.mprotect(start, 8 * P, mmap.PROT_READ)
        libc.mprotect(start, 8 * P, PROT_RW)
    w.write(5)
    if how == "owner_mprotect" and backend.name == "uffd":
        # The write-protect bit outlives mprotect: still armed, still exact.
        assert w.call(GET | CLEAR) == [1, 5]
        return
    assert w.call(GET | CLEAR) == list(range(8)), "a new mapping reads as all written"
    w.write(6)
    assert w.call(GET) == [6], "and is watched from there on"


def test_holes_hold_nothing(watch) -> None:
    start = map_anon(6)
    w = watch(start, 6)
    w.call(CLEAR)
    libc.munmap(start + 2 * P, 2 * P)
    w.write(1, 5)
    assert w.call(GET | CLEAR) == [1, 5]
    assert w.call(GET, start=start + 2 * P, end=start + 4 * P) == []
    w.call(CLEAR, start=start + 2 * P, end=start + 4 * P)
    assert map_anon(2, at=start + 2 * P) == start + 2 * P
    assert w.call(GET) == [2, 3], "memory mapped into the hole is a new mapping"
    low = Watched(w.backend, 0, 0x7FFFF)
    assert low.call(CLEAR) == [], "the selftest's clear of [0, 0x7FFFFFFF)"


SWEEP_AT_LEAST = 64  # foreign.c: the spans a sweep waits for at least
MAP_FIXED_NOREPLACE = 0x100000


def _low_block(npages: int) -> int:
    """npages mapped far below where the kernel places mappings (top-down from
    near the stack): holes punched in it stay holes."""
    for hint in range(1 << 40, 1 << 44, 1 << 40):
        address = libc.mmap(hint, npages * P, PROT_RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                            | MAP_FIXED_NOREPLACE, -1, 0)
        if address == hint:
            return hint
        if address not in (None, ctypes.c_void_p(-1).value):
            libc.munmap(address, npages * P)
    pytest.skip("no free low address range")


def test_spans_of_memory_unmapped_do_not_pile_up(watch, backend, maps_method) -> None:
    """Memory watched, then unmapped by its owner and never watched again (a
    collector's arenas) keeps no tracking state for long: once the spans have
    doubled since the last sweep, a call drops those no mapping overlaps, so
    they stay within twice what is still watched."""
    watch(map_anon(1), 1).call(GET)  # the backend's own set-up is done
    before = lib.ww_memwatch_span_count()
    rounds = 2 * (before + SWEEP_AT_LEAST)  # more than any bound below
    block = _low_block(2 * rounds)
    try:
        for page in range(0, 2 * rounds, 2):  # odd pages stay mapped between the holes
            Watched(backend, block + page * P, 1).call(CLEAR)
            libc.munmap(block + page * P, P)
        after = lib.ww_memwatch_span_count()
    finally:
        libc.munmap(block, 2 * rounds * P)
    assert after < max(SWEEP_AT_LEAST, 2 * (before + 1)), \
        f"spans of unmapped memory must be dropped: {before} before, {after} after {rounds}"
    start = map_anon(3)
    w = watch(start, 3)
    assert w.call(GET) == [0, 1, 2], "memory mapped after a sweep reads as new"


def test_file_mapping_refused_before_anything_is_cleared_shared_memory_watched(watch) -> None:
    start = map_anon(6)  # its last two pages become the file mapping
    with tempfile.TemporaryFile() as file:
        file.write(b"x" * 2 * P)
        file.flush()
        after = libc.mmap(start + 4 * P, 2 * P, PROT_RW, mmap.MAP_PRIVATE | MAP_FIXED,
                          file.fileno(), 0)
        if after != start + 4 * P:
            pytest.skip("could not place the file mapping right after the anonymous one")
        w = watch(start, 4)
        w.call(CLEAR)
        w.write(1)
        with pytest.raises(OSError) as refused:
            w.call(GET | CLEAR, end=start + 6 * P)
        assert refused.value.errno == errno.EINVAL
        assert "cannot be watched" in str(refused.value)
        assert "private file mapping" in str(refused.value)
        assert w.call(GET) == [1], "the refused call cleared nothing"
        libc.munmap(start + 4 * P, 2 * P)
    shared = map_anon(2, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    try:  # shared memory is watched through this process's mapping of it
        s = Watched(w.backend, shared, 2)
        assert s.call(GET | CLEAR) == [0, 1]
        s.write(1)
        assert s.call(GET) == [1]
        s.unwatch()
    finally:
        libc.munmap(shared, 2 * P)


def test_capped_get_clear_leaves_the_rest(watch) -> None:
    w = watch(map_anon(10), 10)
    w.call(CLEAR)
    w.write(1, 3, 5, 7)
    assert w.call(GET | CLEAR, capacity=2) == [1, 3]
    assert w.call(GET) == [5, 7], "nothing past the stop is cleared"
    assert w.call(GET | CLEAR) == [5, 7]
    assert w.call(GET) == []


def test_racing_writer_loses_no_write(watch) -> None:
    npages = 64
    w = watch(map_anon(npages), npages)
    memory = np.frombuffer((ctypes.c_uint8 * (npages * P)).from_address(w.start), np.uint8)
    known = memory.copy()
    w.call(GET | CLEAR)
    known[:] = memory
    reported = 0
    with NativeWriters(w.start, npages, nthreads=2, seed=17, pause_ns=2000):
        for _ in range(scaled_work(400, 40)):
            pages = w.call(GET | CLEAR, capacity=7)
            reported += len(pages)
            for page in pages:  # the contents as of this report, or later
                known[page * P:(page + 1) * P] = memory[page * P:(page + 1) * P]
    for page in w.call(GET | CLEAR):
        known[page * P:(page + 1) * P] = memory[page * P:(page + 1) * P]
    assert reported, "the writers were seen"
    changed = sorted({int(i) // P for i in np.flatnonzero(known != memory)})
    assert changed == [], f"writes to pages {changed} were never reported"


def _kernel_prot(address: int) -> str:
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return line.split()[1][:3]
    return ""


def test_a_file_mapping_where_watched_memory_was_is_never_touched(watch) -> None:
    """Watched memory unmapped and replaced by a file mapping (a library
    loaded there: numpy.random's, on Python 3.12) is not the watch's any more:
    stopping the watch, or writewatch mapping a region over the rest of it,
    leaves the file mapping's protection alone. It used to be "restored" as
    read-write, without PROT_EXEC, and the next call into the library's code
    killed the process."""
    start = map_anon(6)
    w = watch(start, 6)
    w.call(CLEAR)
    libc.munmap(start, 6 * P)
    with tempfile.TemporaryFile() as file:
        file.write(b"x" * 4 * P)
        file.flush()
        placed = libc.mmap(start + 2 * P, 4 * P, mmap.PROT_READ | mmap.PROT_EXEC,
                           mmap.MAP_PRIVATE | MAP_FIXED, file.fileno(), 0)
        assert placed == start + 2 * P
        try:
            w.unwatch()
            assert _kernel_prot(start + 2 * P) == "r-x"
            assert _kernel_prot(start + 5 * P) == "r-x"
        finally:
            libc.munmap(start + 2 * P, 4 * P)


def test_executable_memory_keeps_prot_exec(watch) -> None:
    """JIT code: the mprotect backend would arm it read-only and take PROT_EXEC
    away for good, so it refuses it; uffd write-protects without changing the
    protection, and watches it."""
    start = map_anon(2, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        w = watch(start, 2)
        if w.backend.name == "mprotect":
            with pytest.raises(OSError) as refused:
                w.call(CLEAR)
            assert refused.value.errno == errno.EINVAL
            assert "executable memory" in str(refused.value)
        else:
            w.call(CLEAR)
            w.write(1)
            assert w.call(GET) == [1]
        assert _kernel_prot(start) == "rwx"
        w.unwatch()
        assert _kernel_prot(start) == "rwx"
    finally:
        libc.munmap(start, 2 * P)


def _uffd_wp(address: int) -> bool:
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // P * 8)
        return bool(int.from_bytes(pagemap.read(8), "little") >> 57 & 1)


def test_unwatch_restores_protection(watch, backend) -> None:
    start = map_anon(4)
    ro = map_anon(2, prot=mmap.PROT_READ)
    w = watch(start, 4)
    r = watch(ro, 2)
    w.call(CLEAR)
    r.call(CLEAR)
    w.write(2)
    armed = _kernel_prot(start) == "r--" if backend.name == "mprotect" else _uffd_wp(start)
    assert armed, "a cleared page is armed"
    if backend.name == "mprotect":
        with open("/dev/zero", "rb") as zero:  # the kernel's own write into an armed page
            with pytest.raises(OSError) as fault:
                os.readv(zero.fileno(), [(ctypes.c_char * P).from_address(start)])
            assert fault.value.errno == errno.EFAULT
    w.unwatch()
    r.unwatch()
    assert _kernel_prot(start) == "rw-" and _kernel_prot(ro) == "r--"
    assert not _uffd_wp(start)
    assert ctypes.c_uint8.from_address(start + 2 * P + 8).value == 1, "the data is kept"
    with open("/dev/zero", "rb") as zero:
        assert os.readv(zero.fileno(), [(ctypes.c_char * P).from_address(start)]) == P
    assert w.call(GET) == [0, 1, 2, 3], "watched again: a new mapping"


def test_fork(watch, backend) -> None:
    w = watch(map_anon(6), 6)
    w.call(CLEAR)
    w.write(1)

    def child() -> list[list[int]]:
        first = w.call(GET | CLEAR)  # uffd: the child inherits no registration
        w.write(4)
        return [first, w.call(GET)]

    first, then = run_forked(child)
    if backend.name == "mprotect":
        assert first == [1], "the child inherits the state and the protections"
    else:
        assert first == list(range(6)), "no registration inherited: a new mapping"
    assert then == [4]
    assert w.call(GET) == [1], "the parent's state is its own"


def test_refusals_carry_their_reason(backend) -> None:
    with open("/proc/self/maps") as maps:
        at = next(int(line.split("-")[0], 16) for line in maps if line.rstrip().endswith("[stack]"))
    with pytest.raises(OSError, match=r"\[stack\]") as refused:
        Watched(backend, at, 1).call(GET)
    assert refused.value.errno == errno.EINVAL
    with pytest.raises(OSError, match="flags"):
        Watched(backend, at, 1).call(0x8 | GET)


def test_procmap_query_is_used_where_the_kernel_has_it(watch) -> None:
    w = watch(map_anon(2), 2)
    w.call(GET)
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    assert bool(lib.ww_memwatch_maps_method(-1)) == ((major, minor) >= (6, 11))


PYTHON_HEAP = """
import os
import numpy as np
from writewatch import backends
from writewatch.kernel import ffi, lib
backend = backends.backend("{backend}")
lib.ww_memwatch_maps_method({force_maps})
buffer = bytearray(64 * 1024)  # below the mmap threshold: on the heap
with open("/proc/self/maps") as maps:
    low, high = next((int(x, 16) for x in line.split()[0].split("-"))
                     for line in maps if line.rstrip().endswith("[heap]"))
vec = np.zeros((high - low) // 4096 + 1, np.int64)
out = ffi.from_buffer("uint64_t[]", vec)
backend.process_memwatch(low, high, 3, out, len(vec))   # every heap page armed
junk = [dict(a=i, b=str(i) * 10) for i in range(20000)]  # the interpreter writes its heap
zero = os.open("/dev/zero", os.O_RDONLY)
try:  # the kernel writes into a page of the buffer nobody wrote since the clear
    got = os.readv(zero, [memoryview(buffer)[32 * 1024:36 * 1024]])
except OSError as exc:
    got = -exc.errno
written = backend.process_memwatch(low, high, 1, out, len(vec))
backend.memwatch_unwatch(low, high)
after = os.readv(zero, [memoryview(buffer)[32 * 1024:36 * 1024]])
print(written > 0, got, after, sum(len(d) for d in junk))
"""


def test_the_interpreters_own_heap_keeps_working_while_armed(backend, maps_method) -> None:
    """Every page of the malloc heap armed: the interpreter's writes go through
    the fault handling, the kernel's own write either works (uffd with kernel
    faults) or fails with EFAULT (mprotect), and nothing crashes or hangs; nor
    does writewatch have the kernel write into the heap (/proc/self/maps read
    into a malloc'd buffer failed with EFAULT)."""
    force_maps = int(maps_method == "maps_text")
    result = run_python(PYTHON_HEAP.format(backend=backend.name, force_maps=force_maps),
                        report_hang=True)
    assert result.returncode == 0, result.stderr[-3000:]
    written, got, after, total = result.stdout.split()
    assert written == "True" and total == "40000"
    kernel_faults = backend.name == "uffd" and not backend.kernel_writes_fault()
    assert int(got) == (4096 if kernel_faults else -errno.EFAULT)
    assert after == "4096", "stopped watching: the kernel writes again"


POPULATE_CHANGED_MAPPINGS = """
import json
from writewatch.kernel import lib, PAGE_SIZE, PROT_READ, PROT_WRITE
size = 4 * PAGE_SIZE
answers = {}
for name, prot in (("inaccessible", 0), ("read-only", PROT_READ)):
    address = lib.ww_mmap(0, size, prot, 0x22)  # MAP_PRIVATE | MAP_ANONYMOUS
    answers[name] = lib.ww_populate_for_write(address, size)
    lib.ww_munmap(address, size)
answers["unmapped"] = lib.ww_populate_for_write(address, size)
address = lib.ww_mmap(0, size, PROT_READ | PROT_WRITE, 0x22)
answers["read-write"] = lib.ww_populate_for_write(address, size)
print(json.dumps(answers))
"""


def test_pages_populated_before_write_protect_are_never_touched_once_their_mapping_changed():
    """Before Linux 6.4 the uffd fallback faults pages in before protecting
    them. Another thread may have unmapped the memory or taken its write access
    away meanwhile (a VirtualFree and a VirtualAlloc at the same address while
    process_memwatch walks it): MADV_POPULATE_WRITE then fails, and the failure
    is the answer. Touching the pages by hand there killed the process (Linux
    6.1, the release races of test_lifetime.py)."""
    result = run_python(POPULATE_CHANGED_MAPPINGS)
    assert result.returncode == 0, ("a changed mapping was touched", result.returncode,
                                    result.stderr[-2000:])
    answers = json.loads(result.stdout)
    assert answers["read-write"] == 0, answers
    for name in ("inaccessible", "read-only", "unmapped"):
        assert answers[name] < 0, (f"populating {name} memory must fail, not succeed", answers)
