"""Kernel writes and mmap copies into and out of watched memory
(docs/semantics.md rule 14), on every backend, beyond what
test_kernel_writes.py covers: file mmaps copied into a watched view (the
source faulting in page by page during the copy) and a watched view copied
into a file mmap, writes the kernel makes with no Python buffer in between
(getrandom(2), process_vm_readv(2) called through ctypes), recvmsg_into,
recvfrom_into and a buffered readinto.

Every write succeeds with its full byte count (no EFAULT reaches the caller),
lands, and dirties exactly its pages; copying watched memory out dirties
nothing. Backends whose armed pages the kernel cannot write get
prepare_kernel_write first, the documented way (README, "Kernel writes").
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import tempfile

import numpy as np
import pytest
from kernel_targets import for_kernel, payload, region_fixture  # noqa: F401 (region)

import writewatch as ww

P = ww.PAGE_SIZE
RESET = ww.WRITE_WATCH_FLAG_RESET

_libc = ctypes.CDLL(None, use_errno=True)


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.getrandom.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
_libc.getrandom.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong,
                                   ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t


@pytest.fixture
def data_file():
    """A 16-page file of random bytes, as (file object, its bytes)."""
    data = payload(16 * P, seed=11)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        yield f, data


@pytest.mark.parametrize("how", ["numpy", "memoryview", "memmove"])
def test_file_mmap_copied_into_a_watched_view(region, data_file, how):
    """Pages 3-6 (from mid page 3 to mid page 6) get a file's bytes straight
    from a fresh mmap of it: the source faults in while the destination is
    armed."""
    f, data = data_file
    with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as source:
        view = region.view()
        start, end = 3 * P + 100, 6 * P + 200
        if how == "numpy":
            view[start:end] = np.frombuffer(source, np.uint8)[P:P + end - start]
        elif how == "memoryview":
            memoryview(view)[start:end] = source[P:P + end - start]
        else:
            source_array = np.frombuffer(source, np.uint8)
            ctypes.memmove(view.ctypes.data + start, source_array.ctypes.data + P, end - start)
            del source_array
    assert view[start:end].tobytes() == data[P:P + end - start]
    assert region.written() == [3, 4, 5, 6]


def test_watched_view_copied_into_a_file_mmap_dirties_nothing(region, data_file):
    f, _ = data_file
    view = region.view()
    view[2 * P:5 * P] = np.frombuffer(payload(3 * P, seed=12), np.uint8)
    assert region.written(RESET) == [2, 3, 4]
    with mmap.mmap(f.fileno(), 0) as target:
        target[4 * P:7 * P] = memoryview(view)[2 * P:5 * P]
        np.frombuffer(target, np.uint8)[9 * P:10 * P] = view[4 * P:5 * P]
        target.flush()
    f.seek(4 * P)
    assert f.read(3 * P) == view[2 * P:5 * P].tobytes()
    assert region.written() == [], "reading watched memory dirtied it"


def test_kernel_reads_watched_memory_into_a_file_and_dirties_nothing(region):
    """os.write and socket.send read watched memory in the kernel: no EFAULT
    on armed pages, nothing dirtied."""
    view = region.view()
    view[:] = np.frombuffer(payload(16 * P, seed=13), np.uint8)
    assert region.written(RESET) == list(range(16))
    with tempfile.TemporaryFile(buffering=0) as f:
        assert os.write(f.fileno(), view[P:9 * P]) == 8 * P
        f.seek(0)
        assert f.read() == view[P:9 * P].tobytes()
    left, right = socket.socketpair()
    with left, right:
        left.sendall(view[9 * P:11 * P])
        assert right.recv(2 * P, socket.MSG_WAITALL) == view[9 * P:11 * P].tobytes()
    assert region.written() == []


def test_file_mmap_written_into_a_watched_view_by_the_kernel(region, data_file):
    """readinto from the file while the same file is mmapped (its pages shared
    with the page cache) into a watched view: a kernel copy."""
    f, data = data_file
    with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as source, \
            open(f.fileno(), "rb", buffering=0, closefd=False) as raw:
        assert source[:P] == data[:P]  # the page cache holds the file
        raw.seek(2 * P)
        view = region.view()
        assert raw.readinto(for_kernel(view[8 * P + 7:11 * P + 7])) == 3 * P
    assert view[8 * P + 7:11 * P + 7].tobytes() == data[2 * P:5 * P]
    assert region.written() == [8, 9, 10, 11]


def test_buffered_readinto(region, data_file):
    f, data = data_file
    with open(f.fileno(), "rb", closefd=False) as buffered:
        buffered.seek(0)
        view = region.view()
        assert buffered.readinto(for_kernel(view[5 * P:9 * P])) == 4 * P
    assert view[5 * P:9 * P].tobytes() == data[:4 * P]
    assert region.written() == [5, 6, 7, 8]


def test_recvmsg_into_scattered_buffers(region):
    data = payload(2 * P + 300, seed=14)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        view = region.view()
        got, _, _, _ = right.recvmsg_into([for_kernel(view[P + 10:2 * P + 10]),
                                           for_kernel(view[12 * P:13 * P + 300])],
                                          0, socket.MSG_WAITALL)
    assert got == len(data)
    assert view[P + 10:2 * P + 10].tobytes() == data[:P]
    assert view[12 * P:13 * P + 300].tobytes() == data[P:]
    assert region.written() == [1, 2, 12, 13]


def test_recvfrom_into_a_datagram(region):
    data = payload(P + 1, seed=15)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right:
        left.send(data)
        view = region.view()
        got, _ = right.recvfrom_into(for_kernel(view[14 * P - 1:16 * P], len(data)))
    assert got == len(data)
    assert view[14 * P - 1:15 * P].tobytes() == data
    assert region.written() == [13, 14]


def test_getrandom_writes_straight_into_watched_memory(region):
    """getrandom(2) through ctypes: no buffer protocol, just an address."""
    view = region.view()
    for_kernel(view[4 * P + 1:6 * P])
    ctypes.set_errno(0)
    got = _libc.getrandom(view.ctypes.data + 4 * P + 1, 2 * P - 1, 0)
    assert got == 2 * P - 1, os.strerror(ctypes.get_errno())
    assert view[4 * P + 1:6 * P].any()
    assert region.written() == [4, 5]


def test_process_vm_readv_into_watched_memory(region):
    """process_vm_readv(2) on our own pid copies in the kernel, page by page,
    from a plain buffer into watched memory."""
    source = np.frombuffer(bytearray(payload(3 * P, seed=16)), np.uint8)
    view = region.view()
    for_kernel(view[7 * P:10 * P])
    local = IoVec(view.ctypes.data + 7 * P, 3 * P)
    remote = IoVec(source.ctypes.data, 3 * P)
    ctypes.set_errno(0)
    got = _libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote),
                                 1, 0)
    assert got == 3 * P, os.strerror(ctypes.get_errno())
    assert view[7 * P:10 * P].tobytes() == source.tobytes()
    assert region.written() == [7, 8, 9]
