"""Writes the kernel makes on the process's behalf (readv, readinto,
recv_into, preadv into numpy views of watched memory) succeed with the full
byte count, never EFAULT, land, and dirty exactly the pages they touch
(docs/semantics.md rule 14). The pagemap backend needs nothing before such a
write (rule K20: in async mode kernel writes are resolved and tracked);
backends whose armed pages make the kernel fail with EFAULT (rule K22) get
prepare_kernel_write first, the documented way, and must then report exactly
the same pages."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
from kernel_targets import for_kernel, payload, region_fixture  # noqa: F401 (region)

import writewatch as ww

P = ww.PAGE_SIZE


def test_readv_from_a_pipe(region):
    data = payload(3 * P)
    read_end, write_end = os.pipe()
    try:
        assert os.write(write_end, data) == len(data)
        view = region.view()
        got = os.readv(read_end, [for_kernel(view[2 * P:5 * P])])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert got == 3 * P
    assert view[2 * P:5 * P].tobytes() == data
    assert region.written() == [2, 3, 4]


def test_readv_into_scattered_buffers(region):
    data = payload(P + 100)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
        view = region.view()
        got = os.readv(read_end, [for_kernel(view[P + 50:2 * P + 50]),
                                     for_kernel(view[9 * P:9 * P + 100])])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert got == P + 100
    assert view[P + 50:2 * P + 50].tobytes() == data[:P]
    assert view[9 * P:9 * P + 100].tobytes() == data[P:]
    assert region.written() == [1, 2, 9]


def test_readinto_from_an_unbuffered_file(region):
    data = payload(4 * P)
    with tempfile.TemporaryFile(buffering=0) as f:
        f.write(data)
        f.seek(0)
        view = region.view()
        got = f.readinto(for_kernel(view[6 * P:10 * P]))
    assert got == 4 * P
    assert view[6 * P:10 * P].tobytes() == data
    assert region.written() == [6, 7, 8, 9]


def test_readinto_starting_mid_page_spans_three_pages(region):
    """Half a page into page 2 for two pages' worth: pages 2, 3 and 4."""
    data = payload(2 * P, seed=3)
    with tempfile.TemporaryFile(buffering=0) as f:
        f.write(data)
        f.seek(0)
        view = region.view()
        got = f.readinto(for_kernel(view[2 * P + P // 2:4 * P + P // 2]))
    assert got == 2 * P
    assert view[2 * P + P // 2:4 * P + P // 2].tobytes() == data
    assert (view[2 * P:2 * P + P // 2] == 0).all()
    assert region.written() == [2, 3, 4]


def test_recv_into_over_a_socketpair(region):
    data = payload(3 * P + 17, seed=4)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        view = region.view()
        got = right.recv_into(for_kernel(view[11 * P + 1000:], len(data)), len(data))
    assert got == len(data)
    assert view[11 * P + 1000:11 * P + 1000 + len(data)].tobytes() == data
    # 11P+1000 .. 14P+1017: pages 11 to 14
    assert region.written() == [11, 12, 13, 14]


def test_preadv_at_an_offset(region):
    data = payload(8 * P, seed=5)
    with tempfile.TemporaryFile(buffering=0) as f:
        f.write(data)
        view = region.view()
        got = os.preadv(f.fileno(), [for_kernel(view[0:P]),
                                      for_kernel(view[5 * P + 8:6 * P + 8])], 3 * P)
    assert got == 2 * P
    assert view[0:P].tobytes() == data[3 * P:4 * P]
    assert view[5 * P + 8:6 * P + 8].tobytes() == data[4 * P:5 * P]
    assert region.written() == [0, 5, 6]


def test_kernel_writes_then_reset_then_kernel_writes_again(watched):
    """A page the kernel dirtied resets like any other and is caught again."""
    region = watched(8)
    view = region.view()
    read_end, write_end = os.pipe()
    try:
        for rnd in range(3):
            data = payload(P, seed=10 + rnd)
            os.write(write_end, data)
            assert os.readv(read_end, [for_kernel(view[3 * P:4 * P])]) == P
            assert view[3 * P:4 * P].tobytes() == data
            assert region.written(ww.WRITE_WATCH_FLAG_RESET) == [3]
            assert region.written() == []
    finally:
        os.close(read_end)
        os.close(write_end)


def test_kernel_write_into_a_read_only_page_is_efault_not_tracked(watched):
    """The kernel honours PAGE_READONLY: the write fails and dirties nothing
    (the page itself cannot even be viewed writable, so read through a view
    made before the protection change)."""
    region = watched(4)
    view = region.view()
    assert ww.VirtualProtect(region.base + P, P, ww.PAGE_READONLY) == (True,
                                                                       ww.PAGE_READWRITE)
    with tempfile.TemporaryFile(buffering=0) as f:
        f.write(payload(P))
        with pytest.raises(OSError) as info:
            os.preadv(f.fileno(), [view[P:2 * P]], 0)
    assert info.value.errno == 14  # EFAULT
    assert region.written() == []
