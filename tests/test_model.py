"""Model-based test (docs/semantics.md rules 1-17): hypothesis drives
writewatch and the pure-Python reference model in writewatch/testing/winmodel.py
side by side through random sequences of VirtualAlloc (reserve, commit,
write-watch or not, bad flags), writes through numpy views (single bytes,
ranges straddling pages), VirtualProtect (also over written pages, which
latches them, rule 11, often followed by a decommit), VirtualFree (decommit,
release), VirtualQuery, GetWriteWatch (random sub-ranges, capacities, counts,
with and without RESET) and ResetWriteWatch, and asserts that every return
value, count, address, last error and byte agrees. After every step, every
write-watch region's dirty pages (GetWriteWatch without RESET) and every
readable byte must match the model.

Runs once per backend (conftest.py). The CI profile is small; --soak (or
WRITEWATCH_SOAK=1) runs a long one.
"""

from __future__ import annotations

import random

import numpy as np
from forking import scaled_work
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import writewatch as ww
from writewatch.testing.winmodel import Expect, Region, WinModel

P = ww.PAGE_SIZE
G = ww.ALLOCATION_GRANULARITY
MAX_REGIONS = 4
CANARY = 0xC0FFEE0DDBA11
GUARD = 4  # canary entries on each side of every addresses array

CI_PROFILE = settings(max_examples=scaled_work(50, at_least=20), stateful_step_count=30,
                      deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
SOAK_PROFILE = settings(max_examples=3000, stateful_step_count=80, deadline=None,
                        suppress_health_check=list(HealthCheck))

RESERVE, COMMIT, WW_FLAG = ww.MEM_RESERVE, ww.MEM_COMMIT, ww.MEM_WRITE_WATCH
ALLOCATION_TYPES = [RESERVE | COMMIT | WW_FLAG] * 4 + [RESERVE | WW_FLAG] * 2 + [
    RESERVE | COMMIT, RESERVE, COMMIT]
BAD_ALLOCATION_TYPES = [WW_FLAG, 0, RESERVE | 0x40, COMMIT | WW_FLAG, 1 << 64, -1]
PROTECTIONS = [ww.PAGE_READWRITE] * 4 + [ww.PAGE_READONLY, ww.PAGE_NOACCESS]
BAD_PROTECTIONS = [0, 0x40, 0x104, 3, -1]
HUGE = [1 << 47, (1 << 64) - 1, 1 << 64, -1, -P]


def describe(expect: Expect) -> str:
    return f"model expects {expect.value!r}" + (f" with error {expect.error}"
                                                if expect.error is not None else "")


class WriteWatchMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = WinModel()
        self.released: list[int] = []  # bases released during the run

    def teardown(self) -> None:
        for base in list(self.model.regions):
            ww.VirtualFree(base, 0, ww.MEM_RELEASE)

    # -- choosing targets

    def regions(self) -> list[Region]:
        return [self.model.regions[base] for base in sorted(self.model.regions)]

    def draw_region(self, data: st.DataObject) -> Region:
        return data.draw(st.sampled_from(self.regions()), label="region")

    def draw_address(self, data: st.DataObject, region: Region | None) -> int:
        """An address inside region (mostly page aligned), or, without one, an
        address no region of the model holds (or one it does)."""
        if region is None:
            choices = [0, 1, P, *self.released, *self.model.regions]
            return data.draw(st.sampled_from(choices), label="address")
        page = data.draw(st.integers(0, region.npages - 1), label="page")
        within = data.draw(st.sampled_from([0, 0, 0, 1, P // 2, P - 1]), label="offset")
        return region.base + page * P + within

    def draw_size(self, data: st.DataObject, region: Region, address: int,
                  hostile: bool = False) -> int:
        """A size that stays inside region; a hostile one may leave it, be 0,
        negative or huge."""
        room = region.end - address
        if not hostile:
            kind = data.draw(st.sampled_from(["pages", "pages", "bytes", "to-end"]),
                             label="size kind")
        else:
            kind = data.draw(st.sampled_from(["past-end", "zero", "huge"]), label="size kind")
        if kind == "pages":
            return data.draw(st.integers(1, max(1, room // P)), label="pages") * P
        if kind == "bytes":
            return data.draw(st.integers(1, max(1, room)), label="bytes")
        if kind == "to-end":
            return room
        if kind == "past-end":
            return room + data.draw(st.sampled_from([1, P, G]), label="past")
        if kind == "zero":
            return 0
        return data.draw(st.sampled_from(HUGE), label="huge")

    @staticmethod
    def hostile(data: st.DataObject) -> bool:
        """One call in six gets a bad argument."""
        return data.draw(st.integers(0, 5), label="hostile?") == 0

    # -- VirtualAlloc

    @initialize(npages=st.integers(1, 40),
                allocation_type=st.sampled_from([RESERVE | COMMIT | WW_FLAG, RESERVE | WW_FLAG]))
    def first_region(self, npages, allocation_type):
        """Every run starts with one write-watch region."""
        base = ww.VirtualAlloc(0, npages * P, allocation_type, ww.PAGE_READWRITE)
        expect = self.model.virtual_alloc(0, npages * P, allocation_type, ww.PAGE_READWRITE,
                                          pick=lambda length: base)
        assert base and expect.value == base, ww.GetLastError()

    @precondition(lambda self: len(self.model.regions) < MAX_REGIONS)
    @rule(data=st.data(),
          npages=st.one_of(st.integers(1, 40), st.sampled_from([16, 64, 17])),
          trim=st.sampled_from([0, 0, 0, 1, P - 1]))
    def allocate(self, data, npages, trim):
        size = npages * P - trim
        allocation_type = data.draw(st.sampled_from(ALLOCATION_TYPES), label="type")
        protect = data.draw(st.sampled_from(PROTECTIONS), label="protect")
        if self.hostile(data):
            which = data.draw(st.sampled_from(["type", "protect", "size"]), label="bad")
            if which == "type":
                allocation_type = data.draw(st.sampled_from(BAD_ALLOCATION_TYPES),
                                            label="bad type")
            elif which == "protect":
                protect = data.draw(st.sampled_from(BAD_PROTECTIONS), label="bad protect")
            else:
                size = data.draw(st.sampled_from([0, *HUGE]), label="bad size")
        ww.SetLastError(0xDEAD)
        got = ww.VirtualAlloc(0, size, allocation_type, protect)
        error = ww.GetLastError()

        def pick(length: int) -> int:
            assert got, f"VirtualAlloc failed with {error}; the model expects success"
            assert got % G == 0, f"base {got:#x} is not 64 KiB aligned"
            assert not self.model.overlaps(got, got + length), "overlaps a live region"
            return got

        expect = self.model.virtual_alloc(0, size, allocation_type, protect, pick)
        if got and not expect.ok:
            ww.VirtualFree(got, 0, ww.MEM_RELEASE)
        assert got == expect.value, describe(expect)
        if not expect.ok:
            assert error == expect.error

    @precondition(lambda self: self.model.regions)
    @rule(data=st.data())
    def allocate_inside(self, data):
        """Commit inside a region (or, hostile, collide with it or leave it)."""
        region = self.draw_region(data)
        address = self.draw_address(data, region)
        hostile = self.hostile(data)
        size = self.draw_size(data, region, address, hostile and data.draw(
            st.booleans(), label="bad size?"))
        protect = data.draw(st.sampled_from(PROTECTIONS), label="protect")
        allocation_type = COMMIT
        if hostile:
            allocation_type = data.draw(st.sampled_from(
                [COMMIT, COMMIT | WW_FLAG, RESERVE, RESERVE | COMMIT, RESERVE | WW_FLAG]),
                label="type")
            protect = data.draw(st.sampled_from(PROTECTIONS + BAD_PROTECTIONS),
                                label="protect")
        ww.SetLastError(0xDEAD)
        got = ww.VirtualAlloc(address, size, allocation_type, protect)
        error = ww.GetLastError()
        expect = self.model.virtual_alloc(address, size, allocation_type, protect,
                                          pick=lambda length: 0)
        assert (got, None if got else error) == (expect.value, expect.error), describe(expect)

    # -- writes through views

    def writable_pages(self) -> list[tuple[Region, int]]:
        return [(region, i) for region in self.regions() for i in region.committed_pages()
                if region.state[i] == ww.PAGE_READWRITE]

    @precondition(lambda self: self.model.regions)
    @rule(data=st.data(), length=st.sampled_from([1, 1, 2, 8, 64, P, P + 2, 3 * P]),
          seed=st.integers(0, 2**32 - 1))
    def write(self, data, length, seed):
        """Write through as_array where the model allows a writable view; check
        that as_array refuses (or hands out a read-only view) where it does not."""
        writable = self.writable_pages()
        if writable and not self.hostile(data):
            region, page = data.draw(st.sampled_from(writable), label="writable page")
            offset = page * P + data.draw(st.integers(0, P - 1), label="byte")
        else:
            region = self.draw_region(data)
            offset = data.draw(st.integers(0, region.size - 1), label="byte offset")
        if data.draw(st.booleans(), label="straddle?"):
            offset = max(0, min(region.size - length, (offset | (P - 1)) - length // 2))
        address = region.base + offset
        length = min(length, region.end - address)
        expect = self.model.view(address, length)
        if not expect.ok:
            try:
                ww.as_array(address, length)
            except ww.WriteWatchError as exc:
                assert exc.winerror == expect.error
            else:
                raise AssertionError(f"as_array({address:#x}, {length}) gave a view: "
                                     f"{describe(expect)}")
            return
        view = ww.as_array(address, length)
        if expect.value:  # read-only pages in the range
            assert not view.flags.writeable
            return
        assert view.flags.writeable
        payload = random.Random(seed).randbytes(length)
        view[:] = np.frombuffer(payload, np.uint8)
        self.model.write(address, payload)

    # -- VirtualProtect / VirtualFree

    @precondition(lambda self: self.model.regions)
    @rule(data=st.data())
    def protect(self, data):
        region = self.draw_region(data)
        address = self.draw_address(data, region)
        hostile = self.hostile(data)
        size = self.draw_size(data, region, address, hostile and data.draw(
            st.booleans(), label="bad size?"))
        protect = data.draw(st.sampled_from(
            PROTECTIONS + (BAD_PROTECTIONS if hostile else [])), label="protect")
        ww.SetLastError(0xDEAD)
        got = ww.VirtualProtect(address, size, protect)
        error = ww.GetLastError()
        expect = self.model.virtual_protect(address, size, protect)
        assert got == expect.value, describe(expect)
        if not expect.ok:
            assert error == expect.error

    def written_pages(self) -> list[tuple[Region, int]]:
        return [(region, i) for region in self.regions() for i in sorted(region.dirty)
                if i in region.state]

    @precondition(lambda self: self.written_pages())
    @rule(data=st.data())
    def protect_written_pages(self, data):
        """VirtualProtect over a run of committed pages holding a written one
        (docs/semantics.md rule 11: it latches them), then, often, a decommit
        around it, which the latch must survive."""
        region, page = data.draw(st.sampled_from(self.written_pages()), label="written page")
        first = page
        while first > 0 and first - 1 in region.state:
            first -= 1
        run = range(data.draw(st.integers(first, page), label="first"),
                    data.draw(st.integers(page + 1, region.run_end(page)), label="end"))
        protect = data.draw(st.sampled_from(PROTECTIONS), label="protect")
        address, size = region.base + run.start * P, len(run) * P
        got = ww.VirtualProtect(address, size, protect)
        assert got == self.model.virtual_protect(address, size, protect).value
        if data.draw(st.booleans(), label="decommit?"):
            address = region.base + data.draw(st.integers(0, page), label="from") * P
            size = region.base + data.draw(st.integers(page + 1, region.npages),
                                           label="to") * P - address
            got = ww.VirtualFree(address, size, ww.MEM_DECOMMIT)
            assert got == self.model.virtual_free(address, size, ww.MEM_DECOMMIT).value

    @precondition(lambda self: self.model.regions)
    @rule(data=st.data())
    def decommit(self, data):
        region = self.draw_region(data)
        address = self.draw_address(data, region)
        hostile = self.hostile(data)
        if data.draw(st.integers(0, 7), label="whole?") == 0:
            size = 0
            address = data.draw(st.sampled_from([region.base, region.base + 1, address]),
                                label="address")
        else:
            size = self.draw_size(data, region, address, hostile)
        ww.SetLastError(0xDEAD)
        got = ww.VirtualFree(address, size, ww.MEM_DECOMMIT)
        error = ww.GetLastError()
        expect = self.model.virtual_free(address, size, ww.MEM_DECOMMIT)
        assert got == expect.value, describe(expect)
        if not expect.ok:
            assert error == expect.error

    @precondition(lambda self: self.model.regions)
    @rule(data=st.data())
    def release(self, data):
        region = self.draw_region(data)
        address, size, free_type = region.base, 0, ww.MEM_RELEASE
        if self.hostile(data):
            address = region.base + data.draw(st.sampled_from([0, 1, P, -1]), label="offset")
            size = data.draw(st.sampled_from([0, P, -1]), label="size")
            free_type = data.draw(st.sampled_from(
                [ww.MEM_RELEASE, ww.MEM_RELEASE | ww.MEM_DECOMMIT, 0, -1]), label="type")
        ww.SetLastError(0xDEAD)
        got = ww.VirtualFree(address, size, free_type)
        error = ww.GetLastError()
        expect = self.model.virtual_free(address, size, free_type)
        assert got == expect.value, describe(expect)
        if not expect.ok:
            assert error == expect.error
        elif region.base not in self.model.regions:
            self.released.append(region.base)

    # -- VirtualQuery

    @rule(data=st.data())
    def query(self, data):
        region = self.draw_region(data) if self.model.regions and not self.hostile(
            data) else None
        address = self.draw_address(data, region)
        got = ww.VirtualQuery(address)
        expect = self.model.virtual_query(address)
        if expect.value is None:
            assert got is None
            assert ww.GetLastError() == expect.error
            return
        assert got is not None, f"VirtualQuery failed with {ww.GetLastError()}"
        if expect.value[4] == ww.MEM_FREE:
            got_free = (got.BaseAddress, got.AllocationBase, got.State)
            assert got_free == (expect.value[0], 0, ww.MEM_FREE)
        else:
            assert tuple(got) == expect.value

    # -- GetWriteWatch / ResetWriteWatch

    def draw_watch_range(self, data: st.DataObject, hostile: bool) -> tuple[int, int, int]:
        """(base, size, npages of the region) for a GetWriteWatch/ResetWriteWatch
        call: inside a write-watch region, or, hostile, anywhere."""
        watched = [r for r in self.regions() if r.write_watch]
        candidates = self.regions() if hostile else watched
        region = data.draw(st.sampled_from(candidates), label="region") if candidates and (
            not hostile or data.draw(st.booleans(), label="in a region?")) else None
        base = self.draw_address(data, region)
        if region is None:
            return base, data.draw(st.sampled_from([P, 16 * P, 0]), label="size"), 16
        if data.draw(st.booleans(), label="whole region?"):
            base = region.base
        bad_size = hostile and data.draw(st.booleans(), label="bad size?")
        return base, self.draw_size(data, region, base, bad_size), region.npages

    @rule(data=st.data())
    def get_write_watch(self, data):
        hostile = self.hostile(data)
        base, size, npages = self.draw_watch_range(data, hostile)
        flags = data.draw(st.sampled_from([0, ww.WRITE_WATCH_FLAG_RESET]), label="flags")
        capacity = data.draw(st.integers(1, npages + 2), label="capacity")
        count = data.draw(st.sampled_from([None, None, capacity, max(1, capacity - 1)]),
                          label="count")
        writable = True
        if hostile:
            which = data.draw(st.sampled_from(["flags", "array", "count", "range"]),
                              label="bad")
            if which == "flags":
                flags = data.draw(st.sampled_from([2, 3, 1 << 31, -1, 1 << 64]), label="flags")
            elif which == "array":
                if data.draw(st.booleans(), label="no array?"):
                    capacity = None
                else:
                    writable = False
            elif which == "count":
                count = data.draw(st.sampled_from([0, -1, capacity + 1, 1 << 64]),
                                  label="count")
        backing = np.full((capacity or 0) + 2 * GUARD, CANARY, np.uintp)
        out = None if capacity is None else backing[GUARD:GUARD + capacity]
        if not writable:
            out.flags.writeable = False
        ww.SetLastError(0xDEAD)
        ret, found, granularity = ww.GetWriteWatch(flags, base, size, out, count)
        error = ww.GetLastError()
        expect = self.model.get_write_watch(flags, base, size, capacity, count, writable)
        want_ret, want_found, want_granularity, want_addresses = expect.value
        assert (ret, found, granularity) == (want_ret, want_found, want_granularity), (
            f"{describe(expect)}; got error {error}" if ret else describe(expect))
        if not expect.ok:
            assert error == expect.error
        else:
            assert out is not None
            assert [int(a) for a in out[:found]] == want_addresses
        assert (backing[:GUARD] == CANARY).all(), "wrote before the addresses array"
        assert (backing[GUARD + found:] == CANARY).all(), "wrote past the reported count"

    @rule(data=st.data())
    def reset_write_watch(self, data):
        base, size, _ = self.draw_watch_range(data, self.hostile(data))
        ww.SetLastError(0xDEAD)
        got = ww.ResetWriteWatch(base, size)
        error = ww.GetLastError()
        expect = self.model.reset_write_watch(base, size)
        assert got == expect.value, describe(expect)
        if not expect.ok:
            assert error == expect.error

    # -- after every step

    @invariant()
    def dirty_pages_match(self):
        """GetWriteWatch without RESET over every write-watch region reports
        exactly the model's written committed pages."""
        for region in self.model.regions.values():
            out = np.zeros(region.npages, np.uintp)
            ret, found, _ = ww.GetWriteWatch(0, region.base, region.size, out)
            if not region.write_watch:
                assert ret == ww.WRITE_WATCH_FAILED
                assert ww.GetLastError() == ww.ERROR_INVALID_PARAMETER
                continue
            assert ret == 0, ww.GetLastError()
            got = [(int(a) - region.base) // P for a in out[:found]]
            assert got == self.model.dirty_pages(region)

    @invariant()
    def contents_match(self):
        """Every readable committed page holds what the model says (decommitted
        and recommitted pages read zero; nothing else changed them)."""
        for region in self.model.regions.values():
            readable = [i for i in region.committed_pages()
                        if region.state[i] != ww.PAGE_NOACCESS]
            runs: list[list[int]] = []
            for i in readable:
                if runs and runs[-1][1] == i:
                    runs[-1][1] = i + 1
                else:
                    runs.append([i, i + 1])
            for first, last in runs:
                view = ww.as_array(region.base + first * P, (last - first) * P)
                want = np.frombuffer(b"".join(region.page_bytes(i) for i in range(first, last)),
                                     np.uint8)
                if not np.array_equal(view, want):
                    bad = first + int(np.flatnonzero((view != want).reshape(-1, P).any(1))[0])
                    raise AssertionError(f"page {bad} of the region at {region.base:#x} "
                                         "differs from the model")


def test_writewatch_agrees_with_the_windows_model(soak):
    run_state_machine_as_test(WriteWatchMachine, settings=SOAK_PROFILE if soak else CI_PROFILE)
