"""process_memwatch on memory writewatch did not allocate (docs/semantics.md
rules M13-M20): numpy arrays, plain mmaps, shared memory; new mappings; holes;
mappings that cannot be watched; stopping; ranges past user space."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from forking import patience, run_forked
from frame_numbers import read_pages_count
from native_writers import NativeWriters

import writewatch as ww
from writewatch import backends, memwatch
from writewatch.kernel import ffi, lib

P = ww.PAGE_SIZE
GET = ww.MEMWATCH_SD_GET
CLEAR = ww.MEMWATCH_SD_CLEAR
NO_REUSED = ww.MEMWATCH_SD_NO_REUSED_REGIONS
MAP_FIXED = 0x10


@pytest.fixture(autouse=True)
def unwatch_afterwards(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each case stops watching what it watched (rule M19), mapped still or not:
    all backends run in one process, and memory one backend left watched and
    freed is met again at the same address by the next backend's cases."""
    watched: list[tuple[int, int]] = []
    call = ww.process_memwatch

    def recording(pidfd: int, start: int, length: int, *args: Any, **kwargs: Any) -> int:
        watched.append((start, length))
        return call(pidfd, start, length, *args, **kwargs)

    monkeypatch.setattr(ww, "process_memwatch", recording)
    yield
    for start, length in watched:
        # Refused when watched, or never watched: nothing to stop.
        with contextlib.suppress(OSError, ValueError):
            memwatch.memwatch_unwatch(start, length)


def written(start: int, length: int, flags: int = GET, capacity: int = 1024) -> list[int]:
    """Page numbers (from start) a GET-style call reports."""
    vec = np.full(capacity, -1, np.int64)
    count = ww.process_memwatch(0, start, length, flags, vec)
    assert (vec[count:] == -1).all(), "wrote past the count"
    return [int(v) // P for v in vec[:count]]


def clear(start: int, length: int) -> None:
    assert ww.process_memwatch(0, start, length, CLEAR) == 0


def address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


@pytest.fixture
def anonymous() -> Iterator[mmap.mmap]:
    block = mmap.mmap(-1, 8 * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    yield block
    block.close()


def test_numpy_array_is_watched():
    """Rule M13: a numpy array's own buffer is watched from the first call."""
    array = np.zeros(64 * P, np.uint8)  # large: its own mmap, page aligned + 16 bytes
    start = (array.ctypes.data + P - 1) & ~(P - 1)
    length = 32 * P
    assert written(start, length, GET | CLEAR) == list(range(32)), \
        "rule M13: until its first CLEAR memory reads all written"
    assert written(start, length) == [], "rule M7: nothing is written after a CLEAR"
    array[start - array.ctypes.data + 5 * P] = 1
    array[start - array.ctypes.data + 17 * P + 100] = 1
    assert written(start, length) == [5, 17], "rule M5: exactly the written pages"


def test_new_mapping_reads_all_written_until_its_first_clear(anonymous):
    """Rule M13: a GET alone leaves a new mapping all written."""
    base = address(anonymous)
    assert written(base, 8 * P) == list(range(8))
    assert written(base, 8 * P) == list(range(8)), "rule M13: a GET does not clear"


def test_no_reused_regions_reports_only_pages_written(anonymous, write_watch_backend):
    """Rule M15: present pages that are not the shared zero page."""
    base = address(anonymous)
    anonymous[2 * P] = 1
    anonymous[3 * P] = 1
    assert anonymous[5 * P] == 0  # a read maps the shared zero page
    read = [5] if read_pages_count(write_watch_backend) else []
    assert written(base, 8 * P, GET | NO_REUSED) == [2, 3, *read], \
        "rule M15: a read page is not written (M20: it counts without frame numbers)"
    assert written(base, 8 * P, GET | CLEAR | NO_REUSED) == [2, 3, *read]
    anonymous[5 * P] = 1
    assert written(base, 8 * P) == [5], "rule M15: the clear re-armed every page"


def test_mapping_made_again_at_the_same_address_is_new(anonymous):
    """Rule M13: munmap + mmap at the same address is a new mapping."""
    base = address(anonymous)
    clear(base, 8 * P)
    assert written(base, 8 * P) == []
    again = lib.ww_mmap(base + 2 * P, 2 * P, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED)
    assert again == base + 2 * P
    assert written(base, 8 * P) == [2, 3], "rule M13: the new mapping reads all written"
    clear(base, 8 * P)
    assert written(base, 8 * P) == []


def test_holes_hold_nothing(anonymous):
    """Rule M16: GET and CLEAR over unmapped holes succeed."""
    base = address(anonymous)
    clear(base, 8 * P)
    lib.ww_munmap(base + 3 * P, 2 * P)
    anonymous[6 * P] = 1
    assert written(base, 8 * P, GET | CLEAR) == [6]
    clear(base, 8 * P)


def test_shared_memory_is_watched():
    """Rule M13: shared anonymous memory (shmem) is watched too."""
    block = mmap.mmap(-1, 4 * P, mmap.MAP_SHARED)
    base = address(block)
    assert written(base, 4 * P, GET | CLEAR) == [0, 1, 2, 3]
    block[2 * P] = 7
    assert written(base, 4 * P) == [2]


def _maps_entry(name: str) -> tuple[int, int] | None:
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(name):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                return lo, hi
    return None


@pytest.mark.parametrize("name", ["[vdso]", "[vvar]"])
def test_mapping_the_kernel_will_not_watch_is_refused_by_name(name):
    """Rule M17: EINVAL naming the mapping, never a report."""
    where = _maps_entry(name)
    if where is None:
        pytest.skip(f"no {name} mapping in this process")
    for flags in (GET, GET | CLEAR, CLEAR, GET | NO_REUSED):
        with pytest.raises(OSError) as raised:
            ww.process_memwatch(0, where[0], P, flags, np.zeros(4, np.int64))
        assert raised.value.errno == errno.EINVAL
        assert name in str(raised.value), raised.value


def test_refusal_comes_before_anything_is_cleared():
    """Rule M17: a range whose second half cannot be watched fails and clears
    nothing in its first half."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    block = mmap.mmap(-1, 4 * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address(block)
    with tempfile.TemporaryFile() as file:
        file.write(b"x" * 2 * P)
        file.flush()
        # A shared mapping of a file opened read-only has no VM_MAYWRITE: the
        # kernel will not register it.
        read_only = os.open(f"/proc/self/fd/{file.fileno()}", os.O_RDONLY)
        try:
            fixed = libc.mmap(base + 2 * P, 2 * P, mmap.PROT_READ,
                              mmap.MAP_SHARED | MAP_FIXED, read_only, 0)
        finally:
            os.close(read_only)
    assert fixed == base + 2 * P, os.strerror(ctypes.get_errno())
    clear(base, 2 * P)
    block[P] = 1
    for flags in (CLEAR, GET | CLEAR):
        with pytest.raises(OSError) as raised:
            ww.process_memwatch(0, base, 4 * P, flags, np.zeros(8, np.int64))
        assert raised.value.errno == errno.EINVAL
        assert "cannot be watched" in str(raised.value), raised.value
    assert written(base, 2 * P) == [1], "rule M17: the refused call cleared nothing"


def test_unwatch_leaves_memory_as_it_was(anonymous):
    """Rule M19: stop watching keeps contents and protection; the memory reads
    as never watched (all written) and can be watched again."""
    base = address(anonymous)
    anonymous[0:4] = b"abcd"
    clear(base, 8 * P)
    memwatch.memwatch_unwatch(base, 8 * P)
    assert anonymous[0:4] == b"abcd"
    if backends.backend_status().get("pagemap") != "":
        return  # no PAGEMAP_SCAN to ask (before Linux 6.7); the data check above holds
    arg = ffi.new("struct pm_scan_arg *")
    regions = ffi.new("struct page_region[4]")
    arg.size, arg.start, arg.end = ffi.sizeof("struct pm_scan_arg"), base, base + 8 * P
    arg.vec, arg.vec_len = int(ffi.cast("uintptr_t", regions)), 4
    arg.category_mask = arg.return_mask = lib.PAGE_IS_WPALLOWED
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        assert lib.ww_pagemap_raw(pagemap, arg) == 0, "rule M19: nothing is registered"
    finally:
        os.close(pagemap)
    assert written(base, 8 * P) == list(range(8)), "rule M19: reads as never watched"
    clear(base, 8 * P)
    anonymous[3 * P] = 1
    assert written(base, 8 * P) == [3]


@pytest.mark.parametrize("flags", [GET | CLEAR, GET | CLEAR | NO_REUSED],
                         ids=["get-clear", "get-clear-no-reused"])
def test_first_get_clear_is_atomic_under_concurrent_native_writers(flags):
    """Rules M8, M13 and M15: GET|CLEAR on memory never watched, while native
    threads write into it, loses no write: the first call registers before it
    walks, and with NO_REUSED_REGIONS re-arms the pages it did not report only
    if they are still unwritten. Each reported page is copied into a shadow; a
    write cleared without being reported would leave the shadow stale."""
    npages = 128
    block = mmap.mmap(-1, npages * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address(block)
    memory = np.frombuffer(block, np.uint8)
    shadow = np.zeros(npages * P, np.uint8)
    vec = np.zeros(5, np.int64)

    def poll(each: int) -> int:
        found = ww.process_memwatch(0, base, npages * P, each, vec)
        for offset in vec[:found].tolist():
            shadow[offset:offset + P] = memory[offset:offset + P]
        return found

    full_polls = 0
    with NativeWriters(base, npages, nthreads=2, seed=29, pause_ns=1000) as writers:
        deadline = time.monotonic() + 0.3
        while (time.monotonic() < deadline
               or (full_polls == 0 and time.monotonic() < deadline + patience(10))):
            found = poll(flags)
            full_polls += found == len(vec)
            if found < len(vec):
                time.sleep(0.001)
        writes = writers.stop()
    while poll(flags) == len(vec):
        pass
    assert writes > 0 and full_polls > 0
    stale = np.unique(np.flatnonzero(shadow != memory) // P)
    assert stale.size == 0, f"pages {stale[:10].tolist()} lost a write to GET|CLEAR"
    assert written(base, npages * P) == [], "rule M7: all of it is clear after the drain"


def test_forked_child_watches_its_own_memory(anonymous, write_watch_backend):
    """Rules M13 and K17: a forked child's memory is not registered: it reads
    as never watched there (on mprotect the child inherits the protections and
    the state, so it reads exactly what was written), the child's own CLEAR
    works, and the parent's state is untouched."""
    base = address(anonymous)
    clear(base, 8 * P)
    anonymous[P] = 1

    def child() -> list[list[int]]:
        before = written(base, 8 * P)
        clear(base, 8 * P)
        anonymous[2 * P] = 1
        return [before, written(base, 8 * P)]

    inherited = [1] if write_watch_backend == "mprotect" else list(range(8))
    assert run_forked(child) == [inherited, [2]]
    assert written(base, 8 * P) == [1], "the parent's written state is its own"


# -- the common call (native/python_calls.c): one native call, or None


def _vec(dtype: Any = np.int64, n: int = 8) -> np.ndarray:
    return np.full(n, -1 if np.dtype(dtype).kind == "i" else 0, dtype)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class _IntSubclass(int):
    pass


# (start, length, flags, vec) from the mapping's start: served by the common call on
# the backend it serves itself (pagemap), refusals included, which it returns
# for the general path to word.
COMMON_SERVED: dict[str, Any] = {
    "GET|CLEAR": lambda s: (s, 8 * P, GET | CLEAR, _vec()),
    "GET, longlong vec": lambda s: (s, 8 * P, GET, _vec(np.longlong)),
    "CLEAR alone, no vec": lambda s: (s, 8 * P, CLEAR, None),
    "CLEAR alone, a vec it never reads": lambda s: (s, 8 * P, CLEAR, "not a vec"),
    "int subclasses": lambda s: (_IntSubclass(s), _IntSubclass(8 * P), _IntSubclass(3), _vec()),
    "refused: unaligned start": lambda s: (s + 1, 8 * P, GET, _vec()),
    "refused: negative length": lambda s: (s, -P, GET, _vec()),
    "refused: bad flags": lambda s: (s, 8 * P, 0x80, _vec()),
    "refused: GET with an empty vec": lambda s: (s, 8 * P, GET, _vec(n=0)),
}
COMMON_DECLINED: dict[str, Any] = {
    "GET without a vec": lambda s: (s, 8 * P, GET, None),
    "uint64 vec": lambda s: (s, 8 * P, GET, _vec(np.uint64)),
    "int32 vec": lambda s: (s, 8 * P, GET, _vec(np.int32)),
    "2-D vec": lambda s: (s, 8 * P, GET, np.full((2, 4), -1, np.int64)),
    "strided vec": lambda s: (s, 8 * P, GET, _vec(n=16)[::2]),
    "read-only vec": lambda s: (s, 8 * P, GET, _read_only(_vec())),
    "memoryview vec": lambda s: (s, 8 * P, GET, memoryview(_vec())),
    "list vec": lambda s: (s, 8 * P, GET, [-1] * 8),
    "negative start": lambda s: (-s, 8 * P, GET, _vec()),
    "start past 64 bits": lambda s: (1 << 64, 8 * P, GET, _vec()),
    "flags past 32 bits": lambda s: (s, 8 * P, GET | 1 << 32, _vec()),
    "length past 63 bits": lambda s: (s, 1 << 63, GET, _vec()),
    "float length": lambda s: (s, 8.0 * P, GET, _vec()),
    "numpy integer start": lambda s: (np.uint64(s), 8 * P, GET, _vec()),
}


def _memwatch_outcome(call: Any, args: tuple) -> tuple:
    """What a call answers: its count and the vec's contents, or its error."""
    vec = args[-1]
    try:
        found = call(0, *args, None)
    except OSError as exc:
        return ("error", exc.errno, str(exc))
    except TypeError:
        return ("TypeError",)
    return ("found", found, vec.tolist() if isinstance(vec, np.ndarray) else None)


@pytest.mark.parametrize("case", [*COMMON_SERVED, *COMMON_DECLINED])
def test_the_common_call_answers_as_the_general_path_does(anonymous, case):
    """Rules M11 and M13 are decided once: the common call serves only what it
    recognises, with the general path's answer, and declines the rest."""
    start = address(anonymous)
    make = COMMON_SERVED.get(case) or COMMON_DECLINED[case]
    clear(start, 8 * P)
    kind, uffd, pagemap_fd = memwatch._selection()[3]
    if kind == lib.WW_INDEX_PAGEMAP:
        anonymous[3 * P] = 1
        common = ww.kernel.process_memwatch_common(kind, uffd, pagemap_fd, *make(start))
        assert (common is None) == (case in COMMON_DECLINED), (
            f"{case}: the common call must {'decline' if case in COMMON_DECLINED else 'serve'} "
            "it")
    outcomes = []
    for call in (memwatch.process_memwatch, memwatch._process_memwatch):
        anonymous[3 * P] = 1
        outcomes.append(_memwatch_outcome(call, make(start)))
    assert outcomes[0] == outcomes[1], f"{case}: the common call answered otherwise"


@pytest.mark.parametrize("case", [*COMMON_SERVED, *COMMON_DECLINED])
def test_the_common_call_lets_go_of_every_vec(anonymous, case):
    """No reference or buffer export outlives a call, on any path: the vec
    can still be resized in place afterwards."""
    start = address(anonymous)
    clear(start, 8 * P)
    args = (COMMON_SERVED.get(case) or COMMON_DECLINED[case])(start)
    vec = args[-1]
    before = sys.getrefcount(vec)
    handle = memwatch._selection()[3]
    for _ in range(100):
        ww.kernel.process_memwatch_common(*handle, *args)
    assert sys.getrefcount(vec) == before
    if isinstance(vec, np.ndarray) and vec.base is None and vec.flags.writeable:
        vec.resize(vec.size + 1, refcheck=False)  # BufferError while an export is held
