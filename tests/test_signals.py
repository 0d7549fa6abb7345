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

import pytest
from forking import patience, run_python

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
