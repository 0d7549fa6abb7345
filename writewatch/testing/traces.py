"""The differential tester's traces (conformance.py): calls on numbered
regions, how each runs on an implementation (Session), and random traces
(TraceGenerator)."""

from __future__ import annotations

import contextlib
import random
import zlib
from dataclasses import dataclass

import numpy as np

from writewatch.constants import (
    MEM_COMMIT,
    MEM_DECOMMIT,
    MEM_RELEASE,
    MEM_RESERVE,
    MEM_WRITE_WATCH,
    PAGE_NOACCESS,
    PAGE_READONLY,
    PAGE_READWRITE,
    WRITE_WATCH_FAILED,
    WRITE_WATCH_FLAG_RESET,
    allocation_type_name,
    protection_name,
)
from writewatch.kernel import PAGE_SIZE
from writewatch.regions import ALLOCATION_GRANULARITY
from writewatch.testing.implementations import ReferenceModel, WindowsApi
from writewatch.testing.winmodel import Region, page_ceil

P = PAGE_SIZE
# Guard entries after the addresses array's capacity: none may be overwritten.
_GUARD_ENTRIES = 2
_GUARD_VALUE = 0xDEADBEEFDEADBEEF


# ---------------------------------------------------------------------------
# Traces: calls on numbered regions (slots), so that every implementation can
# place its regions where it likes and any sub-sequence is still a valid trace.


def _size(value: int) -> str:
    if value and value % P == 0:
        return "P" if value == P else f"{value // P}*P"
    return f"{value:#x}" if value >= 16 else str(value)


def _at(slot: int, offset: int) -> str:
    return f"r{slot}" if offset == 0 else f"r{slot} + {_size(offset)}"


@dataclass(frozen=True)
class Alloc:
    slot: int
    pages: int
    allocation_type: int
    protect: int

    def describe(self) -> str:
        return (f"r{self.slot} = VirtualAlloc(NULL, {_size(self.pages * P)}, "
                f"{allocation_type_name(self.allocation_type)}, {protection_name(self.protect)})")


@dataclass(frozen=True)
class Commit:
    slot: int
    offset: int
    size: int
    protect: int

    def describe(self) -> str:
        return (f"VirtualAlloc({_at(self.slot, self.offset)}, {_size(self.size)}, MEM_COMMIT, "
                f"{protection_name(self.protect)})")


@dataclass(frozen=True)
class Free:
    slot: int
    offset: int
    size: int
    free_type: int

    def describe(self) -> str:
        kind = allocation_type_name(self.free_type) if self.free_type in (
            MEM_DECOMMIT, MEM_RELEASE) else f"{self.free_type:#x}"
        return f"VirtualFree({_at(self.slot, self.offset)}, {_size(self.size)}, {kind})"


@dataclass(frozen=True)
class Protect:
    slot: int
    offset: int
    size: int
    protect: int

    def describe(self) -> str:
        return (f"VirtualProtect({_at(self.slot, self.offset)}, {_size(self.size)}, "
                f"{protection_name(self.protect)}, &old)")


@dataclass(frozen=True)
class Write:
    slot: int
    offset: int
    length: int
    value: int
    by_kernel: bool = False
    delivered: int | None = None  # a kernel read: bytes the pipe holds (None: length)

    @property
    def data(self) -> bytes:
        return bytes([self.value]) * (self.length if self.delivered is None
                                      else self.delivered)

    def describe(self) -> str:
        if self.by_kernel:
            return (f"read(pipe, {_at(self.slot, self.offset)}, {self.length})"
                    f"  /* the kernel writes {len(self.data)} bytes of {self.value:#04x} */")
        return f"memset({_at(self.slot, self.offset)}, {self.value:#04x}, {self.length})"


@dataclass(frozen=True)
class Read:
    slot: int
    offset: int
    length: int

    def describe(self) -> str:
        return f"checksum({_at(self.slot, self.offset)}, {self.length})"


@dataclass(frozen=True)
class GetWatch:
    slot: int | None  # None: a NULL base
    flags: int
    offset: int
    size: int
    count: int
    with_array: bool = True

    def describe(self) -> str:
        flags = {0: "0", WRITE_WATCH_FLAG_RESET: "WRITE_WATCH_FLAG_RESET"}.get(
            self.flags, f"{self.flags:#x}")
        base = "NULL" if self.slot is None else _at(self.slot, self.offset)
        array = "addresses" if self.with_array else "NULL"
        return (f"GetWriteWatch({flags}, {base}, {_size(self.size)}, {array}, "
                f"&count /* = {self.count} */, &granularity)")


@dataclass(frozen=True)
class ResetWatch:
    slot: int
    offset: int
    size: int

    def describe(self) -> str:
        return f"ResetWriteWatch({_at(self.slot, self.offset)}, {_size(self.size)})"


Op = Alloc | Commit | Free | Protect | Write | Read | GetWatch | ResetWatch


class Session:
    """One implementation running one trace: slot -> base address."""

    def __init__(self, windows: WindowsApi) -> None:
        self.api = windows
        self.bases: dict[int, int] = {}

    def model(self) -> ReferenceModel:
        assert isinstance(self.api, ReferenceModel)
        return self.api

    def region(self, slot: int) -> Region | None:
        """The model's region in a slot (only for a session running the model)."""
        base = self.bases.get(slot)
        return None if base is None else self.model().regions.get(base)

    def applicable(self, op: Op) -> bool:
        """May op run now? Asked of the oracle (a session running the model)."""
        if isinstance(op, GetWatch) and op.slot is None:
            return True
        if isinstance(op, Alloc):
            return op.slot not in self.bases
        region = self.region(op.slot)  # type: ignore[arg-type]
        if region is None:
            return False
        if isinstance(op, (Write, Read)):
            if op.length <= 0 or op.offset < 0 or op.offset + op.length > region.npages * P:
                return False
            pages = range(op.offset // P, page_ceil(op.offset + op.length) // P)
            allowed = (PAGE_READWRITE,) if isinstance(op, Write) else (PAGE_READONLY,
                                                                      PAGE_READWRITE)
            return all(region.protection(page) in allowed for page in pages)
        return True

    def failure(self) -> str:
        return f"failed, GetLastError() = {self.api.GetLastError()}"

    def perform(self, op: Op) -> str:
        """Run op; its outcome as comparable text (equal text, equal behaviour)."""
        try:
            return self._perform(op)
        except Exception as exc:  # an implementation's bug is a result to compare
            return f"raised {type(exc).__name__}"

    def _perform(self, op: Op) -> str:
        windows = self.api
        if isinstance(op, Alloc):
            base = windows.VirtualAlloc(0, op.pages * P, op.allocation_type, op.protect)
            if not base:
                return self.failure()
            self.bases[op.slot] = base
            aligned = base % ALLOCATION_GRANULARITY == 0
            return "ok, 64 KiB aligned" if aligned else f"ok, base {base:#x} not 64 KiB aligned"
        if isinstance(op, GetWatch) and op.slot is None:
            return self._get_watch(op, 0)
        base = self.bases[op.slot]  # type: ignore[index]
        if isinstance(op, Commit):
            got = windows.VirtualAlloc(base + op.offset, op.size, MEM_COMMIT, op.protect)
            return f"ok, {_at(op.slot, got - base)}" if got else self.failure()
        if isinstance(op, Free):
            if not windows.VirtualFree(base + op.offset, op.size, op.free_type):
                return self.failure()
            if op.free_type == MEM_RELEASE:
                del self.bases[op.slot]
            return "ok"
        if isinstance(op, Protect):
            ok, old = windows.VirtualProtect(base + op.offset, op.size, op.protect)
            return f"ok, old {protection_name(old)}" if ok else self.failure()
        if isinstance(op, Write):
            data = op.data
            if op.by_kernel:
                try:
                    done = windows.kernel_write(base + op.offset, data, op.length)
                except OSError as exc:
                    return f"the kernel's write failed: {exc.strerror or exc}"
                return f"the kernel wrote {done} bytes"
            windows.write(base + op.offset, data)
            return "done"
        if isinstance(op, Read):
            data = windows.read(base + op.offset, op.length)
            return f"{len(data)} bytes, crc32 {zlib.crc32(data):#010x}"
        if isinstance(op, GetWatch):
            return self._get_watch(op, base)
        ret = windows.ResetWriteWatch(base + op.offset, op.size)
        return "ok" if ret == 0 else (self.failure() if ret == WRITE_WATCH_FAILED
                                      else f"returned {ret:#x}")

    def _get_watch(self, op: GetWatch, base: int) -> str:
        addresses = None
        if op.with_array:
            addresses = np.full(op.count + _GUARD_ENTRIES, _GUARD_VALUE, np.uintp)
        ret, count, granularity = self.api.GetWriteWatch(
            op.flags, base + op.offset if op.slot is not None else 0, op.size, addresses,
            op.count)
        overrun = (addresses is not None
                   and bool((addresses[op.count:] != _GUARD_VALUE).any()))
        tail = "; WROTE PAST THE ARRAY'S CAPACITY" if overrun else ""
        if ret != 0:
            if ret != WRITE_WATCH_FAILED:
                return f"returned {ret:#x}{tail}"
            return f"{self.failure()}, count left {count}{tail}"
        assert addresses is not None
        if count > op.count:
            return f"ok, count {count} exceeds the capacity {op.count}{tail}"
        offsets = [int(a) - base for a in addresses[:count]]
        pages = [f"{offset // P}" if offset % P == 0 else f"+{offset:#x}" for offset in offsets]
        return f"ok, granularity {granularity}, pages [{', '.join(pages)}]{tail}"

    def close(self) -> None:
        """Release what the trace left allocated."""
        for base in self.bases.values():
            # A broken implementation must not stop the run.
            with contextlib.suppress(Exception):
                self.api.VirtualFree(base, 0, MEM_RELEASE)
        self.bases.clear()
        self.api.close()


# ---------------------------------------------------------------------------
# Random traces


LAYOUT_OPS = (Alloc, Commit, Free, Protect)


class TraceGenerator:
    """Random traces that mostly make sense (writes land on committed read-write
    pages, calls name live regions) with a share of bad parameters."""

    def __init__(self, seed: int, max_slots: int = 3, with_protect: bool = True) -> None:
        self.rng = random.Random(seed)
        # How much a kernel read delivers is drawn apart, so that traces made
        # before reads could come up short stay the same call for call.
        self.read_rng = random.Random(seed ^ 0x5EED)
        self.max_slots = max_slots
        self.with_protect = with_protect

    def trace(self, length: int) -> list[Op]:
        oracle = Session(ReferenceModel())
        ops: list[Op] = []
        while len(ops) < length:
            op = self._next(oracle)
            if op is None:
                continue
            if oracle.applicable(op):
                oracle.perform(op)
            ops.append(op)
        return ops

    def _runs(self, region: Region, allowed: tuple[int, ...]) -> list[tuple[int, int]]:
        """[first, last) page runs whose state is in allowed."""
        runs: list[tuple[int, int]] = []
        page = 0
        while page < region.npages:  # one step per run of equal state
            end = region.run_end(page)
            if region.protection(page) in allowed:
                if runs and runs[-1][1] == page:
                    runs[-1] = (runs[-1][0], end)
                else:
                    runs.append((page, end))
            page = end
        return runs

    def _next(self, oracle: Session) -> Op | None:
        rng = self.rng
        live = sorted(oracle.bases)
        free_slots = [slot for slot in range(self.max_slots) if slot not in oracle.bases]
        kinds = ["write"] * 30 + ["get"] * 25 + ["reset"] * 6 + ["commit"] * 7 + \
            ["free"] * 8 + ["read"] * 5 + ["null"] * 1
        if self.with_protect:
            kinds += ["protect"] * 7
        if free_slots:
            kinds += ["alloc"] * (30 if not live else 4)
        kind = rng.choice(kinds) if live else "alloc"
        if kind == "alloc":
            return self._alloc(rng.choice(free_slots))
        if kind == "null":
            return GetWatch(None, 0, 0, P, 4)
        slot = rng.choice(live)
        region = oracle.region(slot)
        assert region is not None
        if kind == "write":
            return self._write(slot, region)
        if kind == "read":
            runs = self._runs(region, (PAGE_READONLY, PAGE_READWRITE))
            if not runs:
                return None
            first, last = rng.choice(runs)
            offset = rng.randrange(first * P, last * P)
            return Read(slot, offset, rng.randint(1, min(last * P - offset, 3 * P)))
        if kind == "get":
            return self._get(slot, region)
        offset, size = self._range(region)
        if kind == "reset":
            return ResetWatch(slot, offset, size)
        if kind == "commit":
            return Commit(slot, offset, size, self._protection())
        if kind == "protect":
            return Protect(slot, offset, size, self._protection())
        return self._free(slot, region, offset, size)

    def _alloc(self, slot: int) -> Alloc:
        rng = self.rng
        pages = rng.choice((1, 2, 3, 4, 5, 8, 16, 16, 17, 32, 64))
        watched = MEM_RESERVE | MEM_WRITE_WATCH
        allocation_type, protect = rng.choice((
            (watched | MEM_COMMIT, PAGE_READWRITE),
            (watched | MEM_COMMIT, PAGE_READWRITE),
            (watched | MEM_COMMIT, PAGE_READWRITE),
            (watched | MEM_COMMIT, PAGE_READONLY),
            (watched, PAGE_NOACCESS),
            (watched, PAGE_READWRITE),
            (MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE),  # plain memory: not watched
            (MEM_RESERVE, PAGE_NOACCESS),
            (MEM_WRITE_WATCH, PAGE_READWRITE),  # needs MEM_RESERVE: fails
            (MEM_COMMIT | MEM_WRITE_WATCH, PAGE_READWRITE),
        ))
        return Alloc(slot, pages, allocation_type, protect)

    def _protection(self) -> int:
        return self.rng.choice((PAGE_READWRITE, PAGE_READWRITE, PAGE_READWRITE, PAGE_READONLY,
                                PAGE_NOACCESS))

    def _range(self, region: Region) -> tuple[int, int]:
        """(offset, size) in bytes: mostly whole pages inside the region, some
        unaligned, some empty or running past the end."""
        rng = self.rng
        npages = region.npages
        first = rng.randrange(npages) if rng.random() < 0.6 else 0
        last = rng.randint(first + 1, npages)
        offset, size = first * P, (last - first) * P
        roll = rng.random()
        if roll < 0.04:
            size = 0
        elif roll < 0.09:
            size += rng.choice((1, P, npages * P))  # leaves the region
        elif roll < 0.16:
            shift = rng.randrange(1, P)  # unaligned base, still inside
            offset, size = offset + shift, max(size - shift, 1)
        return offset, size

    def _write(self, slot: int, region: Region) -> Op | None:
        rng = self.rng
        runs = self._runs(region, (PAGE_READWRITE,))
        if not runs:
            return None
        first, last = rng.choice(runs)
        start, end = first * P, last * P
        roll = rng.random()
        if roll < 0.5:
            offset, length = rng.randrange(start, end), 1
        elif roll < 0.65 and last - first >= 2:  # straddle a page boundary (item 8)
            boundary = rng.randrange(first + 1, last) * P
            offset, length = boundary - 2, 4
        else:
            offset = rng.randrange(start, end)
            length = rng.randint(1, min(end - offset, 3 * P))
        value = rng.randrange(1, 256)
        if rng.random() >= 0.1:
            return Write(slot, offset, length, value)
        # A kernel read into the buffer: it may deliver all of it, part, or nothing.
        roll = self.read_rng.random()
        delivered = (None if roll < 0.5 else 0 if roll < 0.7
                     else self.read_rng.randrange(length))
        return Write(slot, offset, length, value, by_kernel=True, delivered=delivered)

    def _get(self, slot: int, region: Region) -> GetWatch:
        rng = self.rng
        if rng.random() < 0.5:
            offset, size = 0, region.npages * P
        else:
            offset, size = self._range(region)
        roll = rng.random()
        if roll < 0.55:
            count = region.npages + rng.randint(0, 2)
        elif roll < 0.9:
            count = rng.randint(1, 3)  # capped (item 9)
        elif roll < 0.95:
            count = 0
        else:
            count = rng.randint(1, region.npages)
        flags = rng.choice((0, WRITE_WATCH_FLAG_RESET) * 12 + (2, 3))
        return GetWatch(slot, flags, offset, size, count, with_array=rng.random() > 0.03)

    def _free(self, slot: int, region: Region, offset: int, size: int) -> Free:
        roll = self.rng.random()
        if roll < 0.2:
            return Free(slot, 0, 0, MEM_RELEASE)
        if roll < 0.25:
            return Free(slot, 0, 0, MEM_DECOMMIT)  # the whole allocation
        if roll < 0.3:
            return Free(slot, self.rng.choice((0, P)), self.rng.choice((0, P)),
                        self.rng.choice((MEM_RELEASE, MEM_DECOMMIT | MEM_RELEASE, 0)))
        return Free(slot, offset, size, MEM_DECOMMIT)


