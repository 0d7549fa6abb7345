"""Signals and SIGSEGV ownership.

- A native signal handler may store into watched memory at any moment, even
  while its thread is inside GetWriteWatch(RESET) holding a region's lock:
  the fault path never waits for something the faulting thread holds, and the
  store is reported (now or by the next call).
- On the mprotect backend, writewatch's SIGSEGV handler keeps first place
  through every common way a Python program touches SIGSEGV: a late
  faulthandler.enable(), faulthandler.disable(), signal.signal(SIGSEGV, f).

Each scenario runs in a child interpreter: a hang or a crash fails one test,
with the child's tracebacks.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from forking import patience, run_python, scaled_work

SIGNAL_STORE_DURING_RESET = """
import json, signal, threading
import numpy as np
import writewatch as ww
from forking import patience
from stall import StalledMemory
from writewatch.testing.cbuild import build_cached

native = build_cached("signal_store", '''
int store_on_signal(int sig, uint64_t address);
int stores_done(void);
''', '''
#include <signal.h>
#include <string.h>
static volatile uint64_t target;
static volatile int stores;
static void on_signal(int sig)
{
    (void)sig;
    *(volatile char *)(uintptr_t)target = 1;   /* a plain store: async-signal-safe */
    __atomic_add_fetch(&stores, 1, __ATOMIC_SEQ_CST);
}
int store_on_signal(int sig, uint64_t address)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    target = address;
    return sigaction(sig, &action, NULL);
}
int stores_done(void) { return __atomic_load_n(&stores, __ATOMIC_SEQ_CST); }
''')
P = ww.PAGE_SIZE
stall = StalledMemory(1)
base = ww.VirtualAlloc(0, 16 * P, ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                       ww.PAGE_READWRITE)
view = ww.as_array(base, 16 * P)
view[::P] = 1                                   # every page written...
out = np.zeros(16, np.uintp)
assert ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, base, 16 * P, out)[:2] == (0, 16)
view[3 * P] = 1                                 # ...then only page 3
assert native.lib.store_on_signal(signal.SIGUSR1, base + 7 * P) == 0
paused = stall.array(16)
first = {}

def reset_call():
    first["result"] = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, base, 16 * P, paused)
    first["pages"] = [(int(a) - base) // P for a in paused[:first["result"][1]]]

caller = threading.Thread(target=reset_call)
caller.start()
stall.wait_for_fault()       # the call is inside its scan, holding what it holds
signal.pthread_kill(caller.ident, signal.SIGUSR1)
for _ in range(int(patience(2000))):  # the handler's store into page 7 completes
    if native.lib.stores_done():
        break
    threading.Event().wait(0.005)
stored = native.lib.stores_done()
stall.resolve()
caller.join()
ret, count, _ = ww.GetWriteWatch(0, base, 16 * P, out)
print(json.dumps({"stored": stored, "first": first["pages"],
                  "after": [(int(a) - base) // P for a in out[:count]]}))
"""


def test_signal_handler_storing_during_a_reset_neither_hangs_nor_is_lost(write_watch_backend):
    """A native signal handler stores into page 7 of a region while its
    thread is inside GetWriteWatch(RESET) on that region (paused at its first
    store, holding the region's lock on the fallbacks). The store completes at
    once, and page 7 is reported by that call or the next one."""
    result = run_python(SIGNAL_STORE_DURING_RESET, timeout=patience(90), report_hang=True)
    if "needs userfaultfd to pause a call" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-4000:]
    seen = json.loads(result.stdout)
    assert seen["stored"] == 1, f"the handler's store did not complete: {seen}"
    assert 3 in seen["first"] and set(seen["first"]) <= {3, 7}, seen
    assert 7 in seen["first"] + seen["after"], f"the handler's store was lost: {seen}"


SEGV_DISPOSITION = """
import faulthandler, json, signal
import numpy as np
import writewatch as ww
{before}
P = ww.PAGE_SIZE
base = ww.VirtualAlloc(0, 8 * P, ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                       ww.PAGE_READWRITE, backend="mprotect")
view = ww.as_array(base, 8 * P)
view[P] = 1                      # tracked: the handler is installed and in use
{change}
view[5 * P] = 1                  # a tracked write after the change
out = np.zeros(8, np.uintp)
ret, count, _ = ww.GetWriteWatch(0, base, 8 * P, out)
print(json.dumps([(int(a) - base) // P for a in out[:count]]))
"""

CHANGES = {
    "faulthandler.enable() late": ("", "faulthandler.enable()"),
    "faulthandler.disable() after enabling it first": ("faulthandler.enable()",
                                                       "faulthandler.disable()"),
    "signal.signal(SIGSEGV, handler)": ("", "signal.signal(signal.SIGSEGV, lambda *a: None)"),
    "signal.signal(SIGSEGV, SIG_DFL)": ("", "signal.signal(signal.SIGSEGV, signal.SIG_DFL)"),
}


@pytest.mark.any_backend
@pytest.mark.parametrize("change", list(CHANGES))
def test_tracked_writes_survive_changes_to_the_sigsegv_disposition(change):
    """On the mprotect backend, a Python program changing SIGSEGV's handler
    after the first region exists must not make the next tracked write fatal
    (faulthandler's handler, SIG_DFL) or fault forever (a Python handler)."""
    before, after = CHANGES[change]
    result = run_python(SEGV_DISPOSITION.format(before=before, change=after), timeout=patience(60),
                        report_hang=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert json.loads(result.stdout) == [1, 5]


NATIVE_HANDLER_LATER = """
import ctypes, json
import numpy as np
import writewatch as ww

P = ww.PAGE_SIZE
base = ww.VirtualAlloc(0, 8 * P, ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                       ww.PAGE_READWRITE, backend="mprotect")
view = ww.as_array(base, 8 * P)
view[P] = 1
libc = ctypes.CDLL(None, use_errno=True)
# A native library installs its own SIGSEGV handler (SIG_DFL here: the worst).
libc.signal.restype = ctypes.c_void_p
libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.signal(11, None)
out = np.zeros(8, np.uintp)
ww.GetWriteWatch(0, base, 8 * P, out)   # the next call puts writewatch's handler first
view[5 * P] = 1
ret, count, _ = ww.GetWriteWatch(0, base, 8 * P, out)
print(json.dumps([(int(a) - base) // P for a in out[:count]]))
"""


@pytest.mark.any_backend
def test_next_call_takes_the_sigsegv_handler_back_from_native_code():
    """A handler installed by native code behind Python's back sees tracked
    writes until the next write-watch call, which puts writewatch's first
    again (chaining to it)."""
    result = run_python(NATIVE_HANDLER_LATER, timeout=patience(60), report_hang=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert json.loads(result.stdout) == [1, 5]


CHAINED_HANDLER = """
import faulthandler, json, sys
import numpy as np
import writewatch as ww
from native_handlers import lib

P = ww.PAGE_SIZE
KIND = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
out = np.zeros(8, np.uintp)
{steps}
view = ww.as_array(base, 8 * P)
view[2 * P] = 1                   # tracked writes still reach writewatch through the chain
ret, count, _ = ww.GetWriteWatch(0, base, 8 * P, out)
print(json.dumps([(int(a) - base) // P for a in out[:count]]), flush=True)
{crash}
print("survived an invalid store", flush=True)
"""

REGION = "base = ww.VirtualAlloc(0, 8 * P, KIND, ww.PAGE_READWRITE, backend='mprotect')\n" \
         "ww.as_array(base, 8 * P)[P] = 1\n"
CALL = "ww.GetWriteWatch(0, base, 8 * P, out)\n"
CHAIN_ORDERS = {
    # The case: a native library chains in after writewatch, and the
    # next call puts writewatch in front again: each now chains to the other.
    "chained in after writewatch": REGION + "lib.chain_sigsegv({how})\n" + CALL,
    "chained in before writewatch": "lib.chain_sigsegv({how})\n" + REGION + CALL,
    "chained in after faulthandler": REGION + "faulthandler.enable()\n"
                                     "lib.chain_sigsegv({how})\n" + CALL,
}


def run_until_it_dies(code: str) -> tuple[int, str, str]:
    try:
        result = run_python(code, timeout=patience(30))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"a genuine invalid store looped instead of killing the process: "
                    f"{exc.stdout!r}")
    return result.returncode, result.stdout, result.stderr


@pytest.mark.any_backend
@pytest.mark.parametrize("how", ["CALL_THROUGH", "DECLINE"])
@pytest.mark.parametrize("order", list(CHAIN_ORDERS))
def test_a_real_fault_through_a_chain_of_handlers_kills_the_process(order, how):
    """A native SIGSEGV handler that passes faults it does not own to the one
    it replaced (calling it, or putting it back and returning), in any order
    with writewatch's: tracked writes keep working, and a store to the NULL
    page still kills the process with SIGSEGV instead of going round the
    chain forever (mprotect)."""
    steps = CHAIN_ORDERS[order].format(how=f"{how == 'DECLINE':d}")
    returncode, stdout, stderr = run_until_it_dies(
        CHAINED_HANDLER.format(steps=steps, crash="lib.store_to_null()"))
    assert returncode == -signal.SIGSEGV, (returncode, stdout, stderr[-3000:])
    assert json.loads(stdout.splitlines()[0]) == [1, 2]
    if "faulthandler" in order:
        assert "Segmentation fault" in stderr, stderr[-3000:]


@pytest.mark.any_backend
def test_a_real_fault_in_a_native_thread_through_a_chain_kills_the_process():
    """The same from a native thread that never ran a write-watch call."""
    steps = CHAIN_ORDERS["chained in after writewatch"].format(how=0)
    returncode, stdout, stderr = run_until_it_dies(
        CHAINED_HANDLER.format(steps=steps, crash="lib.store_to_null_in_thread()"))
    assert returncode == -signal.SIGSEGV, (returncode, stdout, stderr[-3000:])
    assert json.loads(stdout.splitlines()[0]) == [1, 2]


SIGNAL_STORE_WHILE_PAUSED = """
import ctypes, json, signal, threading
import numpy as np
import writewatch as ww
from forking import patience
from native_handlers import lib
from stall import StalledMemory

P = ww.PAGE_SIZE
KIND = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
idle_event = threading.Event()
idle = threading.Thread(target=idle_event.wait, daemon=True)  # like an idle worker
idle.start()


def stores():
    return lib.stores_done(signal.SIGUSR1)


def wait_for_store(before, limit):
    for _ in range(int(patience(limit) / 0.005)):
        if stores() > before:
            break
        threading.Event().wait(0.005)
    return stores() - before


def case(receiver, target):
    stall = StalledMemory(1)
    base = ww.VirtualAlloc(0, 16 * P, KIND, ww.PAGE_READWRITE)
    other = ww.VirtualAlloc(0, 16 * P, KIND, ww.PAGE_READWRITE)
    ww.as_array(base, 16 * P)[::P] = 1
    ww.as_array(other, 16 * P)[::P] = 1
    out = np.zeros(16, np.uintp)
    for region in (base, other):                   # every page armed again
        assert ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, region, 16 * P, out)[:2] == (0, 16)
    # A read-only page 5 ends the run of pages to re-arm that page 3 starts.
    assert ww.VirtualProtect(base + 5 * P, P, ww.PAGE_READONLY)[0]
    view = ww.as_array(base, 5 * P)
    view[3 * P] = 1
    ww.as_array(base + 9 * P, P)[0] = 1
    # Page 3: re-armed (made read-only or write-protected again) before the
    # call pauses at its second store, page 9's address; page 7: clean, armed.
    region, page = {"page being reset": (base, 3), "clean page": (base, 7),
                    "another region": (other, 5)}[target]
    assert lib.store_on_signal(signal.SIGUSR1, region + page * P) == 0
    paused = stall.array(16, before=1)
    first = {}

    def reset_call():
        first["result"] = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, base, 16 * P, paused)
        first["pages"] = [(int(a) - base) // P for a in paused[:first["result"][1]]]

    caller = threading.Thread(target=reset_call)
    caller.start()
    stall.wait_for_fault()     # the call is inside its scan, holding what it holds
    before = stores()
    signal.pthread_kill((caller if receiver == "the resetting thread" else idle).ident,
                        signal.SIGUSR1)
    stored_during_pause = wait_for_store(before, 2)  # a store that can complete now does
    # Meanwhile the fault path serves everyone else: a write into another
    # region (from a thread that does not hold the GIL while it writes) completes.
    writer = threading.Thread(target=ctypes.memset, args=(other + 11 * P, 1, 1), daemon=True)
    writer.start()
    writer.join(patience(10))
    other_write_done = not writer.is_alive()
    stall.resolve()
    caller.join()
    stored = wait_for_store(before, 10)
    ret, count, _ = ww.GetWriteWatch(0, region, 16 * P, out)
    stall.close()
    return {"receiver": receiver, "target": target, "page": page,
            "stored_during_pause": stored_during_pause, "other_write_done": other_write_done,
            "stored": stored, "first": first["pages"],
            "after": [(int(a) - region) // P for a in out[:count]]}


print(json.dumps([case(receiver, target)
                  for receiver in ("the resetting thread", "another thread")
                  for target in ("page being reset", "clean page", "another region")]))
idle_event.set()
"""


def test_signal_handler_stores_during_a_paused_reset(write_watch_backend):
    """GetWriteWatch(RESET) paused inside its scan (holding its region's lock
    on the fallbacks), after it made page 3 read-only again; a native signal
    handler, run by that thread or by an idle one, stores into page 3, a clean
    page or another region. Nothing hangs; the store completes at once when
    its own thread holds the lock or it targets another region (otherwise it
    may wait for the call), and is reported; the fault path keeps serving
    writes into other regions meanwhile. (One child runs the six cases.)"""
    result = run_python(SIGNAL_STORE_WHILE_PAUSED, timeout=patience(150), report_hang=True)
    if "needs userfaultfd to pause a call" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-4000:]
    for seen in json.loads(result.stdout):
        assert seen["other_write_done"], f"a write into another region waited for the call: {seen}"
        if seen["receiver"] == "the resetting thread" or seen["target"] == "another region":
            assert seen["stored_during_pause"] == 1, f"the handler's store waited: {seen}"
        assert seen["stored"] == 1, seen
        page = seen["page"]
        if seen["target"] == "another region":
            assert seen["first"] == [3, 9] and page in seen["after"], seen
        else:
            assert {3, 9} <= set(seen["first"]) <= {3, 9, page}, seen
            assert page in seen["first"] + seen["after"], f"the handler's store was lost: {seen}"


CROSSED_STORES = """
import json, os, signal, threading
import numpy as np
import writewatch as ww
from forking import patience
from native_handlers import lib

P = ww.PAGE_SIZE
KIND = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
NPAGES, ROUNDS = 512, {rounds}
regions = [ww.VirtualAlloc(0, NPAGES * P, KIND, ww.PAGE_READWRITE) for _ in range(2)]
for base in regions:   # decommitted pages split the re-arming into many runs
    for page in range(8, NPAGES, 8):
        assert ww.VirtualFree(base + page * P, P, ww.MEM_DECOMMIT)
# Each poller's signal stores into the other poller's region, a page at a
# time over all its committed pages, so that nearly every store faults.
assert lib.store_on_signal_spread(signal.SIGUSR1, regions[1], NPAGES) == 0
assert lib.store_on_signal_spread(signal.SIGUSR2, regions[0], NPAGES) == 0
done = [0, 0]
started = threading.Barrier(3)

def poll(k):
    views = [ww.as_array(regions[k] + (page + 1) * P, 7 * P) for page in range(0, NPAGES, 8)]
    out = np.zeros(NPAGES, np.uintp)
    started.wait()
    for _ in range(ROUNDS):
        for view in views:
            view[::2 * P] = 1      # many runs to re-arm under the lock
        ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, regions[k], NPAGES * P, out)
        done[k] += 1
    lib.stop_signalling_thread(threading.get_ident())  # nothing left to cross

pollers = [threading.Thread(target=poll, args=(k,), daemon=True) for k in range(2)]
for each in pollers:
    each.start()
assert lib.start_signalling(pollers[0].ident, signal.SIGUSR1,
                            pollers[1].ident, signal.SIGUSR2) == 0
started.wait()
for each in pollers:
    each.join(patience(60))
hung = [each.is_alive() for each in pollers]
if not any(hung):
    lib.stop_signalling()
print(json.dumps({{"done": done, "hung": hung,
                  "stores": [lib.stores_done(signal.SIGUSR1), lib.stores_done(signal.SIGUSR2)]}}),
      flush=True)
os._exit(0)
"""


def test_crossed_signal_stores_between_two_pollers_never_deadlock(write_watch_backend):
    """Two threads poll their own region with RESET; each one's signal handler
    stores into the other's region, so each may fault on a region whose lock
    the other holds while it is itself stopped in a fault: the locks would be
    taken in opposite orders. Both pollers finish."""
    rounds = scaled_work(300, at_least=40)
    result = run_python(CROSSED_STORES.format(rounds=rounds), timeout=patience(150),
                        report_hang=True)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = json.loads(result.stdout)
    assert seen["hung"] == [False, False] and seen["done"] == [rounds, rounds], seen
    assert min(seen["stores"]) > 0, seen
