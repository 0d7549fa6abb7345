"""The Windows-shaped API, and a Pythonic face over the same region table.

The Windows functions never raise for a failure Windows reports: they return
what the SDK says (0, False, 0xFFFFFFFF, None) and leave the reason in the
calling thread's last error. Passing a value no C caller could pass (a string
for an address, a list for the addresses array) raises TypeError, as ctypes
would.

The Pythonic face (WatchedMemory) raises WriteWatchError, an OSError whose
.winerror is the Windows code.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import operator
import os
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Protocol, SupportsIndex, TypeVar

import numpy as np
import numpy.typing as npt

from writewatch import memory, regions, views, watch
from writewatch.backends import BackendName
from writewatch.constants import (
    ERROR_INVALID_ADDRESS,
    ERROR_NOACCESS,
    MEM_COMMIT,
    MEM_RESERVE,
    MEM_WRITE_WATCH,
    PAGE_READWRITE,
    WRITE_WATCH_FAILED,
    WRITE_WATCH_FLAG_RESET,
)
from writewatch.errors import WriteWatchError
from writewatch.kernel import PAGE_SIZE
from writewatch.memory import MEMORY_BASIC_INFORMATION, RegionInfo

_last_error = threading.local()
log = logging.getLogger("writewatch")

T = TypeVar("T")


def GetLastError() -> int:  # noqa: N802 - Windows names
    """The calling thread's last error code."""
    return getattr(_last_error, "code", 0)


def SetLastError(code: int) -> None:  # noqa: N802
    """Set the calling thread's last error code, as GetLastError will return it
    (and forget the reason last_error_reason gave)."""
    _last_error.code = code
    _last_error.reason = ""


def last_error_reason() -> str:
    """Why the calling thread's last failed Windows-shaped call failed, in
    words ("size is 0", "allocation type MEM_TOP_DOWN is not supported"): the
    reason behind GetLastError()'s code. "" when the last error was set by
    SetLastError or no call has failed in this thread. Not a Windows function:
    Windows keeps only the code."""
    return getattr(_last_error, "reason", "")


def _failed(function: str, exc: WriteWatchError) -> None:
    """Record a failure Windows reports: the code for GetLastError, the reason
    for last_error_reason, and a DEBUG line on the writewatch logger."""
    _last_error.code = exc.winerror
    _last_error.reason = exc.strerror or ""
    log.debug("%s failed with %d: %s", function, exc.winerror, _last_error.reason)


def _windows_call(function: str, failed: T, call: Callable[[], T]) -> T:
    """The one place where a failure Windows reports becomes a return value."""
    try:
        return call()
    except WriteWatchError as exc:
        _failed(function, exc)
        return failed


def VirtualAlloc(address: int, size: int, allocation_type: int,  # noqa: N802
                 protect: int, *, backend: BackendName = "auto") -> int:
    """Reserve and/or commit pages; returns the base address, or 0 on failure.

    backend picks the write-watch backend of a MEM_WRITE_WATCH reservation
    ("auto": WRITEWATCH_BACKEND, or the best this machine runs); a backend this
    machine cannot run fails with ERROR_NOT_SUPPORTED."""
    return _windows_call("VirtualAlloc", 0, lambda: memory.allocate(
        address, size, allocation_type, protect, backend))


def VirtualFree(address: int, size: int, free_type: int) -> bool:  # noqa: N802
    """MEM_DECOMMIT a range or MEM_RELEASE an allocation; False on failure."""
    def call() -> bool:
        memory.free(address, size, free_type)
        return True
    return _windows_call("VirtualFree", False, call)


def VirtualProtect(address: int, size: int,  # noqa: N802
                   new_protect: int) -> tuple[bool, int]:
    """Change the protection of committed pages: (True, old protection of the
    first page), or (False, 0) on failure."""
    return _windows_call("VirtualProtect", (False, 0),
                         lambda: (True, memory.set_protection(address, size, new_protect)))


def VirtualQuery(address: int) -> MEMORY_BASIC_INFORMATION | None:  # noqa: N802
    """What is at address (None on failure, as Windows returns 0)."""
    return _windows_call("VirtualQuery", None, lambda: memory.query(address))


def GetWriteWatch(flags: int, base: int, size: int,  # noqa: N802
                  addresses: npt.NDArray[np.uintp] | None,
                  count: int | None = None) -> tuple[int, int, int]:
    """Return (ret, count, granularity) as the C function leaves them.

    addresses receives the page addresses written in [base, base+size) since the
    last reset, ascending; count is its capacity (None: its length). ret is 0 on
    success and 0xFFFFFFFF on failure; count is then the number of addresses and
    granularity the page size. On failure count is returned unchanged."""
    try:
        return 0, watch.get_write_watch(flags, base, size, addresses, count), PAGE_SIZE
    except WriteWatchError as exc:
        _failed("GetWriteWatch", exc)
        if count is None:
            count = 0 if addresses is None else len(addresses)
        return WRITE_WATCH_FAILED, count, 0


def ResetWriteWatch(base: int, size: int) -> int:  # noqa: N802
    """Reset the write-tracking state of [base, base+size); 0 on success."""
    def call() -> int:
        watch.reset_write_watch(base, size)
        return 0
    return _windows_call("ResetWriteWatch", WRITE_WATCH_FAILED, call)


def region_info(address: int) -> RegionInfo | None:
    """The VirtualAlloc region holding address: base, size, write-watch backend
    name (None without MEM_WRITE_WATCH) and whether the kernel's own writes
    into it need prepare_kernel_write. None (ERROR_INVALID_ADDRESS) for an
    address writewatch did not allocate."""
    return _windows_call("region_info", None, lambda: memory.info(address))


class _ReadInto(Protocol):
    def readinto(self, buffer: Any, /) -> int | None: ...


Target = Any  # an address (with size), a numpy array, a writable buffer, a WatchedMemory


def _target_buffer(target: Target, size: int | None) -> np.ndarray:
    """The flat uint8 numpy view of target (first size bytes) to read into."""
    if isinstance(target, WatchedMemory):
        array = target.array
    elif isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if size is None:
            raise TypeError("reading into an address needs a size")
        return views.as_array(int(target), size)
    else:
        array = np.asarray(target)
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise TypeError("the target must be writable contiguous memory")
    flat = array.reshape(-1).view(np.uint8)
    if size is not None:
        size = operator.index(size)
        if not 0 <= size <= flat.nbytes:
            raise ValueError(f"size {size} does not fit the {flat.nbytes}-byte target")
        flat = flat[:size]
    return flat


def _kernel_write(buffer: np.ndarray, write: Callable[[np.ndarray], int | None]) -> int:
    """Prepare buffer's pages for a kernel write, then let write fill it."""
    if buffer.nbytes == 0:
        return 0
    address = buffer.ctypes.data
    watch.prepare_kernel_write(address, buffer.nbytes)
    try:
        done = write(buffer)
    except OSError as exc:
        if exc.errno != errno.EFAULT or isinstance(exc, WriteWatchError):
            raise
        raise WriteWatchError(ERROR_NOACCESS, f"the kernel could not write into "
                              f"[{address:#x}, +{buffer.nbytes:#x}): is it all committed "
                              "PAGE_READWRITE memory?") from exc
    if done is None:
        raise BlockingIOError(errno.EAGAIN, "no data ready (non-blocking source)")
    return done


def read_into(source: int | _ReadInto, target: Target, size: int | None = None) -> int:
    """Read from a file descriptor or a file object (anything with readinto)
    into watched memory, on every backend; returns the bytes read (one read,
    as read(2) or ReadFile: fewer at end of file).

    target is an address (size needed), a numpy array, a writable buffer or a
    WatchedMemory; size limits the read to the target's first size bytes. The
    target's pages are marked written first (prepare_kernel_write), even if the
    read returns fewer bytes: the mprotect backend, and the uffd backend
    without privilege, would otherwise make the kernel's write fail with EFAULT.
    """
    buffer = _target_buffer(target, size)
    if isinstance(source, int):
        return _kernel_write(buffer, lambda b: os.readv(source, [b.data]))
    return _kernel_write(buffer, source.readinto)


def recv_into(sock: socket.socket, target: Target, size: int | None = None,
              flags: int = 0) -> int:
    """sock.recv_into into watched memory, on every backend (read_into says
    how target and size are given); returns the bytes received."""
    buffer = _target_buffer(target, size)
    return _kernel_write(buffer, lambda b: sock.recv_into(b.data, b.nbytes, flags))


WrittenUnit = Literal["address", "offset", "page"]
_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1


class WatchedMemory:
    """A write-watched block of memory for Python code.

    >>> with WatchedMemory(64 * 4096) as mem:
    ...     mem.array[4096 * 3] = 1
    ...     mem.written(reset=True, unit="page").tolist()
    [3]

    size is rounded up to whole pages (WatchedMemory(100) is one 4096-byte
    page); .size is the rounded size and .address the first byte. The block
    is a buffer: np.asarray(mem) is its uint8 view (.array), len(mem) its size,
    and memoryview(mem) works on Python 3.12+ (memoryview(mem.array) on any).

    The reservation is committed whole (read-write) unless commit=False; then
    commit() the parts to use. backend picks the write-watch backend ("auto":
    the best this machine has); .backend names the one it got. close() (or the
    with block) releases it; a block dropped without either is released when
    collected, and views made from it keep its memory mapped meanwhile.
    """

    def __init__(self, size: int, *, commit: bool = True, protect: int = PAGE_READWRITE,
                 backend: BackendName = "auto") -> None:
        size = operator.index(size)
        if size < 0:
            raise ValueError(f"size must not be negative, not {size}")
        allocation_type = MEM_RESERVE | MEM_WRITE_WATCH | (MEM_COMMIT if commit else 0)
        self.address = memory.allocate(0, size, allocation_type, protect, backend)
        self._size = -(-size // PAGE_SIZE) * PAGE_SIZE
        name = memory.info(self.address).backend
        assert name is not None
        self.backend: str = name
        self._array: np.ndarray | None = None
        self._closed = False
        # The block acts on this region object, never on whatever region owns
        # its address: after VirtualFree(mem.address, 0, MEM_RELEASE) the
        # kernel hands the same addresses to the next reservation.
        region = regions.find(self.address)
        assert region is not None
        self._region = region
        # Released when collected, like an mmap or a file, if never closed.
        self._finalizer = weakref.finalize(self, memory.release_collected, region)

    def __repr__(self) -> str:
        state = ("closed" if self._closed or not self._region.listed
                 else f"{self._size:#x} bytes")
        return f"<WatchedMemory at {self.address:#x}, {state}, backend {self.backend}>"

    def _check_open(self) -> None:
        if self._closed or not self._region.listed:
            raise ValueError("the memory was freed")

    # One object owns the memory: a copy would free it a second time, and a
    # pickle cannot carry a mapping to another process.
    def __copy__(self) -> WatchedMemory:
        raise TypeError("a WatchedMemory cannot be copied: it owns its memory (copy the "
                        "contents with mem.array.copy())")

    def __deepcopy__(self, memo: object) -> WatchedMemory:
        return self.__copy__()

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        raise TypeError("a WatchedMemory cannot be pickled: it is memory of this process "
                        "(pickle the contents, mem.array, instead)")

    @property
    def size(self) -> int:
        """The block's size in bytes (whole pages)."""
        self._check_open()
        return self._size

    @property
    def kernel_writes_fault(self) -> bool:
        """Whether the kernel's own writes into this block (os.readv,
        readinto, recv_into) fail with EFAULT unless prepared: read_into and
        recv_into prepare; otherwise call prepare_kernel_write first."""
        self._check_open()
        return memory.info(self.address).kernel_writes_fault

    @property
    def array(self) -> np.ndarray:
        """A uint8 view of the whole block (every page must be committed)."""
        self._check_open()
        if self._array is None:
            self._array = views.as_array(self.address, self.size)
        return self._array

    def __len__(self) -> int:
        return self.size  # raises once closed, like .size

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        array = self.array
        if dtype is not None and np.dtype(dtype) != array.dtype:
            if copy is False:
                raise ValueError("a view of the block is uint8; converting needs a copy")
            return array.astype(dtype)
        return array.copy() if copy else array

    if sys.version_info >= (3, 12):
        def __buffer__(self, flags: int) -> memoryview:
            return memoryview(self.array)

    def _span(self, offset: int, size: int | None) -> tuple[int, int]:
        """Absolute (address, size) of [offset, offset+size) of the block,
        refusing anything that leaves it (another allocation may lie there)."""
        self._check_open()
        offset = operator.index(offset)
        size = self.size - offset if size is None else operator.index(size)
        if offset < 0 or size < 0 or offset + size > self.size:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, f"[{offset:#x}, +{size:#x}) is not "
                                  f"inside the {self.size:#x}-byte block")
        return self.address + offset, size

    def view(self, offset: int = 0, size: int | None = None,
             dtype: npt.DTypeLike = np.uint8) -> np.ndarray:
        """A numpy view of [offset, offset+size) of the block."""
        return views.as_array(*self._span(offset, size), dtype)

    def commit(self, offset: int, size: int, protect: int = PAGE_READWRITE) -> None:
        """Commit [offset, offset+size) of the block (a commit=False block)."""
        memory.allocate(*self._span(offset, size), MEM_COMMIT, protect)

    def read_into(self, source: int | _ReadInto, offset: int = 0,
                  size: int | None = None) -> int:
        """Read from a file descriptor or file object into [offset,
        offset+size) of the block (size None: to its end), on every backend;
        returns the bytes read (writewatch.read_into)."""
        return read_into(source, *self._span(offset, size))

    def recv_into(self, sock: socket.socket, offset: int = 0, size: int | None = None,
                  flags: int = 0) -> int:
        """sock.recv_into into [offset, offset+size) of the block, on every
        backend; returns the bytes received."""
        return recv_into(sock, *self._span(offset, size), flags)

    def written(self, reset: bool = False, *, out: npt.NDArray[np.uintp] | None = None,
                unit: WrittenUnit = "address") -> npt.NDArray[np.uintp]:
        """The pages written since the last reset, ascending, as a uintp array
        of their addresses (unit="address"), byte offsets from .address
        ("offset") or page indices ("page": offset // PAGE_SIZE, ready to
        index an array of pages). The conversion is done in place, vectorized.

        With out, at most len(out) pages are returned (a view of out) and,
        with reset, only those pages are reset."""
        self._check_open()
        if not isinstance(reset, (bool, np.bool_)):
            raise TypeError(f"reset must be a bool, not {type(reset).__name__}")
        if unit not in ("address", "offset", "page"):
            raise ValueError(f"unit must be 'address', 'offset' or 'page', not {unit!r}")
        if out is None:
            out = np.empty(memory.committed_size(self.address) // PAGE_SIZE, np.uintp)
            if len(out) == 0:
                return out
        # Converted natively before the store: out may lie in memory another
        # thread makes unwritable once the call is over.
        origin = 0 if unit == "address" else self.address
        shift = _PAGE_SHIFT if unit == "page" else 0
        return out[:watch.get_write_watch_as(WRITE_WATCH_FLAG_RESET if reset else 0,
                                             self.address, self.size, out, origin, shift)]

    def reset(self) -> None:
        """Mark every page unwritten."""
        self._check_open()
        watch.reset_write_watch(self.address, self.size)

    def close(self) -> None:
        """Release the memory (views made earlier keep it mapped until collected)."""
        if not self._closed:
            self._closed = True
            self._array = None
            self._finalizer.detach()
            # Released through VirtualFree already: nothing left to do.
            with contextlib.suppress(WriteWatchError):
                memory.release_region(self._region)

    def __enter__(self) -> WatchedMemory:
        self._check_open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
