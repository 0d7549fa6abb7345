"""A pure-Python reference model of the Windows virtual-memory and write-watch
semantics writewatch promises (docs/semantics.md rules 1-17, README "The Windows API").

No kernel behind it: regions hold their committed pages' protections, the set
of written pages and the bytes of the pages written to (sparse, so a huge
reservation costs what its committed pages cost). It is the one statement of
those semantics in the project: the tests (tests/test_model.py,
tests/test_hostile_inputs.py) drive it and writewatch side by side and compare
every return value, count, address, last error and byte, and the differential
tester's ``model`` (writewatch.testing.conformance.ReferenceModel) is a WindowsApi-shaped
adapter over it, so that what the tests check and what the tester compares
other implementations with cannot drift apart.

Each method takes the arguments of the function it models (integers only: the
TypeError cases are the hostile-input tests' business) and returns an
``Expect``: the value the real call must return and, for a failure, the last
error it must leave. Methods change the model only when the call succeeds.

The one thing the model cannot know is where the kernel puts a reservation made
with address 0: such calls take ``pick``, a callable that receives the length
and returns the base the real call chose (the caller checks it is 64 KiB
aligned and overlaps nothing the model knows). ``pick`` may instead raise
``ModelError`` (8 when it has no room, say) to make the call fail.

Two steps are methods a variant may override to build a deliberately wrong
model (the conformance tool's planted bugs): ``_report_and_reset``, the walk of
GetWriteWatch, and ``_decommit``. So that such a variant shows its bug the way
a real implementation would, the rest of the model does not repeat their work:
committing a page leaves its dirty bit and bytes alone (decommit, the only way a
page stops being committed, is what drops them), and the walk reports only
committed pages.

Order of the checks, where several errors apply, follows writewatch's
documentation (which follows Wine): see each method.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The SDK's numbers; everything the model says with them is its own, written
# without looking at regions.py, so that the two can be compared.
from writewatch.constants import (
    ERROR_INVALID_ADDRESS,
    ERROR_INVALID_PARAMETER,
    ERROR_NOACCESS,
    ERROR_NOT_ENOUGH_MEMORY,
    MEM_COMMIT,
    MEM_DECOMMIT,
    MEM_FREE,
    MEM_PRIVATE,
    MEM_RELEASE,
    MEM_RESERVE,
    MEM_WRITE_WATCH,
    PAGE_NOACCESS,
    PAGE_READONLY,
    PAGE_READWRITE,
    WRITE_WATCH_FAILED,
    WRITE_WATCH_FLAG_RESET,
)

PAGE = mmap.PAGESIZE  # the machine's, as writewatch's granularity is
GRANULARITY = 0x10000
USER_SPACE_END = (1 << 47) - PAGE  # x86_64, four-level page tables
LOWEST_USER_ADDRESS = 0x10000      # Windows and Wine refuse the low 64 KiB

PROTECTIONS = (PAGE_NOACCESS, PAGE_READONLY, PAGE_READWRITE)

RESERVED = 0  # page state of a reserved page; a committed page holds its protection


def page_floor(address: int) -> int:
    return address & ~(PAGE - 1)


def page_ceil(address: int) -> int:
    return (address + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
class Expect:
    """What the real call must return, and the last error when it fails."""

    value: Any
    error: int | None = None  # None: the call succeeds

    @property
    def ok(self) -> bool:
        return self.error is None


class ModelError(Exception):
    """Raised inside the model to return a failure."""

    def __init__(self, error: int) -> None:
        super().__init__(error)
        self.error = error


@dataclass
class Region:
    """One reservation. Sparse, so that a reservation of terabytes costs what
    its committed pages cost: `state` maps each committed page to its
    protection (a page absent from it is reserved), `dirty` holds the written
    committed pages, `content` the pages holding anything but zeros, `latched`
    the written pages a VirtualProtect latched (docs/semantics.md rule 11):
    written, and kept written by a decommit until a reset."""

    base: int
    npages: int
    write_watch: bool
    allocation_protect: int
    state: dict[int, int] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    content: dict[int, bytearray] = field(default_factory=dict)
    latched: set[int] = field(default_factory=set)

    @property
    def size(self) -> int:
        return self.npages * PAGE

    @property
    def end(self) -> int:
        return self.base + self.size

    def protection(self, page: int) -> int:
        return self.state.get(page, RESERVED)

    def page_bytes(self, page: int) -> bytes:
        return bytes(self.content.get(page, bytes(PAGE)))

    def pages(self, first: int, last: int) -> range:
        """Page indices of the page-aligned address range [first, last)."""
        return range((first - self.base) // PAGE, (last - self.base) // PAGE)

    def committed_in(self, pages: range) -> list[int]:
        """The committed pages among pages, ascending (cost: committed pages)."""
        if len(pages) <= len(self.state):
            return [i for i in pages if i in self.state]
        return sorted(i for i in self.state if pages.start <= i < pages.stop)

    def commit(self, first: int, last: int, protect: int) -> None:
        # A committed page keeps its dirty state. Fresh pages start clean and
        # read as zero (docs/semantics.md rules 2, 11) because decommit dropped both.
        for i in self.pages(first, last):
            self.state[i] = protect

    def decommit(self, first: int, last: int) -> None:
        """Item 11: the pages of [first, last) become reserved and lose their
        dirty state, unless latched, and their contents (cost: committed, dirty
        and written pages)."""
        pages = self.pages(first, last)
        for i in self.committed_in(pages):
            del self.state[i]
        self.dirty.difference_update([i for i in self.dirty
                                      if i in pages and i not in self.latched])
        for i in [i for i in self.content if i in pages]:
            del self.content[i]

    def report_and_reset(self, pages: range, capacity: int, reset: bool) -> list[int]:
        """Items 5 and 9: the written pages among pages (committed, or latched
        and decommitted: rule 11), ascending; the walk stops when capacity are
        found, and a reset covers exactly the pages reported (and unlatches
        them)."""
        reported = sorted(i for i in self.dirty
                          if i in pages and (i in self.state or i in self.latched))[:capacity]
        if reset:
            self.dirty.difference_update(reported)
            self.latched.difference_update(reported)
        return reported

    def reset(self, pages: range) -> None:
        """ResetWriteWatch over pages: clean, and no longer latched."""
        self.dirty.difference_update([i for i in self.dirty if i in pages])
        self.latched.difference_update([i for i in self.latched if i in pages])

    def latch(self, pages: range) -> None:
        """VirtualProtect over pages latches those written now (rule 11)."""
        self.latched.update(i for i in self.dirty if i in pages)

    def committed_pages(self) -> list[int]:
        return sorted(self.state)

    def run_end(self, page: int) -> int:
        """One past the last page of the run of equal state starting at page."""
        if page in self.state:
            value, j = self.state[page], page
            while self.state.get(j) == value:
                j += 1
            return j
        return min((i for i in self.state if i > page), default=self.npages)


class CommitTooLargeError(Exception):
    """A commit larger than the model's commit_limit: the model costs memory per
    committed page, and the caller chose not to model commits that large."""


class WinModel:
    """The whole address space as writewatch's Windows API sees it.

    commit_limit (bytes, None for no limit): a commit larger than it raises
    CommitTooLargeError before anything changes, so that a fuzzer can skip it.

    chosen_reservations: False makes a reservation at a chosen address fail with
    487, for a user that makes its addresses up (ReferenceModel) and would
    otherwise have to steer them around such reservations."""

    def __init__(self, commit_limit: int | None = None,
                 chosen_reservations: bool = True) -> None:
        self.regions: dict[int, Region] = {}
        self.commit_limit = commit_limit
        self.chosen_reservations = chosen_reservations

    def _check_commit_size(self, first: int, last: int) -> None:
        if self.commit_limit is not None and last - first > self.commit_limit:
            raise CommitTooLargeError(last - first)

    # -- helpers

    def find(self, address: int) -> Region | None:
        for region in self.regions.values():
            if region.base <= address < region.end:
                return region
        return None

    def overlaps(self, start: int, end: int) -> bool:
        return any(r.base < end and start < r.end for r in self.regions.values())

    @staticmethod
    def _uint(value: int) -> int:
        if not 0 <= value < 1 << 64:
            raise ModelError(ERROR_INVALID_PARAMETER)
        return value

    @staticmethod
    def _run(failed: Any, body: Callable[[], Any]) -> Expect:
        try:
            return Expect(body())
        except ModelError as exc:
            return Expect(failed, exc.error)

    # -- VirtualAlloc

    def virtual_alloc(self, address: int, size: int, allocation_type: int, protect: int,
                      pick: Callable[[int], int]) -> Expect:
        """Checks: any argument outside 0..2**64-1, a protection other than
        NOACCESS/READONLY/READWRITE, unknown type bits, neither RESERVE nor
        COMMIT, WRITE_WATCH without RESERVE, size 0 -> 87; a range past the user
        address space -> 487 with an address, 8 without one; a reservation whose
        64 KiB-rounded base falls in the low 64 KiB -> 87 (Wine: "disallow low
        64k"); a reservation overlapping another -> 487; a commit not inside one
        reservation -> 487 (any reservation at an address, when the model was
        made without chosen_reservations). MEM_COMMIT with address 0 reserves
        too."""
        def body() -> int:
            for value in (address, size, allocation_type):
                self._uint(value)
            if protect not in PROTECTIONS:
                raise ModelError(ERROR_INVALID_PARAMETER)
            if allocation_type & ~(MEM_COMMIT | MEM_RESERVE | MEM_WRITE_WATCH):
                raise ModelError(ERROR_INVALID_PARAMETER)
            if not allocation_type & (MEM_COMMIT | MEM_RESERVE):
                raise ModelError(ERROR_INVALID_PARAMETER)
            if allocation_type & MEM_WRITE_WATCH and not allocation_type & MEM_RESERVE:
                raise ModelError(ERROR_INVALID_PARAMETER)
            if size == 0:
                raise ModelError(ERROR_INVALID_PARAMETER)
            if address + size > USER_SPACE_END:
                raise ModelError(ERROR_INVALID_ADDRESS if address else ERROR_NOT_ENOUGH_MEMORY)
            if allocation_type & MEM_RESERVE or address == 0:
                if address:
                    if not self.chosen_reservations:
                        raise ModelError(ERROR_INVALID_ADDRESS)
                    base = address & ~(GRANULARITY - 1)
                    length = page_ceil(address + size) - base
                    if base < LOWEST_USER_ADDRESS:
                        raise ModelError(ERROR_INVALID_PARAMETER)
                    if self.overlaps(base, base + length):
                        raise ModelError(ERROR_INVALID_ADDRESS)
                else:
                    length = page_ceil(size)
                if allocation_type & MEM_COMMIT:
                    self._check_commit_size(page_floor(address), page_ceil(address + size))
                if not address:
                    base = pick(length)
                region = Region(base, length // PAGE,
                                bool(allocation_type & MEM_WRITE_WATCH), protect)
                if allocation_type & MEM_COMMIT:
                    first, last = ((page_floor(address), page_ceil(address + size)) if address
                                   else (region.base, region.end))
                    region.commit(first, last, protect)
                self.regions[base] = region
                return base
            found = self.find(address)
            first, last = page_floor(address), page_ceil(address + size)
            if found is None or last > found.end:
                raise ModelError(ERROR_INVALID_ADDRESS)
            self._check_commit_size(first, last)
            found.commit(first, last, protect)
            return first

        return self._run(0, body)

    # -- VirtualFree

    def virtual_free(self, address: int, size: int, free_type: int) -> Expect:
        """Checks: arguments out of range, a type other than DECOMMIT/RELEASE ->
        87; an address in no reservation -> 487; RELEASE with a size -> 87,
        not in the first page -> 487; DECOMMIT with size 0 not in the first page
        -> 487, a range leaving the reservation -> 487."""
        def body() -> bool:
            for value in (address, size, free_type):
                self._uint(value)
            if free_type not in (MEM_DECOMMIT, MEM_RELEASE):
                raise ModelError(ERROR_INVALID_PARAMETER)
            region = self.find(address)
            if region is None:
                raise ModelError(ERROR_INVALID_ADDRESS)
            at_base = page_floor(address) == region.base
            if free_type == MEM_RELEASE:
                if size != 0:
                    raise ModelError(ERROR_INVALID_PARAMETER)
                if not at_base:
                    raise ModelError(ERROR_INVALID_ADDRESS)
                del self.regions[region.base]
                return True
            if size == 0:
                if not at_base:
                    raise ModelError(ERROR_INVALID_ADDRESS)
                first, last = region.base, region.end
            else:
                first, last = page_floor(address), page_ceil(address + size)
                if last > region.end:
                    raise ModelError(ERROR_INVALID_ADDRESS)
            self._decommit(region, first, last)
            return True

        return self._run(False, body)

    # -- VirtualProtect

    def virtual_protect(self, address: int, size: int, new_protect: int) -> Expect:
        """(True, old protection of the first page). Checks: arguments out of
        range, an unknown protection, size 0 -> 87; a range not inside one
        reservation or not all committed -> 487. Dirty state is untouched
        (item 10), and the pages written now are latched (rule 11)."""
        def body() -> tuple[bool, int]:
            self._uint(address)
            self._uint(size)
            if new_protect not in PROTECTIONS:
                raise ModelError(ERROR_INVALID_PARAMETER)
            if size == 0:
                raise ModelError(ERROR_INVALID_PARAMETER)
            first, last = page_floor(address), page_ceil(address + size)
            region = self.find(first)
            if region is None or last > region.end:
                raise ModelError(ERROR_INVALID_ADDRESS)
            pages = region.pages(first, last)
            if len(region.committed_in(pages)) != len(pages):
                raise ModelError(ERROR_INVALID_ADDRESS)
            old = region.state[pages[0]]
            for i in pages:
                region.state[i] = new_protect
            region.latch(pages)
            return True, old

        return self._run((False, 0), body)

    # -- VirtualQuery

    def virtual_query(self, address: int) -> Expect:
        """MEMORY_BASIC_INFORMATION fields as a tuple, or None (87) above user
        space. For an address in no known region only (BaseAddress,
        AllocationBase, State) = (page, 0, MEM_FREE) is modelled; RegionSize
        there depends on memory the model does not know, and is None."""
        def body() -> tuple[int, ...] | tuple[int, int, int, None, int, int, int]:
            self._uint(address)
            if address >= USER_SPACE_END:
                raise ModelError(ERROR_INVALID_PARAMETER)
            page = page_floor(address)
            region = self.find(page)
            if region is None:
                return (page, 0, 0, None, MEM_FREE, PAGE_NOACCESS, 0)
            i = (page - region.base) // PAGE
            value = region.protection(i)
            j = region.run_end(i)
            return (page, region.base, region.allocation_protect, (j - i) * PAGE,
                    MEM_COMMIT if value != RESERVED else MEM_RESERVE, value, MEM_PRIVATE)

        return self._run(None, body)

    # -- views and writes

    def view(self, address: int, size: int) -> Expect:
        """as_array(address, size): the value is True for a read-only view,
        False for a writable one; a range not inside one region, or touching a
        reserved or PAGE_NOACCESS page, fails with 487 (a WriteWatchError).
        size 0 is a ValueError, modelled as error -1."""
        def body() -> bool:
            self._uint(address)
            self._uint(size)
            if size == 0:
                raise ModelError(-1)
            region = self.find(address)
            if region is None or address + size > region.end:
                raise ModelError(ERROR_INVALID_ADDRESS)
            pages = region.pages(page_floor(address), page_ceil(address + size))
            committed = region.committed_in(pages)
            states = {region.state[i] for i in committed}
            if len(committed) != len(pages) or PAGE_NOACCESS in states:
                raise ModelError(ERROR_INVALID_ADDRESS)
            return PAGE_READONLY in states

        return self._run(None, body)

    def write(self, address: int, data: bytes) -> None:
        """A user-mode write through a writable view (the caller checked view()).
        Only a write-watch region records the pages written."""
        region = self.find(address)
        assert region is not None and address + len(data) <= region.end
        offset = address - region.base
        while data:
            i, at = divmod(offset, PAGE)
            assert region.protection(i) == PAGE_READWRITE
            page = region.content.setdefault(i, bytearray(PAGE))
            chunk = data[:PAGE - at]
            page[at:at + len(chunk)] = chunk
            if region.write_watch:
                region.dirty.add(i)
            data = data[len(chunk):]
            offset += len(chunk)

    def read_into(self, address: int, size: int, data: bytes) -> None:
        """ReadFile (or read(2)) into the buffer [address, address+size) that
        delivers data (at most size bytes, maybe none): the whole buffer is
        marked written as the read is issued, however many bytes arrive
        (docs/semantics.md rule 14); then data lands at its start. The caller
        checked that the buffer is writable (view())."""
        assert len(data) <= size
        region = self.find(address)
        assert region is not None and address + size <= region.end
        if region.write_watch and size:
            region.dirty.update(region.pages(page_floor(address), page_ceil(address + size)))
        if data:
            self.write(address, data)

    def read(self, address: int, length: int) -> bytes:
        """A read through a readable view (the caller checked view())."""
        region = self.find(address)
        assert region is not None and address + length <= region.end
        first = page_floor(address)
        pages = region.pages(first, page_ceil(address + length))
        assert all(region.protection(i) in (PAGE_READONLY, PAGE_READWRITE) for i in pages)
        whole = b"".join(region.page_bytes(i) for i in pages)
        return whole[address - first:address - first + length]

    # -- GetWriteWatch / ResetWriteWatch

    def _watched_range(self, base: int, size: int) -> tuple[Region, int, int]:
        if size == 0:
            raise ModelError(ERROR_INVALID_PARAMETER)
        first, last = page_floor(base), page_ceil(base + size)
        region = self.find(first)
        if region is None or not region.write_watch or last > region.end:
            raise ModelError(ERROR_INVALID_PARAMETER)
        return region, first, last

    def get_write_watch(self, flags: int, base: int, size: int, capacity: int | None,
                        count: int | None, writable: bool = True) -> Expect:
        """GetWriteWatch with an addresses array of `capacity` entries (None: no
        array) and `count` (None: the array's length). The value is
        (ret, count, granularity, addresses reported). Checks in the order of rule 15
        (item 15): count 0 -> 87; no array -> 998; count past the array or a
        read-only array -> 998; flags other than 0/1 -> 87; size 0 -> 87; a
        range that leaves the write-watch region once rounded out to pages, or a
        base outside one -> 87. The walk reports the written committed pages in
        ascending order and stops when count are found; with RESET exactly
        those are reset (item 9)."""
        given = (capacity or 0) if count is None else count

        def body() -> tuple[int, int, int, list[int]]:
            cap = 0 if capacity is None else capacity
            wanted = cap if count is None else self._uint(count)
            if wanted == 0:
                raise ModelError(ERROR_INVALID_PARAMETER)
            if capacity is None or wanted > cap or not writable:
                raise ModelError(ERROR_NOACCESS)
            self._uint(flags)
            if flags & ~WRITE_WATCH_FLAG_RESET:
                raise ModelError(ERROR_INVALID_PARAMETER)
            self._uint(base)
            self._uint(size)
            region, first, last = self._watched_range(base, size)
            walked = self._report_and_reset(region, region.pages(first, last), wanted,
                                            bool(flags & WRITE_WATCH_FLAG_RESET))
            return 0, len(walked), PAGE, [region.base + i * PAGE for i in walked]

        return self._run((WRITE_WATCH_FAILED, given, 0, []), body)

    def reset_write_watch(self, base: int, size: int) -> Expect:
        """ResetWriteWatch: 0, or 0xFFFFFFFF with 87 for size 0 or a range
        outside one write-watch region."""
        def body() -> int:
            self._uint(base)
            self._uint(size)
            region, first, last = self._watched_range(base, size)
            region.reset(region.pages(first, last))
            return 0

        return self._run(WRITE_WATCH_FAILED, body)

    # -- the steps a deliberately wrong variant overrides

    def _report_and_reset(self, region: Region, pages: range, capacity: int,
                          reset: bool) -> list[int]:
        """GetWriteWatch's walk over pages (indices into region): the pages it
        reports, at most capacity, reset too when reset is true."""
        return region.report_and_reset(pages, capacity, reset)

    def _decommit(self, region: Region, first: int, last: int) -> None:
        """VirtualFree(MEM_DECOMMIT) of the page-aligned range [first, last)."""
        region.decommit(first, last)

    # -- whole-model views

    @staticmethod
    def dirty_pages(region: Region) -> list[int]:
        return sorted(region.dirty)
