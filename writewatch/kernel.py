"""The kernel layer: memory system calls, the process_memwatch primitive and the
write-watch backends behind it.

Nothing here knows about regions or Windows; regions.py calls down into this
module and nothing calls up. Every native helper returns a value or -errno, and
_check is the one place that turns -errno into the right OSError subclass.

Backends, best first:
- ``pagemap``: one userfaultfd per process in async write-protect mode (Linux
  6.7+), queried and re-armed with the PAGEMAP_SCAN ioctl on /proc/self/pagemap.
  A page reads "written" exactly when its page-table entry has lost the
  write-protect bit, so the kernel does the bookkeeping and a first write costs
  one minor fault.
- ``uffd``: synchronous userfaultfd write-protect; a native thread records each
  first write (_tracking.c).
- ``mprotect``: read-only pages and a native SIGSEGV handler (_tracking.c).
Each reservation gets a Watcher from its backend; regions.py mirrors the
write-watch reservations into the native index (_index.c) that serves
GetWriteWatch in one call.
"""

from __future__ import annotations

import errno
import logging
import mmap
import operator
import os
import re
import signal
import threading
from dataclasses import asdict, dataclass
from enum import IntFlag
from typing import Any

import numpy as np

try:
    from writewatch._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only in a tree that was never built
    raise ImportError(
        "writewatch's compiled part (writewatch._native) is missing: this looks like an "
        "unbuilt source tree. Install the project (pip install -e .) or run from outside "
        f"the checkout. ({exc})"
    ) from exc

PAGE_SIZE = mmap.PAGESIZE
_PAGE_MASK = PAGE_SIZE - 1

PROT_NONE = 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
# mmap flags the stdlib does not export (x86_64 values)
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000
MADV_POPULATE_WRITE = 23  # Linux 5.14

_UFFD_OPEN_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
_UFFD_FEATURES = lib.UFFD_FEATURE_WP_ASYNC | lib.UFFD_FEATURE_WP_UNPOPULATED


class MemwatchFlags(IntFlag):
    """process_memwatch flags, as in the seed's uapi/linux/memwatch.h."""

    MEMWATCH_SD_GET = 0x1
    MEMWATCH_SD_CLEAR = 0x2
    MEMWATCH_SD_NO_REUSED_REGIONS = 0x4


MEMWATCH_SD_GET = MemwatchFlags.MEMWATCH_SD_GET
MEMWATCH_SD_CLEAR = MemwatchFlags.MEMWATCH_SD_CLEAR
MEMWATCH_SD_NO_REUSED_REGIONS = MemwatchFlags.MEMWATCH_SD_NO_REUSED_REGIONS
# A plain int: ~ on an IntFlag complements only within its defined bits.
_MEMWATCH_ALL = int(MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR | MEMWATCH_SD_NO_REUSED_REGIONS)


def _oserror(err: int, message: str) -> OSError:
    # OSError(errno, ...) picks the matching subclass (ProcessLookupError, ...).
    return OSError(err, f"{message}: {os.strerror(err)}")


def _check(result: int, what: str) -> int:
    """Return a native helper's result, or raise the OSError its -errno names."""
    if result < 0:
        raise _oserror(-result, what)
    return result


# ---------------------------------------------------------------------------
# Plain memory calls (used by regions.py for every region, watched or not)


def map_reserved(address: int, size: int, alignment: int) -> int:
    """Reserve size bytes of inaccessible, unbacked address space.

    With address 0 the kernel picks the place and it is aligned to alignment;
    otherwise exactly [address, address+size) is taken or FileExistsError is raised
    (MAP_FIXED_NOREPLACE never replaces an existing mapping).
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    if address:
        got = _check(lib.ww_mmap(address, size, PROT_NONE, flags | MAP_FIXED_NOREPLACE),
                     "mmap")
        if got != address:  # a kernel older than 4.17 treats the flag as a hint
            lib.ww_munmap(got, size)
            raise _oserror(errno.EEXIST, "mmap")
        return got
    # Over-allocate, then trim both ends to land on the alignment.
    span = size + alignment - PAGE_SIZE
    got = _check(lib.ww_mmap(0, span, PROT_NONE, flags), "mmap")
    start = (got + alignment - 1) & ~(alignment - 1)
    if start > got:
        lib.ww_munmap(got, start - got)
    if got + span > start + size:
        lib.ww_munmap(start + size, got + span - start - size)
    return start


def unmap(address: int, size: int) -> None:
    _check(lib.ww_munmap(address, size), "munmap")


def protect(address: int, size: int, prot: int) -> None:
    _check(lib.ww_mprotect(address, size, prot), "mprotect")


def discard(address: int, size: int) -> None:
    """Drop the pages' contents: they read as zero when next touched."""
    _check(lib.ww_madvise(address, size, mmap.MADV_DONTNEED), "madvise(MADV_DONTNEED)")


def no_huge_pages(address: int, size: int) -> None:
    """Keep 4 KiB precision: a transparent huge page is tracked as one 2 MiB unit."""
    _check(lib.ww_madvise(address, size, mmap.MADV_NOHUGEPAGE), "madvise(MADV_NOHUGEPAGE)")


# ---------------------------------------------------------------------------
# Fork: the child inherits the parent's userfaultfd and pagemap descriptors, and
# they still act on the PARENT's memory. The child forgets them and opens its own.

_process_epoch = 0


def process_epoch() -> int:
    """A number that changes in a forked child: state tied to kernel objects of an
    older epoch (registrations, descriptors) belongs to the parent."""
    return _process_epoch


def _after_fork_in_child() -> None:
    global _process_epoch
    _process_epoch += 1
    lib.ww_index_after_fork_child()
    for each in _backends.values():
        each.forget_process_state()


# ---------------------------------------------------------------------------
# Backends


class Watcher:
    """The write-watch state of one reservation on one backend.

    regions.py calls it with page-aligned spans inside the reservation, holding
    the region's lock. A watched page is "written" once any write reached it
    since it was last reset.
    """

    survives_fork = False  # does tracking go on unaided in a forked child?

    def watch(self, start: int, length: int, prot: int, *, clean: bool = True) -> None:
        """Track newly committed pages and give them the POSIX protection prot.
        clean=False reports every page written until reset (after fork, when the
        parent's dirty state is unknown)."""
        raise NotImplementedError

    def unwatch(self, start: int, length: int) -> None:
        """Stop tracking pages about to be decommitted."""
        raise NotImplementedError

    def protect(self, start: int, length: int, prot: int) -> None:
        """Change the protection of watched pages, keeping their dirty state."""
        raise NotImplementedError

    def written(self, spans: Spans, first: int, last: int, reset: bool, out: np.ndarray,
                capacity: int) -> int:
        """Write the addresses of the written pages of spans inside [first, last)
        into out[:capacity] (a contiguous 64-bit numpy array), ascending; with
        reset, re-arm exactly the reported pages in the same step. Stops when
        capacity entries are written. Returns the number written. The caller
        checks that out is writable; BufferError if it is not contiguous."""
        raise NotImplementedError

    def reset(self, spans: Spans, first: int, last: int) -> None:
        """Re-arm every page of spans inside [first, last)."""
        raise NotImplementedError

    def prepare_kernel_write(self, start: int, length: int) -> None:
        """Mark pages written before the kernel writes them (read(2) and
        friends), so that the kernel's write cannot fail on a tracking trap."""

    def detach(self) -> None:
        """The reservation is gone."""

    def native_handle(self) -> tuple[int, int]:
        """(kind, handle) under which _index.c scans this reservation."""
        raise NotImplementedError


class Spans:
    """Page-aligned, ascending, disjoint [start, end) address spans in a C array:
    built once when a region's committed runs change, used by every scan."""

    __slots__ = ("array", "count")

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self.count = len(spans)
        self.array = ffi.new("uint64_t[]", [bound for span in spans for bound in span] or [0])


def index_add(base: int, size: int, watcher: Watcher | None) -> None:
    """Enter a reservation in the native index (no spans yet). Plain ones are
    there too, so that an output array inside one is checked before a store."""
    kind, handle = (lib.WW_INDEX_PLAIN, -1) if watcher is None else watcher.native_handle()
    _check(lib.ww_index_add(base, size, kind, handle), "write-watch index")


def index_update(base: int, watcher: Watcher, spans: Spans) -> None:
    """Tell the native index a reservation's committed spans (and, after fork,
    its new handle)."""
    _check(lib.ww_index_update(base, watcher.native_handle()[1], spans.array, spans.count),
           "write-watch index")


def index_remove(base: int) -> None:
    _check(lib.ww_index_remove(base), "write-watch index")


# Looked up once: this is the per-frame path of a game loop.
_native_get_write_watch = lib.ww_get_write_watch
_from_buffer = ffi.from_buffer
_UINT64S = ffi.typeof("uint64_t[]")


def get_write_watch(flags: int, base: int, size: int, out: np.ndarray,
                    capacity: int) -> int | None:
    """GetWriteWatch in one native call (_index.c): the count, or None when the
    index cannot serve the call (an error to explain, or a forked child's
    region to refresh) and the caller must take its own path. out must be a
    writable contiguous 64-bit array (the caller checks writability)."""
    if not 0 <= capacity <= len(out) or out.itemsize != 8:
        raise ValueError("capacity outside the 64-bit output array")
    found: int = _native_get_write_watch(flags, base, size, _from_buffer(_UINT64S, out),
                                         capacity)
    if found >= 0:
        return found
    if found <= -lib.WW_INDEX_ERRNO_BASE:
        raise _oserror(-found - lib.WW_INDEX_ERRNO_BASE, "GetWriteWatch scan")
    return None


def output_writable(out: np.ndarray, count: int) -> bool:
    """Can count 64-bit entries be stored at the start of out? False when out
    lies in memory writewatch manages that was made read-only, inaccessible or
    decommitted after the array was made (numpy still calls it writable)."""
    return lib.ww_output_check(_from_buffer(_UINT64S, out), count * 8) == 0


def _output_pointer(out: np.ndarray, capacity: int) -> Any:
    if not 0 <= capacity <= len(out) or out.itemsize != 8:
        raise ValueError("capacity outside the 64-bit output array")
    try:
        # Writability is the caller's check: asking cffi for it costs twice as much.
        return ffi.from_buffer("uint64_t[]", out)
    except TypeError as exc:  # cffi's word for a non-contiguous buffer
        raise BufferError(str(exc)) from None


class Backend:
    """A write-watch mechanism: makes a Watcher for each reservation."""

    name = "abstract"
    summary = ""
    preference = 0  # auto picks the available backend with the highest

    def unavailable_reason(self, caps: Capabilities) -> str:
        """Why this machine cannot run the backend ("" when it can)."""
        raise NotImplementedError

    def attach(self, base: int, size: int) -> Watcher:
        raise NotImplementedError

    def kernel_writes_fault(self) -> bool:
        """True when the kernel's own writes into watched pages (read(2) and
        friends) fail with EFAULT unless prepare_kernel_write comes first."""
        return False

    def forget_process_state(self) -> None:
        """Called in a forked child: drop descriptors that belong to the parent."""


def _open_uffd(flags: int = _UFFD_OPEN_FLAGS, *, user_mode_only: bool = True) -> int:
    fd = -errno.EINVAL
    if user_mode_only:
        fd = lib.ww_uffd_open(flags | lib.UFFD_USER_MODE_ONLY)
    if fd == -errno.EINVAL:  # before Linux 5.11 there is no UFFD_USER_MODE_ONLY
        fd = lib.ww_uffd_open(flags)
    return _check(fd, "userfaultfd")


def _offered_uffd_features() -> int:
    """Every userfaultfd feature this kernel offers (UFFDIO_API asking for none)."""
    fd = _open_uffd()
    try:
        return _uffd_api(fd, 0)
    finally:
        os.close(fd)


def _uffd_api(fd: int, features: int) -> int:
    """Enable features on a fresh userfaultfd; returns every feature the kernel has."""
    api = ffi.new("struct uffdio_api *")
    result = lib.ww_uffd_api(fd, features, api)
    if result < 0:
        raise _oserror(-result, f"UFFDIO_API(features={features:#x})")
    return int(api.features)


def _register_wp(uffd: int, start: int, length: int) -> None:
    ioctls = ffi.new("uint64_t *")
    _check(lib.ww_uffd_register_wp(uffd, start, length, ioctls), "UFFDIO_REGISTER")
    if not ioctls[0] & (1 << lib.WW_UFFDIO_WRITEPROTECT_BIT):
        lib.ww_uffd_unregister(uffd, start, length)
        raise _oserror(errno.EOPNOTSUPP, "UFFDIO_REGISTER gave no UFFDIO_WRITEPROTECT")


class _PerProcess:
    """Lazily opened per-process kernel objects, forgotten in a forked child."""

    def __init__(self) -> None:
        self._fds: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    def open(self) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self) -> tuple[int, ...]:
        fds = self._fds
        if fds is None:
            with self._lock:
                if self._fds is None:
                    self._fds = self.open()
                fds = self._fds
        return fds

    def forget(self) -> None:
        self._lock = threading.Lock()
        fds, self._fds = self._fds, None
        for fd in fds or ():
            os.close(fd)


class _PagemapFds(_PerProcess):
    def open(self) -> tuple[int, ...]:
        uffd = _open_uffd()
        try:
            _uffd_api(uffd, _UFFD_FEATURES)
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(uffd)
            raise
        return uffd, pagemap


class PagemapBackend(Backend):
    """userfaultfd async write-protect + PAGEMAP_SCAN (Linux 6.7+): the kernel
    keeps the dirty state in the page tables; a first write costs one minor
    fault and no context switch."""

    name = "pagemap"
    summary = "userfaultfd async write-protect + PAGEMAP_SCAN"
    preference = 3

    def __init__(self) -> None:
        self.fds = _PagemapFds()

    def unavailable_reason(self, caps: Capabilities) -> str:
        return "" if caps.pagemap_backend else caps.pagemap_backend_detail

    @property
    def uffd(self) -> int:
        return self.fds.get()[0]

    @property
    def pagemap_fd(self) -> int:
        return self.fds.get()[1]

    def attach(self, base: int, size: int) -> Watcher:
        return _PagemapWatcher(self)

    def forget_process_state(self) -> None:
        self.fds.forget()


class _PagemapWatcher(Watcher):
    def __init__(self, backend: PagemapBackend) -> None:
        self.backend = backend

    def watch(self, start: int, length: int, prot: int, *, clean: bool = True) -> None:
        uffd = self.backend.uffd
        _register_wp(uffd, start, length)
        if clean:
            # Only this range: write-protecting unpopulated memory allocates page
            # tables for all of it, so cost follows what the caller asks to watch.
            _check(lib.ww_uffd_writeprotect(uffd, start, length, 1), "UFFDIO_WRITEPROTECT")
        self.protect(start, length, prot)

    def unwatch(self, start: int, length: int) -> None:
        _check(lib.ww_uffd_unregister(self.backend.uffd, start, length), "UFFDIO_UNREGISTER")

    def protect(self, start: int, length: int, prot: int) -> None:
        # The write-protect bit survives mprotect, so dirty state does too.
        protect(start, length, prot)

    def written(self, spans: Spans, first: int, last: int, reset: bool, out: np.ndarray,
                capacity: int) -> int:
        return _check(lib.ww_pagemap_written_spans(
            self.backend.pagemap_fd, spans.array, spans.count, first, last, reset,
            _output_pointer(out, capacity), capacity), "PAGEMAP_SCAN")

    def reset(self, spans: Spans, first: int, last: int) -> None:
        _check(lib.ww_pagemap_reset_spans(self.backend.pagemap_fd, spans.array, spans.count,
                                          first, last), "PAGEMAP_SCAN")

    def native_handle(self) -> tuple[int, int]:
        return lib.WW_INDEX_PAGEMAP, self.backend.pagemap_fd

    # prepare_kernel_write: nothing to do, the kernel resolves async write-protect
    # faults of its own writes too.


class _TrackedWatcher(Watcher):
    """Per-page state kept by _tracking.c (the mprotect and uffd backends)."""

    def __init__(self, base: int, size: int, mode: int) -> None:
        self.slot = _check(lib.ww_track_attach(base, size, mode), "write-watch range table")

    def watch(self, start: int, length: int, prot: int, *, clean: bool = True) -> None:
        _check(lib.ww_track_watch(self.slot, start, length, prot, clean), "watch")

    def unwatch(self, start: int, length: int) -> None:
        _check(lib.ww_track_unwatch(self.slot, start, length), "unwatch")

    def protect(self, start: int, length: int, prot: int) -> None:
        _check(lib.ww_track_protect(self.slot, start, length, prot), "mprotect")

    def written(self, spans: Spans, first: int, last: int, reset: bool, out: np.ndarray,
                capacity: int) -> int:
        return _check(lib.ww_track_written_spans(self.slot, spans.array, spans.count, first,
                                                 last, reset, _output_pointer(out, capacity),
                                                 capacity), "collect")

    def reset(self, spans: Spans, first: int, last: int) -> None:
        _check(lib.ww_track_written_spans(self.slot, spans.array, spans.count, first, last, 1,
                                          ffi.NULL, (last - first) // PAGE_SIZE), "reset")

    def prepare_kernel_write(self, start: int, length: int) -> None:
        _check(lib.ww_track_prepare_write(self.slot, start, length), "prepare_kernel_write")

    def detach(self) -> None:
        _check(lib.ww_track_detach(self.slot), "detach")

    def native_handle(self) -> tuple[int, int]:
        return lib.WW_INDEX_TRACKED, self.slot


class MprotectBackend(Backend):
    """Armed pages are read-only; a native SIGSEGV handler records the first
    write and gives write access back. Works on any Linux; each first write
    costs a signal and an mprotect. The kernel cannot write into armed pages
    (read(2) fails with EFAULT): call prepare_kernel_write first."""

    name = "mprotect"
    summary = "mprotect + SIGSEGV handler (native)"
    preference = 1

    def unavailable_reason(self, caps: Capabilities) -> str:
        return ""

    def kernel_writes_fault(self) -> bool:
        return True  # the kernel does not fault into a signal handler

    def attach(self, base: int, size: int) -> Watcher:
        _check(lib.ww_segv_install(), "sigaction(SIGSEGV)")
        watcher = _TrackedWatcher(base, size, lib.WW_MODE_MPROTECT)
        # A forked child inherits the handler, the state and the protections.
        watcher.survives_fork = True
        return watcher


class _SyncUffd(_PerProcess):
    """The uffd backend's descriptor and handler thread for this process."""

    features = 0
    kernel_faults = False  # do the kernel's own writes reach the handler thread?

    def open(self) -> tuple[int, ...]:
        # Without UFFD_USER_MODE_ONLY, faults taken by the kernel's own writes
        # (read(2) into watched memory) reach the handler thread too; it needs
        # privilege (or vm.unprivileged_userfaultfd = 1), so fall back to it.
        try:
            uffd = _open_uffd(user_mode_only=False)
            self.kernel_faults = True
        except PermissionError:
            uffd = _open_uffd()
            self.kernel_faults = False
        try:
            offered = _offered_uffd_features()
            wanted = (lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
                      | offered & lib.UFFD_FEATURE_WP_UNPOPULATED)
            self.features = _uffd_api(uffd, wanted) & wanted
            _check(lib.ww_uffd_handler_start(uffd), "pthread_create")
        except OSError:
            os.close(uffd)
            raise
        return (uffd,)


class UffdBackend(Backend):
    """userfaultfd synchronous write-protect (Linux 5.7+) with a native handler
    thread: each first write blocks until the thread records it and removes
    the protection."""

    name = "uffd"
    summary = "userfaultfd write-protect + handler thread (native)"
    preference = 2

    def __init__(self) -> None:
        self.uffd = _SyncUffd()

    def unavailable_reason(self, caps: Capabilities) -> str:
        if not caps.userfaultfd:
            return caps.userfaultfd_detail
        if not caps.uffd_features & lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            return "userfaultfd has no write-protect mode (needs Linux 5.7 or newer)"
        return ""

    def attach(self, base: int, size: int) -> Watcher:
        return _UffdWatcher(self, base, size)

    def kernel_writes_fault(self) -> bool:
        self.uffd.get()
        return not self.uffd.kernel_faults

    def forget_process_state(self) -> None:
        self.uffd.forget()


class _UffdWatcher(_TrackedWatcher):
    def __init__(self, backend: UffdBackend, base: int, size: int) -> None:
        super().__init__(base, size, lib.WW_MODE_UFFD)
        self.backend = backend

    def watch(self, start: int, length: int, prot: int, *, clean: bool = True) -> None:
        (uffd,) = self.backend.uffd.get()
        _register_wp(uffd, start, length)
        if clean and not self.backend.uffd.features & lib.UFFD_FEATURE_WP_UNPOPULATED:
            # Write-protecting an empty page table entry does nothing before
            # Linux 6.7: fault the pages in first so the protection sticks.
            protect(start, length, PROT_READ | PROT_WRITE)
            if lib.ww_madvise(start, length, MADV_POPULATE_WRITE) < 0:
                lib.ww_touch_for_write(start, length)
        super().watch(start, length, prot, clean=clean)

    def unwatch(self, start: int, length: int) -> None:
        super().unwatch(start, length)
        (uffd,) = self.backend.uffd.get()
        _check(lib.ww_uffd_unregister(uffd, start, length), "UFFDIO_UNREGISTER")


_backends: dict[str, Backend] = {
    each.name: each for each in (PagemapBackend(), UffdBackend(), MprotectBackend())
}
_backend_lock = threading.Lock()
_unavailable: dict[str, str] | None = None
_auto_choice: str | None = None
log = logging.getLogger("writewatch")

BACKEND_ENV = "WRITEWATCH_BACKEND"


class BackendUnavailableError(OSError):
    """The requested write-watch mechanism does not work on this machine."""


def backend_names() -> list[str]:
    """Every backend writewatch knows, available here or not, best first."""
    return sorted(_backends, key=lambda name: -_backends[name].preference)


def backend_status() -> dict[str, str]:
    """Each backend's name -> "" if it works here, else why not (probed once)."""
    global _unavailable
    with _backend_lock:
        if _unavailable is None:
            caps = probe()
            _unavailable = {name: _backends[name].unavailable_reason(caps)
                            for name in backend_names()}
        return dict(_unavailable)


def backend_report() -> list[dict[str, Any]]:
    """Each backend, best first: name, available, and what it is or why not."""
    status = backend_status()
    return [{"name": name, "available": not status[name],
             "detail": status[name] or _backends[name].summary} for name in backend_names()]


def requested_backend() -> str:
    """The backend WRITEWATCH_BACKEND asks for ("auto" when unset)."""
    name = os.environ.get(BACKEND_ENV, "auto").strip() or "auto"
    if name != "auto" and name not in _backends:
        raise ValueError(f"{BACKEND_ENV}={name!r} names no backend; choose one of "
                         f"{', '.join(backend_names())} or auto")
    return name


def backend(name: str = "auto") -> Backend:
    """The backend to watch new memory with.

    "auto" means what WRITEWATCH_BACKEND says, or else the best backend that
    works here (chosen once per process and logged). An explicit request for a
    backend this machine cannot run raises BackendUnavailableError saying why;
    it never switches silently."""
    global _auto_choice
    if name == "auto":
        name = requested_backend()
    if name == "auto":
        if _auto_choice is None:
            status = backend_status()
            _auto_choice = next(each for each in backend_names() if not status[each])
            log.info("writewatch: using %s backend", _auto_choice)
        name = _auto_choice
    if name not in _backends:
        raise ValueError(f"unknown write-watch backend {name!r}; choose one of "
                         f"{', '.join(backend_names())} or auto")
    reason = backend_status()[name]
    if reason:
        raise BackendUnavailableError(errno.ENOSYS, f"{name} backend unavailable: {reason}")
    return _backends[name]


# Range locks are held across fork() by native handlers; _tracking.c says why.
_check(lib.ww_track_install_fork_handlers(), "pthread_atfork")
os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# process_memwatch: the seed's system call, on PAGEMAP_SCAN


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to (EINVAL if it is none, ESRCH if it exited)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as info:
            match = re.search(r"^Pid:\s*(-?\d+)", info.read(), re.MULTILINE)
    except OSError as exc:
        raise _oserror(errno.EINVAL, f"pidfd {pidfd} is not an open descriptor") from exc
    if match is None:
        raise _oserror(errno.EINVAL, f"descriptor {pidfd} is not a pidfd")
    pid = int(match.group(1))
    if pid <= 0:
        raise _oserror(errno.ESRCH, f"the process of pidfd {pidfd} has exited")
    return pid


def _target_pagemap(pidfd: int) -> int:
    """Open the pagemap of the process pidfd refers to; ESRCH if it is gone or the
    caller may not inspect it (the kernel checks ptrace read access)."""
    pid = _pidfd_pid(pidfd)
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _oserror(errno.ESRCH, f"cannot access process {pid} ({exc.strerror})") from exc
    try:
        # The process was alive after the open, so pid was not reused meanwhile.
        signal.pidfd_send_signal(pidfd, 0)
    except OSError as exc:
        os.close(fd)
        raise _oserror(errno.ESRCH, f"process {pid} exited") from exc
    return fd


def _vec_pointer(vec: Any, vec_len: int | None) -> tuple[Any, int]:
    if not isinstance(vec, np.ndarray) or vec.dtype != np.int64 or vec.ndim != 1:
        raise _oserror(errno.EINVAL, "vec must be a 1-D numpy int64 array")
    if not vec.flags.c_contiguous or not vec.flags.writeable:
        raise _oserror(errno.EINVAL, "vec must be contiguous and writable")
    if vec_len is None:
        vec_len = len(vec)
    if not 0 < vec_len <= len(vec):
        raise _oserror(errno.EINVAL, f"vec_len {vec_len} must be 1..len(vec) ({len(vec)})")
    if not output_writable(vec, vec_len):
        raise _oserror(errno.EINVAL, "vec lies in memory that cannot be written")
    return ffi.from_buffer("uint64_t[]", vec), vec_len


def process_memwatch(pidfd: int, start: int, length: int, flags: int,
                     vec: np.ndarray | None = None, vec_len: int | None = None) -> int:
    """The seed's ``process_memwatch``, on whichever backend watches the range.

    pidfd 0 (or a pidfd of the caller) is the calling process, on any backend;
    otherwise a pidfd (os.pidfd_open) of a process the caller may ptrace-read,
    served through its /proc/PID/pagemap (pagemap backend only: the fallbacks
    keep their state in the target's own memory). MEMWATCH_SD_GET writes the byte offsets from start
    of the written pages of [start, start+length) into vec (numpy int64),
    ascending, and stops when vec_len entries are filled; with MEMWATCH_SD_CLEAR
    too, exactly the reported pages are re-armed in the same step and nothing past
    the stop is cleared. CLEAR alone re-arms the whole range. Returns the number
    of offsets written.

    Memory that is not being watched is never reported clean: a range that
    touches a mapping not registered for write watch fails with EINVAL before
    anything is read or cleared. Unmapped gaps hold no pages and report nothing.
    MEMWATCH_SD_NO_REUSED_REGIONS is accepted and has no effect: async
    write-protect has no per-mapping dirty flag to ignore.

    Errors (OSError): EINVAL (bad flags, unaligned start, negative length, GET
    without room or with a vec in memory that cannot be written, range not
    watched), ESRCH (the process is gone or may not be inspected), EIO (the
    kernel failed the scan). A non-integer argument raises TypeError.
    """
    # numpy integers are integers too, but their fixed-width arithmetic would wrap.
    pidfd, start, length, flags = (operator.index(each) for each in (pidfd, start, length, flags))
    if vec_len is not None:
        vec_len = operator.index(vec_len)
    if (flags & ~_MEMWATCH_ALL
            or not flags & (MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR)):
        raise _oserror(errno.EINVAL, f"invalid process_memwatch flags {flags!r}")
    if start < 0 or start & _PAGE_MASK:
        raise _oserror(errno.EINVAL, f"start {start:#x} is not page aligned")
    if length < 0:
        raise _oserror(errno.EINVAL, f"negative length {length}")
    end = start + ((length + _PAGE_MASK) & ~_PAGE_MASK)
    if end >= 1 << 64:
        raise _oserror(errno.EINVAL, "range wraps the address space")
    get = bool(flags & MEMWATCH_SD_GET)
    clear = bool(flags & MEMWATCH_SD_CLEAR)
    out, capacity = _vec_pointer(vec, vec_len) if get else (ffi.NULL, 0)
    if end == start:
        return 0

    if pidfd != 0 and _pidfd_pid(pidfd) == os.getpid():
        pidfd = 0  # a pidfd of the calling process is the calling process
    if pidfd == 0:
        slot = lib.ww_track_find(start)
        if slot >= 0:  # memory watched by the mprotect or uffd backend
            return _memwatch_tracked(slot, start, end, get, clear, out, capacity)
        if backend_status()["pagemap"]:
            raise _oserror(errno.EINVAL, f"[{start:#x}, {end:#x}) is not watched memory")
        pagemap = _backends["pagemap"]
        assert isinstance(pagemap, PagemapBackend)
        fd, owned = pagemap.pagemap_fd, False
    else:
        fd, owned = _target_pagemap(pidfd), True
    try:
        checked = lib.ww_pagemap_check_watched(fd, start, end)
        if checked == -errno.EPERM:
            raise _oserror(errno.EINVAL, f"[{start:#x}, {end:#x}) is not all watched memory")
        _memwatch_check(checked)
        if get:
            walk_end = ffi.new("uint64_t *")
            return _memwatch_check(lib.ww_pagemap_written(fd, start, end, clear, out, capacity,
                                                          start, walk_end))
        _memwatch_check(lib.ww_pagemap_reset(fd, start, end))
        return 0
    finally:
        if owned:
            os.close(fd)


def _memwatch_tracked(slot: int, start: int, end: int, get: bool, clear: bool, out: Any,
                      capacity: int) -> int:
    """process_memwatch on this process's memory of a userspace-tracking backend."""
    if not lib.ww_track_all_watched(slot, start, end):
        raise _oserror(errno.EINVAL, f"[{start:#x}, {end:#x}) is not all watched memory")
    if get:
        return _memwatch_check(lib.ww_track_written(slot, start, end, clear, out, capacity,
                                                    start))
    _memwatch_check(lib.ww_track_written(slot, start, end, 1, ffi.NULL,
                                         (end - start) // PAGE_SIZE, 0))
    return 0


def _memwatch_check(result: int) -> int:
    """The seed's errors: EINVAL and ESRCH pass through, any other failure is EIO."""
    if result < 0 and -result not in (errno.EINVAL, errno.ESRCH):
        raise OSError(errno.EIO, f"PAGEMAP_SCAN failed: {os.strerror(-result)}")
    return _check(result, "PAGEMAP_SCAN")


# ---------------------------------------------------------------------------
# probe: what this machine supports, as data


@dataclass(frozen=True)
class Capabilities:
    """What the running kernel and sandbox allow. Each *_detail says why."""

    kernel_release: str
    kernel_version: tuple[int, ...]
    userfaultfd: bool
    userfaultfd_detail: str
    wp_async: bool
    wp_unpopulated: bool
    pagemap_scan: bool
    pagemap_scan_detail: str
    soft_dirty: bool
    soft_dirty_detail: str
    unprivileged_userfaultfd: int | None
    seccomp_mode: int | None
    pagemap_backend: bool
    pagemap_backend_detail: str
    uffd_features: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _seccomp_mode() -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^Seccomp:\s*(\d+)", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _kernel_version(release: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    return tuple(int(part or 0) for part in match.groups()) if match else ()


def _probe_userfaultfd(unprivileged: int | None, seccomp: int | None) -> tuple[bool, str, int]:
    try:
        fd = _open_uffd()
    except OSError as exc:
        # What denies it (a seccomp filter, the sysctl, a security module) and
        # how to allow it: writewatch/sandbox.py.
        from writewatch import sandbox

        return False, sandbox.userfaultfd_denial(exc.errno or 0).detail, 0
    os.close(fd)
    try:
        features = _offered_uffd_features()
    except OSError as exc:
        return False, f"UFFDIO_API failed: {exc.strerror}", 0
    return True, "userfaultfd available", features


def _probe_pagemap_scan() -> tuple[bool, str]:
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/proc/self/pagemap cannot be opened: {exc.strerror}"
    try:
        arg = ffi.new("struct pm_scan_arg *")
        arg.size = ffi.sizeof("struct pm_scan_arg")
        arg.start = arg.end = 0
        arg.category_mask = arg.return_mask = lib.PAGE_IS_WRITTEN
        result = lib.ww_pagemap_raw(fd, arg)
    finally:
        os.close(fd)
    if result == -errno.ENOTTY:
        return False, "no PAGEMAP_SCAN ioctl (needs Linux 6.7 or newer)"
    if result < 0:
        return False, f"PAGEMAP_SCAN failed: {os.strerror(-result)}"
    return True, "PAGEMAP_SCAN available"


def _probe_soft_dirty() -> tuple[bool, str]:
    # Every new mapping carries VM_SOFTDIRTY, shown as "sd" in smaps' VmFlags only
    # when the kernel has CONFIG_MEM_SOFT_DIRTY: a probe with no side effect
    # (clearing soft-dirty bits would touch the whole process).
    try:
        with open("/proc/self/smaps") as f:
            flags = [line for line in f if line.startswith("VmFlags:")]
    except OSError as exc:
        return False, f"/proc/self/smaps cannot be read: {exc.strerror}"
    if any(" sd" in line for line in flags):
        return True, "soft-dirty bits available (CONFIG_MEM_SOFT_DIRTY)"
    return False, "kernel built without CONFIG_MEM_SOFT_DIRTY"


def probe() -> Capabilities:
    """Find out, without changing anything, what this machine supports."""
    release = os.uname().release
    version = _kernel_version(release)
    unprivileged = _read_int("/proc/sys/vm/unprivileged_userfaultfd")
    seccomp = _seccomp_mode()
    uffd_ok, uffd_detail, features = _probe_userfaultfd(unprivileged, seccomp)
    wp_async = bool(features & lib.UFFD_FEATURE_WP_ASYNC)
    wp_unpopulated = bool(features & lib.UFFD_FEATURE_WP_UNPOPULATED)
    scan_ok, scan_detail = _probe_pagemap_scan()
    sd_ok, sd_detail = _probe_soft_dirty()

    missing = []
    if not uffd_ok:
        missing.append(uffd_detail)
    elif not (wp_async and wp_unpopulated):
        missing.append("userfaultfd lacks WP_ASYNC/WP_UNPOPULATED (needs Linux 6.7 or newer)")
    if not scan_ok:
        missing.append(scan_detail)
    backend_ok = not missing
    backend_detail = ("userfaultfd async write-protect + PAGEMAP_SCAN" if backend_ok
                      else "; ".join(missing))
    return Capabilities(
        kernel_release=release,
        kernel_version=version,
        userfaultfd=uffd_ok,
        userfaultfd_detail=uffd_detail,
        wp_async=wp_async,
        wp_unpopulated=wp_unpopulated,
        pagemap_scan=scan_ok,
        pagemap_scan_detail=scan_detail,
        soft_dirty=sd_ok,
        soft_dirty_detail=sd_detail,
        unprivileged_userfaultfd=unprivileged,
        seccomp_mode=seccomp,
        pagemap_backend=backend_ok,
        pagemap_backend_detail=backend_detail,
        uffd_features=features,
    )
