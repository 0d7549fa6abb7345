"""WatchedBuffer: write watch over buffers Python already has, on every backend
(conftest runs each test once per backend), and aligned_empty."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import threading
import time
import weakref

import numpy as np
import pytest
from forking import patience, run_forked, scaled_work
from native_writers import NativeWriters

import writewatch as ww

P = ww.PAGE_SIZE


def vma_flags(start: int, end: int) -> list[tuple[str, str]]:
    """(permissions, VmFlags) of each mapping of /proc/self/smaps that overlaps
    [start, end)."""
    found: list[tuple[str, str]] = []
    with open("/proc/self/smaps") as smaps:
        current: tuple[str, int, int] | None = None
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                low, high = (int(part, 16) for part in head[0].split("-"))
                current = (head[1], low, high)
            elif head[0] == "VmFlags:" and current is not None:
                perms, low, high = current
                if low < end and start < high:
                    found.append((perms, " ".join(head[1:])))
    return found


def readv_into(buffer: memoryview | np.ndarray, data: bytes) -> int:
    """The kernel writes data into buffer (read(2) from a pipe)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
        return os.readv(read_end, [buffer])
    finally:
        os.close(read_end)
        os.close(write_end)


# -- what can be watched


def test_numpy_rows_pages_and_offsets():
    state = ww.aligned_empty((1000, 512), np.float64)  # rows of exactly one page
    with ww.WatchedBuffer(state) as watched:
        assert watched.written().tolist() == []  # watching starts clean
        state[[3, 700]] += 1
        assert watched.written(unit="row").tolist() == [3, 700]
        assert watched.written(unit="page").tolist() == [3, 700]
        assert watched.written(unit="offset").tolist() == [3 * P, 700 * P]
        assert watched.written(unit="address").tolist() == [state.ctypes.data + 3 * P,
                                                             state.ctypes.data + 700 * P]
        assert watched.written(reset=True, unit="row").tolist() == [3, 700]
        assert watched.written(unit="row").tolist() == []
        state[5] = 1
        answer = watched.written()  # owns its memory: not a view of a 1000-entry array
        assert answer.tolist() == [5 * P] and answer.base is None and answer.dtype == np.uintp


@pytest.mark.parametrize("row_bytes", [8, 24, 1000, P, 3 * P + 8, 5 * P])
def test_rows_are_the_rows_the_written_pages_touch(row_bytes):
    rows = max(3 * P // row_bytes, 4) * 8
    state = ww.aligned_empty((rows, row_bytes), np.uint8)
    rng = np.random.default_rng(row_bytes)
    with ww.WatchedBuffer(state) as watched:
        touched = np.unique(rng.integers(0, state.size, 6))
        state.reshape(-1)[touched] = 1
        pages = np.unique(touched // P)
        expected = sorted({row for page in pages.tolist()
                           for row in range(page * P // row_bytes,
                                            min(((page + 1) * P - 1) // row_bytes, rows - 1) + 1)})
        assert watched.written(unit="page").tolist() == pages.tolist()
        assert watched.written(unit="row").tolist() == expected
        # Capped: the smallest out that holds one page's rows, until nothing is left.
        per_page = min((P - 1) // row_bytes + 2, rows)
        got: list[int] = []
        for _ in range(len(expected) + 1):
            chunk = watched.written(reset=True, unit="row", out=np.zeros(per_page, np.uintp))
            if not len(chunk):
                break
            got += chunk.tolist()
        assert sorted(set(got)) == expected
        assert watched.written(unit="row").tolist() == []


def test_bytearray_memoryview_ctypes_and_mmap():
    made = [bytearray(5 * P), (ctypes.c_int32 * (3 * P)).from_buffer(ww.aligned_empty(3 * P * 4,
                                                                                      np.uint8)),
            mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)]
    made.append(memoryview(ww.aligned_empty(4 * P, np.uint8))[P:])
    for buffer in made:
        with ww.WatchedBuffer(buffer) as watched:
            view = memoryview(buffer).cast("B")
            view[2 * P + 1] = 7
            offsets = watched.written(reset=True).tolist()
            page = (watched.page_offset + 2 * P + 1) // P
            # Only pages shared with other memory (a bytearray's) can read written again.
            shared = {0, watched.npages - 1} if watched.shares_pages else set()
            assert set(watched.written(unit="page").tolist()) <= shared
            assert max(page * P - watched.page_offset, 0) in offsets, type(buffer)
            view.release()


def test_a_bytearray_cannot_be_resized_nor_an_mmap_closed_while_watched():
    data = bytearray(3 * P)
    block = mmap.mmap(-1, 2 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with ww.WatchedBuffer(data), ww.WatchedBuffer(block):
        with pytest.raises(BufferError):
            data.extend(b"x")
        with pytest.raises(BufferError):
            block.close()
    data.extend(b"x")
    block.close()


def test_an_array_of_a_dtype_numpy_exports_no_buffer_for():
    times = ww.aligned_empty(P, "datetime64[ns]")
    with ww.WatchedBuffer(times) as watched:
        times[P // 8 * 3] = np.datetime64("2024-01-01")
        # Rows are 8 bytes: the written page touches 512 of them.
        assert watched.written(unit="row").tolist() == list(range(P // 8 * 3, P // 8 * 4))


# -- what cannot


def test_read_only_buffers_are_refused_with_the_reason():
    frozen = ww.aligned_empty(P, np.uint8)
    frozen.flags.writeable = False
    for buffer in (frozen, b"bytes", memoryview(bytearray(10)).toreadonly()):
        with pytest.raises(TypeError, match="read-only"):
            ww.WatchedBuffer(buffer)


def test_what_is_not_one_writable_block_is_refused():
    array = ww.aligned_empty((64, 64), np.float64)
    with pytest.raises(ValueError, match="not C-contiguous"):
        ww.WatchedBuffer(array[:, ::2])
    with pytest.raises(ValueError, match="not C-contiguous"):
        ww.WatchedBuffer(memoryview(bytearray(100))[::2])
    with pytest.raises(ValueError, match="empty"):
        ww.WatchedBuffer(bytearray())
    with pytest.raises(TypeError, match="not a buffer"):
        ww.WatchedBuffer([1, 2, 3])


@pytest.mark.parametrize("access", [mmap.ACCESS_WRITE, mmap.ACCESS_COPY])
def test_file_pages_are_refused_by_the_kernel_layer(tmp_path, access):
    path = tmp_path / "data"
    path.write_bytes(b"\1" * 4 * P)
    with open(path, "r+b") as file:
        block = mmap.mmap(file.fileno(), 4 * P, access=access)
        with pytest.raises(OSError) as raised:
            ww.WatchedBuffer(block)
        assert raised.value.errno == 22  # EINVAL, and it says why
        block[0] = 2  # nothing was left armed
        block.close()  # nor exported
    memfd = os.memfd_create("state")
    os.ftruncate(memfd, 2 * P)
    with mmap.mmap(memfd, 2 * P) as block, pytest.raises(OSError, match="memfd:state"):
        ww.WatchedBuffer(block)
    os.close(memfd)
    # Shared anonymous memory: a forked child's writes would not be seen.
    with mmap.mmap(-1, 2 * P) as block, pytest.raises(OSError, match="MAP_PRIVATE") as raised:
        ww.WatchedBuffer(block)
    assert raised.value.errno == 22
    with (open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as ro,
          pytest.raises(TypeError, match="read-only")):
        ww.WatchedBuffer(ro)


def test_virtualalloc_memory_is_refused():
    with ww.WatchedMemory(4 * P) as memory, pytest.raises(ValueError, match="VirtualAlloc"):
        ww.WatchedBuffer(memory.array)


def test_two_watches_cannot_share_a_page():
    block = ww.aligned_empty(4 * P, np.uint8)
    with ww.WatchedBuffer(block[:P + 10]):
        with pytest.raises(ValueError, match="overlap"):
            ww.WatchedBuffer(block[P + 100:])  # page 1 is the first's
        with pytest.raises(ValueError, match="overlap"):
            ww.WatchedBuffer(block)
        with ww.WatchedBuffer(block[2 * P:]) as other:  # pages of its own
            block[3 * P] = 1
            assert other.written(unit="page").tolist() == [1]
    with ww.WatchedBuffer(block):  # the pages are free again
        pass


# -- shared pages


def test_a_shared_page_reports_its_neighbours_writes():
    block = ww.aligned_empty(4 * P, np.uint8)
    part = block[100:3 * P + 50]  # shares page 0 and page 3 with the rest of block
    with ww.WatchedBuffer(part) as watched:
        assert watched.shares_pages and watched.page_offset == 100 and watched.npages == 4
        block[0] = 1  # not part's byte, but part's page
        block[3 * P + 60] = 1
        assert watched.written(unit="page").tolist() == [0, 3]
        assert watched.written(unit="offset").tolist() == [0, 3 * P - 100]
        # Rows are bytes: those of the written pages that are part's.
        assert watched.written(reset=True, unit="row").tolist() == [*range(P - 100),
                                                                    *range(3 * P - 100, 3 * P - 50)]


def test_aligned_empty_owns_its_pages():
    first, second = ww.aligned_empty((3, 100), np.int32), ww.aligned_empty(10, np.uint8)
    for array in (first, second):
        assert array.ctypes.data % P == 0 and array.flags.c_contiguous and array.flags.writeable
        assert not array.any()
    assert first.shape == (3, 100) and first.dtype == np.int32
    with ww.WatchedBuffer(first) as one, ww.WatchedBuffer(second) as two:
        assert not one.shares_pages or one.nbytes % P
        second[:] = 1
        assert one.written().tolist() == [] and two.written().tolist() == [0]
    with pytest.raises(ValueError):
        ww.aligned_empty((2, -1))


# -- get and reset


def test_capped_output_keeps_what_did_not_fit():
    state = ww.aligned_empty(10 * P, np.uint8)
    with ww.WatchedBuffer(state) as watched:
        state[::P] = 1
        out = np.full(4, 99, np.uintp)
        first = watched.written(reset=True, unit="page", out=out)
        assert first.tolist() == [0, 1, 2, 3] and np.shares_memory(first, out)
        assert watched.written(reset=True, unit="page", out=np.empty(100, np.int64)).tolist() \
            == list(range(4, 10))
        assert watched.written().tolist() == []
        with pytest.raises(TypeError):
            watched.written(out=np.empty(4, np.int32))
        with pytest.raises(ValueError):
            watched.written(unit="row", out=np.empty(0, np.uintp))
        with pytest.raises(ValueError, match="unit"):
            watched.written(unit="bytes")  # type: ignore[arg-type]


def test_no_write_is_lost_to_a_reset():
    """Writers keep writing while written(reset=True) ships each reported page
    to a replica; once they stop, one more call must make the replica equal."""
    npages = 256
    state = ww.aligned_empty(npages * P, np.uint8)
    replica = state.copy()
    pages, replica_pages = state.reshape(-1, P), replica.reshape(-1, P)
    with ww.WatchedBuffer(state) as watched:
        out = np.empty(16, np.uintp)  # capped: most calls leave pages for the next
        with NativeWriters(state.ctypes.data, npages, nthreads=2, seed=5, pause_ns=2000):
            for _ in range(scaled_work(400, 50)):
                dirty = watched.written(reset=True, unit="page", out=out)
                replica_pages[dirty] = pages[dirty]
        while len(dirty := watched.written(reset=True, unit="page", out=out)):
            replica_pages[dirty] = pages[dirty]
        assert np.array_equal(state, replica)


# -- lifetimes


def test_close_twice_and_use_after_close():
    watched = ww.WatchedBuffer(ww.aligned_empty(P, np.uint8))
    watched.close()
    watched.close()
    assert watched.closed and "closed" in repr(watched)
    for use in (watched.written, watched.reset, watched.__enter__):
        with pytest.raises(ValueError, match="closed"):
            use()


def test_a_watch_cannot_be_copied_or_pickled():
    import copy
    import pickle

    with ww.WatchedBuffer(ww.aligned_empty(P, np.uint8)) as watched:
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="copied or pickled"):
                attempt(watched)
        assert not watched.closed


def test_the_watch_keeps_its_buffer_alive():
    state = ww.aligned_empty(2 * P, np.uint8)
    alive = weakref.ref(state)
    watched = ww.WatchedBuffer(state)
    del state
    gc.collect()
    assert alive() is not None
    watched.close()
    gc.collect()
    assert alive() is None


def test_closing_leaves_the_memory_as_it_was():
    state = ww.aligned_empty(8 * P, np.uint8)
    state[:] = np.arange(state.size) % 251
    before = bytes(state)
    start, end = state.ctypes.data, state.ctypes.data + state.nbytes
    with ww.WatchedBuffer(state) as watched:
        state[3 * P] = 1
        if watched.backend == "pagemap":
            assert any("uw" in flags.split() for _, flags in vma_flags(start, end))
        if watched.backend == "mprotect":
            assert any(perms.startswith("r-") for perms, _ in vma_flags(start, end))
    assert bytes(state[:3 * P]) == before[:3 * P] and bytes(state[3 * P + 1:]) == before[3 * P + 1:]
    for perms, flags in vma_flags(start, end):
        assert perms.startswith("rw") and "uw" not in flags.split(), (perms, flags)
    # The kernel can write into it again on every backend.
    assert readv_into(state[:P], b"k" * 10) == 10 and bytes(state[:10]) == b"k" * 10


def test_a_dropped_watch_stops_and_frees_its_pages():
    state = ww.aligned_empty(4 * P, np.uint8)
    ww.WatchedBuffer(state)  # dropped at once
    with ww.WatchedBuffer(state) as again:  # its pages were given back
        state[P] = 1
        assert again.written(unit="page").tolist() == [1]
    assert readv_into(state[:P], b"x") == 1


def test_a_finalizer_acts_on_its_own_watch_only():
    state = ww.aligned_empty(4 * P, np.uint8)
    first = ww.WatchedBuffer(state)
    first.close()
    second = ww.WatchedBuffer(state)
    del first
    gc.collect()
    state[2 * P] = 1
    assert second.written(unit="page").tolist() == [2]
    if second.kernel_writes_fault:  # still armed: second's watch was not stopped
        with pytest.raises(OSError):
            readv_into(state[:P], b"x")
    second.close()


def test_prepared_kernel_writes_work_and_are_reported_on_every_backend():
    state = ww.aligned_empty(4 * P, np.uint8)
    state[:] = 9
    with ww.WatchedBuffer(state[100:]) as watched:  # the buffer starts inside page 0
        watched.prepare_kernel_write(P - 100, 2 * P)  # pages 1 and 2
        assert bytes(state) == b"\x09" * (4 * P)  # the preparation changed nothing
        assert readv_into(state[P:3 * P], b"k" * (2 * P)) == 2 * P
        assert watched.written(unit="page").tolist() == [1, 2]
        with pytest.raises(ValueError, match="not inside"):
            watched.prepare_kernel_write(10, watched.nbytes)
    with pytest.raises(ValueError, match="closed"):
        watched.prepare_kernel_write()


def test_kernel_writes_as_each_backend_states():
    state = ww.aligned_empty(2 * P, np.uint8)
    with ww.WatchedBuffer(state) as watched:
        if watched.kernel_writes_fault:
            with pytest.raises(OSError) as raised:
                readv_into(state[P:], b"data")
            assert raised.value.errno == 14  # EFAULT, as documented
        else:
            assert readv_into(state[P:], b"data") == 4
            assert watched.written(unit="page").tolist() == [1]


def test_closing_during_a_call_leaves_nothing_watched(monkeypatch):
    """close() while another thread's written() is inside the kernel call: the
    call must not start watching again after the unwatch (the first GET on
    memory never watched starts a watch), so close waits for it."""

    state = ww.aligned_empty(8 * P, np.uint8)
    start, end = state.ctypes.data, state.ctypes.data + state.nbytes
    watched = ww.WatchedBuffer(state)
    backend = type(watched._watch.backend)
    real = backend.process_memwatch
    inside = threading.Event()

    def slow(self, *args):
        inside.set()
        time.sleep(0.2)  # close() is called meanwhile
        return real(self, *args)

    monkeypatch.setattr(backend, "process_memwatch", slow)
    reader = threading.Thread(target=watched.written)
    reader.start()
    assert inside.wait(patience(10))
    watched.close()
    reader.join()
    monkeypatch.undo()
    for perms, flags in vma_flags(start, end):
        assert perms.startswith("rw") and "uw" not in flags.split(), (perms, flags)
    assert readv_into(state[:P], b"k") == 1


def test_a_forked_child_misses_no_write_and_the_parent_keeps_its_state():
    state = ww.aligned_empty(16 * P, np.uint8)
    watched = ww.WatchedBuffer(state)
    state[3 * P] = 1  # not yet reported when the process forks

    def child() -> list[list[int]]:
        state[5 * P] = 1
        first = watched.written(reset=True, unit="page").tolist()  # never fewer
        state[7 * P] = 1
        then = watched.written(unit="page").tolist()  # exact after a reset
        watched.close()
        return [first, then]

    first, then = run_forked(child)
    assert {3, 5} <= set(first) and then == [7]
    assert watched.written(unit="page").tolist() == [3]
    watched.close()
