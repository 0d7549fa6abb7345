"""The differential tester (writewatch.testing.conformance): its reference model keeps
docs/semantics.md rules 1-17, writewatch's backends agree with it and with each
other, and planted bugs are found and reported with a shrunk trace."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from forking import patience

import writewatch as ww
from writewatch import backends
from writewatch.testing import conformance
from writewatch.testing.conformance import (
    Alloc,
    Free,
    GetWatch,
    Implementation,
    ReferenceModel,
    Write,
)

P = ww.PAGE_SIZE
ROOT = Path(__file__).resolve().parent.parent
WATCHED = ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH
pytestmark = pytest.mark.any_backend  # names its backends itself


def backends_here() -> list[str]:
    """The backends to test: WRITEWATCH_BACKEND's if set (as conftest does), else all here."""
    requested = backends.requested_backend()
    if requested != "auto":
        return [requested]
    return [name for name, reason in backends.backend_status().items() if not reason]


AVAILABLE = backends_here()
needs_a_backend = pytest.mark.skipif(not AVAILABLE, reason="no write-watch backend here")
needs_a_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None,
                                      reason="no C compiler")


def run_tester(*args: str, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "writewatch.testing.conformance", *args],
                          capture_output=True, text=True, timeout=patience(120), cwd=cwd,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})})


# -- deliberately wrong implementations


class ResetsPagesItDidNotReturn(ReferenceModel):
    """GetWriteWatch(RESET) with a capped array resets the whole range (rule 9 broken)."""

    def _report_and_reset(self, region, pages, capacity, reset):
        reported = super()._report_and_reset(region, pages, capacity, reset=False)
        if reset:
            region.dirty.difference_update(pages)
        return reported


class KeepsDirtyStateOnDecommit(ReferenceModel):
    """Decommitted pages keep their dirty state (rule 11 broken, as Wine's old path)."""

    def _decommit(self, region, first, last):
        kept = set(region.dirty)
        super()._decommit(region, first, last)
        region.dirty = kept


class MarksOnlyWhatArrives(ReferenceModel):
    """A kernel read marks only the pages its data lands in (rule 14 broken:
    Wine's uffd-async path without preparing the buffer)."""

    def kernel_write(self, address, data, size):
        self._touch(address, size, writable=True)
        self.model.write(address, data)
        return len(data)


class IgnoresTheLatch(ReferenceModel):
    """Decommit clears latched pages too (rule 11's exception missing, as in Wine)."""

    def _decommit(self, region, first, last):
        region.latched.difference_update(region.pages(first, last))
        super()._decommit(region, first, last)


def planted(cls: type[ReferenceModel]) -> Implementation:
    return Implementation(cls.__name__, cls)


MODEL = Implementation("model", ReferenceModel)


# -- the reference model itself


class TestModel:
    def setup_method(self) -> None:
        self.model = ReferenceModel()
        self.out = np.zeros(2048, np.uintp)

    def pages(self, base: int, flags: int = 0, size: int = 16 * P,
              count: int | None = None) -> list[int]:
        ret, found, granularity = self.model.GetWriteWatch(flags, base, size, self.out, count)
        assert (ret, granularity) == (0, P)
        return [(int(a) - base) // P for a in self.out[:found]]

    def test_items_1_to_4_allocation_one_write_and_reset(self):
        assert self.model.VirtualAlloc(0, 16 * P, ww.MEM_WRITE_WATCH, ww.PAGE_READWRITE) == 0
        assert self.model.GetLastError() == ww.ERROR_INVALID_PARAMETER
        base = self.model.VirtualAlloc(0, 16 * P, WATCHED, ww.PAGE_READWRITE)
        assert base % ww.ALLOCATION_GRANULARITY == 0
        assert self.pages(base) == []
        self.model.write(base + P + 1, b"x")
        assert self.pages(base, ww.WRITE_WATCH_FLAG_RESET) == [1]
        assert self.pages(base) == []

    def test_items_8_and_9_straddling_write_and_capped_reset(self):
        base = self.model.VirtualAlloc(0, 16 * P, WATCHED, ww.PAGE_READWRITE)
        self.model.write(base + 5 * P - 2, b"abcd")
        self.model.write(base + 9 * P, b"e")
        assert self.pages(base, ww.WRITE_WATCH_FLAG_RESET, count=1) == [4]
        assert self.pages(base) == [5, 9]

    def test_items_10_to_12_protection_and_decommit(self):
        base = self.model.VirtualAlloc(0, 16 * P, WATCHED, ww.PAGE_NOACCESS)
        assert self.model.VirtualProtect(base + 2 * P, 6 * P, ww.PAGE_READWRITE) == \
            (True, ww.PAGE_NOACCESS)
        self.model.write(base + 4 * P, b"x")
        self.model.write(base + 5 * P, b"y")
        self.model.VirtualProtect(base + 2 * P, 6 * P, ww.PAGE_NOACCESS)
        assert self.pages(base) == [4, 5]
        # Rule 11: that VirtualProtect latched pages 4 and 5, so a decommit
        # keeps them written (as Wine test_write_watch's ending shows).
        assert self.model.VirtualFree(base + 5 * P, P, ww.MEM_DECOMMIT)
        assert self.pages(base) == [4, 5]
        assert self.model.VirtualAlloc(base + 5 * P, P, ww.MEM_COMMIT, ww.PAGE_READWRITE)
        assert self.pages(base) == [4, 5]
        assert self.model.read(base + 5 * P, 1) == b"\0"
        # A reset clears the latch: decommitting a page written afterwards clears it.
        assert self.model.ResetWriteWatch(base + 5 * P, P) == 0
        self.model.write(base + 5 * P, b"z")
        assert self.model.VirtualFree(base + 5 * P, P, ww.MEM_DECOMMIT)
        assert self.pages(base) == [4]

    def test_item_13_every_other_page_of_2048(self):
        base = self.model.VirtualAlloc(0, 2048 * P, WATCHED, ww.PAGE_READWRITE)
        for page in range(0, 2048, 2):
            self.model.write(base + page * P, b"x")
        assert self.pages(base, ww.WRITE_WATCH_FLAG_RESET, 2048 * P, 1024) == \
            list(range(0, 2048, 2))
        assert self.pages(base, 0, 2048 * P) == []

    def test_item_15_errors_in_wines_order(self):
        base = self.model.VirtualAlloc(0, 16 * P, WATCHED, ww.PAGE_READWRITE)
        get = self.model.GetWriteWatch
        assert get(7, base, 16 * P, None, 0) == (ww.WRITE_WATCH_FAILED, 0, 0)
        assert self.model.GetLastError() == ww.ERROR_INVALID_PARAMETER
        get(7, base, 16 * P, None, 4)
        assert self.model.GetLastError() == ww.ERROR_NOACCESS
        for flags, at, size in ((2, base, P), (0, base, 0), (0, base, 32 * P),
                                (0, base + 15 * P, P + 1), (0, 0, P)):
            assert get(flags, at, size, self.out, 4) == (ww.WRITE_WATCH_FAILED, 4, 0)
            assert self.model.GetLastError() == ww.ERROR_INVALID_PARAMETER
        assert self.model.ResetWriteWatch(base, 0) == ww.WRITE_WATCH_FAILED

    def test_item_16_reserve_only_region(self):
        base = self.model.VirtualAlloc(0, 16 * P, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                                       ww.PAGE_NOACCESS)
        assert self.pages(base) == []
        assert self.model.ResetWriteWatch(base, 16 * P) == 0

    def test_reservation_at_a_chosen_address_is_not_modelled(self):
        """The model makes its addresses up: reserving at one fails with 487
        (after the argument checks), as it always has; the traces never do it."""
        assert self.model.VirtualAlloc(0x10000000, P, ww.MEM_RESERVE, ww.PAGE_READWRITE) == 0
        assert self.model.GetLastError() == ww.ERROR_INVALID_ADDRESS
        assert self.model.VirtualAlloc(0x10000000, P, ww.MEM_RESERVE, 0x40) == 0
        assert self.model.GetLastError() == ww.ERROR_INVALID_PARAMETER

    def test_arguments_writewatch_refuses_are_refused_as_writewatch_does(self):
        """The checks of writewatch.testing.winmodel, which the test suite holds
        writewatch to: values out of range, arrays it cannot fill, no room."""
        base = self.model.VirtualAlloc(0, 4 * P, WATCHED, ww.PAGE_READWRITE)
        self.model.write(base, b"x")
        self.model.write(base + P, b"x")
        assert self.model.VirtualAlloc(-P, P, ww.MEM_COMMIT, ww.PAGE_READWRITE) == 0
        assert self.model.GetLastError() == ww.ERROR_INVALID_PARAMETER
        get = self.model.GetWriteWatch
        assert get(0, base, 4 * P, self.out, -1)[0] == ww.WRITE_WATCH_FAILED
        assert self.model.GetLastError() == ww.ERROR_INVALID_PARAMETER
        assert get(0, base, 4 * P, self.out[:1], 3) == (ww.WRITE_WATCH_FAILED, 3, 0)
        assert self.model.GetLastError() == ww.ERROR_NOACCESS
        read_only = np.zeros(4, np.uintp)
        read_only.flags.writeable = False
        assert get(0, base, 4 * P, read_only)[0] == ww.WRITE_WATCH_FAILED
        assert self.model.GetLastError() == ww.ERROR_NOACCESS
        assert self.model.VirtualAlloc(0, 1 << 42, ww.MEM_RESERVE, ww.PAGE_READWRITE) == 0
        assert self.model.GetLastError() == ww.ERROR_NOT_ENOUGH_MEMORY
        huge = self.model.VirtualAlloc(0, 1 << 40, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                                       ww.PAGE_NOACCESS)  # sparse: costs nothing
        assert huge % ww.ALLOCATION_GRANULARITY == 0
        assert self.pages(huge, size=1 << 40) == []


# -- writewatch against the model and against itself


@needs_a_backend
def test_every_available_backend_agrees_with_the_model():
    implementations = [MODEL, *(conformance.resolve(name) for name in AVAILABLE)]
    verdicts = conformance.compare(implementations, traces=60, length=60, seed=11)
    assert {v.implementation for v in verdicts} == set(AVAILABLE)
    for verdict in verdicts:
        assert verdict.divergence is None, verdict.divergence.report()
        assert verdict.compared > 1000


def why_fewer_than_two() -> str:
    if backends.requested_backend() != "auto":
        return f"{backends.BACKEND_ENV} restricts the run to one backend"
    return "; ".join(f"{name} unavailable: {why}"
                     for name, why in backends.backend_status().items() if why)


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="fewer than two backends here: "
                    + why_fewer_than_two())
def test_backends_agree_with_each_other():
    verdicts = conformance.compare([conformance.resolve(name) for name in AVAILABLE],
                                   traces=30, length=60, seed=5)
    assert all(v.divergence is None for v in verdicts), [v.divergence.report()
                                                         for v in verdicts if v.divergence]


def test_unavailable_backend_is_skipped_with_its_reason(monkeypatch, capsys):
    reasons = {name: "" for name in backends.backend_names()}
    reasons["uffd"] = "pretend: no userfaultfd here"
    monkeypatch.setattr(backends, "backend_status", lambda: dict(reasons))
    assert conformance.main(["--traces", "3", "model", "uffd", "mprotect"]) == 0
    out = capsys.readouterr().out
    assert "uffd      skipped: pretend: no userfaultfd here" in out
    assert "mprotect  agrees" in out


def test_default_implementations_follow_the_backend_list():
    assert conformance.default_implementations() == ["model", *backends.backend_names()]


def test_traces_are_reproducible_from_their_seed():
    first = conformance.TraceGenerator(42).trace(80)
    assert first == conformance.TraceGenerator(42).trace(80)
    assert first != conformance.TraceGenerator(43).trace(80)
    kinds = {type(op).__name__ for op in first}
    assert {"Alloc", "Write", "GetWatch"} <= kinds


# -- planted bugs


def test_capped_reset_bug_is_found_with_a_short_trace():
    (verdict,) = conformance.compare([MODEL, planted(ResetsPagesItDidNotReturn)], traces=100)
    found = verdict.divergence
    assert found is not None
    assert len(found.trace) <= 5 < found.original_length
    resets = [op for op in found.trace if isinstance(op, GetWatch)
              and op.flags == ww.WRITE_WATCH_FLAG_RESET]
    assert resets and resets[0].count < 16
    assert isinstance(found.trace[0], Alloc)
    report = found.report()
    assert "GetWriteWatch(WRITE_WATCH_FLAG_RESET" in report and "<- here" in report
    assert f"shrunk from {found.original_length} to {len(found.trace)} calls" in report
    # The shrunk trace still shows it, from scratch.
    divergences, _ = conformance.run_trace(found.trace, MODEL,
                                           [planted(ResetsPagesItDidNotReturn)])
    assert divergences and divergences[0].step == len(found.trace) - 1


def test_trace_calls_read_as_the_windows_calls_they_stand_for():
    """A report's trace spells flags as the SDK does, unnamed bits in hex."""
    assert Alloc(0, 16, WATCHED, ww.PAGE_READWRITE).describe() == (
        "r0 = VirtualAlloc(NULL, 16*P, MEM_RESERVE|MEM_COMMIT|MEM_WRITE_WATCH, PAGE_READWRITE)")
    assert Alloc(1, 1, ww.MEM_RESERVE | 0x40, ww.PAGE_NOACCESS).describe() == (
        "r1 = VirtualAlloc(NULL, P, MEM_RESERVE|0x40, PAGE_NOACCESS)")


def test_traces_include_short_and_empty_kernel_reads():
    writes = [op for seed in range(200)
              for op in conformance.TraceGenerator(seed).trace(60)
              if isinstance(op, conformance.Write) and op.by_kernel]
    delivered = {"full" if op.delivered is None else "none" if op.delivered == 0 else "short"
                 for op in writes}
    assert delivered == {"full", "none", "short"}


def test_read_marking_only_what_arrives_is_found():
    (verdict,) = conformance.compare([MODEL, planted(MarksOnlyWhatArrives)], traces=200)
    found = verdict.divergence
    assert found is not None
    reads = [op for op in found.trace if isinstance(op, conformance.Write) and op.by_kernel]
    assert reads and reads[-1].delivered is not None


def test_missing_latch_is_found():
    (verdict,) = conformance.compare([MODEL, planted(IgnoresTheLatch)], traces=200)
    found = verdict.divergence
    assert found is not None
    assert any(isinstance(op, conformance.Protect) for op in found.trace)
    assert any(isinstance(op, conformance.Free) for op in found.trace)


def test_decommit_bug_is_found_with_a_short_trace():
    (verdict,) = conformance.compare([MODEL, planted(KeepsDirtyStateOnDecommit)], traces=100)
    found = verdict.divergence
    assert found is not None and len(found.trace) <= 6
    assert any(isinstance(op, Free) and op.free_type == ww.MEM_DECOMMIT for op in found.trace)
    assert any(isinstance(op, Write) for op in found.trace)
    assert "VirtualFree(r0" in found.report()


class ResetsWholeRangeOnRealMemory:
    """A shim on writewatch with the classic bug: GetWriteWatch(RESET) done as
    GetWriteWatch + ResetWriteWatch over the whole range (real memory, ctypes writes)."""

    def __init__(self) -> None:
        self.real = conformance.WritewatchApi(AVAILABLE[0])

    def __getattr__(self, name):
        return getattr(self.real, name)

    def GetWriteWatch(self, flags, base, size, addresses, count=None):  # noqa: N802
        result = self.real.GetWriteWatch(0, base, size, addresses, count)
        if result[0] == 0 and flags == ww.WRITE_WATCH_FLAG_RESET:
            self.real.ResetWriteWatch(base, size)
        return result


@needs_a_backend
def test_bug_in_an_implementation_on_real_memory_is_found():
    buggy = Implementation("buggy", lambda: conformance.PythonObjectApi(
        ResetsWholeRangeOnRealMemory()))
    (verdict,) = conformance.compare([MODEL, buggy], traces=100, length=60)
    assert verdict.divergence is not None
    assert len(verdict.divergence.trace) <= 6


# -- the command line: Python objects and shared libraries by name

BROKEN_MODULE = '''
from writewatch.testing.conformance import ReferenceModel

class ForgetsTheCap(ReferenceModel):
    def _report_and_reset(self, region, pages, capacity, reset):
        reported = super()._report_and_reset(region, pages, capacity, reset=False)
        if reset:
            region.dirty.difference_update(pages)
        return reported
'''


def test_cli_finds_a_python_object_named_module_colon_attribute(tmp_path):
    (tmp_path / "mylayer.py").write_text(BROKEN_MODULE)
    result = run_tester("model", "mylayer:ForgetsTheCap", "--traces", "100", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "mylayer:ForgetsTheCap  DIVERGES" in result.stdout
    assert "mylayer:ForgetsTheCap diverges from model" in result.stdout
    assert "<- here" in result.stdout and "shrunk from" in result.stdout


def test_cli_takes_a_file_path_and_compares_one_implementation_with_the_model(tmp_path):
    (tmp_path / "layer.py").write_text("from writewatch.testing.conformance import ReferenceModel\n"
                                       "Mine = ReferenceModel\n")
    result = run_tester(f"{tmp_path / 'layer.py'}:Mine", "--traces", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reference: model" in result.stdout
    assert "agrees" in result.stdout


def test_cli_refuses_what_it_cannot_load():
    result = run_tester("model", "no_such_module_here:Thing")
    assert result.returncode == 2
    assert "cannot load" in result.stderr
    assert run_tester("model", "bogus").returncode == 2


def _build_shim():
    spec = importlib.util.spec_from_file_location(
        "translation_layer_build", ROOT / "examples" / "translation_layer" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.build()


@needs_a_compiler
@pytest.mark.parametrize("backend", AVAILABLE)
def test_cli_runs_a_shared_library_with_the_windows_signatures(backend):
    shim = _build_shim()
    result = run_tester("model", f"lib:{shim.library}", "--traces", "40",
                        env={backends.BACKEND_ENV: backend})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"lib:{shim.library}  agrees" in result.stdout


BROKEN_LIBRARY = r'''
#include <windows.h>
#include <dlfcn.h>

/* Forwards to libwinshim.so, but does GetWriteWatch(RESET) as a get and then a
   reset of the whole range: the pages the capped array could not hold are lost. */
static void *shim(const char *name)
{
    static void *library;
    if (!library)
        library = dlopen(SHIM_PATH, RTLD_NOW | RTLD_LOCAL);
    return dlsym(library, name);
}

LPVOID WINAPI VirtualAlloc(LPVOID a, SIZE_T s, DWORD t, DWORD p)
{
    return ((LPVOID (*)(LPVOID, SIZE_T, DWORD, DWORD))shim("VirtualAlloc"))(a, s, t, p);
}

BOOL WINAPI VirtualFree(LPVOID a, SIZE_T s, DWORD t)
{
    return ((BOOL (*)(LPVOID, SIZE_T, DWORD))shim("VirtualFree"))(a, s, t);
}

BOOL WINAPI VirtualProtect(LPVOID a, SIZE_T s, DWORD p, PDWORD old)
{
    return ((BOOL (*)(LPVOID, SIZE_T, DWORD, PDWORD))shim("VirtualProtect"))(a, s, p, old);
}

UINT WINAPI ResetWriteWatch(LPVOID base, SIZE_T size)
{
    return ((UINT (*)(LPVOID, SIZE_T))shim("ResetWriteWatch"))(base, size);
}

UINT WINAPI GetWriteWatch(DWORD flags, PVOID base, SIZE_T size, PVOID *addresses,
                          ULONG_PTR *count, ULONG *granularity)
{
    UINT (*get)(DWORD, PVOID, SIZE_T, PVOID *, ULONG_PTR *, ULONG *) = shim("GetWriteWatch");
    UINT ret = get(flags & ~WRITE_WATCH_FLAG_RESET, base, size, addresses, count, granularity);
    if (ret == 0 && (flags & WRITE_WATCH_FLAG_RESET))
        ResetWriteWatch(base, size);
    return ret;
}

DWORD WINAPI GetLastError(void)
{
    return ((DWORD (*)(void))shim("GetLastError"))();
}

void WINAPI PrepareKernelWrite(PVOID address, SIZE_T size)
{
    ((void (*)(PVOID, SIZE_T))shim("PrepareKernelWrite"))(address, size);
}
'''


@needs_a_compiler
@needs_a_backend
def test_cli_finds_a_bug_in_a_native_library(tmp_path):
    shim = _build_shim()
    source = tmp_path / "broken.c"
    source.write_text(BROKEN_LIBRARY)
    library = tmp_path / "libbroken.so"
    subprocess.run([os.environ.get("CC", "gcc"), "-shared", "-fPIC", "-O1",
                    f"-I{ROOT / 'examples' / 'translation_layer' / 'include'}",
                    f'-DSHIM_PATH="{shim.library}"', str(source), "-o", str(library), "-ldl"],
                   check=True, capture_output=True)
    result = run_tester("model", str(library), "--traces", "100",
                        env={backends.BACKEND_ENV: AVAILABLE[-1]})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{library}  DIVERGES" in result.stdout
    assert "GetWriteWatch(WRITE_WATCH_FLAG_RESET" in result.stdout
