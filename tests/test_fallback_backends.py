"""What only the fallback backends (mprotect + SIGSEGV, userfaultfd handler
thread) have to get right: VMA limits, fault chaining, kernel writes."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from forking import run_python

import writewatch as ww
from writewatch import backends, memory
from writewatch.kernel import lib

P = ww.PAGE_SIZE
pytestmark = pytest.mark.any_backend  # names its backends itself


def available(name: str) -> bool:
    return not backends.backend_status()[name]


needs_mprotect = pytest.mark.skipif(not available("mprotect"), reason="mprotect backend "
                                    f"unavailable: {backends.backend_status()['mprotect']}")
needs_uffd = pytest.mark.skipif(not available("uffd"),
                                reason=f"uffd backend unavailable: "
                                       f"{backends.backend_status()['uffd']}")


def mapping_count() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


@needs_mprotect
def test_random_writes_over_1gib_survive_max_map_count():
    """Every other page of 262144 written in random order would leave ~131072
    separate writable pages, twice vm.max_map_count's 65530 mappings: the
    handler re-arms to merge them back instead of failing."""
    npages = (1 << 30) // P
    written = np.arange(0, npages, 2)
    np.random.default_rng(7).shuffle(written)
    with ww.WatchedMemory(npages * P, backend="mprotect") as mem:
        memory = mem.array
        for chunk in np.array_split(written, 16):
            memory[chunk * P] = 1  # numpy's loop takes one fault per page
        with open("/proc/sys/vm/max_map_count") as f:
            assert mapping_count() < int(f.read())
        reported = mem.written(reset=True)
        assert np.array_equal(reported, mem.address + np.sort(written) * P)
        assert len(mem.written()) == 0
        memory[P * 3] = 2
        assert list(mem.written() - mem.address) == [3 * P]


def run_on_backend(code: str, backend: str) -> subprocess.CompletedProcess[str]:
    return run_python(code, env={"WRITEWATCH_BACKEND": backend})


@needs_mprotect
def test_genuine_segfault_elsewhere_still_kills_and_faulthandler_reports_it():
    result = run_on_backend("""
        import ctypes, faulthandler
        faulthandler.enable()
        import writewatch as ww
        mem = ww.WatchedMemory(16 * ww.PAGE_SIZE)
        mem.array[5] = 1                      # the handler is installed and working
        assert len(mem.written()) == 1
        print("armed", flush=True)
        ctypes.string_at(8)                   # a real crash, not ours
    """, "mprotect")
    assert result.stdout == "armed\n"
    assert result.returncode == -11, result.stderr
    assert "Fatal Python error: Segmentation fault" in result.stderr


@needs_mprotect
def test_write_to_a_read_only_page_is_still_an_access_violation():
    result = run_on_backend("""
        import ctypes
        import writewatch as ww
        mem = ww.WatchedMemory(16 * ww.PAGE_SIZE)
        ok, old = ww.VirtualProtect(mem.address, ww.PAGE_SIZE, ww.PAGE_READONLY)
        assert ok
        print("protected", flush=True)
        ctypes.memset(mem.address, 1, 1)
    """, "mprotect")
    assert result.stdout == "protected\n"
    assert result.returncode == -11


@needs_mprotect
def test_without_faulthandler_the_default_action_kills():
    result = run_on_backend("""
        import ctypes, faulthandler
        faulthandler.disable()
        import writewatch as ww
        mem = ww.WatchedMemory(16 * ww.PAGE_SIZE)
        mem.array[0] = 1
        ctypes.string_at(8)
    """, "mprotect")
    assert result.returncode == -11
    assert "Fatal Python error" not in result.stderr


@needs_mprotect
def test_kernel_write_into_armed_pages_fails_without_preparation():
    """The documented limit of the mprotect backend, and its remedy."""
    with ww.WatchedMemory(8 * P, backend="mprotect") as mem:
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, b"k" * 3 * P)
            view = mem.view(P + 100, 3 * P - 200)
            with pytest.raises(OSError) as failure:
                os.readv(read_end, [view])
            assert failure.value.errno == 14  # EFAULT
            ww.prepare_kernel_write(mem.address + P + 100, 3 * P - 200)
            assert os.readv(read_end, [view]) == 3 * P - 200
        finally:
            os.close(read_end)
            os.close(write_end)
        assert list((mem.written() - mem.address) // P) == [1, 2, 3]
        assert bytes(view[:4]) == b"kkkk"


@needs_uffd
def test_uffd_kernel_writes_reach_the_handler_thread_when_privileged():
    with ww.WatchedMemory(8 * P, backend="uffd") as mem:
        if backends.backend("uffd").kernel_writes_fault():
            pytest.skip("uffd opened with UFFD_USER_MODE_ONLY: kernel writes need "
                        "prepare_kernel_write")
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, b"u" * 2 * P)
            assert os.readv(read_end, [mem.view(2 * P, 2 * P)]) == 2 * P
        finally:
            os.close(read_end)
            os.close(write_end)
        assert list((mem.written() - mem.address) // P) == [2, 3]


@pytest.mark.parametrize("name", ["mprotect", "uffd"])
def test_view_outliving_release_stays_writable(name):
    """Released memory is disarmed, so a stale view never traps into a
    handler that no longer knows the range."""
    if not available(name):
        pytest.skip(f"{name} unavailable: {backends.backend_status()[name]}")
    mem = ww.WatchedMemory(4 * P, backend=name)
    view = mem.view()
    mem.close()
    view[::P] = 9  # would kill the process if still armed
    assert view[P] == 9


@pytest.mark.parametrize("name", ["mprotect", "uffd"])
def test_process_memwatch_serves_the_calling_process(name):
    if not available(name):
        pytest.skip(f"{name} unavailable: {backends.backend_status()[name]}")
    with ww.WatchedMemory(8 * P, backend=name) as mem:
        mem.array[5 * P] = 1
        mem.array[2 * P] = 1
        vec = np.zeros(8, np.int64)
        flags = ww.MEMWATCH_SD_GET | ww.MEMWATCH_SD_CLEAR
        assert ww.process_memwatch(0, mem.address, 8 * P, flags, vec, 1) == 1
        assert vec[0] == 2 * P
        assert ww.process_memwatch(0, mem.address, 8 * P, ww.MEMWATCH_SD_GET, vec) == 1
        assert vec[0] == 5 * P
        with pytest.raises(OSError) as outside:
            ww.process_memwatch(0, mem.address, 9 * P, ww.MEMWATCH_SD_GET, vec)
        assert outside.value.errno == 22


def test_explicit_unavailable_backend_is_an_error_not_a_switch(monkeypatch):
    status = {**backends.backend_status(), "uffd": "pretend it is missing"}
    monkeypatch.setattr(backends, "backend_status", lambda: status)
    with pytest.raises(ww.WriteWatchError) as refused:
        memory.allocate(0, P, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH, ww.PAGE_NOACCESS,
                         backend="uffd")
    assert refused.value.winerror == ww.ERROR_NOT_SUPPORTED
    assert "pretend it is missing" in str(refused.value)


def test_unknown_backend_name_is_refused(monkeypatch):
    monkeypatch.setenv("WRITEWATCH_BACKEND", "segfaulty")
    with pytest.raises(ValueError, match="names no backend"):
        backends.backend()


@needs_uffd
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_unprivileged_uffd_falls_back_to_user_mode_only_and_prepare_kernel_write():
    """Without privilege (vm.unprivileged_userfaultfd = 0) the uffd backend opens
    its userfaultfd with UFFD_USER_MODE_ONLY: tracking still works, the kernel's
    own writes then need prepare_kernel_write, and the backend says so."""
    from forking import run_forked

    def unprivileged() -> dict[str, object]:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        backend = backends.backend("uffd")
        seen: dict[str, object] = {}
        with ww.WatchedMemory(8 * P, backend="uffd") as mem:
            seen["needs_preparation"] = backend.kernel_writes_fault()
            mem.array[P] = 1
            read_end, write_end = os.pipe()
            try:
                os.write(write_end, b"p" * 2 * P)
                target = mem.view(4 * P, P)
                try:
                    os.readv(read_end, [target])
                    seen["unprepared"] = "ok"
                except OSError as exc:
                    seen["unprepared"] = exc.errno
                ww.prepare_kernel_write(target.ctypes.data, target.nbytes)
                seen["prepared"] = os.readv(read_end, [target])
            finally:
                os.close(read_end)
                os.close(write_end)
            seen["pages"] = [int(a - mem.address) // P for a in mem.written()]
        return seen

    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("unprivileged userfaultfd is allowed here: no fallback to exercise")
    seen = run_forked(unprivileged)
    assert seen["needs_preparation"] is True
    assert seen["unprepared"] == 14  # EFAULT: the fault never reached the handler thread
    assert seen["prepared"] == P
    assert seen["pages"] == [1, 4]


def test_auto_is_the_mechanism_native_code_chooses(monkeypatch):
    """One decision for Python and C (native/mechanism.c), and it agrees with
    the facts the probe reports: the best backend available here."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.setattr(backends, "_auto_choice", None)
    chosen = backends.backend().name
    assert chosen == backends._by_mode[lib.ww_mechanism_best()]
    assert chosen == backends.available_backends()[0].name


@pytest.mark.parametrize("value, meaning", [
    ("", "auto"), (" auto ", "auto"), ("pagemap", "pagemap"), ("uffd\n", "uffd"),
    ("\tmprotect", "mprotect"), ("segfaulty", None), ("uffd mprotect", None)])
def test_writewatch_backend_means_the_same_to_python_and_to_c(monkeypatch, value, meaning):
    """The library reads WRITEWATCH_BACKEND through the same native function."""
    mode = lib.ww_mechanism_named(value.encode())
    assert (backends._by_mode.get(mode, "auto") if mode >= 0 else None) == meaning
    monkeypatch.setenv(backends.BACKEND_ENV, value)
    if meaning is None:
        with pytest.raises(ValueError, match="names no backend"):
            backends.requested_backend()
    else:
        assert backends.requested_backend() == meaning
