"""Write watch across fork (docs/semantics.md rule K17, the fork trap).

A forked child's mappings lose their userfaultfd registration, and the
descriptors it inherits still act on the PARENT's memory. writewatch must give
the child working tracking of its own (conservative at first: every page that
may have been written reads written until reset, then exact again) and must
never change the parent's dirty state from the child.

Children are plain os.fork() children that always end in os._exit: a failure in
one is reported here and never runs the rest of the test session.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from forking import patience, run_forked, run_python

import writewatch as ww
from writewatch import backends

P = ww.PAGE_SIZE
NPAGES = 32     # reserved
COMMITTED = 16  # the first 16 committed; the rest reserved (never reported)
PARENT_PAGES = [2, 7, 11]



class Region:
    def __init__(self) -> None:
        self.base = ww.VirtualAlloc(0, NPAGES * P, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                                    ww.PAGE_NOACCESS)
        assert self.base, ww.GetLastError()
        assert ww.VirtualAlloc(self.base, COMMITTED * P, ww.MEM_COMMIT,
                               ww.PAGE_READWRITE) == self.base, ww.GetLastError()
        self.memory = ww.as_array(self.base, COMMITTED * P)

    def write(self, *pages: int) -> None:
        for page in pages:
            self.memory[page * P + 40] += 1

    def pages(self, reset: bool = False) -> list[int]:
        """Page numbers GetWriteWatch reports over the whole reservation."""
        out = np.full(NPAGES, 0xDEAD, np.uintp)
        ret, found, granularity = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET if reset else 0,
                                                   self.base, NPAGES * P, out)
        assert (ret, granularity) == (0, P), ww.GetLastError()
        return [(int(a) - self.base) // P for a in out[:found]]

    def reset(self) -> None:
        assert ww.ResetWriteWatch(self.base, NPAGES * P) == 0, ww.GetLastError()


@pytest.fixture
def region() -> Iterator[Region]:
    each = Region()
    yield each
    del each.memory
    assert ww.VirtualFree(each.base, 0, ww.MEM_RELEASE)


# ---------------------------------------------------------------------------
# the child has working tracking of its own


@pytest.mark.parametrize("parent_wrote", [PARENT_PAGES, []],
                         ids=["parent-wrote-pages", "parent-wrote-nothing"])
@pytest.mark.parametrize("how", ["get-with-reset", "reset-write-watch"])
def test_child_reports_conservatively_then_exactly_after_reset(region, parent_wrote, how):
    """Fork: in the child every page written before the fork reads written (more
    may, never a reserved one); after a reset the child is exact again: one
    write, exactly that page, and a RESET poll clears it."""
    region.write(*parent_wrote)

    def child() -> dict[str, Any]:
        seen: dict[str, Any] = {"first": region.pages()}
        if how == "get-with-reset":
            seen["first_reset"] = region.pages(reset=True)
        else:
            region.reset()
        seen["after_reset"] = region.pages()
        region.write(5)
        seen["after_write"] = region.pages(reset=True)
        seen["after_second_reset"] = region.pages()
        region.write(13, 1)
        seen["two_writes"] = region.pages()
        return seen

    seen = run_forked(child)
    assert set(parent_wrote) <= set(seen["first"]), "a page written before fork was lost"
    assert all(page < COMMITTED for page in seen["first"]), "reserved page reported"
    if how == "get-with-reset":
        assert seen["first_reset"] == seen["first"]
    assert seen["after_reset"] == []
    assert seen["after_write"] == [5]
    assert seen["after_second_reset"] == []
    assert seen["two_writes"] == [1, 13]


def test_child_commits_fresh_pages_tracked_exactly(region):
    """Pages the child commits after the fork start clean in the child (its own
    tracking), while the inherited ones are still conservative until reset."""
    region.write(*PARENT_PAGES)

    def child() -> dict[str, Any]:
        at = region.base + COMMITTED * P
        assert ww.VirtualAlloc(at, 8 * P, ww.MEM_COMMIT, ww.PAGE_READWRITE) == at
        fresh = ww.as_array(at, 8 * P)
        seen = {"fresh_part": [page for page in region.pages() if page >= COMMITTED]}
        fresh[2 * P] = 1  # page 18 of the reservation
        seen["after_write"] = [page for page in region.pages() if page >= COMMITTED]
        seen["inherited"] = [page for page in region.pages() if page < COMMITTED]
        return seen

    seen = run_forked(child)
    assert seen["fresh_part"] == []
    assert seen["after_write"] == [COMMITTED + 2]
    assert set(PARENT_PAGES) <= set(seen["inherited"])
    assert region.pages() == PARENT_PAGES  # the parent never saw any of it


def test_child_decommit_and_release_do_not_touch_the_parent(region):
    """The child decommitting pages (its dirty state dropped) and releasing the
    region leaves the parent's pages, contents and tracking as they were."""
    region.write(*PARENT_PAGES)

    def child() -> dict[str, Any]:
        assert ww.VirtualFree(region.base, 8 * P, ww.MEM_DECOMMIT)
        seen = {"after_decommit": region.pages()}
        assert ww.VirtualFree(region.base, 0, ww.MEM_RELEASE)
        return seen

    seen = run_forked(child)
    assert all(8 <= page < COMMITTED for page in seen["after_decommit"])
    assert 11 in seen["after_decommit"]
    assert region.pages() == PARENT_PAGES
    assert int(region.memory[2 * P + 40]) == 1  # the child's discard was its own
    region.write(4)
    assert region.pages(reset=True) == [2, 4, 7, 11]


def test_child_process_memwatch_on_its_own_region(region):
    """process_memwatch(0, ...) in a forked child on a region inherited from the
    parent: the region is write-watch memory there too, so it is served
    (conservatively at first) rather than refused as unwatched."""
    region.write(*PARENT_PAGES)

    def child() -> dict[str, Any]:
        vec = np.zeros(COMMITTED, np.int64)
        seen: dict[str, Any] = {}
        try:
            found = ww.process_memwatch(0, region.base, COMMITTED * P,
                                        ww.MEMWATCH_SD_GET | ww.MEMWATCH_SD_CLEAR, vec)
            seen["first"] = (vec[:found] // P).tolist()
        except OSError as exc:
            seen["first"] = f"{type(exc).__name__}: {exc}"
        region.pages(reset=True)  # whatever the above did, start clean
        region.write(6)
        found = ww.process_memwatch(0, region.base, COMMITTED * P, ww.MEMWATCH_SD_GET, vec)
        seen["after_write"] = (vec[:found] // P).tolist()
        return seen

    seen = run_forked(child)
    assert isinstance(seen["first"], list), seen["first"]
    assert set(PARENT_PAGES) <= set(seen["first"])
    assert seen["after_write"] == [6]
    assert region.pages() == PARENT_PAGES  # and the parent is untouched


# ---------------------------------------------------------------------------
# the child never touches the parent's state


def test_child_resets_do_not_touch_the_parent(region):
    """Fork trap: the child's GetWriteWatch(RESET), ResetWriteWatch and
    process_memwatch CLEAR over the whole region act on the child's memory
    only; the parent still reports exactly its own pages afterwards."""
    region.write(*PARENT_PAGES)

    def child() -> list[int]:
        first = region.pages(reset=True)
        region.write(3, 9)
        region.reset()
        region.write(4)
        ww.process_memwatch(0, region.base, COMMITTED * P, ww.MEMWATCH_SD_CLEAR)
        region.pages(reset=True)
        return first

    child_first = run_forked(child)
    assert set(PARENT_PAGES) <= set(child_first)  # the child did see them
    assert region.pages() == PARENT_PAGES
    # and the parent's tracking goes on exactly
    region.write(12)
    assert region.pages(reset=True) == [*PARENT_PAGES, 12]
    assert region.pages() == []


def test_parent_writes_while_child_lives_are_tracked(region):
    """Writes the parent makes while a forked child lives (copy-on-write faults,
    on a clean page and on an already written one) are reported exactly; the
    child's own writes never show up in the parent."""
    region.write(*PARENT_PAGES)
    go_read, go_write = os.pipe()

    def child() -> list[int]:
        assert os.read(go_read, 1) == b"x"  # the parent has written
        region.write(0, 1)
        return region.pages(reset=True)

    def parent_while_child_runs() -> None:
        region.write(2, 14)  # 2 was already dirty, 14 was clean
        os.write(go_write, b"x")

    try:
        child_pages = run_forked(child, parent_while_child_runs)
    finally:
        os.close(go_read)
        os.close(go_write)
    assert {0, 1, *PARENT_PAGES} <= set(child_pages)
    assert region.pages() == [2, 7, 11, 14]


# ---------------------------------------------------------------------------
# fork followed by exec


def test_fork_then_exec_leaves_parent_tracking_intact(region):
    """Fork + execv of a fresh interpreter: the parent's dirty pages are still
    exactly reported, new writes are tracked and RESET works."""
    region.write(1, 8)
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(sys.executable, [sys.executable, "-c", "pass"])
        finally:
            os._exit(127)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert region.pages() == [1, 8]
    region.write(3)
    assert region.pages(reset=True) == [1, 3, 8]
    assert region.pages() == []
    region.write(15)
    assert region.pages() == [15]


def test_child_is_served_by_the_one_call_path_after_the_fork_hook(region):
    """The at-fork hook refreshes every region, so the child's GetWriteWatch
    runs in the native index again instead of declining to Python each time."""
    from writewatch import index

    def child() -> dict[str, Any]:
        out = np.zeros(NPAGES, np.uintp)
        try:
            index.get_write_watch_as(ww.WRITE_WATCH_FLAG_RESET, region.base, NPAGES * P, out,
                                     NPAGES)
        except index.RefusedError as refused:
            return {"served": False, "reason": refused.reason}
        region.write(4)
        found = index.get_write_watch_as(0, region.base, NPAGES * P, out, NPAGES)
        return {"served": True, "pages": [(int(a) - region.base) // P for a in out[:found]]}

    seen = run_forked(child)
    assert seen["served"]
    assert seen["pages"] == [4]


# ---------------------------------------------------------------------------
# fork while other threads fault

FORK_WHILE_PYTHON_WRITES = """
import os, threading, time
import writewatch as ww
P = ww.PAGE_SIZE
base = ww.VirtualAlloc(0, 64 * P, ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                       ww.PAGE_READWRITE)
view = ww.as_array(base, 64 * P)
stop = threading.Event()

def write_holding_the_gil():
    while not stop.is_set():
        assert ww.ResetWriteWatch(base, 64 * P) == 0
        for page in range(64):
            view[page * P] = 1  # the first write after the reset faults

writer = threading.Thread(target=write_holding_the_gil)
writer.start()
forks, deadline = 0, time.monotonic() + {seconds}
while forks < 300 and time.monotonic() < deadline:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    forks += 1
stop.set()
writer.join()
print("forked", forks, "times")
"""


def test_fork_while_a_python_thread_faults_on_watched_memory_does_not_deadlock():
    """A Python thread writes into watched memory holding the GIL; on the
    fallback backends each first write after a reset faults into a handler
    that takes the page range's lock. fork() holds those locks, so the forking
    thread must not wait for the GIL while it holds them (a deadlock found by
    test_concurrency's fork scenario). Runs in a child interpreter: a deadlock
    fails with every thread's traceback instead of hanging the session."""
    result = run_python(FORK_WHILE_PYTHON_WRITES.format(seconds=2), timeout=patience(50),
                        report_hang=True)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "forked" in result.stdout and "forked 0 times" not in result.stdout


FORK_WITH_THE_UFFD_HANDLER = """
import json, os, threading, warnings
late, stop = threading.Event(), threading.Event()
def start_late_thread():                  # runs after writewatch's before-fork hook
    if late.is_set():
        threading.Thread(target=stop.wait).start()
os.register_at_fork(before=start_late_thread)
import writewatch as ww
P = ww.PAGE_SIZE

def fork_then_write(page):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    mem.array[page * P] = 1               # right after the fork: the handler is back
    os.waitpid(pid, 0)

with ww.WatchedMemory(16 * P, backend="uffd") as mem:
    mem.array[0] = 1                      # the handler thread is running now
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fork_then_write(1)
        alone = [str(w.message) for w in caught]
        other = threading.Thread(target=stop.wait)
        other.start()
        fork_then_write(2)
        stop.set()
        other.join()
        stop.clear()
        shared = [str(w.message) for w in caught[len(alone):]]
        late.set()
        fork_then_write(3)
        late.clear()
        stop.set()
        joined = [str(w.message) for w in caught[len(alone) + len(shared):]]
    mem.array[5 * P] = 1
    print(json.dumps({"alone": alone, "shared": shared, "joined": joined,
                      "pages": mem.written(unit="page").tolist()}))
"""


@pytest.mark.any_backend
def test_fork_with_the_uffd_handler_thread_warns_only_of_threads_of_the_user():
    """Rule: the uffd backend's handler thread never makes os.fork() warn
    "This process is multi-threaded" (Python 3.12+ warns for every thread
    alive, native ones too). When it is the only other thread it is stopped
    before the fork and started again after it in the parent, so the process
    forks single-threaded; 3.13 counts the threads after the after-fork hooks,
    when the handler runs again, and its warning for that fork is ignored
    (backends/uffd.py). A thread of the user's still brings the warning, also
    on the next fork after an ignored one, and so does one that starts after
    the handler stopped, before the fork. Tracking goes on throughout."""
    if backends.backend_status().get("uffd"):
        pytest.skip(f"uffd backend unavailable: {backends.backend_status()['uffd']}")
    # No report_hang: its faulthandler watchdog is a thread of its own, as is
    # a second OpenBLAS worker.
    result = run_python(FORK_WITH_THE_UFFD_HANDLER, timeout=patience(60),
                        env={"OPENBLAS_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["pages"] == [0, 1, 2, 3, 5]
    assert found["alone"] == []
    for threads_of_the_user in found["shared"], found["joined"]:
        if sys.version_info >= (3, 12):
            assert len(threads_of_the_user) == 1 and "multi-threaded" in threads_of_the_user[0]
        else:
            assert threads_of_the_user == []
