"""Concurrency: no write is lost while everything happens at once, on every
backend.

Native writer threads (tests/native_writers.py: plain pthreads storing counters
into random slots of random pages, pausing ~1 us after each store so that a
dropped write is not simply written again) write into a watched region while
Python threads, all at the same time:

- poll it with GetWriteWatch(WRITE_WATCH_FLAG_RESET): one over the whole region,
  one over random sub-ranges, both with random capacities (so capped walks stop
  anywhere), each copying the pages it is told about into a shadow buffer;
- call VirtualProtect(PAGE_READWRITE) over random parts of it (a protection
  change must neither dirty nor reset, docs/semantics.md rule 10);
- call ResetWriteWatch on parts of a second region that other writers write
  into, and check that a write made after ResetWriteWatch returned is always
  reported (the race ResetWriteWatch has is only with writes made before it);
- VirtualAlloc, write, GetWriteWatch, VirtualProtect, decommit and VirtualFree
  regions of their own, checking every report exactly;
- (second test) fork: subprocess.run, os.fork + exec, and os.fork children that
  use writewatch themselves and must see their own writes.

The shadow check: a page's copy is made after the GetWriteWatch that reported
it, under a lock, so the shadow holds the memory as it was at the last copy.
A write that a poll reset without reporting is missing from the shadow for
good; once the writers stop and one last poll drains the region, the shadow
equals the memory byte for byte exactly when no write was lost.

CI runs each test for about a second per backend (longer if a loaded CPU kept a
thread from going round, or the writers from reaching most pages, by then);
--soak (or WRITEWATCH_SOAK=1) for a minute. Loops are bounded in count as well
as in time, and nothing asserts on time. Each scenario runs in a child
interpreter: a deadlock (a thread holding the GIL spinning on a lock whose
holder waits for the GIL) then fails its test, with every thread's traceback,
instead of hanging the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
from forking import patience, run_python
from native_writers import NativeWriters

import writewatch as ww

P = ww.PAGE_SIZE
RESET = ww.WRITE_WATCH_FLAG_RESET
WATCHED = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
RW = ww.PAGE_READWRITE
NPAGES = 128        # the polled region
RESET_PAGES = 64    # the ResetWriteWatch region
PAUSE_NS = 1000     # writers' pause after each store (see native_writers.py)
CI_SECONDS = 1.0
SOAK_SECONDS = 60.0
MAX_ROUNDS = 10_000_000  # every loop is bounded in count too
JOIN_TIMEOUT = patience(120.0)
SETTLE_LIMIT = patience(15.0)  # the most run_for waits past its time for a run to be exercised
TAIL_POLLS = 50  # sub-range polls after the writers stop, before the drain


def run_seconds(soak: bool) -> float:
    return SOAK_SECONDS if soak else CI_SECONDS


def watched_region(npages: int) -> int:
    base = ww.VirtualAlloc(0, npages * P, WATCHED, RW)
    assert base, ww.GetLastError()
    return base


@contextlib.contextmanager
def two_regions() -> Iterator[tuple[int, int]]:
    """The polled region and the ResetWriteWatch region, released afterwards."""
    polled, resetting = watched_region(NPAGES), watched_region(RESET_PAGES)
    try:
        yield polled, resetting
    finally:
        assert ww.VirtualFree(polled, 0, ww.MEM_RELEASE)
        assert ww.VirtualFree(resetting, 0, ww.MEM_RELEASE)


class Shadow:
    """Copies of the pages GetWriteWatch(RESET) reports, made after the call
    that reported them, under one lock."""

    def __init__(self, base: int, npages: int) -> None:
        self.base = base
        self.npages = npages
        self.view = ww.as_array(base, npages * P)
        self.shadow = np.zeros(npages * P, np.uint8)  # a fresh region reads as zeros
        self.lock = threading.Lock()
        self.polls = 0
        self.pages_copied = 0
        self.full_polls = 0
        self.refused = 0

    def poll(self, first: int, last: int, capacity: int, out: np.ndarray,
             out_readable: contextlib.AbstractContextManager[object] | None = None) -> int:
        """One GetWriteWatch(RESET), its pages copied. With out_readable
        (held while out is read), out lies in memory another thread makes
        unwritable at times: the call may then answer 998, and must have
        reset nothing."""
        ret, found, granularity = ww.GetWriteWatch(RESET, self.base + first * P,
                                                   (last - first) * P, out, capacity)
        if out_readable is not None and ret != 0 and ww.GetLastError() == ww.ERROR_NOACCESS:
            self.refused += 1
            return 0
        if (ret, granularity) != (0, P) or not 0 <= found <= capacity:
            raise AssertionError(f"GetWriteWatch returned {(ret, found, granularity)}, "
                                 f"last error {ww.GetLastError()}")
        with out_readable or contextlib.nullcontext():
            pages = (out[:found].astype(np.int64) - self.base) // P
        if found and not ((np.diff(pages) > 0).all() and first <= pages[0]
                          and pages[-1] < last):
            raise AssertionError(f"pages {pages.tolist()} not ascending inside "
                                 f"[{first}, {last})")
        with self.lock:
            for page in pages.tolist():
                self.shadow[page * P:(page + 1) * P] = self.view[page * P:(page + 1) * P]
            self.polls += 1
            self.pages_copied += found
            self.full_polls += found == capacity
        return found

    def drain(self) -> None:
        """Once nothing writes any more: copy every page still reported."""
        out = np.zeros(self.npages, np.uintp)
        for _ in range(3):
            if self.poll(0, self.npages, self.npages, out) < self.npages:
                return
        raise AssertionError("GetWriteWatch(RESET) kept reporting pages after the writers "
                             "stopped")

    def stale_pages(self) -> list[int]:
        differ = (self.shadow != self.view).reshape(-1, P).any(axis=1)
        return np.flatnonzero(differ).tolist()


class Workers:
    """Python threads running body(rng, stop) until stop is set; failures are
    collected for the main thread."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.rounds: dict[str, int] = {}

    def start(self, name: str, seed: int, body: Callable[[np.random.Generator], None]) -> None:
        rng = np.random.default_rng(seed)
        self.rounds[name] = 0

        def run() -> None:
            try:
                while not self.stop.is_set() and self.rounds[name] < MAX_ROUNDS:
                    body(rng)
                    self.rounds[name] += 1
            except BaseException as exc:  # reported by the main thread
                self.errors.append(f"{name}: {exc!r}")
                self.stop.set()

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def run_for(self, seconds: float, until: Callable[[], bool]) -> None:
        """Run for `seconds`, then on until `until()` says the run exercised
        what the test checks (a loaded CPU can make some threads lag), for at
        most SETTLE_LIMIT more seconds. Returns early if a worker failed."""
        if self.stop.wait(seconds):
            return
        settle_deadline = time.monotonic() + SETTLE_LIMIT
        while not until() and time.monotonic() < settle_deadline:
            if self.stop.wait(0.01):
                return

    def all_went_round(self) -> bool:
        return all(rounds > 0 for rounds in self.rounds.values())

    def more_rounds(self, name: str, rounds: int, limit: float = patience(5.0)) -> None:
        """Let the threads run until name has done `rounds` more (or limit seconds)."""
        target = self.rounds[name] + rounds
        deadline = time.monotonic() + limit
        while (self.rounds[name] < target and not self.stop.is_set()
               and time.monotonic() < deadline):
            time.sleep(0.001)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(JOIN_TIMEOUT)
        stuck = [thread.name for thread in self.threads if thread.is_alive()]
        assert not stuck, f"threads did not finish: {stuck}"


# ---------------------------------------------------------------------------
# the Python threads' bodies


def whole_poller(shadow: Shadow) -> Callable[[np.random.Generator], None]:
    out = np.zeros(shadow.npages, np.uintp)

    def body(rng: np.random.Generator) -> None:
        shadow.poll(0, shadow.npages, int(rng.integers(1, shadow.npages + 1)), out)
    return body


def sub_range_poller(shadow: Shadow) -> Callable[[np.random.Generator], None]:
    out = np.zeros(shadow.npages, np.uintp)

    def body(rng: np.random.Generator) -> None:
        first = int(rng.integers(0, shadow.npages))
        last = int(rng.integers(first + 1, shadow.npages + 1))
        shadow.poll(first, last, int(rng.integers(1, last - first + 1)), out)
    return body


def protector(base: int, npages: int) -> Callable[[np.random.Generator], None]:
    def body(rng: np.random.Generator) -> None:
        first = int(rng.integers(0, npages))
        count = int(rng.integers(1, npages - first + 1))
        ok, old = ww.VirtualProtect(base + first * P, count * P, RW)
        if (ok, old) != (True, RW):
            raise AssertionError(f"VirtualProtect gave {(ok, old)}, error {ww.GetLastError()}")
    return body


def resetter(base: int, npages: int) -> Callable[[np.random.Generator], None]:
    """ResetWriteWatch on a random range of the first half, then a write into
    it: that write must be reported (it was made after the reset returned)."""
    view = ww.as_array(base, npages * P)
    out = np.zeros(npages, np.uintp)
    half = npages // 2

    def body(rng: np.random.Generator) -> None:
        first = int(rng.integers(0, half))
        last = int(rng.integers(first + 1, half + 1))
        if ww.ResetWriteWatch(base + first * P, (last - first) * P) != 0:
            raise AssertionError(f"ResetWriteWatch failed: {ww.GetLastError()}")
        page = int(rng.integers(first, last))
        view[page * P + int(rng.integers(0, P))] = int(rng.integers(1, 256))
        ret, found, _ = ww.GetWriteWatch(0, base, npages * P, out)
        pages = ((out[:found].astype(np.int64) - base) // P).tolist()
        if ret != 0 or page not in pages:
            raise AssertionError(f"a write to page {page} after ResetWriteWatch returned was "
                                 f"not reported (got {pages}, ret {ret:#x})")
    return body


def second_half_poller(base: int, npages: int) -> Callable[[np.random.Generator], None]:
    """GetWriteWatch(RESET) on the second half, while resetter works on the first."""
    out = np.zeros(npages, np.uintp)
    half = npages // 2

    def body(rng: np.random.Generator) -> None:
        ret, found, _ = ww.GetWriteWatch(RESET, base + half * P, (npages - half) * P, out,
                                         int(rng.integers(1, npages - half + 1)))
        pages = ((out[:found].astype(np.int64) - base) // P).tolist()
        if ret != 0 or any(not half <= page < npages for page in pages):
            raise AssertionError(f"second-half poll reported {pages} (ret {ret:#x})")
    return body


def allocator(body_rounds: list[int]) -> Callable[[np.random.Generator], None]:
    """A region of its own each round: every report exact."""
    out = np.zeros(40, np.uintp)

    def report(base: int, flags: int = 0) -> list[int]:
        ret, found, _ = ww.GetWriteWatch(flags, base, npages_of[base] * P, out)
        if ret != 0:
            raise AssertionError(f"GetWriteWatch failed: {ww.GetLastError()}")
        return ((out[:found].astype(np.int64) - base) // P).tolist()

    npages_of: dict[int, int] = {}

    def body(rng: np.random.Generator) -> None:
        npages = int(rng.integers(3, 33))
        base = ww.VirtualAlloc(0, npages * P, WATCHED, RW)
        if not base:
            raise AssertionError(f"VirtualAlloc failed: {ww.GetLastError()}")
        npages_of[base] = npages
        try:
            written = sorted({int(p) for p in rng.integers(0, npages, size=4)})
            view = ww.as_array(base, npages * P)
            for page in written:
                view[page * P + int(rng.integers(0, P))] = 1
            del view
            if report(base) != written:
                raise AssertionError(f"wrote {written}, reported {report(base)}")
            if not ww.VirtualFree(base + P, P, ww.MEM_DECOMMIT):
                raise AssertionError(f"decommit failed: {ww.GetLastError()}")
            written = [page for page in written if page != 1]
            if ww.VirtualProtect(base, P, ww.PAGE_READONLY) != (True, RW):
                raise AssertionError(f"VirtualProtect failed: {ww.GetLastError()}")
            if report(base, RESET) != written:
                raise AssertionError(f"after decommit and protect: expected {written}")
            if report(base) != []:
                raise AssertionError("RESET did not reset")
            info = ww.VirtualQuery(base + P)
            if info is None or (info.State, info.RegionSize) != (ww.MEM_RESERVE, P):
                raise AssertionError(f"VirtualQuery of the decommitted page: {info}")
        finally:
            del npages_of[base]
            if not ww.VirtualFree(base, 0, ww.MEM_RELEASE):
                raise AssertionError(f"release failed: {ww.GetLastError()}")
        body_rounds[0] += 1
    return body


def start_everything(workers: Workers, polled: int, resetting: int, shadow: Shadow,
                     seed: int) -> list[int]:
    allocations = [0]
    workers.start("whole-poller", seed, whole_poller(shadow))
    workers.start("sub-range-poller", seed + 1, sub_range_poller(shadow))
    workers.start("protector", seed + 2, protector(polled, NPAGES))
    workers.start("resetter", seed + 3, resetter(resetting, RESET_PAGES))
    workers.start("second-half-poller", seed + 4, second_half_poller(resetting, RESET_PAGES))
    workers.start("allocator-1", seed + 5, allocator(allocations))
    workers.start("allocator-2", seed + 6, allocator(allocations))
    return allocations


def exercised(shadow: Shadow, workers: Workers) -> bool:
    """What check_nothing_lost requires of a run besides its result."""
    return (workers.all_went_round() and shadow.full_polls > 0
            and written_pages(shadow) > NPAGES // 2)


def written_pages(shadow: Shadow) -> int:
    return int(shadow.view.reshape(-1, P).any(axis=1).sum())


def check_nothing_lost(shadow: Shadow, writes: int, workers: Workers) -> None:
    assert workers.errors == [], "\n".join(workers.errors)
    shadow.drain()
    assert writes > 0, "the native writers made no store"
    idle = [name for name, rounds in workers.rounds.items() if rounds == 0]
    assert not idle, f"threads that never completed a round: {idle}"
    assert shadow.full_polls > 0, "no capped poll filled its capacity"
    stale = shadow.stale_pages()
    assert stale == [], (f"{len(stale)} pages differ from their shadow (first {stale[:8]}): "
                         "a write was reset without being reported")
    assert written_pages(shadow) > NPAGES // 2


def scenario_everything(soak: bool) -> None:
    with two_regions() as (polled, resetting):
        everything(polled, resetting, soak)


def everything(polled: int, resetting: int, soak: bool) -> None:
    shadow = Shadow(polled, NPAGES)
    workers = Workers()
    writers = [NativeWriters(polled, NPAGES, nthreads=2, seed=61, pause_ns=PAUSE_NS),
               NativeWriters(resetting, RESET_PAGES, nthreads=1, seed=62, pause_ns=PAUSE_NS)]
    try:
        allocations = start_everything(workers, polled, resetting, shadow, seed=600)
        workers.run_for(run_seconds(soak), until=lambda: exercised(shadow, workers))
    finally:
        writes = sum(each.stop() for each in writers)
        # Pollers go on a little after the last store: a poll that reset a page
        # without reporting it now loses that page's final contents for good.
        workers.more_rounds("sub-range-poller", TAIL_POLLS)
        workers.finish()
    check_nothing_lost(shadow, writes, workers)
    assert allocations[0] > 0


# ---------------------------------------------------------------------------
# fork and exec under load


CHILD_TIMEOUT = patience(60.0)


def wait_child(pid: int) -> int:
    """The exit code of pid; kills it if it is still running after CHILD_TIMEOUT."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} hung")


def child_uses_writewatch(base: int, npages: int, rng: np.random.Generator) -> int:
    """In a forked child: the child's own writes are reported (conservatively at
    first: a reset makes tracking exact). Returns the exit status."""
    page, later = (int(p) for p in rng.choice(npages, size=2, replace=False))
    try:
        view = ww.as_array(base, npages * P)
        out = np.zeros(npages, np.uintp)
        view[page * P] = 1
        ret, found, _ = ww.GetWriteWatch(RESET, base, npages * P, out)
        if ret != 0 or base + page * P not in out[:found].tolist():
            return 3
        view[later * P + 5] = 2
        ret, found, _ = ww.GetWriteWatch(0, base, npages * P, out)
        if ret != 0:
            return 6
        if base + later * P not in out[:found].tolist():
            return 4  # the child's write after its reset was not reported
        if found != 1:
            return 7  # pages reported that nobody wrote after the reset
        return 0
    except BaseException:
        return 5


def forker(base: int, npages: int, forks: list[int]) -> Callable[[np.random.Generator], None]:
    def body(rng: np.random.Generator) -> None:
        how = ("subprocess", "fork-exec", "fork-uses-writewatch")[forks[0] % 3]
        if how == "subprocess":
            result = subprocess.run([sys.executable, "-S", "-c", "pass"], timeout=CHILD_TIMEOUT)
            code = result.returncode
        else:
            child_rng = np.random.default_rng(int(rng.integers(1 << 32)))
            pid = os.fork()
            if pid == 0:
                status = 70
                try:
                    if how == "fork-exec":
                        os.execv(sys.executable, [sys.executable, "-S", "-c", "pass"])
                    else:
                        status = child_uses_writewatch(base, npages, child_rng)
                finally:
                    os._exit(status)
            code = wait_child(pid)
        if code != 0:
            raise AssertionError(f"{how} child exited with {code}")
        forks[0] += 1
    return body


def scenario_fork(soak: bool) -> None:
    with two_regions() as (polled, resetting):
        fork_under_load(polled, resetting, soak)


def fork_under_load(polled: int, resetting: int, soak: bool) -> None:
    shadow = Shadow(polled, NPAGES)
    workers = Workers()
    forks = [0]
    writers = [NativeWriters(polled, NPAGES, nthreads=2, seed=71, pause_ns=PAUSE_NS),
               NativeWriters(resetting, RESET_PAGES, nthreads=1, seed=72, pause_ns=PAUSE_NS)]
    try:
        start_everything(workers, polled, resetting, shadow, seed=700)
        workers.start("forker", 799, forker(polled, NPAGES, forks))
        workers.run_for(run_seconds(soak),
                        until=lambda: exercised(shadow, workers) and forks[0] >= 1)
    finally:
        writes = sum(each.stop() for each in writers)
        workers.more_rounds("sub-range-poller", TAIL_POLLS)
        workers.finish()
    check_nothing_lost(shadow, writes, workers)
    assert forks[0] >= 1


def scenario_forked_children(soak: bool) -> None:
    with two_regions() as (polled, _):
        forked_children(polled)


def forked_children(polled: int) -> None:
    with NativeWriters(polled, 8, nthreads=2, seed=81, pause_ns=PAUSE_NS) as writers:
        codes = []
        for seed in range(4):
            pid = os.fork()
            if pid == 0:
                os._exit(child_uses_writewatch(polled, NPAGES, np.random.default_rng(seed)))
            codes.append(wait_child(pid))
        writers.stop()
    assert codes == [0, 0, 0, 0]
    out = np.zeros(NPAGES, np.uintp)
    ret, found, _ = ww.GetWriteWatch(0, polled, NPAGES * P, out)
    pages = ((out[:found].astype(np.int64) - polled) // P).tolist()
    # The writers wrote pages 0..7 only; every page they wrote still reads
    # written in the parent although the children reset theirs.
    view = ww.as_array(polled, NPAGES * P).reshape(-1, P)
    assert ret == 0 and pages == np.flatnonzero(view.any(axis=1)).tolist()
    assert pages and max(pages) < 8


# ---------------------------------------------------------------------------
# the tests: each scenario in a child interpreter, so that a deadlock fails
# the test (with every thread's traceback) instead of hanging the session

SCENARIOS = {
    "everything": scenario_everything,
    "fork": scenario_fork,
    "forked-children": scenario_forked_children,
}


def run_isolated(name: str, soak: bool, module: str = "test_concurrency") -> None:
    """Scenario name of module's SCENARIOS, in a child interpreter."""
    timeout = patience((SOAK_SECONDS + 250) if soak else 50)  # a CI scenario takes a few seconds
    try:
        result = run_python(f"""
            import {module}
            {module}.SCENARIOS[{name!r}]({soak!r})
            print("scenario done", flush=True)
            """, timeout=timeout, report_hang=True)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the {name} scenario hung:\n{exc.stderr!r}") from None
    assert result.returncode == 0 and "scenario done" in result.stdout, (
        f"exit status {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-12000:]}")


def test_no_write_lost_while_everything_runs_at_once(soak):
    """Writers, RESET pollers, VirtualProtect, ResetWriteWatch and allocators
    at once: the shadow copy equals the memory (module docstring)."""
    run_isolated("everything", soak)


def test_fork_and_exec_under_load_keep_parent_tracking_exact(soak):
    """While writers write and pollers poll, a thread keeps forking
    (subprocess.run, fork + exec, fork children that use writewatch on the
    polled region's copy). The children exit cleanly (status 4: a child's write
    after its reset went unreported) and the parent loses no write."""
    run_isolated("fork", soak)


def test_child_forked_while_writers_run_exits_cleanly_and_parent_keeps_its_pages():
    """A child forked while native writers store into watched memory has no
    writer threads; it can still use writewatch on its copy, and the parent's
    dirty pages are untouched by whatever the child resets."""
    run_isolated("forked-children", False)
