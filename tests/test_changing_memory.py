"""Memory that another thread changes while a call runs.

A call checks its arguments once and uses them later: whatever another thread
does in between (making the output array PAGE_NOACCESS, decommitting it,
decommitting pages the call scans, latching pages the call resets) must leave
the call either done before the change or answering as Windows does (998 for
an output array that cannot be written), never crashing the process or
reporting a page nothing wrote. Each race runs many rounds beside the call, in
a child interpreter where a crash can only fail its own test.
"""

from __future__ import annotations

import json
import threading

import numpy as np
from forking import patience, run_python, scaled_work

import writewatch as ww
from writewatch import latch

P = ww.PAGE_SIZE
RESET = ww.WRITE_WATCH_FLAG_RESET
WATCHED = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
RW = ww.PAGE_READWRITE

OUTPUT_CHANGED_DURING_CALL = """
import json, threading
import numpy as np
import writewatch as ww

P = ww.PAGE_SIZE
NPAGES = 4096        # every page written: each scan fills the whole array
OUT_SIZE = NPAGES * 8
CALLS = {calls}

def scanned(latched):
    mem = ww.WatchedMemory(NPAGES * P)
    ww.as_array(mem.address, NPAGES * P)[::P] = 1
    if latched:
        # A latched page decommitted: the region's calls take the walk in Python.
        assert ww.VirtualProtect(mem.address, P, ww.PAGE_READWRITE)[0]
        assert ww.VirtualFree(mem.address, P, ww.MEM_DECOMMIT)
    return mem

def output(kind):
    y = ww.VirtualAlloc(0, OUT_SIZE, ww.MEM_RESERVE | ww.MEM_COMMIT | kind, ww.PAGE_READWRITE)
    assert y
    return y, ww.as_array(y, OUT_SIZE, np.uintp)

def change(y, stop, changes):
    while not stop.is_set():
        if changes[0] % 2:
            assert ww.VirtualProtect(y, OUT_SIZE, ww.PAGE_NOACCESS)[0]
            assert ww.VirtualProtect(y, OUT_SIZE, ww.PAGE_READWRITE)[0]
        else:
            assert ww.VirtualFree(y, OUT_SIZE, ww.MEM_DECOMMIT)
            assert ww.VirtualAlloc(y, OUT_SIZE, ww.MEM_COMMIT, ww.PAGE_READWRITE) == y
        changes[0] += 1

def calls(mem, out, written):
    answers = {{}}
    for _ in range(CALLS):
        if written:
            try:
                ret, count = 0, len(mem.written(out=out, unit="page"))
            except ww.WriteWatchError as exc:
                ret = 1
                ww.SetLastError(exc.winerror)
        else:
            ret, count, _ = ww.GetWriteWatch(0, mem.address, NPAGES * P, out)
        answer = "ok" if ret == 0 else str(ww.GetLastError())
        if ret == 0:
            assert count == NPAGES, count
        answers[answer] = answers.get(answer, 0) + 1
    return answers

regions = {{False: scanned(False), True: scanned(True)}}
outputs = {{"plain": output(0), "watched": output(ww.MEM_WRITE_WATCH)}}
outcome = {{}}
for latched, kind, written in [(False, "plain", False), (False, "watched", False),
                               (True, "plain", False), (True, "watched", False),
                               (False, "watched", True), (True, "plain", True)]:
    y, out = outputs[kind]
    stop, changes = threading.Event(), [0]
    changer = threading.Thread(target=change, args=(y, stop, changes))
    changer.start()
    try:
        answers = calls(regions[latched], out, written)
    finally:
        stop.set()
        changer.join()
    name = ("latched" if latched else "index") + "-" + kind + ("-written" if written else "")
    outcome[name] = {{"answers": answers, "changes": changes[0]}}
print(json.dumps(outcome))
"""


def test_output_array_made_unwritable_during_the_call(write_watch_backend):
    """GetWriteWatch's output array (or WatchedMemory.written's out) lies in
    VirtualAlloc memory, plain or watched, that another thread makes
    PAGE_NOACCESS or decommits while the call scans, on the index's path and
    on the latched walk. The array was checked once and used later (by
    written() a second time, to convert the addresses): the process died with
    SIGSEGV. Now the change waits for the call: each call succeeds or answers
    998."""
    calls = scaled_work(600, at_least=60)
    result = run_python(OUTPUT_CHANGED_DURING_CALL.format(calls=calls),
                        timeout=patience(240), report_hang=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-4000:])
    outcome = json.loads(result.stdout)
    assert len(outcome) == 6
    for name, each in outcome.items():
        assert set(each["answers"]) <= {"ok", str(ww.ERROR_NOACCESS)}, (name, each)
        assert sum(each["answers"].values()) == calls, (name, each)
        assert each["changes"] > 0, (name, each)


def test_a_decommit_never_makes_a_racing_scan_report_its_pages(write_watch_backend):
    """GetWriteWatch(0) while another thread decommits (and recommits) most of
    the region: nothing writes, so nothing may be reported. The pagemap
    backend reported every decommitted page (240 of 240): they were
    unregistered before the index learned they were gone."""
    npages, kept = 256, 16
    base = ww.VirtualAlloc(0, npages * P, WATCHED, RW)
    assert base
    rest, rest_size = base + kept * P, (npages - kept) * P
    stop = threading.Event()
    cycles = [0]

    def decommit_and_recommit() -> None:
        while not stop.is_set():
            assert ww.VirtualFree(rest, rest_size, ww.MEM_DECOMMIT)
            assert ww.VirtualAlloc(rest, rest_size, ww.MEM_COMMIT, RW) == rest
            cycles[0] += 1

    out = np.zeros(npages, np.uintp)
    reported = 0
    worker = threading.Thread(target=decommit_and_recommit)
    worker.start()
    try:
        target = scaled_work(300, at_least=50)
        for _ in range(scaled_work(200_000, at_least=20_000)):
            ret, count, _ = ww.GetWriteWatch(0, base, npages * P, out)
            assert ret == 0, ww.GetLastError()
            reported += count
            if cycles[0] >= target:
                break
    finally:
        stop.set()
        worker.join()
        assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    assert cycles[0] > 0
    assert reported == 0


def test_a_reset_between_the_latch_scan_and_the_latch_unlatches(write_watch_backend,
                                                                 monkeypatch):
    """VirtualProtect latches the pages it finds written (rule 11). A
    GetWriteWatch(RESET) that ran between its scan and its latch reported and
    reset the page, and the latch then marked it anyway: after a decommit the
    page was reported although in either serial order of the two calls it
    ends unlatched. The VirtualProtect here stops right after its scan while
    a RESET runs; the RESET now waits for it."""
    base = ww.VirtualAlloc(0, 4 * P, WATCHED, RW)
    assert base
    scanned, go = threading.Event(), threading.Event()
    address_runs = latch._address_runs

    def paused_after_scan(addresses: np.ndarray) -> list[tuple[int, int]]:
        runs = address_runs(addresses)
        scanned.set()
        go.wait(patience(30))
        return runs

    monkeypatch.setattr(latch, "_address_runs", paused_after_scan)
    try:
        for _ in range(2):
            ww.as_array(base, P)[0] = 1
            scanned.clear()
            go.clear()
            protect = threading.Thread(target=ww.VirtualProtect, args=(base, P, RW))
            protect.start()
            assert scanned.wait(patience(30))
            out = np.zeros(4, np.uintp)
            answer: list[tuple[int, int, int]] = []
            reset = threading.Thread(
                target=lambda answer=answer, out=out:
                answer.append(ww.GetWriteWatch(RESET, base, 4 * P, out)))
            reset.start()
            reset.join(patience(0.2))  # before the fix it completed here
            go.set()
            protect.join()
            reset.join()
            assert answer[0][:2] == (0, 1) and out[0] == base
            assert ww.VirtualFree(base, P, ww.MEM_DECOMMIT)
            assert ww.GetWriteWatch(0, base, 4 * P, out)[:2] == (0, 0), out
            assert ww.VirtualAlloc(base, P, ww.MEM_COMMIT, RW) == base
    finally:
        go.set()
        assert ww.VirtualFree(base, 0, ww.MEM_RELEASE)


WRITTEN_THEN_PROTECTED = """
import sys
import numpy as np
import writewatch as ww

P = ww.PAGE_SIZE
mem = ww.WatchedMemory(16 * P)
mem.array[3 * P] = 1
y = ww.VirtualAlloc(0, P, ww.MEM_RESERVE | ww.MEM_COMMIT, ww.PAGE_READWRITE)
out = ww.as_array(y, P, np.uintp)

def protect_once_the_scan_returns(frame, event, arg):
    # Another thread's VirtualProtect, landing the moment the scan's native
    # call has returned.
    if event == "c_return" and "get_write_watch" in getattr(arg, "__name__", ""):
        sys.setprofile(None)
        assert ww.VirtualProtect(y, P, ww.PAGE_NOACCESS)[0]

sys.setprofile(protect_once_the_scan_returns)
found = mem.written(out=out, unit="page")
sys.setprofile(None)
assert ww.VirtualProtect(y, P, ww.PAGE_READWRITE)[0]
assert found.tolist() == [3], found
print("ok")
"""


def test_written_stores_into_its_out_array_only_during_the_call(write_watch_backend):
    """WatchedMemory.written(out=..., unit="page") converted the addresses in
    out after the call had returned: an out array that another thread made
    PAGE_NOACCESS by then killed the process. The conversion now happens
    before the store, inside the call."""
    result = run_python(WRITTEN_THEN_PROTECTED, timeout=patience(60), report_hang=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-4000:])
    assert result.stdout.strip() == "ok"
