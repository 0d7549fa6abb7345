"""The mprotect backend when the kernel refuses to split a VMA.

Every armed/unarmed boundary is a VMA, and a process may have at most
vm.max_map_count of them. When the fault handler cannot unprotect one page
(mprotect fails with ENOMEM), it coalesces, and if that does not free enough
mappings it unprotects a larger run that needs no split and reports all of it
as written. Over-reporting is allowed; dying with SIGSEGV or losing a write is
not. Each case runs in a child interpreter, since the failure was the
interpreter's death.
"""

from __future__ import annotations

import pytest
from forking import patience, run_python

from writewatch import backends

pytestmark = [
    pytest.mark.any_backend,  # names its backend itself
    pytest.mark.skipif(bool(backends.backend_status()["mprotect"]),
                       reason="mprotect backend unavailable"),
]

# Only a hang ever gets near it: the children finish in seconds natively (and in
# a minute or two under QEMU's software emulation, which patience scales to).
HANG_GUARD = patience(120)


def max_map_count() -> int:
    with open("/proc/sys/vm/max_map_count") as f:
        return int(f.read())


def run_mprotect(code: str) -> None:
    result = run_python(code, timeout=HANG_GUARD, env={"WRITEWATCH_BACKEND": "mprotect"},
                        report_hang=True)
    assert result.returncode == 0, (
        f"the child died (exit status {result.returncode})\n{result.stdout}{result.stderr}")
    assert result.stdout.startswith("ok"), result.stdout + result.stderr


def test_random_writes_over_1gib_through_numpy_keep_the_interpreter_alive():
    """The reported crash: on Linux 6.1 every page written apart from the others
    got an anon_vma of its own, VMAs with different anon_vmas never merge back,
    coalescing freed nothing and the handler gave up: SIGSEGV."""
    run_mprotect("""
        import numpy as np
        import writewatch as ww
        size = 1 << 30
        base = ww.VirtualAlloc(0, size, ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                               ww.PAGE_READWRITE)
        assert base
        view = ww.as_array(base, size)
        pages = np.unique(np.random.default_rng(7).integers(0, 262144, 100000))
        view[pages * 4096] = 1
        out = np.zeros(size // ww.PAGE_SIZE, np.uintp)
        ret, count, _ = ww.GetWriteWatch(0, base, size, out)
        assert ret == 0, ww.GetLastError()
        reported = (out[:count] - base) // ww.PAGE_SIZE
        assert np.isin(pages, reported).all(), "a write was lost"
        assert (view[pages * 4096] == 1).all()
        print("ok", len(pages), count)
    """)


@pytest.mark.skipif(max_map_count() > 1 << 18,
                    reason=f"vm.max_map_count = {max_map_count()} is too high to fill")
def test_writes_proceed_when_other_mappings_fill_max_map_count():
    """Another part of the process has used up vm.max_map_count: no mprotect that
    splits a VMA can succeed, coalescing the region cannot help, and writes must
    still go through, reported (over-reporting allowed)."""
    run_mprotect("""
        import ctypes, errno, mmap
        import numpy as np
        import writewatch as ww
        P = ww.PAGE_SIZE
        npages = 4096
        base = ww.VirtualAlloc(0, npages * P,
                               ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                               ww.PAGE_READWRITE)
        assert base
        view = ww.as_array(base, npages * P)
        # Everything the writes and the check need, made before the fill.
        pages = np.unique(np.random.default_rng(7).integers(0, npages, 1000))
        offsets = pages * P
        out = np.zeros(npages, np.uintp)

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        span = 2 * limit * P
        filler = libc.mmap(None, span, mmap.PROT_READ | mmap.PROT_WRITE,
                           mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000, -1, 0)
        assert filler not in (None, ctypes.c_void_p(-1).value)
        # Every other page read-only, one VMA each, until the kernel refuses.
        for k in range(limit):
            if libc.mprotect(filler + 2 * k * P, P, mmap.PROT_READ):
                assert ctypes.get_errno() == errno.ENOMEM
                break
        else:
            raise AssertionError("the kernel never refused a split")

        view[offsets] = 1
        ret, count, _ = ww.GetWriteWatch(0, base, npages * P, out)
        libc.munmap(filler, span)
        assert ret == 0, ww.GetLastError()
        reported = (out[:count] - base) // P
        assert np.isin(pages, reported).all(), "a write was lost"
        assert (view[offsets] == 1).all()
        # Tracking goes on once mappings are free again.
        ret, count, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, base, npages * P, out)
        assert ret == 0 and ww.GetWriteWatch(0, base, npages * P, out)[1] == 0
        view[5 * P] = 2
        ret, count, _ = ww.GetWriteWatch(0, base, npages * P, out)
        assert ret == 0 and list(out[:count]) == [base + 5 * P]
        print("ok", len(pages), count)
    """)
