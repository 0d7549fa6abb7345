"""WatchedBuffer: write watch over memory Python code already has (a numpy
array, bytearray, mmap, memoryview, ctypes array), on process_memwatch; and
aligned_empty, a numpy array with pages of its own.

The kernel keeps one written bit per page, so (docs/semantics.md rules B1-B7):
- a page the buffer shares with other memory (the buffer does not start or
  end on a page boundary) reads written when anything writes to it: the
  buffer or its neighbour (B3);
- two watches cannot share a page, since one's reset would hide writes from
  the other: the second is refused (B5).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import operator
import threading
import weakref
from bisect import bisect_left
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from writewatch import backends, kernel
from writewatch.backends import BackendName
from writewatch.kernel import PAGE_SIZE, ffi, lib, page_ceil, page_floor
from writewatch.memwatch import MEMWATCH_SD_CLEAR, MEMWATCH_SD_GET

BufferUnit = Literal["offset", "page", "row", "address"]
_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
_GET, _CLEAR = int(MEMWATCH_SD_GET), int(MEMWATCH_SD_CLEAR)
_NO_OUTPUT = np.empty(0, np.int64)


def _export(buffer: Any) -> tuple[memoryview, int | None]:
    """A memoryview of buffer's memory (its export: while it is held, a
    bytearray cannot be resized nor an mmap closed), and the number of rows
    along its first axis (None for a 0-d buffer). TypeError for what exports
    no writable buffer, ValueError for what is not one contiguous block."""
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.writeable:
            raise TypeError("the array is read-only: nothing can write to it, so there is "
                            "nothing to watch")
        if not buffer.flags.c_contiguous:
            raise ValueError("the array is not C-contiguous: its memory is not one block "
                             "(watch the array it is a view of, or a contiguous copy)")
        rows = buffer.shape[0] if buffer.ndim else None
        # As bytes: numpy exports no buffer for some dtypes (datetime64).
        return buffer.reshape(-1).view(np.uint8).data, rows
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError(f"a {type(buffer).__name__} is not a buffer: watch a numpy array, "
                        "bytearray, mmap, memoryview or ctypes array") from None
    if view.readonly:
        view.release()
        raise TypeError(f"the {type(buffer).__name__} is read-only: nothing can write to it, "
                        "so there is nothing to watch")
    if not view.c_contiguous:
        view.release()
        raise ValueError(f"the {type(buffer).__name__} is not C-contiguous: its memory is "
                         "not one block")
    return view, view.shape[0] if view.ndim and view.shape else None


def _shared_pages(first: int, end: int) -> str:
    """What [first, end) maps that is shared or a file's, in words, or "".
    Such pages change through other mappings (another process's, a forked
    child's) and a file's through write(2), with no write through this
    process's page tables for any backend to see (docs/semantics.md rule B1)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if low < end and first < high:
                path = fields[5].strip() if len(fields) > 5 else ""
                if fields[1][3] == "s":
                    return f"a shared mapping of {path or 'anonymous memory'}"
                if fields[4] != "0":
                    return f"pages of {path or 'inode ' + fields[4]}"
    return ""


def _address_of(view: memoryview) -> int:
    pointer = ffi.from_buffer("char[]", view)
    try:
        return int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)


class _Claims:
    """Which pages each live watch holds: a page belongs to at most one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: list[int] = []
        self.watches: list[_Watch] = []

    def claim(self, watch: _Watch) -> None:
        with self.lock:
            i = bisect_left(self.starts, watch.first)
            for other in self.watches[max(i - 1, 0):i + 1]:
                if other.first < watch.end and watch.first < other.end:
                    raise ValueError(
                        f"pages [{watch.first:#x}, {watch.end:#x}) overlap the pages "
                        f"[{other.first:#x}, {other.end:#x}) of another open WatchedBuffer: "
                        "one written bit per page cannot serve two watches (close the "
                        "other first, or give each buffer its own pages with aligned_empty)")
            self.starts.insert(i, watch.first)
            self.watches.insert(i, watch)

    def release(self, watch: _Watch) -> bool:
        """Drop watch's claim; False if it held none (released already)."""
        with self.lock:
            i = bisect_left(self.starts, watch.first)
            if i < len(self.watches) and self.watches[i] is watch:
                del self.starts[i], self.watches[i]
                return True
            return False


_claims = _Claims()


class _Watch:
    """The state a WatchedBuffer's finalizer needs (never the WatchedBuffer)."""

    def __init__(self, buffer: Any, view: memoryview, backend: kernel.Backend, first: int,
                 end: int) -> None:
        self.buffer, self.view = buffer, view  # held until closed
        self.backend, self.first, self.end = backend, first, end
        self.lock = threading.Lock()  # a call and close() never overlap
        self.open = True

    def scan(self, start: int, flags: int, vec: np.ndarray, capacity: int) -> int:
        """process_memwatch over [start, self.end) on this watch's backend."""
        out = kernel.output_pointer(vec, capacity) if flags & _GET else ffi.NULL
        return kernel.check(self.backend.process_memwatch(start, self.end, flags, out, capacity),
                            "process_memwatch")


def _stop(watch: _Watch) -> None:
    """Close or finalizer: end this watch's own claim and watch, once."""
    with watch.lock:
        if not watch.open:
            return
        watch.open = False
        try:
            if _claims.release(watch):
                watch.backend.memwatch_unwatch(watch.first, watch.end)
        finally:
            watch.view.release()
            watch.buffer = None


class WatchedBuffer:
    """Which parts of a writable buffer were written since the last reset.

    >>> state = aligned_empty((1000, 512), np.float64)   # 1000 rows of 4 KiB
    >>> with WatchedBuffer(state) as watched:
    ...     state[[3, 700]] += 1
    ...     watched.written(reset=True, unit="row").tolist()
    [3, 700]

    buffer is a numpy array, bytearray, mmap, memoryview or ctypes array:
    writable, C-contiguous, in private anonymous memory (shared memory and a
    file's pages are refused with OSError EINVAL saying why: mmap.mmap(-1, n)
    is shared unless given flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS).
    Watching starts clean; the watch holds buffer (and its export) until
    closed: a bytearray cannot be resized nor an mmap closed meanwhile.

    Granularity is the page. A page the buffer shares with other memory (its
    first and last, unless the buffer starts and ends on page boundaries:
    .shares_pages) reads written whenever anything writes to it. aligned_empty
    makes arrays with pages of their own. Two open watches cannot share a page
    (ValueError).

    backend picks the mechanism ("auto": WRITEWATCH_BACKEND, or the best
    here). Where .kernel_writes_fault is True (mprotect; uffd without
    privilege), the kernel's own writes into the watched pages (os.readv,
    readinto, recv_into) fail with EFAULT unless prepare_kernel_write comes
    first. close() (or the with block, or collection) stops
    the watch and leaves the memory as it was; a closed watch raises
    ValueError.
    """

    def __init__(self, buffer: Any, *, backend: BackendName = "auto") -> None:
        view, self.rows = _export(buffer)
        try:
            if view.nbytes == 0:
                raise ValueError("the buffer is empty: it has no pages to watch")
            self.address, self.nbytes = _address_of(view), view.nbytes
            first, end = page_floor(self.address), page_ceil(self.address + self.nbytes)
            # The native check process_memwatch makes: does it hold region memory?
            if lib.ww_memwatch_checked(first, end - first, _CLEAR, 0,
                                       ffi.NULL) == -lib.WW_MEMWATCH_IN_REGION:
                raise ValueError("the buffer is VirtualAlloc memory: watch it with "
                                 "MEM_WRITE_WATCH and GetWriteWatch (or WatchedMemory)")
            shared = _shared_pages(first, end)
            if shared:
                raise kernel.oserror(errno.EINVAL, f"the buffer is {shared}: other mappings "
                                     "(or write(2) on a file) change it with no write through "
                                     "this process's page tables, which no backend would see "
                                     "(an anonymous mmap can be private: flags=mmap.MAP_PRIVATE"
                                     " | mmap.MAP_ANONYMOUS)")
            chosen = backends.backend(backend)
            watch = _Watch(buffer, view, chosen, first, end)
        except BaseException:
            view.release()
            raise
        _claims.claim(watch)
        try:
            watch.scan(first, _CLEAR, _NO_OUTPUT, 0)  # the first CLEAR starts watching, clean
        except BaseException:
            with contextlib.suppress(OSError):  # whatever the failed CLEAR registered
                chosen.memwatch_unwatch(first, end)
            _claims.release(watch)
            view.release()
            raise
        self.backend: str = chosen.name
        self._watch = watch
        self._finalizer = weakref.finalize(self, _stop, watch)

    @property
    def buffer(self) -> Any:
        """The object watched (held until the watch is closed)."""
        self._check_open()
        return self._watch.buffer

    def _check_open(self) -> None:
        if not self._watch.open:
            raise ValueError("the watch is closed")

    @property
    def npages(self) -> int:
        """Pages the buffer touches (page k holds buffer bytes from
        max(k * PAGE_SIZE - .page_offset, 0))."""
        return (self._watch.end - self._watch.first) >> _PAGE_SHIFT

    @property
    def page_offset(self) -> int:
        """Bytes of the first page that lie before the buffer."""
        return self.address - self._watch.first

    @property
    def shares_pages(self) -> bool:
        """Does the buffer share its first or last page with other memory?"""
        return bool(self.page_offset or (self.address + self.nbytes) % PAGE_SIZE)

    @property
    def closed(self) -> bool:
        return not self._watch.open

    @property
    def kernel_writes_fault(self) -> bool:
        """Whether the kernel's own writes into the watched pages fail with
        EFAULT (the mprotect backend; uffd without privilege)."""
        return self._watch.backend.kernel_writes_fault()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes} bytes in {self.npages} pages"
        return (f"<WatchedBuffer at {self.address:#x}, {state}, "
                f"backend {self.backend}>")

    def written(self, reset: bool = False, *, out: npt.NDArray[Any] | None = None,
                unit: BufferUnit = "offset") -> npt.NDArray[Any]:
        """What was written since the last reset, ascending: unit "offset"
        (default) gives the byte offset in the buffer where each written page's
        part begins (0 for a first page that starts before the buffer), "page"
        page indices (offset // PAGE_SIZE when the buffer is page aligned),
        "row" the indices along the buffer's first axis whose bytes touch a
        written page, "address" the written pages' addresses.

        reset=True re-arms exactly what is reported, in the same step as it is
        read: a write is reported by this call or the next one, never lost.
        out (a 1-D contiguous array of 8-byte integers) caps the result at
        len(out) entries and receives it (the result is a view of out); what
        did not fit stays written for the next call. For rows, out must hold
        at least the rows one page can touch. Without out, a new uintp array
        of its own."""
        if not isinstance(reset, (bool, np.bool_)):
            raise TypeError(f"reset must be a bool, not {type(reset).__name__}")
        if unit not in ("offset", "page", "row", "address"):
            raise ValueError(f"unit must be 'offset', 'page', 'row' or 'address', not {unit!r}")
        if unit == "row" and self.rows is None:
            raise ValueError("a 0-d buffer has no rows")
        if out is not None:
            _check_out(out)
        flags = _GET | (_CLEAR if reset else 0)
        watch = self._watch
        with watch.lock:
            self._check_open()
            if unit == "row":
                return self._rows(flags, out)
            npages = self.npages
            vec = np.empty(npages, np.uintp) if out is None else out
            if len(vec) == 0:
                return vec
            found = vec[:watch.scan(watch.first, flags, vec, min(len(vec), npages))]
        # process_memwatch gives byte offsets from the first page: converted in
        # place, with as few numpy calls as can be (each costs about a microsecond).
        if unit == "address":
            found += watch.first
        elif unit == "page":
            found >>= _PAGE_SHIFT
        elif not self.page_offset or not len(found):
            pass
        elif found[0] == 0:  # the first page begins before the buffer: offset 0
            found[1:] -= self.page_offset
        else:
            found -= self.page_offset
        # A short answer must not keep a page-count array alive (8 bytes per page).
        return found.copy() if out is None and 2 * len(found) < len(vec) else found

    def _rows(self, flags: int, out: np.ndarray | None) -> np.ndarray:
        """written(unit="row"), under the watch's lock."""
        watch = self._watch
        assert self.rows is not None
        row_bytes = max(self.nbytes // max(self.rows, 1), 1)
        pages = np.empty(self.npages, np.int64)
        if out is None:
            count = watch.scan(watch.first, flags, pages, self.npages)
            return self._rows_of(pages[:count], -1, np.uintp, row_bytes)
        # Each call is capped so that its pages' rows surely fit what is left of
        # out: reset then re-arms only pages whose rows are all reported.
        per_page = min((PAGE_SIZE - 1) // row_bytes + 2, self.rows)
        if len(out) < per_page:
            raise ValueError(f"out holds {len(out)} rows, and one page can touch {per_page} "
                             f"rows of {row_bytes} bytes: give it at least {per_page}")
        filled, start, last_row = 0, watch.first, -1
        while start < watch.end and len(out) - filled >= per_page:
            capacity = (len(out) - filled) // per_page
            count = watch.scan(start, flags, pages, capacity)
            if count == 0:
                break
            # Offsets are from start: make them from the first page.
            np.add(pages[:count], np.int64(start - watch.first), out=pages[:count])
            rows = self._rows_of(pages[:count], last_row, out.dtype, row_bytes)
            out[filled:filled + len(rows)] = rows
            filled += len(rows)
            last_row = int(rows[-1]) if len(rows) else last_row
            start = watch.first + int(pages[count - 1]) + PAGE_SIZE
            if count < capacity:
                break
        return out[:filled]

    def _rows_of(self, offsets: np.ndarray, after: int, dtype: Any, row_bytes: int) -> np.ndarray:
        """The rows, ascending and each once, that the pages at offsets (from
        the first page, ascending) touch, leaving out rows up to after."""
        assert self.rows is not None
        first_byte = np.maximum(offsets - self.page_offset, 0)
        last_byte = np.minimum(offsets + (PAGE_SIZE - self.page_offset), self.nbytes) - 1
        low = first_byte // row_bytes
        high = np.minimum(last_byte // row_bytes, self.rows - 1)
        # Neighbouring pages can touch the same row: start each run after the
        # previous run's last row.
        if len(low):
            np.maximum(low[1:], high[:-1] + 1, out=low[1:])
            low[0] = max(int(low[0]), after + 1)
        counts = np.maximum(high - low + 1, 0)
        total = int(counts.sum())
        rows = np.arange(total, dtype=np.int64)
        starts = np.cumsum(counts) - counts
        rows += np.repeat(low - starts, counts)
        return rows.astype(dtype, copy=False)

    def prepare_kernel_write(self, offset: int = 0, size: int | None = None) -> None:
        """Mark the pages holding bytes [offset, offset+size) of the buffer
        (size None: to its end) written, so that the kernel's own write into
        them (os.readv, readinto, recv_into) succeeds on every backend (rule
        B7). Each page gets an atomic add of nothing: no byte changes, even
        while other threads write. A reset between this call and the kernel's
        write re-arms the pages: call it again."""
        offset = operator.index(offset)
        size = self.nbytes - offset if size is None else operator.index(size)
        if offset < 0 or size < 0 or offset + size > self.nbytes:
            raise ValueError(f"[{offset}, +{size}) is not inside the {self.nbytes}-byte buffer")
        watch = self._watch
        with watch.lock:  # the buffer stays alive and watched meanwhile
            self._check_open()
            if size:
                first = page_floor(self.address + offset)
                kernel.check(lib.ww_touch_for_write(
                    first, page_ceil(self.address + offset + size) - first), "touch")

    def reset(self) -> None:
        """Mark the whole buffer unwritten."""
        watch = self._watch
        with watch.lock:
            self._check_open()
            watch.scan(watch.first, _CLEAR, _NO_OUTPUT, 0)

    def close(self) -> None:
        """Stop watching and leave the memory as it was (protections,
        registrations); closing again does nothing."""
        self._finalizer()

    def __reduce__(self) -> Any:
        # A copy would share this watch: closing either would end both.
        raise TypeError("a WatchedBuffer cannot be copied or pickled: watch a copy of the "
                        "buffer instead")

    def __enter__(self) -> WatchedBuffer:
        self._check_open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _check_out(out: Any) -> None:
    if not isinstance(out, np.ndarray) or out.dtype.kind not in "iu" or out.itemsize != 8:
        raise TypeError("out must be a numpy array of 8-byte integers (uintp, int64)")
    if out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a 1-D, contiguous, writable array")


def aligned_empty(shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.float64) -> np.ndarray:
    """A new C-contiguous array in pages of its own (a private anonymous
    mapping, zero-filled, freed with the array): watched, it shares no page
    with other memory, so only its own writes are reported."""
    dtype = np.dtype(dtype)
    dims = (operator.index(shape),) if not isinstance(shape, tuple) else \
        tuple(operator.index(each) for each in shape)
    if any(each < 0 for each in dims):
        raise ValueError(f"negative dimensions in {dims}")
    count = int(np.prod(dims, dtype=np.int64))
    block = mmap.mmap(-1, max(page_ceil(count * dtype.itemsize), PAGE_SIZE),
                      flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(block, dtype, count).reshape(dims)
