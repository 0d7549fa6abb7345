"""The implementations under test, each behind one interface: the raw C
reference and writewatch's backends; and the timer floors subtracted from
short samples."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

import writewatch as ww
from writewatch import backends, kernel, memory
from writewatch.bench.model import (
    RAW,
    RAW_MODES,
    RAW_MPROTECT,
    RESET,
    BenchError,
    P,
    reference,
)

# ---------------------------------------------------------------------------
# Implementations under test: the raw reference and writewatch's backends


class BenchTarget:
    """One implementation's write-watch region for one scenario: committed
    pages [start, start + size) of a reservation [base, base + reserved)."""

    impl = ""
    base = start = size = reserved = 0

    def __init__(self) -> None:
        self.ref = reference()

    @property
    def npages(self) -> int:
        return self.size // P

    def touch(self, pages: np.ndarray | None = None) -> int:
        """Write one byte (C code) to each page, or to the pages numbered in
        pages (uint32), in that order; the elapsed ns."""
        if pages is None:
            return int(self.ref.lib.wwb_touch(self.start, self.ref.ffi.NULL, self.npages))
        return int(self.ref.lib.wwb_touch(self.start, self.ref.ffi.from_buffer("uint32_t[]", pages),
                                          len(pages)))

    def prepare(self) -> None:
        """Make every page present and clean (what a first write after a reset means)."""
        self.touch()
        self.reset()

    def scan(self, flags: int, start: int, size: int, out: np.ndarray) -> tuple[int, int]:
        """GetWriteWatch(flags, start, size): (pages found, elapsed ns)."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class RawTarget(BenchTarget):
    """A region of reference.c: the kernel's write tracking (RAW, the pagemap
    backend's calls) or a fallback mechanism done plainly (RAW_MPROTECT,
    RAW_UFFD)."""

    impl = RAW

    def __init__(self, reserved: int, offset: int, size: int, impl: str = RAW) -> None:
        super().__init__()
        self.impl, self.mode = impl, RAW_MODES[impl]
        err = self.ref.ffi.new("int *")
        region = self.ref.lib.wwb_region_new_mode(reserved, offset, size, self.mode, err)
        if region == self.ref.ffi.NULL:
            raise BenchError(kernel.oserror(
                err[0], f"{impl} reference cannot set up {size} bytes").strerror)
        self.region = region
        self.base, self.reserved = int(region.base), reserved
        self.start, self.size = int(region.commit_start), size
        self._elapsed = self.ref.ffi.new("uint64_t *")

    def touch(self, pages: np.ndarray | None = None) -> int:
        self.before_writes()
        return super().touch(pages)

    def before_writes(self) -> None:
        """Before anything writes to the region: the mprotect reference's
        SIGSEGV handler first (writewatch's mprotect backend puts its own first
        on each call)."""
        if self.impl == RAW_MPROTECT:
            self.ref.lib.wwb_segv_first()

    def scan(self, flags: int, start: int, size: int, out: np.ndarray) -> tuple[int, int]:
        # Only the committed span, as writewatch scans: one PAGEMAP_SCAN over a
        # whole reservation reports the never-committed pages that share a page
        # table with the committed ones as written (docs/semantics.md rule K18).
        end = min(start + size, self.start + self.size)
        start = max(start, self.start)
        n = self.ref.lib.wwb_scan_timed(self.region, start, end, flags & RESET,
                                        self.ref.ffi.from_buffer("uint64_t[]", out), len(out),
                                        self._elapsed)
        if n < 0:
            raise BenchError(kernel.oserror(-n, f"{self.impl}: GetWriteWatch failed").strerror)
        return int(n), int(self._elapsed[0])

    def reset(self) -> None:
        result = self.ref.lib.wwb_reset(self.region, self.start, self.start + self.size)
        if result < 0:
            raise BenchError(kernel.oserror(-result, f"{self.impl}: reset failed").strerror)

    def close(self) -> None:
        if self.region is not None:
            self.ref.lib.wwb_region_free(self.region)
            self.region = None


class ApiTarget(BenchTarget):
    """A MEM_WRITE_WATCH region on one backend, driven through the Windows API."""

    def __init__(self, backend: str, reserved: int, offset: int, size: int) -> None:
        super().__init__()
        self.impl = backend
        whole = offset == 0 and size == reserved
        kind = ww.MEM_RESERVE | ww.MEM_WRITE_WATCH | (ww.MEM_COMMIT if whole else 0)
        self.base = memory.allocate(0, reserved, kind, ww.PAGE_READWRITE,
                                     backends.checked_name(backend))
        if not whole and ww.VirtualAlloc(self.base + offset, size, ww.MEM_COMMIT,
                                         ww.PAGE_READWRITE) != self.base + offset:
            ww.VirtualFree(self.base, 0, ww.MEM_RELEASE)
            raise BenchError(f"{backend}: commit failed: {ww.GetLastError()}")
        self.reserved, self.start, self.size = reserved, self.base + offset, size

    def prepare(self) -> None:
        # The fallbacks' armed pages would fault once each through their
        # handlers; marking them written first makes populating them cheap.
        ww.prepare_kernel_write(self.start, self.size)
        super().prepare()

    def scan(self, flags: int, start: int, size: int, out: np.ndarray) -> tuple[int, int]:
        get_write_watch, clock = ww.GetWriteWatch, time.perf_counter_ns
        t0 = clock()
        ret, found, _ = get_write_watch(flags, start, size, out)
        t1 = clock()
        if ret != 0:
            raise BenchError(f"{self.impl}: GetWriteWatch failed with {ww.GetLastError()}")
        return found, t1 - t0

    def reset(self) -> None:
        if ww.ResetWriteWatch(self.start, self.size) != 0:
            raise BenchError(f"{self.impl}: ResetWriteWatch failed with {ww.GetLastError()}")

    def close(self) -> None:
        if self.base:
            ww.VirtualFree(self.base, 0, ww.MEM_RELEASE)
            self.base = 0


def available_backends(requested: Sequence[str] = ()) -> list[str]:
    status = backends.backend_status()
    if requested:
        for name in requested:
            if name not in status:
                raise BenchError(f"unknown backend {name!r}; choose from {', '.join(status)}")
            if status[name]:
                raise BenchError(f"{name} backend unavailable here: {status[name]}")
        return list(requested)
    return [name for name in backends.backend_names() if not status[name]]


def raw_reference_missing() -> str:
    """"" when the raw reference can run here, else why not."""
    return backends.backend_status().get("pagemap", "")


@contextmanager
def made_targets(impls: Sequence[str], reserved: int, offset: int,
                 size: int) -> Iterator[list[BenchTarget]]:
    made: list[BenchTarget] = []
    try:
        for impl in impls:
            made.append(RawTarget(reserved, offset, size, impl) if impl in RAW_MODES
                        else ApiTarget(impl, reserved, offset, size))
        yield made
    finally:
        for target in made:
            target.close()


# ---------------------------------------------------------------------------
# Timer floors


def python_timer_floor(samples: int = 20000) -> float:
    """Median ns of an empty perf_counter_ns interval (what each Python sample
    carries besides the call)."""
    clock = time.perf_counter_ns
    values = []
    for _ in range(samples):
        t0 = clock()
        t1 = clock()
        values.append(t1 - t0)
    return float(statistics.median(values))


def c_timer_floor(samples: int = 20000) -> float:
    ref = reference()
    out = np.empty(samples, np.uint64)
    ref.lib.wwb_timer_floor(samples, ref.ffi.from_buffer("uint64_t[]", out))
    return float(np.median(out))
