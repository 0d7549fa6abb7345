"""The Pythonic face as a new user meets it: a region says its backend, reads
from files and sockets into it work on every backend, written() gives pages
as addresses, offsets or indices, and the block behaves as the buffer it is."""

from __future__ import annotations

import errno
import os
import socket
import sys
import tempfile

import numpy as np
import pytest

import writewatch as ww
from writewatch import backends

P = ww.PAGE_SIZE


def test_a_block_names_its_backend_and_shows_where_it_is(write_watch_backend):
    with ww.WatchedMemory(4 * P) as mem:
        assert mem.backend == write_watch_backend
        text = repr(mem)
        assert f"{mem.address:#x}" in text and f"{4 * P:#x} bytes" in text
        assert f"backend {write_watch_backend}" in text
        assert mem.kernel_writes_fault == backends.backend(write_watch_backend) \
            .kernel_writes_fault()
    assert "closed" in repr(mem)


@pytest.mark.any_backend
def test_a_block_made_with_mprotect_says_kernel_writes_need_preparing():
    with ww.WatchedMemory(4 * P, backend="mprotect") as mem:
        assert mem.backend == "mprotect"
        assert mem.kernel_writes_fault
        info = ww.region_info(mem.address + 5)
        assert info == ww.RegionInfo(mem.address, 4 * P, "mprotect", True)
        assert "base=0x" in repr(info)


def test_region_info_for_the_windows_face(write_watch_backend):
    base = ww.VirtualAlloc(0, 4 * P, ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                           ww.PAGE_READWRITE)
    plain = ww.VirtualAlloc(0, 4 * P, ww.MEM_RESERVE | ww.MEM_COMMIT, ww.PAGE_READWRITE)
    try:
        info = ww.region_info(base + P)
        assert info is not None and info.base == base and info.backend == write_watch_backend
        plain_info = ww.region_info(plain)
        assert plain_info is not None
        assert plain_info.backend is None and not plain_info.kernel_writes_fault
    finally:
        ww.VirtualFree(base, 0, ww.MEM_RELEASE)
        ww.VirtualFree(plain, 0, ww.MEM_RELEASE)
    ww.SetLastError(0)
    assert ww.region_info(base) is None
    assert ww.GetLastError() == ww.ERROR_INVALID_ADDRESS


@pytest.mark.parametrize("how", ["fd", "file", "address", "view", "block"])
def test_read_into_works_on_every_backend(how):
    data = bytes(range(256)) * (3 * P // 256)
    with tempfile.TemporaryFile() as file, ww.WatchedMemory(8 * P) as mem:
        file.write(data)
        file.seek(0)
        mem.reset()
        if how == "fd":
            got = ww.read_into(file.fileno(), mem.view(P, 3 * P))
        elif how == "file":
            got = ww.read_into(file, mem.view(P, 4 * P), 3 * P)
        elif how == "address":
            got = ww.read_into(file.fileno(), mem.address + P, 3 * P)
        elif how == "view":
            got = mem.read_into(file, P, 3 * P)
        else:
            got = ww.read_into(file, mem, 4 * P)
            mem.array[P:4 * P] = mem.array[:3 * P].copy()
        assert got == len(data)
        assert bytes(mem.array[P:4 * P]) == data
        pages = list(mem.written(unit="page"))
        assert {1, 2, 3} <= set(pages)


def test_recv_into_works_on_every_backend():
    left, right = socket.socketpair()
    with left, right, ww.WatchedMemory(4 * P) as mem:
        left.sendall(b"hello" * 1000)
        mem.reset()
        got = ww.recv_into(right, mem.view(P, 2 * P))
        assert 0 < got <= 5000 and bytes(mem.array[P:P + got]) == (b"hello" * 1000)[:got]
        assert mem.written(unit="page")[0] == 1
        left.sendall(b"x")
        assert mem.recv_into(right, 3 * P, 10) == 1 and mem.array[3 * P] == ord("x")


@pytest.mark.any_backend
def test_a_read_into_unwritable_memory_says_why():
    with tempfile.TemporaryFile() as file, ww.WatchedMemory(4 * P, backend="mprotect") as mem:
        file.write(b"x" * P)
        file.seek(0)
        ww.VirtualProtect(mem.address, P, ww.PAGE_READONLY)
        with pytest.raises(TypeError, match="writable"):
            ww.read_into(file.fileno(), mem.view(0, P))
        with pytest.raises(TypeError, match="needs a size"):
            ww.read_into(file.fileno(), mem.address)


@pytest.mark.any_backend
def test_an_unprepared_kernel_write_into_mprotect_memory_faults():
    """What read_into saves a user from (and the README warns of)."""
    read_end, write_end = os.pipe()
    with ww.WatchedMemory(4 * P, backend="mprotect") as mem:
        os.write(write_end, b"data")
        mem.reset()
        with pytest.raises(OSError) as raised:
            os.readv(read_end, [mem.view(0, P)])
        assert raised.value.errno == errno.EFAULT
        assert ww.read_into(read_end, mem.view(0, P)) == 4
    os.close(read_end)
    os.close(write_end)


def test_written_as_addresses_offsets_and_pages():
    with ww.WatchedMemory(16 * P) as mem:
        for page in (2, 5, 11):
            mem.array[page * P + 3] = 1
        addresses = mem.written()
        assert addresses.dtype == np.uintp
        assert list(addresses - mem.address) == [2 * P, 5 * P, 11 * P]
        assert list(mem.written(unit="offset")) == [2 * P, 5 * P, 11 * P]
        pages = mem.written(unit="page")
        assert list(pages) == [2, 5, 11]
        frames = mem.array.reshape(-1, P)  # pages index the caller's array directly
        assert (frames[pages][:, 3] == 1).all()
        out = np.zeros(2, np.uintp)
        first = mem.written(reset=True, out=out, unit="page")
        assert list(first) == [2, 5] and first.base is out
        assert list(mem.written(unit="page")) == [11]


def test_written_refuses_what_is_not_a_flag():
    with ww.WatchedMemory(4 * P) as mem:
        with pytest.raises(TypeError, match="reset must be a bool"):
            mem.written(reset="yes")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            mem.written(True, np.zeros(4, np.uintp))  # type: ignore[misc]
        with pytest.raises(ValueError, match="unit"):
            mem.written(unit="pages")  # type: ignore[arg-type]
        assert len(mem.written(reset=np.bool_(True))) == 0


def test_size_rounds_up_to_whole_pages():
    with ww.WatchedMemory(100) as mem:
        assert mem.size == P and len(mem) == P


def test_the_block_is_a_buffer():
    with ww.WatchedMemory(4 * P) as mem:
        array = np.asarray(mem)
        assert array.dtype == np.uint8 and array.shape == (4 * P,)
        array[P] = 7
        assert mem.array[P] == 7 and list(mem.written(unit="page")) == [1]
        assert np.asarray(mem, dtype=np.uint16).dtype == np.uint16  # a copy
        assert len(mem) == 4 * P
        view = memoryview(mem) if sys.version_info >= (3, 12) else memoryview(mem.array)
        assert view.nbytes == 4 * P and view[P] == 7


def test_a_block_refuses_copy_and_pickle():
    """A copy would own the same memory: closing it freed the original's."""
    import copy
    import pickle

    with ww.WatchedMemory(2 * P) as mem:
        for make_copy in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="WatchedMemory cannot be"):
                make_copy(mem)
        mem.array[P] = 1  # still its own, still mapped
        assert mem.written(unit="page").tolist() == [1]


def test_a_closed_block_has_no_size_and_cannot_be_entered():
    mem = ww.WatchedMemory(2 * P)
    mem.close()
    for use in (len, lambda m: m.size, lambda m: m.__enter__()):
        with pytest.raises(ValueError, match="freed"):
            use(mem)
    with pytest.raises(ValueError, match="freed"), mem:
        pass


def test_a_negative_size_is_a_value_error():
    with pytest.raises(ValueError, match="negative"):
        ww.WatchedMemory(-1)
    with pytest.raises(TypeError):
        ww.WatchedMemory(4096.0)  # type: ignore[arg-type]
