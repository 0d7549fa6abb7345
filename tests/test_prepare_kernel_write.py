"""prepare_kernel_write marks every writable page of its range written on every
backend, as ReadFile marks its whole buffer once its handle is valid
(docs/semantics.md rule 14), and leaves the bytes alone."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from native_writers import NativeWriters

import writewatch as ww

P = ww.PAGE_SIZE


def dirty_then_reset(region) -> None:
    region.view()[::P] = 0
    assert region.written(ww.WRITE_WATCH_FLAG_RESET) == list(range(region.npages))


@pytest.fixture(params=["unpopulated", "populated-and-reset"])
def region(request, watched):
    region = watched(16)
    if request.param == "populated-and-reset":
        dirty_then_reset(region)
    return region


def read_file(region, offset: int, size: int, file_bytes: int) -> int:
    """A ReadFile-like read: prepare the whole buffer, then read what the file has."""
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * file_bytes)
        f.flush()
        f.seek(0)
        fd = os.dup(f.fileno())
    try:
        ww.prepare_kernel_write(region.base + offset, size)
        return os.readv(fd, [ww.as_array(region.base + offset, size)])
    finally:
        os.close(fd)


def test_short_read_marks_the_whole_buffer(region):
    assert read_file(region, 0, 16 * P, 2 * P + 3) == 2 * P + 3
    assert region.written() == list(range(16))
    assert bytes(region.view()[:2 * P + 3]) == b"x" * (2 * P + 3)


def test_read_at_end_of_file_marks_the_whole_buffer(region):
    assert read_file(region, 0, 16 * P, 0) == 0
    assert region.written() == list(range(16))


def test_unaligned_buffer_marks_every_page_it_touches(region):
    assert read_file(region, 3 * P + 5, 2 * P, 0) == 0
    assert region.written() == [3, 4, 5]


def test_contents_are_left_alone(region):
    data = np.random.default_rng(3).integers(0, 256, 16 * P, dtype=np.uint8)
    region.view()[:] = data
    region.written(ww.WRITE_WATCH_FLAG_RESET)
    ww.prepare_kernel_write(region.base, 16 * P)
    assert (region.view() == data).all()
    assert region.written() == list(range(16))


def test_reset_after_preparing_rearms_the_pages(region):
    ww.prepare_kernel_write(region.base, 16 * P)
    assert region.written(ww.WRITE_WATCH_FLAG_RESET) == list(range(16))
    assert region.written() == []
    assert read_file(region, 0, 16 * P, 0) == 0  # prepared again: marked again
    assert region.written() == list(range(16))


def test_only_committed_read_write_pages_are_marked(watched):
    region = watched(16, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH, ww.PAGE_NOACCESS)
    assert ww.VirtualAlloc(region.base + 2 * P, 4 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE)
    assert ww.VirtualAlloc(region.base + 6 * P, 2 * P, ww.MEM_COMMIT, ww.PAGE_READONLY)
    assert ww.VirtualAlloc(region.base + 8 * P, 2 * P, ww.MEM_COMMIT, ww.PAGE_NOACCESS)
    assert ww.VirtualAlloc(region.base + 10 * P, 2 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE)
    ww.prepare_kernel_write(region.base, 16 * P)
    assert region.written() == [2, 3, 4, 5, 10, 11]


def test_while_other_threads_write(watched):
    region = watched(64)
    with NativeWriters(region.base, 64, nthreads=2, seed=5, pause_ns=1000) as writers:
        rounds = 0
        while rounds < 50 or (writers.writes() < 1000 and rounds < 100_000):
            ww.prepare_kernel_write(region.base, 64 * P)
            assert region.written(ww.WRITE_WATCH_FLAG_RESET) == list(range(64))
            rounds += 1
        assert writers.writes() > 0
    region.written(ww.WRITE_WATCH_FLAG_RESET)
    ww.prepare_kernel_write(region.base + P, P)
    assert region.written() == [1]
