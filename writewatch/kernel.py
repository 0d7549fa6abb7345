"""The kernel layer: memory system calls, the one -errno helper, the /proc
readers, what the machine offers (Capabilities, which probe.py fills in), the
contract every write-watch backend implements, and the one ordered fork hook.

Nothing here knows about regions or Windows; every other module calls down into
this layer and it imports none of them (pyproject.toml's import-linter
contracts name every layer). Every native helper returns a value or -errno, and
check() (with oserror() for an errno in hand) is the one place that turns it
into the right OSError subclass, worded by the caller.

The words, used the same way in every layer:
- a *backend* is one write-watch mechanism (writewatch/backends/: pagemap,
  uffd, mprotect), one object per process;
- a *watcher* is a backend's write-watch state for one reservation (Watcher);
- a page is *written* once any write reached it since it was last reset; to
  *reset* (re-arm) a page is to make its next write count again.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
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

# The common calls as CPython functions (native/python_calls.c), set on the
# compiled module once: each answers the native call's result for its common
# call, or None for any other, which its caller's checked path serves and
# words (index.get_write_watch_common, memwatch.process_memwatch).
if lib.ww_install_python_calls() != 0:  # pragma: no cover - only without memory
    raise ImportError("writewatch._native could not define its common calls")
from writewatch._native import get_write_watch as _get_write_watch
from writewatch._native import process_memwatch as _process_memwatch

get_write_watch_common: Callable[[Any, Any, Any, Any, Any], int | None] = _get_write_watch
process_memwatch_common: Callable[[int, int, int, Any, Any, Any, Any], int | None] = \
    _process_memwatch

# The native code is built for one page size (native/abi.h): refuse to run on
# another rather than track the wrong pages.
PAGE_SIZE: int = lib.WW_PAGE_SIZE
if mmap.PAGESIZE != PAGE_SIZE:  # pragma: no cover - x86_64 always has 4 KiB pages
    raise ImportError(f"writewatch is built for {PAGE_SIZE}-byte pages; this system uses "
                      f"{mmap.PAGESIZE}")
PAGE_MASK = PAGE_SIZE - 1


def page_floor(address: int) -> int:
    return address & ~PAGE_MASK


def page_ceil(address: int) -> int:
    return (address + PAGE_MASK) & ~PAGE_MASK


PROT_NONE = 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
# mmap flags the stdlib does not export (x86_64 values)
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000
MADV_POPULATE_WRITE: int = lib.WW_MADV_POPULATE_WRITE  # Linux 5.14 (native/abi.h)


def errno_words(err: int) -> str:
    """What an errno value means (the one decoder's wording, also for messages
    that name a kernel errno they do not raise)."""
    return os.strerror(err)


def oserror(err: int, message: str, *, cause: int = 0) -> OSError:
    """The one decoder of errno values. OSError(errno, ...) picks the matching
    subclass (ProcessLookupError for ESRCH, PermissionError for EPERM, ...);
    the message is the call's own wording, then what the errno means. A call
    that reports a failure under another errno (process_memwatch's EIO) passes
    the kernel's as cause: its meaning is what the message says."""
    return OSError(err, f"{message}: {errno_words(cause or err)}")


def check(result: int, what: str) -> int:
    """Return a native helper's result, or raise the OSError its -errno names."""
    if result < 0:
        raise oserror(-result, what)
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
        got = check(lib.ww_mmap(address, size, PROT_NONE, flags | MAP_FIXED_NOREPLACE), "mmap")
        if got != address:  # a kernel older than 4.17 treats the flag as a hint
            lib.ww_munmap(got, size)
            raise oserror(errno.EEXIST, "mmap")
        return got
    # Over-allocate, then trim both ends to land on the alignment.
    span = size + alignment - PAGE_SIZE
    got = check(lib.ww_mmap(0, span, PROT_NONE, flags), "mmap")
    start = (got + alignment - 1) & ~(alignment - 1)
    if start > got:
        lib.ww_munmap(got, start - got)
    if got + span > start + size:
        lib.ww_munmap(start + size, got + span - start - size)
    return start


def unmap(address: int, size: int) -> None:
    check(lib.ww_munmap(address, size), "munmap")


def protect(address: int, size: int, prot: int) -> None:
    check(lib.ww_mprotect(address, size, prot), "mprotect")


def discard(address: int, size: int) -> None:
    """Drop the pages' contents: they read as zero when next touched."""
    check(lib.ww_madvise(address, size, mmap.MADV_DONTNEED), "madvise(MADV_DONTNEED)")


def no_huge_pages(address: int, size: int) -> None:
    """Keep 4 KiB precision: a transparent huge page is tracked as one 2 MiB unit."""
    check(lib.ww_madvise(address, size, mmap.MADV_NOHUGEPAGE), "madvise(MADV_NOHUGEPAGE)")


# ---------------------------------------------------------------------------
# userfaultfd (the pagemap and uffd backends, and the probe)

UFFD_OPEN_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK


def open_uffd(flags: int = UFFD_OPEN_FLAGS) -> int:
    """A new userfaultfd, UFFD_USER_MODE_ONLY first (Linux 5.11: an unprivileged
    process may open one when vm.unprivileged_userfaultfd = 0), without it
    where the kernel refuses the flag (native/syscalls.c)."""
    return check(lib.ww_uffd_open_user_mode_first(flags), "userfaultfd")


def uffd_open_errno(flags: int) -> int:
    """0 if userfaultfd(flags) opens here (the descriptor is closed at once),
    else its errno: a probe that changes nothing."""
    fd = lib.ww_uffd_open(flags)
    if fd < 0:
        return int(-fd)
    os.close(fd)
    return 0


def uffd_enable_features(fd: int, features: int) -> int:
    """UFFDIO_API on a fresh userfaultfd; returns every feature the kernel has."""
    api = ffi.new("struct uffdio_api *")
    check(lib.ww_uffd_api(fd, features, api), f"UFFDIO_API(features={features:#x})")
    return int(api.features)


def uffd_offered_features() -> int:
    """Every userfaultfd feature this kernel offers (UFFDIO_API asking for none)."""
    fd = open_uffd()
    try:
        return uffd_enable_features(fd, 0)
    finally:
        os.close(fd)


def uffd_register_write_protect(uffd: int, start: int, length: int) -> None:
    ioctls = ffi.new("uint64_t *")
    check(lib.ww_uffd_register_wp(uffd, start, length, ioctls), "UFFDIO_REGISTER")
    # The answer is a mask of ioctl bit numbers, not ioctl numbers (docs/semantics.md K9).
    if not ioctls[0] & (1 << lib.WW_UFFDIO_WRITEPROTECT_BIT):
        lib.ww_uffd_unregister(uffd, start, length)
        raise oserror(errno.EOPNOTSUPP, "UFFDIO_REGISTER gave no UFFDIO_WRITEPROTECT")


# ---------------------------------------------------------------------------
# What /proc and uname(2) say about this process and kernel (read by probe.py
# and sandbox.py; None when a file is missing or unreadable, as in a sandbox)


def read_proc_int(path: str) -> int | None:
    """The first number in a /proc file (a sysctl such as vm.max_map_count)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def proc_status_field(name: str) -> str | None:
    """A field of /proc/self/status (Seccomp, CapEff, ...), as written there."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{name}:\s*(\S+)", f.read(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1) if match else None


def kernel_version() -> tuple[int, ...]:
    """(major, minor, patch) of the running kernel's release; () when the
    release does not start with a version."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", os.uname().release)
    return tuple(int(part or 0) for part in match.groups()) if match else ()


# ---------------------------------------------------------------------------
# Fork: the child inherits the parent's userfaultfd and pagemap descriptors, and
# they still act on the PARENT's memory (docs/semantics.md rule K17). Every layer
# drops or refreshes its state here, lower layers first, in the order below;
# the range locks of the fallback backends are handed over by pthread_atfork
# handlers inside fork() itself (native/tracking.c says why).

FORK_STEPS = ("index", "backends", "regions")
_fork_steps: dict[str, tuple[Callable[[], None] | None, Callable[[], None] | None,
                             Callable[[], None]]] = {}
_process_epoch = 0


def on_fork(step: str, *, child: Callable[[], None], before: Callable[[], None] | None = None,
            parent: Callable[[], None] | None = None) -> None:
    """Register a layer's fork handlers under its step of FORK_STEPS: before and
    parent run in reverse step order around fork(), child in step order."""
    if step not in FORK_STEPS:
        raise ValueError(f"unknown fork step {step!r}")
    _fork_steps[step] = (before, parent, child)


def _ordered(reverse: bool = False) -> list[tuple[Callable[[], None] | None,
                                                  Callable[[], None] | None,
                                                  Callable[[], None]]]:
    steps = reversed(FORK_STEPS) if reverse else iter(FORK_STEPS)
    return [_fork_steps[step] for step in steps if step in _fork_steps]


def _before_fork() -> None:
    for before, _, _ in _ordered(reverse=True):
        if before is not None:
            before()


def _after_fork_in_parent() -> None:
    for _, parent, _ in _ordered():
        if parent is not None:
            parent()


def _after_fork_in_child() -> None:
    global _process_epoch
    _process_epoch += 1
    for _, _, child in _ordered():
        child()


def process_epoch() -> int:
    """A number that changes in a forked child: state tied to kernel objects of an
    older epoch (registrations, descriptors) belongs to the parent."""
    return _process_epoch


check(lib.ww_track_install_fork_handlers(), "pthread_atfork")
os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# What this machine offers: probe.py finds out, Backend.unavailable_reason reads it

@dataclass(frozen=True)
class KernelFeature:
    """One kernel feature a backend relies on, and whether this machine has it."""

    name: str
    present: bool
    since: str                      # the mainline Linux version that brought it
    required_by: tuple[str, ...]    # backends that are off without it
    optional_for: tuple[str, ...]   # backends that work without it, as purpose says
    purpose: str

    @property
    def role(self) -> str:
        parts = []
        if self.required_by:
            parts.append("required by " + ", ".join(self.required_by))
        if self.optional_for:
            parts.append("optional for " + ", ".join(self.optional_for))
        return "; ".join(parts) or "used by no backend"


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
    features: tuple[KernelFeature, ...] = ()
    max_map_count: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (what `python -m writewatch info --json` prints)."""
        return asdict(self)


# ---------------------------------------------------------------------------
# The backend contract


class Spans:
    """Page-aligned, ascending, disjoint [start, end) address spans in a C array,
    for a watcher's scan from Python (the latch walk); the index keeps a
    region's committed spans itself, for the scans it makes."""

    __slots__ = ("array", "count")

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self.count = len(spans)
        self.array = ffi.new("uint64_t[]", [bound for span in spans for bound in span] or [0])


def output_pointer(out: np.ndarray, capacity: int) -> Any:
    """A uint64_t* to out, a contiguous 64-bit array holding at least capacity
    entries (BufferError if it is not contiguous)."""
    if not 0 <= capacity <= len(out) or out.itemsize != 8:
        raise ValueError("capacity outside the 64-bit output array")
    try:
        # Writability is the caller's check: asking cffi for it costs twice as much.
        return ffi.from_buffer("uint64_t[]", out)
    except TypeError as exc:  # cffi's word for a non-contiguous buffer
        raise BufferError(str(exc)) from None


class Watcher:
    """A backend's write-watch state for one reservation.

    regions.py calls it with page-aligned spans inside the reservation, holding
    the region's lock. GetWriteWatch and ResetWriteWatch normally run in
    native/index.c, through native_handle(); get_write_watch serves the calls
    the index hands back (a region with latched pages).
    """

    survives_fork = False  # does tracking go on unaided in a forked child?

    def watch(self, start: int, length: int, prot: int, *, clean: bool = True) -> None:
        """Track newly committed pages and give them the POSIX protection prot.
        clean=False reports every page written until reset (after fork, when the
        parent's written state is unknown)."""
        raise NotImplementedError

    def unwatch(self, start: int, length: int) -> None:
        """Stop tracking pages about to be decommitted."""
        raise NotImplementedError

    def protect(self, start: int, length: int, prot: int) -> None:
        """Change the protection of watched pages, keeping their written state."""
        raise NotImplementedError

    def get_write_watch(self, spans: Spans, first: int, last: int, reset: bool,
                        out: np.ndarray, capacity: int) -> int:
        """Write the addresses of the written pages of spans inside [first, last)
        into out[:capacity] (a contiguous 64-bit numpy array), ascending; with
        reset, re-arm exactly the reported pages in the same step. Stops when
        capacity entries are written. Returns the number written."""
        raise NotImplementedError

    def prepare_kernel_write(self, start: int, length: int) -> None:
        """Mark pages written before the kernel writes them (read(2) and
        friends), so that the kernel's write cannot fail on a tracking trap."""

    def detach(self) -> None:
        """The reservation is gone."""

    def native_handle(self) -> tuple[int, int]:
        """(kind, handle) under which native/index.c scans this reservation:
        GetWriteWatch and ResetWriteWatch run there, in one native call."""
        raise NotImplementedError


class Backend:
    """A write-watch mechanism: makes a Watcher for each reservation."""

    name = "abstract"
    summary = ""
    preference = 0  # the order backends are listed in (native/mechanism.c picks for auto)
    operation = "process_memwatch"  # what a failed call of this mechanism is called

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

    def watches(self, address: int) -> bool:
        """Does this backend watch the write-watch region memory at address?"""
        raise NotImplementedError

    def region_memwatch(self, start: int, end: int, get: bool, clear: bool, out: Any,
                        capacity: int) -> int:
        """process_memwatch on [start, end) of a write-watch region this backend
        watches (memwatch.py checked the arguments): EINVAL unless all of it is
        committed, watched memory (docs/semantics.md rule M12)."""
        raise NotImplementedError

    def process_memwatch(self, start: int, end: int, flags: int, out: Any,
                         capacity: int) -> int:
        """process_memwatch (rules M13-M20) on [start, end) of this process,
        memory that no write-watch region holds: the first GET or CLEAR starts
        watching it. start and end are page aligned inside user space and flags
        valid (memwatch.py checked them); out is a uint64_t * with room for
        capacity offsets (NULL without GET). Returns the count, or -errno for
        memwatch.py to decode; a mapping that cannot be watched raises
        OSError(EINVAL) naming it, before anything is read or cleared."""
        raise NotImplementedError

    def memwatch_handle(self) -> tuple[int, int, int]:
        """(kind, uffd, pagemap_fd) under which native/index_calls.c serves
        process_memwatch in one call (kind WW_INDEX_PAGEMAP); any other kind
        means process_memwatch above is called."""
        return lib.WW_INDEX_PLAIN, -1, -1

    def memwatch_unwatch(self, start: int, end: int) -> None:
        """Stop watching [start, end) of memory process_memwatch watched,
        leaving its contents and protection as they were; it then reads as
        never watched (rule M19)."""
        raise NotImplementedError


class PerProcess:
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
