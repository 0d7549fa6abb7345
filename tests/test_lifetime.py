"""A region's lifetime covers every call and every fault using it.

A release (or decommit) racing a GetWriteWatch, a process_memwatch or a native
writer must leave each of them either done before it or failing the way
Windows fails (error 87); it never crashes the process, hangs a writer, raises
from a Windows-shaped function, or lets a call in flight go on scanning, and
re-arming, an address range that a new region now owns. The deterministic
races pause the call inside its scan (tests/stall.py); the others run many
cycles beside busy processes, so that threads get preempted mid-call. Each
runs in a child interpreter: a crash or a hang fails one test, with the
child's tracebacks.
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
from forking import patience, run_python, scaled_work

import writewatch as ww
from writewatch import regions

LOST_WRITES_AFTER_RELEASE = """
import json, threading
import numpy as np
import writewatch as ww
from stall import StalledMemory

P = ww.PAGE_SIZE
KIND = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
NPAGES = 2048   # every other page written: more page runs than one scan batch holds
stall = StalledMemory(2)
x = ww.VirtualAlloc(0, NPAGES * P, KIND, ww.PAGE_READWRITE)
assert x
view = ww.as_array(x, NPAGES * P)
view[::2 * P] = 1
del view  # so that the release unmaps X at once
out = stall.array(NPAGES // 2)
first_call = {}

def scan_x():
    first_call["result"] = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, x, NPAGES * P, out)

z_pages = {}

def release_x_and_reuse_its_range():
    assert ww.VirtualFree(x, 0, ww.MEM_RELEASE)
    # Z lies in the part of X's old range that the paused call has not reached.
    z = ww.VirtualAlloc(x + 1024 * P, 256 * P, KIND, ww.PAGE_READWRITE)
    assert z == x + 1024 * P, (hex(z), hex(x))
    ww.as_array(z, 256 * P)[::P] = 1
    z_pages["z"] = z

scanner = threading.Thread(target=scan_x)
scanner.start()
stall.wait_for_fault()          # the call is inside its scan of X now
releaser = threading.Thread(target=release_x_and_reuse_its_range)
releaser.start()
releaser.join(SETTLE)           # with the bug it finishes here; fixed, it waits
stall.resolve()
scanner.join()
releaser.join()
z = z_pages["z"]
found = np.zeros(256, np.uintp)
ret, count, _ = ww.GetWriteWatch(0, z, 256 * P, found)
print(json.dumps({"ret": ret, "z_written": count, "first_call": first_call["result"][:2]}))
"""


def test_release_waits_for_a_get_write_watch_in_flight(write_watch_backend):
    """GetWriteWatch(RESET) paused inside its scan of X; another thread releases
    X, makes Z inside X's old range and writes Z's 256 pages. The release must
    wait for the call (on Windows the call completes before the release), so
    that Z's owner sees all 256 pages written, not the call resetting them."""
    result = run_python(LOST_WRITES_AFTER_RELEASE.replace("SETTLE", str(patience(0.5))),
                        timeout=patience(120), report_hang=True)
    if "needs userfaultfd to pause a call" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-4000:]
    seen = json.loads(result.stdout)
    assert seen["ret"] == 0
    assert seen["z_written"] == 256, f"Z's owner lost writes: {seen}"
    assert seen["first_call"] == [0, 1024], seen  # it completed, before the release


RELEASE_RACES = """
import json, os, threading
import numpy as np
import writewatch as ww
from writewatch import MEMWATCH_SD_CLEAR, MEMWATCH_SD_GET

P = ww.PAGE_SIZE
KIND = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
CYCLES = {cycles}
current = {{"base": 0}}
stop = threading.Event()
raised, failures, memwatch_errors, calls = [], {{}}, {{}}, [0]

def poll_get_write_watch():
    out = np.zeros(16, np.uintp)
    vec = np.zeros(16, np.int64)
    while not stop.is_set():
        base = current["base"]
        if not base:
            continue
        try:
            ret, _, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, base, 16 * P, out)
            if ret:
                code = ww.GetLastError()
                failures[code] = failures.get(code, 0) + 1
            ww.process_memwatch(0, base, 16 * P, MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR, vec)
        except OSError as exc:  # process_memwatch's EINVAL for a released range is fine
            memwatch_errors[exc.errno] = memwatch_errors.get(exc.errno, 0) + 1
        except Exception as exc:
            raised.append(repr(exc))
        calls[0] += 1

pollers = [threading.Thread(target=poll_get_write_watch) for _ in range(2)]
for each in pollers:
    each.start()
for cycle in range(CYCLES):
    base = ww.VirtualAlloc(0, 16 * P, KIND, ww.PAGE_READWRITE)
    assert base
    ww.as_array(base, 16 * P)[::P] = 1
    current["base"] = base
    for _ in range(200):           # let the pollers get into a call on this region
        if calls[0] > cycle:
            break
        os.sched_yield()
    assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
stop.set()
for each in pollers:
    each.join()
print(json.dumps({{"raised": raised[:5], "failures": failures, "calls": calls[0],
                  "memwatch_errors": memwatch_errors}}))
"""


def test_calls_racing_a_release_fail_like_windows_and_never_crash(write_watch_backend,
                                                                  busy_cpus, soak):
    """GetWriteWatch and process_memwatch racing VirtualFree: the Windows call
    returns failure with error 87 (never raises), process_memwatch raises
    EINVAL, and nothing reads per-page state a release has freed (a crash).
    A third of the cycles unless --soak: this test ran longest in the suite."""
    cycles = scaled_work(3000 if soak else 1000, at_least=300)
    result = run_python(RELEASE_RACES.format(cycles=cycles), timeout=patience(240),
                        report_hang=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-4000:])
    seen = json.loads(result.stdout)
    assert seen["raised"] == [], seen
    assert set(map(int, seen["failures"])) <= {87}, seen
    assert set(map(int, seen["memwatch_errors"])) <= {22}, seen  # EINVAL
    assert seen["calls"] > 0


WRITERS_RACING_RELEASE = """
import json
import writewatch as ww
from native_writers import NativeWriters

P = ww.PAGE_SIZE
KIND = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
writes = 0
for cycle in range({cycles}):
    base = ww.VirtualAlloc(0, 16 * P, KIND, ww.PAGE_READWRITE)
    view = ww.as_array(base, 16 * P)    # keeps the memory mapped after the release
    with NativeWriters(base, 16, nthreads=2, seed=cycle) as writers:
        while writers.writes() < 64:     # the writers are at work, faulting on armed pages
            pass
        ww.ResetWriteWatch(base, 16 * P) # arm every page again
        assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
        writes += writers.stop()
    del view
print(json.dumps({{"writes": writes}}))
"""


def test_native_writers_racing_a_release_neither_crash_nor_hang(write_watch_backend, busy_cpus,
                                                                soak):
    """Native threads write through memory a view keeps mapped while another
    thread releases its region (the README promises such a view never faults):
    the release gives armed pages their access back before forgetting them,
    and wakes a writer blocked in a write-protect fault. A third of the cycles
    unless --soak."""
    cycles = scaled_work(300 if soak else 100, at_least=30)
    result = run_python(WRITERS_RACING_RELEASE.format(cycles=cycles), timeout=patience(240),
                        report_hang=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-4000:])
    assert json.loads(result.stdout)["writes"] > 0


def test_dropped_watched_memory_is_released_when_collected(write_watch_backend, soak):
    """A WatchedMemory dropped without close() or a with block is released
    when collected, as an mmap or a file is (20,000 of them once held 20 GB of
    address space, and the fallbacks refused the 16,385th), while a view made
    from it keeps its memory mapped and writable."""
    before = len(regions.live_regions())
    # Any number leaked fails the count below. The 16,384 regions the
    # fallbacks once capped are passed by test_scale's 100k live regions on
    # every backend; --soak drops 20,000 here as well.
    for _ in range(scaled_work(20_000 if soak else 2_000, at_least=2_000)):
        mem = ww.WatchedMemory(ww.PAGE_SIZE)
        mem.array[0] = 1
    del mem
    gc.collect()
    assert len(regions.live_regions()) == before
    mem = ww.WatchedMemory(ww.PAGE_SIZE)
    view = mem.view()
    del mem
    gc.collect()
    assert len(regions.live_regions()) == before
    view[0] = 1  # still mapped, no longer watched
    assert view[0] == 1


KIND = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH


def _reserve_again(address: int, size: int) -> int:
    """A new write-watch region at exactly the addresses just released (the
    kernel would often hand them back anyway; asking makes it certain)."""
    base = ww.VirtualAlloc(address, size, KIND, ww.PAGE_READWRITE)
    assert base == address, ww.GetLastError()
    return base


def _assert_intact(base: int, size: int) -> None:
    """The region at base is whole and watched: committed, scanned, and its
    writes reported."""
    info = ww.VirtualQuery(base)
    assert info is not None and info.State == ww.MEM_COMMIT and info.AllocationBase == base, info
    ww.ResetWriteWatch(base, size)
    ww.as_array(base, size)[ww.PAGE_SIZE] = 7
    out = np.zeros(size // ww.PAGE_SIZE, np.uintp)
    assert ww.GetWriteWatch(0, base, size, out)[:2] == (0, 1), ww.GetLastError()
    assert out[0] == base + ww.PAGE_SIZE


def test_a_collected_block_releases_its_own_region_not_the_next_one(write_watch_backend):
    """A WatchedMemory released through the Windows face and then dropped:
    collecting it once destroyed whatever region the kernel had handed its
    addresses to next (VirtualQuery said MEM_FREE, GetWriteWatch failed with
    87, and the next write killed the process)."""
    size = 16 * ww.PAGE_SIZE
    for _ in range(3):
        mem = ww.WatchedMemory(size)
        address = mem.address
        assert ww.VirtualFree(address, 0, ww.MEM_RELEASE)
        new = _reserve_again(address, size)
        del mem
        gc.collect()
        _assert_intact(new, size)
        assert ww.VirtualFree(new, 0, ww.MEM_RELEASE)


def test_a_block_released_through_windows_acts_on_nothing_else(write_watch_backend):
    """Once its region is gone, a WatchedMemory refuses every use, and
    close() leaves the region now at its address alone."""
    size = 16 * ww.PAGE_SIZE
    mem = ww.WatchedMemory(size)
    assert ww.VirtualFree(mem.address, 0, ww.MEM_RELEASE)
    new = _reserve_again(mem.address, size)
    for use in (lambda: mem.written(), mem.reset, lambda: mem.array, lambda: mem.view(),
                lambda: mem.commit(0, ww.PAGE_SIZE)):
        with pytest.raises(ValueError, match="freed"):
            use()
    assert "closed" in repr(mem)
    mem.close()
    mem.close()
    _assert_intact(new, size)
    assert ww.VirtualFree(new, 0, ww.MEM_RELEASE)


FINALIZER_UNDER_LOCKS = """
import gc, json
import writewatch as ww
from writewatch import memory, regions

# A finalizer runs wherever the collector does: in a thread that holds the
# region table's lock, or the lock of the very region it releases.
released = []
def drop_under(lock):
    mem = ww.WatchedMemory(ww.PAGE_SIZE)
    region = regions.find(mem.address)
    with lock(region):
        del mem
        gc.collect()
        released.append(region.listed)
    ww.VirtualAlloc(0, ww.PAGE_SIZE, ww.MEM_RESERVE, ww.PAGE_READWRITE)  # releases what waited
    released.append(region.listed)

drop_under(lambda region: regions._table.lock)
drop_under(lambda region: region.lock)
print(json.dumps(released))
"""


def test_a_finalizer_never_waits_for_a_lock_its_thread_holds(write_watch_backend):
    """Collecting a WatchedMemory while its thread holds the region table's
    lock or the region's own lock puts the release off to the next
    VirtualAlloc instead of deadlocking."""
    result = run_python(FINALIZER_UNDER_LOCKS, timeout=patience(30), report_hang=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-4000:])
    # Still listed while the lock was held, released by the next VirtualAlloc.
    assert json.loads(result.stdout) == [True, False, True, False]


RELEASE_BESIDE_A_PAUSED_CALL = """
import json, threading
import numpy as np
import writewatch as ww
from forking import patience
from native_writers import NativeWriters
from stall import StalledMemory
from writewatch.kernel import lib

P = ww.PAGE_SIZE
KIND = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
stall = StalledMemory(1)
busy = ww.VirtualAlloc(0, 64 * P, KIND, ww.PAGE_READWRITE)
view = ww.as_array(busy, 64 * P)
view[::2 * P] = 1                      # half the pages written, half armed
paused = stall.array(64)
first_call = {}

def scan_busy():
    first_call["result"] = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, busy, 64 * P, paused)

caller = threading.Thread(target=scan_busy)
caller.start()
stall.wait_for_fault()                 # a call on the busy region is paused inside its scan
writers = NativeWriters(busy, 64, nthreads=2, seed=5)   # and writers fault on its armed pages
retired = []

def make_and_release_others():
    for _ in range(CYCLES):
        other = ww.VirtualAlloc(0, 16 * P, KIND, ww.PAGE_READWRITE)
        assert other
        ww.as_array(other, 16 * P)[::P] = 1
        out = np.zeros(16, np.uintp)
        assert ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, other, 16 * P, out)[:2] == (0, 16)
        assert ww.VirtualFree(other, 0, ww.MEM_RELEASE)
        retired.append(lib.ww_track_retired_waiting())

releaser = threading.Thread(target=make_and_release_others, daemon=True)
releaser.start()
releaser.join(patience(30))
released_during_pause = not releaser.is_alive()
stall.resolve()
caller.join()
writers.stop()
releaser.join()
print(json.dumps({"released_during_pause": released_during_pause, "retired": retired,
                  "first_call": first_call["result"][:2]}))
"""


def test_a_release_waits_only_for_its_own_regions_calls(write_watch_backend):
    """A GetWriteWatch on one region is paused inside its scan (holding that
    region's lock on the fallbacks, with native writers stopped in faults on
    it); meanwhile other regions are made, used, and released: each release
    completes while the call stays paused, since it waits only for the users
    of its own region, and the table memory those releases replaced is freed
    meanwhile, not held until no call runs anywhere."""
    cycles = scaled_work(40, at_least=10)
    result = run_python(RELEASE_BESIDE_A_PAUSED_CALL.replace("CYCLES", str(cycles)),
                        timeout=patience(120), report_hang=True)
    if "needs userfaultfd to pause a call" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-4000:]
    seen = json.loads(result.stdout)
    assert seen["released_during_pause"], f"a release waited for another region's call: {seen}"
    assert seen["first_call"] == [0, 32], seen
    # Each release retires a few blocks; a grace period that ends lets them go.
    assert len(seen["retired"]) == cycles and max(seen["retired"]) <= 8, seen
