"""Hostile inputs: every public function fuzzed with wrong types, negative,
huge and unaligned numbers, addresses of freed and never-allocated memory,
arrays of the wrong dtype, read-only, non-contiguous, too short, and counts
larger than arrays (the Windows functions' parameter errors: docs/semantics.md
rule 15).

Every call must either succeed or fail with the documented error code (the
Windows functions) or exception (TypeError for values no C caller could pass,
ValueError for as_array sizes, OSError with EINVAL/ESRCH/EIO for
process_memwatch), and must write nothing outside the buffers it was given:
output arrays end exactly where a PROT_NONE guard page begins, the bytes around
them hold canaries (tests/guard_pages.py), and after every call the
write-watch state and every readable byte of the regions involved are compared
with the reference model (writewatch/testing/winmodel.py).

Each fuzzer runs in a child interpreter (one per function and backend), so that
a write into a guard page or any other crash fails that test alone instead of
killing the test session. Cases known to be crash-prone get their own child.

Committing huge sizes with MEM_WRITE_WATCH is kept out of the fuzzers: the
kernel allocates page tables for every write-protected page (2 MiB per GiB, so
64 TiB would take 128 GiB), which would take the machine down rather than fail.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import operator
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from forking import patience, run_python, scaled_work
from guard_pages import ARRAY_KINDS, is_addresses_array, make_array, make_vec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import writewatch as ww
from writewatch import backends
from writewatch.testing.winmodel import (
    USER_SPACE_END,
    CommitTooLargeError,
    Expect,
    WinModel,
    page_ceil,
)

P = ww.PAGE_SIZE
G = ww.ALLOCATION_GRANULARITY
RESERVE, COMMIT, WW_FLAG = ww.MEM_RESERVE, ww.MEM_COMMIT, ww.MEM_WRITE_WATCH
RW, RO, NA = ww.PAGE_READWRITE, ww.PAGE_READONLY, ww.PAGE_NOACCESS
FAILED = ww.WRITE_WATCH_FAILED
COMMIT_LIMIT = 1 << 28  # successful commits above this are skipped (see the docstring)

CI_PROFILE = settings(max_examples=scaled_work(60, at_least=20), deadline=None,
                      derandomize=True,
                      suppress_health_check=list(HealthCheck))
SOAK_PROFILE = settings(max_examples=5000, deadline=None,
                        suppress_health_check=list(HealthCheck))

def is_int(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def as_int(value: Any) -> int:
    return operator.index(value)


# ---------------------------------------------------------------------------
# hostile values

ODD = [None, 1.5, "4096", b"\x00", [0], (), object(), np.float64(1.0), 1j]
EDGE_NUMBERS = [0, 1, -1, P - 1, P, P + 1, 16 * P, G, 2**31, 2**32 - 1, 2**32, 2**47 - P,
                2**47, 2**63 - 1, 2**63, 2**64 - P, 2**64 - 1, 2**64, -(2**63), -(2**64),
                np.int64(-1), np.uint64(2**64 - 1), np.int32(P), True]
OFFSETS = [0, 1, P - 1, P, P + 1, 3 * P, 6 * P, 7 * P, 12 * P, 16 * P - 1, 16 * P, G - 1, G,
           -1, -P]


def numbers() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(EDGE_NUMBERS), st.integers(-(1 << 66), 1 << 66),
                     st.integers(0, 40 * P))


def sizes() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(0, 20 * P), st.sampled_from(EDGE_NUMBERS),
                     st.integers(2**64 - 2 * P, 2**64 + P), numbers())


def odd_or(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(strategy, strategy, strategy, strategy, st.sampled_from(ODD))


# ---------------------------------------------------------------------------
# the scene every fuzzed call aims at


class Scene:
    """Regions mirrored in a WinModel, made fresh for every example:

    a: write-watch, 16 pages committed read-write, then page 6 PAGE_READONLY,
       page 7 PAGE_NOACCESS, pages 12-15 decommitted; pages 1, 3, 4, 9 written.
    b: write-watch, 8 pages reserved only.
    c: no write watch, 4 pages committed.
    freed: the base of a released reservation.
    scratch: an ordinary numpy buffer (memory writewatch never allocated).
    """

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.model = WinModel(commit_limit=COMMIT_LIMIT)
        self.extra: list[int] = []  # real allocations the model does not hold
        self.a = self.alloc(0, 16 * P, RESERVE | COMMIT | WW_FLAG, RW)
        self.b = self.alloc(0, 8 * P, RESERVE | WW_FLAG, RW)
        self.c = self.alloc(0, 4 * P, RESERVE | COMMIT, RW)
        freed = self.alloc(0, P, RESERVE, RW)
        self.expect(ww.VirtualFree(freed, 0, ww.MEM_RELEASE),
                    self.model.virtual_free(freed, 0, ww.MEM_RELEASE))
        self.freed = freed
        self.expect(ww.VirtualProtect(self.a + 6 * P, P, RO),
                    self.model.virtual_protect(self.a + 6 * P, P, RO))
        self.expect(ww.VirtualProtect(self.a + 7 * P, P, NA),
                    self.model.virtual_protect(self.a + 7 * P, P, NA))
        self.expect(ww.VirtualFree(self.a + 12 * P, 4 * P, ww.MEM_DECOMMIT),
                    self.model.virtual_free(self.a + 12 * P, 4 * P, ww.MEM_DECOMMIT))
        for page in (1, 3, 4, 9):
            self.write(self.a + page * P + 8, bytes([page, 0xEE]))
        self.scratch = np.zeros(4 * P, np.uint8)
        self.draw_offset_in_page = data.draw(st.sampled_from([0, 8, P - 8, P - 64]),
                                             label="out offset in page")
        self.check()

    # -- building

    def alloc(self, address: int, size: int, allocation_type: int, protect: int) -> int:
        got = ww.VirtualAlloc(address, size, allocation_type, protect)
        assert got, ww.GetLastError()
        expect = self.model.virtual_alloc(address, size, allocation_type, protect,
                                          pick=lambda length: got)
        assert expect.value == got
        return got

    @staticmethod
    def expect(got: Any, expect: Expect) -> None:
        assert got == expect.value, (got, expect)

    def write(self, address: int, payload: bytes) -> None:
        ww.as_array(address, len(payload))[:] = np.frombuffer(payload, np.uint8)
        self.model.write(address, payload)

    def close(self) -> None:
        for base in [*self.model.regions, *self.extra]:
            ww.VirtualFree(base, 0, ww.MEM_RELEASE)

    # -- drawing arguments

    def addresses(self) -> st.SearchStrategy[Any]:
        named = st.builds(lambda base, offset: base + offset,
                          st.sampled_from([self.a, self.b, self.c, self.freed]),
                          st.one_of(st.sampled_from(OFFSETS), st.integers(-G, 2 * G)))
        return odd_or(st.one_of(named, named, numbers(),
                                st.just(self.scratch.ctypes.data)))

    # -- checking

    def dirty_pages(self) -> dict[int, list[int]]:
        """The real write-watch state of every write-watch region of the model."""
        result = {}
        for base, region in self.model.regions.items():
            if not region.write_watch:
                continue
            out = np.zeros(region.npages, np.uintp)
            ret, found, _ = ww.GetWriteWatch(0, base, region.size, out)
            assert ret == 0, ww.GetLastError()
            result[base] = [(int(a) - base) // P for a in out[:found]]
        return result

    def check(self) -> None:
        """Real dirty pages and every readable byte equal the model's."""
        for base, pages in self.dirty_pages().items():
            assert pages == self.model.dirty_pages(self.model.regions[base]), (
                f"dirty pages of the region at {base:#x}")
        for base, region in self.model.regions.items():
            for i in region.committed_pages():
                if region.state[i] == NA:
                    continue
                view = ww.as_array(base + i * P, P)
                assert bytes(view) == region.page_bytes(i), (
                    f"page {i} of the region at {base:#x} changed behind the model's back")


def expect_windows_failure(call: Callable[[], Any], failed: Any, codes: set[int]) -> None:
    """For a call with a non-integer argument: TypeError, or the failure value
    with one of codes as the last error. Never success."""
    ww.SetLastError(0xDEAD)
    try:
        got = call()
    except TypeError:
        return
    assert got == failed, f"a call with a non-integer argument returned {got!r}"
    assert ww.GetLastError() in codes


# ---------------------------------------------------------------------------
# the fuzzers (each runs in a child interpreter: see run_fuzzer)


def fuzz_get_write_watch(data: st.DataObject) -> None:
    scene = Scene(data)
    try:
        flags = data.draw(odd_or(st.one_of(st.sampled_from([0, 1, 1, 2, 3, -1, 1 << 31]),
                                           numbers())), label="flags")
        base = data.draw(scene.addresses(), label="base")
        size = data.draw(odd_or(sizes()), label="size")
        kind = data.draw(st.sampled_from(ARRAY_KINDS), label="array kind")
        length = data.draw(st.integers(0, 40), label="array length")
        count = data.draw(st.one_of(st.none(), st.none(), st.integers(-2, 45),
                                    st.sampled_from([2**32, 2**64 - 1, 2**64, np.int64(3)]),
                                    st.sampled_from(ODD)), label="count")
        addresses, guard = make_array(kind, length,
                                      scene.a + 2 * P + scene.draw_offset_in_page)
        if guard is not None:
            guard.snapshot()
        call = lambda: ww.GetWriteWatch(flags, base, size, addresses, count)  # noqa: E731

        if not is_addresses_array(addresses):
            with pytest.raises(TypeError):
                call()
            found = 0
        elif not all(is_int(v) for v in (flags, base, size)) or not (
                count is None or is_int(count)):
            expect_windows_failure(call, (FAILED, count if count is not None else (
                0 if addresses is None else len(addresses)), 0),
                {ww.ERROR_INVALID_PARAMETER, ww.ERROR_NOACCESS})
            found = 0
        else:
            capacity = None if addresses is None else len(addresses)
            writable = addresses is None or addresses.flags.writeable
            ww.SetLastError(0xDEAD)
            ret, found, granularity = call()
            error = ww.GetLastError()
            expect = scene.model.get_write_watch(as_int(flags), as_int(base), as_int(size),
                                                 capacity, None if count is None
                                                 else as_int(count), writable)
            want = expect.value
            assert (ret, found, granularity) == want[:3], (
                f"got {(ret, found, granularity)} (error {error}); "
                f"model {want[:3]} (error {expect.error})")
            if expect.ok:
                assert [int(a) for a in addresses[:found]] == want[3]
                if kind == "in-watched-region" and found:
                    # The output array is watched memory: filling it is a write.
                    scene.model.write(addresses.ctypes.data, addresses[:found].tobytes())
            else:
                assert error == expect.error
        if guard is not None:
            start = addresses.ctypes.data if isinstance(addresses, np.ndarray) else 0
            changed = guard.changed_outside(start, start + 8 * found)
            assert not changed, f"bytes outside the reported entries changed at {changed}"
        scene.check()
    finally:
        scene.close()


def fuzz_reset_write_watch(data: st.DataObject) -> None:
    scene = Scene(data)
    try:
        base = data.draw(scene.addresses(), label="base")
        size = data.draw(odd_or(sizes()), label="size")
        if not (is_int(base) and is_int(size)):
            expect_windows_failure(lambda: ww.ResetWriteWatch(base, size), FAILED,
                                   {ww.ERROR_INVALID_PARAMETER})
        else:
            ww.SetLastError(0xDEAD)
            got = ww.ResetWriteWatch(base, size)
            expect = scene.model.reset_write_watch(as_int(base), as_int(size))
            assert got == expect.value, (got, expect)
            if not expect.ok:
                assert ww.GetLastError() == expect.error
        scene.check()
    finally:
        scene.close()


ALLOCATION_TYPES = [RESERVE | COMMIT | WW_FLAG, RESERVE | WW_FLAG, RESERVE, COMMIT,
                    RESERVE | COMMIT, WW_FLAG, COMMIT | WW_FLAG, 0, ww.MEM_RELEASE,
                    RESERVE | 0x40, 0x80000000 | COMMIT]
PROTECTIONS = [RW, RO, NA, 0, 3, 0x40, 0x104, 0x80000000]


def fuzz_virtual_alloc(data: st.DataObject) -> None:
    scene = Scene(data)
    try:
        address = data.draw(st.one_of(st.just(0), scene.addresses()), label="address")
        size = data.draw(odd_or(sizes()), label="size")
        allocation_type = data.draw(odd_or(st.one_of(st.sampled_from(ALLOCATION_TYPES),
                                                     numbers())), label="type")
        protect = data.draw(odd_or(st.one_of(st.sampled_from(PROTECTIONS), numbers())),
                            label="protect")
        if not all(is_int(v) for v in (address, size, allocation_type, protect)):
            got = None
            with contextlib.suppress(TypeError):
                got = ww.VirtualAlloc(address, size, allocation_type, protect)
            if got:
                scene.extra.append(got)
            assert not got, "VirtualAlloc succeeded with a non-integer argument"
            return
        address, size = as_int(address), as_int(size)
        allocation_type, protect = as_int(allocation_type), as_int(protect)
        try:
            predicted = copy.deepcopy(scene.model).virtual_alloc(
                address, size, allocation_type, protect, pick=lambda length: -1)
        except CommitTooLargeError:
            assume(False)  # see the module docstring
        ww.SetLastError(0xDEAD)
        got = ww.VirtualAlloc(address, size, allocation_type, protect)
        error = ww.GetLastError()
        anywhere = predicted.value == -1
        fixed_reserve = predicted.ok and not anywhere and allocation_type & RESERVE
        if got and (not predicted.ok or (fixed_reserve and got != predicted.value)):
            scene.extra.append(got)
        if not predicted.ok:
            assert (got, error) == (0, predicted.error), (
                f"VirtualAlloc({address:#x}, {size:#x}, {allocation_type:#x}, {protect:#x}) "
                f"returned {got:#x} (error {error}); the model expects error {predicted.error}")
        elif not got:
            # Only the kernel can refuse what the model allows: no address space
            # left (8), or a mapping the model does not know at a fixed address.
            assert error == ww.ERROR_NOT_ENOUGH_MEMORY or (
                fixed_reserve and error == ww.ERROR_INVALID_ADDRESS), (
                f"VirtualAlloc failed with {error}; the model expects success")
        else:
            if not anywhere:
                assert got == predicted.value, (
                    f"VirtualAlloc({address:#x}, ...) returned {got:#x}, not "
                    f"{predicted.value:#x}")

            def pick(length: int) -> int:
                assert got % G == 0 and not scene.model.overlaps(got, got + length)
                return got

            assert scene.model.virtual_alloc(address, size, allocation_type, protect,
                                             pick).value == got
        scene.check()
    finally:
        scene.close()


FREE_TYPES = [ww.MEM_DECOMMIT, ww.MEM_RELEASE, ww.MEM_DECOMMIT | ww.MEM_RELEASE, 0,
              ww.MEM_FREE, 0x1000, -1]


def fuzz_virtual_free(data: st.DataObject) -> None:
    scene = Scene(data)
    try:
        address = data.draw(scene.addresses(), label="address")
        size = data.draw(odd_or(st.one_of(st.just(0), sizes())), label="size")
        free_type = data.draw(odd_or(st.one_of(st.sampled_from(FREE_TYPES), numbers())),
                              label="free type")
        if not all(is_int(v) for v in (address, size, free_type)):
            expect_windows_failure(lambda: ww.VirtualFree(address, size, free_type), False,
                                   {ww.ERROR_INVALID_PARAMETER, ww.ERROR_INVALID_ADDRESS})
        else:
            ww.SetLastError(0xDEAD)
            got = ww.VirtualFree(address, size, free_type)
            error = ww.GetLastError()
            expect = scene.model.virtual_free(as_int(address), as_int(size), as_int(free_type))
            assert got == expect.value, (got, error, expect)
            if not expect.ok:
                assert error == expect.error
        scene.check()
    finally:
        scene.close()


def fuzz_virtual_protect(data: st.DataObject) -> None:
    scene = Scene(data)
    try:
        address = data.draw(scene.addresses(), label="address")
        size = data.draw(odd_or(sizes()), label="size")
        protect = data.draw(odd_or(st.one_of(st.sampled_from(PROTECTIONS), numbers())),
                            label="protect")
        if not all(is_int(v) for v in (address, size, protect)):
            expect_windows_failure(lambda: ww.VirtualProtect(address, size, protect),
                                   (False, 0),
                                   {ww.ERROR_INVALID_PARAMETER, ww.ERROR_INVALID_ADDRESS})
        else:
            ww.SetLastError(0xDEAD)
            got = ww.VirtualProtect(address, size, protect)
            error = ww.GetLastError()
            expect = scene.model.virtual_protect(as_int(address), as_int(size),
                                                 as_int(protect))
            assert got == expect.value, (got, error, expect)
            if not expect.ok:
                assert error == expect.error
        scene.check()
    finally:
        scene.close()


def fuzz_virtual_query(data: st.DataObject) -> None:
    scene = Scene(data)
    try:
        address = data.draw(scene.addresses(), label="address")
        if not is_int(address):
            expect_windows_failure(lambda: ww.VirtualQuery(address), None,
                                   {ww.ERROR_INVALID_PARAMETER})
            return
        got = ww.VirtualQuery(address)
        expect = scene.model.virtual_query(as_int(address))
        if expect.value is None:
            assert got is None and ww.GetLastError() == expect.error, got
        elif expect.value[4] == ww.MEM_FREE:
            assert got is not None
            page = expect.value[0]
            assert (got.BaseAddress, got.AllocationBase, got.State, got.Protect) == (
                page, 0, ww.MEM_FREE, NA)
            following = [base for base in scene.model.regions if base > page]
            assert 0 < got.RegionSize <= min(following, default=USER_SPACE_END) - page
        else:
            assert tuple(got) == expect.value
        scene.check()
    finally:
        scene.close()


DTYPES = [np.uint8, np.uint8, np.uint32, np.uintp, np.float64, ">u4", "V3", np.bool_,
          np.complex128, [("a", "u1"), ("b", "<u4")], object, str, "V0", "S0", "U0",
          "not a dtype", None, 3]


def fuzz_as_array(data: st.DataObject) -> None:
    scene = Scene(data)
    try:
        address = data.draw(scene.addresses(), label="address")
        size = data.draw(odd_or(st.one_of(st.integers(0, 3 * P), sizes())), label="size")
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        try:
            numpy_dtype = np.dtype(dtype)
        except TypeError:
            numpy_dtype = None
        try:
            view = ww.as_array(address, size, dtype)
        except TypeError:
            assert (not (is_int(address) and is_int(size)) or numpy_dtype is None
                    or numpy_dtype.hasobject), "TypeError for integer arguments and a dtype"
            return
        except ValueError as exc:
            assert not isinstance(exc, ww.WriteWatchError)
            assert numpy_dtype is not None and is_int(size)
            assert (as_int(size) == 0 or numpy_dtype.itemsize == 0
                    or as_int(size) % numpy_dtype.itemsize), f"ValueError: {exc}"
            return
        except ww.WriteWatchError as exc:
            if not (is_int(address) and is_int(size)):
                # An integer argument out of range, checked before the other's type.
                assert exc.winerror == ww.ERROR_INVALID_PARAMETER
                assert any(is_int(v) and not 0 <= as_int(v) < 1 << 64 for v in (address, size))
                return
            expect = scene.model.view(as_int(address), as_int(size))
            assert not expect.ok and exc.winerror in (expect.error, ww.ERROR_INVALID_PARAMETER)
            return
        # A view was made: the model must allow it, and it must be exactly that memory.
        assert is_int(address) and is_int(size) and numpy_dtype is not None
        address, size = as_int(address), as_int(size)
        assert numpy_dtype.itemsize and size % numpy_dtype.itemsize == 0
        expect = scene.model.view(address, size)
        assert expect.ok, f"as_array({address:#x}, {size}) gave a view; model: {expect}"
        assert view.ctypes.data == address and view.nbytes == size
        assert view.dtype == numpy_dtype
        assert view.flags.writeable == (not expect.value)
        if view.flags.writeable:
            raw = view.view(np.uint8)
            value = int(raw[-1])
            raw[-1] = value  # a write, even of the same value, dirties the page
            scene.model.write(address + size - 1, bytes([value]))
        del view
        scene.check()
    finally:
        scene.close()


def fuzz_prepare_kernel_write(data: st.DataObject) -> None:
    """prepare_kernel_write may mark the writable committed pages of its range
    written (backends whose armed pages the kernel cannot write do): nothing
    else may change."""
    scene = Scene(data)
    try:
        address = data.draw(scene.addresses(), label="address")
        size = data.draw(odd_or(sizes()), label="size")
        before = scene.dirty_pages()
        try:
            ww.prepare_kernel_write(address, size)
        except TypeError:
            assert not (is_int(address) and is_int(size))
            return
        except ww.WriteWatchError as exc:
            assert exc.winerror == ww.ERROR_INVALID_PARAMETER
            assert not all(is_int(v) and 0 <= as_int(v) < 1 << 64 for v in (address, size))
            return
        address, size = as_int(address), as_int(size)
        for base, pages in scene.dirty_pages().items():
            region = scene.model.regions[base]
            allowed = set(before[base]) | {
                i for i in region.committed_pages() if region.state[i] == RW
                and address < base + (i + 1) * P and base + i * P < address + size}
            assert set(pages) <= allowed, f"pages {sorted(set(pages) - allowed)} became dirty"
            assert set(before[base]) <= set(pages), "prepare_kernel_write reset pages"
            region.dirty.update(pages)
        scene.check()
    finally:
        scene.close()


def fuzz_process_memwatch(data: st.DataObject) -> None:
    scene = Scene(data)
    own = os.pidfd_open(os.getpid())
    try:
        pidfd = data.draw(st.one_of(st.sampled_from([0, 0, 0, own, -1, 1, 2**31, 2**70]),
                                    st.sampled_from(ODD)), label="pidfd")
        start = data.draw(st.one_of(scene.addresses(), st.sampled_from(
            [scene.a, scene.a + P, scene.a + 3 * P])), label="start")
        length = data.draw(odd_or(st.one_of(st.integers(0, 20 * P), sizes())), label="length")
        flags = data.draw(odd_or(st.one_of(st.integers(0, 8), numbers())), label="flags")
        kind = data.draw(st.sampled_from(["int64"] * 6 + ["none", "readonly", "uint64",
                                                         "strided", "2-D", "list", "empty"]),
                         label="vec kind")
        length_of_vec = data.draw(st.integers(0, 20), label="vec length")
        vec_len = data.draw(st.one_of(st.none(), st.none(), st.integers(-1, 25),
                                      st.sampled_from([2**64, 1.0, "1"])), label="vec_len")
        vec, guard = make_vec(kind, length_of_vec)
        if guard is not None:
            guard.snapshot()
        before = scene.dirty_pages()
        try:
            result = ww.process_memwatch(pidfd, start, length, flags, vec, vec_len)
        except TypeError:
            assert not all(is_int(v) for v in (pidfd, start, length, flags)) or not (
                vec_len is None or is_int(vec_len)), "TypeError for integer arguments"
            result = None
        except OSError as exc:
            assert exc.errno in (errno.EINVAL, errno.ESRCH, errno.EIO), exc
            assert not isinstance(exc, ww.WriteWatchError)
            result = None
        after = scene.dirty_pages()
        region = scene.model.regions[scene.a]
        if result is not None:
            assert isinstance(result, int) and result >= 0
            assert isinstance(vec, np.ndarray) or result == 0
            start, length = as_int(start), as_int(length)
            if result:
                assert result <= len(vec) and (vec_len is None or result <= as_int(vec_len))
                offsets = [int(v) for v in vec[:result]]
                assert offsets == sorted(set(offsets)), "offsets not ascending"
                pages = [(start + v - scene.a) // P for v in offsets]
                assert all(v % P == 0 for v in offsets)
                assert set(pages) <= set(before[scene.a]), "reported a page never written"
        # Nothing becomes dirty; CLEAR may only clear.
        for base in before:
            assert set(after[base]) <= set(before[base])
        region.dirty = set(after[scene.a])
        if guard is not None:
            start_address = vec.ctypes.data
            end = start_address + 8 * (result or 0)
            changed = guard.changed_outside(start_address, end)
            assert not changed, f"bytes outside the reported entries changed at {changed}"
        scene.check()
    finally:
        os.close(own)
        scene.close()


BACKENDS = ["auto", "auto", "pagemap", "uffd", "mprotect", "nope", "", 3]


def fuzz_watched_memory(data: st.DataObject) -> None:
    """WatchedMemory and its methods: everything stays inside the block."""
    size = data.draw(odd_or(st.one_of(st.integers(1, 40 * P), st.sampled_from(
        [16 * P, G, 0, -1, 2**64, 2**47]))), label="size")
    commit = data.draw(st.booleans(), label="commit")
    protect = data.draw(odd_or(st.sampled_from(PROTECTIONS)), label="protect")
    backend = data.draw(st.sampled_from(BACKENDS), label="backend")
    if is_int(size) and commit and 0 < as_int(size) < 1 << 64:
        assume(as_int(size) <= COMMIT_LIMIT)
    try:
        mem = ww.WatchedMemory(size, commit=commit, protect=protect, backend=backend)
    except ww.WriteWatchError:
        return
    except (TypeError, ValueError) as exc:
        assert not isinstance(exc, ww.WriteWatchError)
        return
    neighbour = ww.VirtualAlloc(mem.address + mem.size, P, RESERVE | COMMIT, RW)
    try:
        assert mem.size == page_ceil(as_int(size))
        offset = data.draw(st.one_of(st.integers(-2 * P, mem.size + 2 * P),
                                     st.sampled_from([0, mem.size, -1, -P, 2**64])),
                           label="offset")
        length = data.draw(st.one_of(st.none(), st.integers(-1, mem.size + 2 * P)),
                           label="length")
        method = data.draw(st.sampled_from(["view", "commit", "written", "reset"]),
                           label="method")
        end = offset + (mem.size - offset if length is None else length)
        inside = offset >= 0 and end <= mem.size and end > offset
        if method == "view":
            try:
                view = mem.view(offset, length)
            except (ww.WriteWatchError, ValueError, TypeError):
                return
            assert inside, (f"view({offset}, {length}) of a {mem.size}-byte block gave "
                            f"memory at {view.ctypes.data - mem.address:+#x} from its start")
        elif method == "commit":
            try:
                mem.commit(offset, length if length is not None else P,
                           data.draw(st.sampled_from([RW, RO, NA, 0]), label="protect"))
            except (ww.WriteWatchError, ValueError, TypeError):
                return
            end = offset + (P if length is None else length)
            assert offset >= 0 and end <= mem.size, (
                f"commit({offset}, {length}) of a {mem.size}-byte block succeeded")
        elif method == "written":
            length_of_out = data.draw(st.integers(0, 40), label="out length")
            kind = data.draw(st.sampled_from(["uintp", "none", "int64", "readonly", "empty"]),
                             label="out kind")
            out = None if kind == "none" else np.zeros(
                length_of_out, np.int64 if kind == "int64" else np.uintp)
            if kind == "empty":
                out = out[:0]
            if kind == "readonly":
                out.flags.writeable = False
            try:
                got = mem.written(reset=data.draw(st.booleans(), label="reset"), out=out)
            except (ww.WriteWatchError, TypeError):
                return
            assert len(got) == 0 or ((got >= mem.address).all() and (
                got < mem.address + mem.size).all())
        else:
            mem.reset()
    finally:
        mem.close()
        if neighbour:
            ww.VirtualFree(neighbour, 0, ww.MEM_RELEASE)


FUZZERS: dict[str, Callable[[st.DataObject], None]] = {
    "GetWriteWatch": fuzz_get_write_watch,
    "ResetWriteWatch": fuzz_reset_write_watch,
    "VirtualAlloc": fuzz_virtual_alloc,
    "VirtualFree": fuzz_virtual_free,
    "VirtualProtect": fuzz_virtual_protect,
    "VirtualQuery": fuzz_virtual_query,
    "as_array": fuzz_as_array,
    "prepare_kernel_write": fuzz_prepare_kernel_write,
    "process_memwatch": fuzz_process_memwatch,
    "WatchedMemory": fuzz_watched_memory,
}


def run_fuzzer(name: str) -> None:
    """Entry point of the child interpreter."""
    soak = os.environ.get("WRITEWATCH_SOAK", "").strip() not in ("", "0")
    body = FUZZERS[name]
    test = settings(SOAK_PROFILE if soak else CI_PROFILE)(given(data=st.data())(body))
    test()


@pytest.mark.parametrize("name", list(FUZZERS))
def test_fuzz_public_function(name, soak):
    """Hypothesis fuzz of one public function, in a child interpreter."""
    result = run_python(f"import test_hostile_inputs as t\nt.run_fuzzer({name!r})\n",
                       timeout=patience(3600 if soak else 300),
                       env={"WRITEWATCH_SOAK": "1" if soak else "0"})
    assert result.returncode == 0, (
        f"exit status {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")


# ---------------------------------------------------------------------------
# what the fuzzers found, pinned down (each also in the fuzzers' reach)


def test_size_that_wraps_the_address_space_fails_87(watched):
    """Rule 15: a range that leaves the region once rounded to pages fails with
    87. A size within a page of 2**64 wraps base+size around to just below
    base; the range must still be refused, never read as the first page."""
    region = watched(4)
    region.view()[0] = 1
    out = np.full(4, 0xDEAD, np.uintp)
    for base, size in [(region.base + 100, 2**64 - 50), (region.base, 2**64 - 1)]:
        for flags in (0, ww.WRITE_WATCH_FLAG_RESET):
            ww.SetLastError(0)
            assert ww.GetWriteWatch(flags, base, size, out) == (FAILED, 4, 0), (
                f"GetWriteWatch({flags}, base{base - region.base:+}, {size:#x})")
            assert ww.GetLastError() == ww.ERROR_INVALID_PARAMETER
        ww.SetLastError(0)
        assert ww.ResetWriteWatch(base, size) == FAILED
        assert ww.GetLastError() == ww.ERROR_INVALID_PARAMETER
    assert region.written() == [0], "a failed call reset the page"


def test_reserving_in_the_low_64k_fails_87():
    """A reservation's address is rounded down to 64 KiB; in the first 64 KiB
    that is 0, which Windows (and Wine: "disallow low 64k") refuses with 87. It
    must never become "anywhere": the caller asked for that address."""
    wrong = []
    for allocation_type in (RESERVE, RESERVE | COMMIT, RESERVE | COMMIT | WW_FLAG):
        for address in (1, P, 0xFFFF):
            ww.SetLastError(0)
            got = ww.VirtualAlloc(address, P, allocation_type, RW)
            error = ww.GetLastError()
            info = ww.VirtualQuery(got) if got else None
            if got:
                ww.VirtualFree(got, 0, ww.MEM_RELEASE)
            if (got, error) != (0, ww.ERROR_INVALID_PARAMETER):
                wrong.append(f"VirtualAlloc({address:#x}, {P:#x}, {allocation_type:#x}) "
                             f"returned {got:#x}, last error {error}" + (
                                 f", State {info.State:#x} RegionSize {info.RegionSize:#x}"
                                 if info else ""))
    assert not wrong, "\n".join(wrong)


@pytest.mark.any_backend
def test_as_array_zero_sized_dtype_is_value_error(watched):
    """as_array documents ValueError for a size that is not a positive multiple
    of the dtype's itemsize; an itemsize of 0 must not divide by zero."""
    region = watched(1)
    for dtype in (str, "V0", "S0"):
        with pytest.raises((ValueError, TypeError)) as info:
            ww.as_array(region.base, P, dtype)
        assert not isinstance(info.value, ZeroDivisionError), dtype


@pytest.mark.parametrize("method", ["view", "commit"])
def test_watched_memory_stays_inside_its_block(method):
    """WatchedMemory.view and .commit take offsets into the block: an offset
    past its end must be refused even when another allocation lies there."""
    # The kernel places mappings top-down: a block made right after the
    # neighbour usually lands just below it. A hole left by earlier tests can
    # catch the block instead; keeping the misses until the end fills the
    # holes, so a later try lands right.
    misses: list[tuple[int, ww.WatchedMemory]] = []
    try:
        for _ in range(32):
            neighbour = ww.VirtualAlloc(0, G, RESERVE, RW)
            assert neighbour, ww.GetLastError()
            mem = ww.WatchedMemory(G)
            if mem.address + G == neighbour:
                break
            misses.append((neighbour, mem))
        else:
            pytest.fail("no block landed right below its neighbour in 32 tries")
        try:
            if method == "commit":
                with pytest.raises((ww.WriteWatchError, ValueError)):
                    mem.commit(G, P)
                assert ww.VirtualQuery(neighbour).State == ww.MEM_RESERVE
            else:
                assert ww.VirtualAlloc(neighbour, P, COMMIT, RW) == neighbour
                with pytest.raises((ww.WriteWatchError, ValueError)):
                    mem.view(G, P)
        finally:
            misses.append((neighbour, mem))
    finally:
        for address, block in misses:
            block.close()
            assert ww.VirtualFree(address, 0, ww.MEM_RELEASE), ww.GetLastError()


def test_numpy_integers_are_integers_everywhere(watched):
    """numpy integer scalars (what indexing a numpy array gives) are accepted
    wherever an integer is, with the same result as a Python int: never an
    OverflowError from numpy's fixed-width arithmetic."""
    region = watched(4)
    region.view()[P] = 1
    base, size = region.base, region.size
    out = np.zeros(4, np.uintp)
    assert ww.GetWriteWatch(np.uint32(0), np.uint64(base), np.int32(size), out,
                            np.int16(4)) == (0, 1, P)
    assert ww.VirtualQuery(np.uint64(base + P)).State == ww.MEM_COMMIT
    assert ww.VirtualProtect(np.int64(base), np.int32(P), np.int8(RW)) == (True, RW)
    vec = np.zeros(4, np.int64)
    for length in (np.int32(size), np.uint16(size), np.int64(size)):
        got = ww.process_memwatch(np.int32(0), np.uint64(base), length, ww.MEMWATCH_SD_GET,
                                  vec, np.int8(4))
        assert (got, vec[0]) == (1, P), type(length)


# ---------------------------------------------------------------------------
# crash-prone cases, each in a child interpreter


@pytest.mark.parametrize("how", ["read-only", "no-access", "decommitted"])
def test_addresses_array_in_inaccessible_memory_fails_998_without_crashing(how):
    """An addresses array over VirtualAlloc memory that was made read-only,
    PAGE_NOACCESS or decommitted after the view was taken: numpy still calls it
    writable, but GetWriteWatch must fail with ERROR_NOACCESS (as Windows does
    for a buffer it cannot write) instead of crashing the interpreter, and
    must leave the write-watch state alone."""
    result = run_python(f"""
        import numpy as np
        import writewatch as ww
        P = ww.PAGE_SIZE
        mem = ww.WatchedMemory(16 * P)
        mem.array[::P] = 1
        other = ww.VirtualAlloc(0, 4 * P, ww.MEM_RESERVE | ww.MEM_COMMIT, ww.PAGE_READWRITE)
        out = ww.as_array(other, 4 * P, np.uintp)
        how = {how!r}
        if how == "read-only":
            assert ww.VirtualProtect(other, 4 * P, ww.PAGE_READONLY)[0]
        elif how == "no-access":
            assert ww.VirtualProtect(other, 4 * P, ww.PAGE_NOACCESS)[0]
        else:
            assert ww.VirtualFree(other, 4 * P, ww.MEM_DECOMMIT)
        print("calling", flush=True)
        for flags in (0, ww.WRITE_WATCH_FLAG_RESET):
            ret = ww.GetWriteWatch(flags, mem.address, mem.size, out)
            assert ret == (ww.WRITE_WATCH_FAILED, len(out), 0), ret
            assert ww.GetLastError() == ww.ERROR_NOACCESS, ww.GetLastError()
        assert len(mem.written()) == 16, "a failed call reset pages"
        print("survived", flush=True)
    """, timeout=patience(60))
    assert result.returncode == 0 and result.stdout == "calling\nsurvived\n", (
        f"exit status {result.returncode}; stdout {result.stdout!r}\n{result.stderr[-3000:]}")


def test_process_memwatch_vec_in_inaccessible_memory_does_not_crash():
    """The same for process_memwatch's vec: EINVAL (or EFAULT-as-EIO), not a crash."""
    result = run_python("""
        import errno
        import numpy as np
        import writewatch as ww
        P = ww.PAGE_SIZE
        mem = ww.WatchedMemory(16 * P)
        mem.array[::P] = 1
        other = ww.VirtualAlloc(0, 4 * P, ww.MEM_RESERVE | ww.MEM_COMMIT, ww.PAGE_READWRITE)
        vec = ww.as_array(other, 4 * P, np.int64)
        assert ww.VirtualProtect(other, 4 * P, ww.PAGE_READONLY)[0]
        print("calling", flush=True)
        try:
            ww.process_memwatch(0, mem.address, mem.size, ww.MEMWATCH_SD_GET, vec)
        except OSError as exc:
            assert exc.errno in (errno.EINVAL, errno.EIO), exc
        else:
            raise AssertionError("process_memwatch wrote into read-only memory")
        assert len(mem.written()) == 16
        print("survived", flush=True)
    """, timeout=patience(60))
    assert result.returncode == 0 and result.stdout == "calling\nsurvived\n", (
        f"exit status {result.returncode}; stdout {result.stdout!r}\n{result.stderr[-3000:]}")


def test_writes_into_a_view_through_every_dtype_stay_in_place(watched):
    """A view with a non-uint8 dtype at an unaligned address writes exactly its
    bytes: the pages around it stay clean and unchanged."""
    region = watched(4)
    size = 3 * 2729  # ends 2 bytes before page 3
    view = ww.as_array(region.base + P + 3, size, np.dtype([("a", "u1"), ("b", "<u2")]))
    view["b"] = 0xFFFF
    memory = region.view()
    assert not memory[:P + 3].any() and not memory[P + 3 + size:].any()
    assert memory[P + 3:P + 3 + size].reshape(-1, 3)[:, 1:].all()
    assert region.written() == [1, 2]


# ---------------------------------------------------------------------------
# faults outside watched memory, each in a child interpreter

FAULTS = {
    "write-reserved-page": "ctypes.memset(base + 8 * P, 1, 1)",
    "read-noaccess-page": "ctypes.string_at(base + 2 * P, 1)",
    "write-readonly-page": "ctypes.memset(base + 3 * P, 1, 1)",
    "read-decommitted-page": "ctypes.string_at(base + P, 1)",
    "null-pointer": "ctypes.string_at(8)",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_genuine_segfault_in_and_around_watched_memory_kills_with_a_traceback(fault):
    """A real access violation, inside a write-watch reservation or elsewhere,
    kills the process with SIGSEGV after faulthandler printed where it
    happened, with the backend's fault handling installed and in use."""
    result = run_python(f"""
        import ctypes, faulthandler
        faulthandler.enable()
        import writewatch as ww
        P = ww.PAGE_SIZE
        base = ww.VirtualAlloc(0, 16 * P, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH, ww.PAGE_NOACCESS)
        assert ww.VirtualAlloc(base, 4 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE) == base
        ww.as_array(base, 4 * P)[::P] = 1     # tracked writes: the handling is in use
        assert ww.VirtualFree(base + P, P, ww.MEM_DECOMMIT)
        assert ww.VirtualProtect(base + 2 * P, P, ww.PAGE_NOACCESS)[0]
        assert ww.VirtualProtect(base + 3 * P, P, ww.PAGE_READONLY)[0]
        out = __import__("numpy").zeros(16, __import__("numpy").uintp)
        assert ww.GetWriteWatch(0, base, 16 * P, out)[:2] == (0, 3)
        print("armed", flush=True)
        def crash():
            {FAULTS[fault]}
        crash()
        print("survived", flush=True)
    """, timeout=patience(60))
    assert result.stdout == "armed\n", result.stderr[-3000:]
    assert result.returncode == -11, (result.returncode, result.stderr[-3000:])
    assert "Fatal Python error: Segmentation fault" in result.stderr
    assert "in crash" in result.stderr, result.stderr[-3000:]


@pytest.mark.any_backend
def test_faulthandler_enabled_after_writewatch_keeps_tracking_and_still_reports():
    """mprotect backend: faulthandler enabled after writewatch installed its
    SIGSEGV handler (a program calling faulthandler.enable() late, or any
    library installing a handler) must not turn tracked writes into fatal
    errors, at least once writewatch has been called again; a genuine fault
    still gets faulthandler's traceback."""
    if kernel_status("mprotect"):
        pytest.skip(f"mprotect backend unavailable: {kernel_status('mprotect')}")
    result = run_python("""
        import ctypes, faulthandler
        faulthandler.disable()
        import writewatch as ww
        P = ww.PAGE_SIZE
        first = ww.WatchedMemory(16 * P)
        first.array[0] = 1                    # writewatch's handler is installed
        faulthandler.enable()
        second = ww.WatchedMemory(16 * P)     # writewatch runs again after it
        first.array[5 * P] = 1
        second.array[2 * P] = 1
        assert [int(a - first.address) // P for a in first.written()] == [0, 5]
        assert [int(a - second.address) // P for a in second.written()] == [2]
        print("tracked", flush=True)
        def crash():
            ctypes.string_at(8)
        crash()
    """, timeout=patience(60), env={"WRITEWATCH_BACKEND": "mprotect"})
    assert result.stdout == "tracked\n", (result.returncode, result.stderr[-3000:])
    assert result.returncode == -11
    assert "Fatal Python error: Segmentation fault" in result.stderr
    assert "in crash" in result.stderr


def kernel_status(name: str) -> str:

    return backends.backend_status()[name]
