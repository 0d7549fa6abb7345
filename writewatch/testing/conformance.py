"""Differential tester: drive implementations of the Windows write-watch API
through the same random traces and report the first call where they disagree,
with the trace shrunk to the few calls that still show it.

    python -m writewatch.testing.conformance                  # the model and every backend here
    python -m writewatch.testing.conformance model mprotect   # two of them
    python -m writewatch.testing.conformance model mymod:MyApi          # your Python object
    python -m writewatch.testing.conformance model lib:./libmyshim.so   # your shared library

An implementation is named by:

- ``model``: the pure-Python reference implementation of Windows' semantics
  (docs/semantics.md rules 1-17): ReferenceModel, an adapter over writewatch.testing.winmodel,
  the model the test suite holds writewatch to. It needs no kernel support, so
  a divergence is found even on a machine with a single backend.
- a writewatch backend name (``backends.backend_names()``: pagemap, uffd,
  mprotect, ...). One this machine cannot run is skipped, saying why.
- ``module:attribute`` or ``path/to/file.py:attribute``: a Python object with
  the methods VirtualAlloc, VirtualFree, GetWriteWatch, ResetWriteWatch,
  GetLastError (and optionally VirtualProtect) taking what writewatch's
  functions take (GetWriteWatch(flags, base, size, addresses, count) returns
  (ret, count, granularity); addresses is a numpy uintp array or None). A class
  or other callable without those methods is called to make a fresh instance
  per trace. Memory is written and read at the returned addresses with ctypes,
  unless the object has write(address, data), read(address, length) and
  kernel_write(address, data, size) methods (a simulation without real memory).
- ``lib:PATH`` (or a path ending in .so): a shared library exporting the
  Windows signatures: ``LPVOID VirtualAlloc(LPVOID, SIZE_T, DWORD, DWORD)``,
  ``BOOL VirtualFree(LPVOID, SIZE_T, DWORD)``, ``UINT GetWriteWatch(DWORD,
  PVOID, SIZE_T, PVOID*, ULONG_PTR*, ULONG*)``, ``UINT ResetWriteWatch(LPVOID,
  SIZE_T)``, ``DWORD GetLastError(void)`` and optionally ``BOOL
  VirtualProtect(LPVOID, SIZE_T, DWORD, PDWORD)`` and ``void
  PrepareKernelWrite(PVOID, SIZE_T)``. The tester makes the kernel write into
  watched memory itself (read(2) from a pipe into a buffer, which may deliver
  fewer bytes than the buffer holds, or none: docs/semantics.md rule 14 says
  the whole buffer is marked written all the same); an implementation whose
  pages are read-only while armed (mprotect) makes such a write fail with
  EFAULT unless it is told first, as a layer does inside its own ReadFile:
  PrepareKernelWrite (or a Python object's prepare_kernel_write method) is
  called over the whole buffer before each such read when it exists.

The first implementation named is the reference the others are compared with
(``model`` when none is named). Every call's outcome is compared: return value,
last error on failure, count, granularity, the reported pages (as offsets from
their region, since each implementation places regions differently), bytes read
back, and that nothing was written past the addresses array's capacity.

Which memory a trace may touch is decided by a private copy of the model: a
write happens only where the model says the pages are committed read-write, and
if an implementation disagrees with the model about what is allocated or
committed the trace stops there (touching memory it does not have would crash
the tester) and that is the divergence reported.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import importlib.util
import os
import random
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from writewatch import api, backends, watch
from writewatch.backends import BackendName
from writewatch.constants import (
    ERROR_NOT_ENOUGH_MEMORY,
    MEM_COMMIT,
    MEM_DECOMMIT,
    MEM_RELEASE,
    MEM_RESERVE,
    MEM_WRITE_WATCH,
    PAGE_NOACCESS,
    PAGE_READONLY,
    PAGE_READWRITE,
    WRITE_WATCH_FAILED,
    WRITE_WATCH_FLAG_RESET,
    allocation_type_name,
    protection_name,
)
from writewatch.kernel import PAGE_SIZE
from writewatch.regions import ALLOCATION_GRANULARITY
from writewatch.testing.winmodel import (
    USER_SPACE_END,
    Expect,
    ModelError,
    Region,
    WinModel,
    page_ceil,
    page_floor,
)

P = PAGE_SIZE
# Guard entries after the addresses array's capacity: none may be overwritten.
_GUARD_ENTRIES = 2
_GUARD_VALUE = 0xDEADBEEFDEADBEEF


class WindowsApi(Protocol):
    """What an implementation under test offers (writewatch's own signatures)."""

    def VirtualAlloc(self, address: int, size: int, allocation_type: int,  # noqa: N802
                     protect: int) -> int: ...

    def VirtualFree(self, address: int, size: int, free_type: int) -> bool: ...  # noqa: N802

    def VirtualProtect(self, address: int, size: int,  # noqa: N802
                       new_protect: int) -> tuple[bool, int]: ...

    def GetWriteWatch(self, flags: int, base: int, size: int,  # noqa: N802
                      addresses: npt.NDArray[np.uintp] | None,
                      count: int | None = None) -> tuple[int, int, int]: ...

    def ResetWriteWatch(self, base: int, size: int) -> int: ...  # noqa: N802

    def GetLastError(self) -> int: ...  # noqa: N802

    def write(self, address: int, data: bytes) -> None: ...

    def read(self, address: int, length: int) -> bytes: ...

    def kernel_write(self, address: int, data: bytes, size: int) -> int:
        """Have the kernel read into the size-byte buffer at address from a pipe
        holding data (at most size bytes, maybe none: read(2) then returns 0);
        returns the number of bytes read, raises OSError if the kernel fails."""
        ...

    def close(self) -> None:
        """Forget per-trace state (allocations are released by the tester)."""
        ...


# ---------------------------------------------------------------------------
# The reference model: Windows' semantics (writewatch.testing.winmodel), no real memory


class _HookedModel(WinModel):
    """The model, with its two overridable steps handed to a ReferenceModel so
    that a subclass of ReferenceModel overriding them changes what it does."""

    def __init__(self, owner: ReferenceModel) -> None:
        # Refuse reservations at a chosen address (487): the tester's traces
        # never make one, and the made-up addresses would have to avoid them.
        super().__init__(chosen_reservations=False)
        self._owner = owner

    def _report_and_reset(self, region: Region, pages: range, capacity: int,
                          reset: bool) -> list[int]:
        return self._owner._report_and_reset(region, pages, capacity, reset)

    def _decommit(self, region: Region, first: int, last: int) -> None:
        self._owner._decommit(region, first, last)


class ReferenceModel:
    """docs/semantics.md rules 1-17 as a simulation: a WindowsApi-shaped adapter over
    writewatch.testing.winmodel.WinModel, the model the test suite checks writewatch
    against, so that the tester's reference and the tests' cannot drift apart.
    The adapter keeps the last error, makes addresses up (64 KiB aligned), and
    its write/read/kernel_write act on the model's contents, raising OSError
    where a real access would fault.

    Where Windows leaves a detail open (the order of VirtualFree's checks, for
    one), the model does what writewatch documents. A reservation at a chosen
    address is not modelled: it fails with 487. Subclass and override
    _report_and_reset or _decommit to build a deliberately wrong variant: the
    model calls them for GetWriteWatch's walk and VirtualFree(MEM_DECOMMIT)."""

    _FIRST_BASE = 0x7E0000000000

    def __init__(self) -> None:
        self.model: WinModel = _HookedModel(self)
        self._next_base = self._FIRST_BASE
        self._last_error = 0

    @property
    def regions(self) -> dict[int, Region]:
        """The model's regions by base address."""
        return self.model.regions

    def _pick(self, length: int) -> int:
        """The base of a reservation made with address 0."""
        base = self._next_base
        if base + length > USER_SPACE_END:
            raise ModelError(ERROR_NOT_ENOUGH_MEMORY)
        # Leave a gap so that no range of one region runs into the next.
        end = base + page_ceil(length + P) + ALLOCATION_GRANULARITY
        self._next_base = -(-end // ALLOCATION_GRANULARITY) * ALLOCATION_GRANULARITY
        return base

    def _result(self, expect: Expect) -> Any:
        if expect.error is not None:
            self._last_error = expect.error
        return expect.value

    def GetLastError(self) -> int:  # noqa: N802
        return self._last_error

    # -- VirtualAlloc / VirtualFree / VirtualProtect

    def VirtualAlloc(self, address: int, size: int, allocation_type: int,  # noqa: N802
                     protect: int) -> int:
        result: int = self._result(self.model.virtual_alloc(address, size, allocation_type,
                                                            protect, self._pick))
        return result

    def VirtualFree(self, address: int, size: int, free_type: int) -> bool:  # noqa: N802
        result: bool = self._result(self.model.virtual_free(address, size, free_type))
        return result

    def VirtualProtect(self, address: int, size: int,  # noqa: N802
                       new_protect: int) -> tuple[bool, int]:
        result: tuple[bool, int] = self._result(self.model.virtual_protect(address, size,
                                                                           new_protect))
        return result

    # -- GetWriteWatch / ResetWriteWatch

    def GetWriteWatch(self, flags: int, base: int, size: int,  # noqa: N802
                      addresses: npt.NDArray[np.uintp] | None,
                      count: int | None = None) -> tuple[int, int, int]:
        capacity = None if addresses is None else len(addresses)
        writable = addresses is None or bool(addresses.flags.writeable)
        ret, found, granularity, reported = self._result(self.model.get_write_watch(
            flags, base, size, capacity, count, writable))
        if addresses is not None:
            for i, address in enumerate(reported):
                addresses[i] = address
        return ret, found, granularity

    def ResetWriteWatch(self, base: int, size: int) -> int:  # noqa: N802
        result: int = self._result(self.model.reset_write_watch(base, size))
        return result

    # -- the steps a deliberately wrong variant overrides

    def _report_and_reset(self, region: Region, pages: range, capacity: int,
                          reset: bool) -> list[int]:
        """Items 5 and 9: the written committed pages among pages (indices into
        region), ascending; the walk stops when the array is full (capacity
        pages), and a reset covers exactly the pages reported."""
        return region.report_and_reset(pages, capacity, reset)

    def _decommit(self, region: Region, first: int, last: int) -> None:
        """Item 11: the pages of [first, last) (addresses) become reserved and
        lose their dirty state and contents."""
        region.decommit(first, last)

    # -- memory

    def _touch(self, address: int, length: int, writable: bool) -> None:
        region = self.model.find(address)
        if region is None or address + length > region.end:
            raise OSError(f"access violation at {address:#x}")
        allowed = (PAGE_READWRITE,) if writable else (PAGE_READONLY, PAGE_READWRITE)
        pages = region.pages(page_floor(address), page_ceil(address + length))
        if any(region.protection(page) not in allowed for page in pages):
            raise OSError(f"access violation at {address:#x}")

    def write(self, address: int, data: bytes) -> None:
        self._touch(address, len(data), writable=True)
        self.model.write(address, data)

    def read(self, address: int, length: int) -> bytes:
        self._touch(address, length, writable=False)
        return self.model.read(address, length)

    def kernel_write(self, address: int, data: bytes, size: int) -> int:
        self._touch(address, size, writable=True)
        self.model.read_into(address, size, data)  # rule 14: the whole buffer
        return len(data)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# Real memory: writewatch's backends, a user's Python object, a shared library


def _write_memory(address: int, data: bytes) -> None:
    ctypes.memmove(address, data, len(data))


def _read_memory(address: int, length: int) -> bytes:
    return ctypes.string_at(address, length)


def _kernel_write_memory(address: int, data: bytes, size: int) -> int:
    """read(2) of size bytes from a pipe holding data into the memory: the
    kernel does the writing (data may be shorter, or empty: end of file)."""
    target = (ctypes.c_char * size).from_address(address)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
        os.close(write_end)
        write_end = -1
        return os.readv(read_end, [memoryview(target).cast("B")])
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


class WritewatchApi:
    """writewatch's Windows API with every new write-watch region on one backend."""

    def __init__(self, backend: str) -> None:
        self.backend: BackendName = backends.checked_name(backend)

    def VirtualAlloc(self, address: int, size: int, allocation_type: int,  # noqa: N802
                     protect: int) -> int:
        return api.VirtualAlloc(address, size, allocation_type, protect, backend=self.backend)

    def VirtualFree(self, address: int, size: int, free_type: int) -> bool:  # noqa: N802
        return api.VirtualFree(address, size, free_type)

    def VirtualProtect(self, address: int, size: int,  # noqa: N802
                       new_protect: int) -> tuple[bool, int]:
        return api.VirtualProtect(address, size, new_protect)

    def GetWriteWatch(self, flags: int, base: int, size: int,  # noqa: N802
                      addresses: npt.NDArray[np.uintp] | None,
                      count: int | None = None) -> tuple[int, int, int]:
        return api.GetWriteWatch(flags, base, size, addresses, count)

    def ResetWriteWatch(self, base: int, size: int) -> int:  # noqa: N802
        return api.ResetWriteWatch(base, size)

    def GetLastError(self) -> int:  # noqa: N802
        return api.GetLastError()

    def write(self, address: int, data: bytes) -> None:
        _write_memory(address, data)

    def read(self, address: int, length: int) -> bytes:
        return _read_memory(address, length)

    def kernel_write(self, address: int, data: bytes, size: int) -> int:
        # As ReadFile does: the whole buffer is marked (rule 14), and made
        # writable for the kernel (the mprotect backend needs it).
        watch.prepare_kernel_write(address, size)
        return _kernel_write_memory(address, data, size)

    def close(self) -> None:
        pass


_REQUIRED = ("VirtualAlloc", "VirtualFree", "GetWriteWatch", "ResetWriteWatch", "GetLastError")


class PythonObjectApi:
    """A user's Python object, with real-memory access filled in where it has none."""

    def __init__(self, target: Any) -> None:
        missing = [name for name in _REQUIRED if not callable(getattr(target, name, None))]
        if missing:
            raise TypeError(f"{target!r} has no {', '.join(missing)}")
        self.target = target

    def VirtualAlloc(self, address: int, size: int, allocation_type: int,  # noqa: N802
                     protect: int) -> int:
        return int(self.target.VirtualAlloc(address, size, allocation_type, protect) or 0)

    def VirtualFree(self, address: int, size: int, free_type: int) -> bool:  # noqa: N802
        return bool(self.target.VirtualFree(address, size, free_type))

    def VirtualProtect(self, address: int, size: int,  # noqa: N802
                       new_protect: int) -> tuple[bool, int]:
        ok, old = self.target.VirtualProtect(address, size, new_protect)
        return bool(ok), int(old)

    def GetWriteWatch(self, flags: int, base: int, size: int,  # noqa: N802
                      addresses: npt.NDArray[np.uintp] | None,
                      count: int | None = None) -> tuple[int, int, int]:
        ret, found, granularity = self.target.GetWriteWatch(flags, base, size, addresses, count)
        return int(ret), int(found), int(granularity)

    def ResetWriteWatch(self, base: int, size: int) -> int:  # noqa: N802
        return int(self.target.ResetWriteWatch(base, size))

    def GetLastError(self) -> int:  # noqa: N802
        return int(self.target.GetLastError())

    def write(self, address: int, data: bytes) -> None:
        own = getattr(self.target, "write", None)
        own(address, data) if own else _write_memory(address, data)

    def read(self, address: int, length: int) -> bytes:
        own = getattr(self.target, "read", None)
        return bytes(own(address, length)) if own else _read_memory(address, length)

    def kernel_write(self, address: int, data: bytes, size: int) -> int:
        own = getattr(self.target, "kernel_write", None)
        if own:
            return int(own(address, data, size))
        prepare = getattr(self.target, "prepare_kernel_write", None)
        if prepare:
            prepare(address, size)
        return _kernel_write_memory(address, data, size)

    def close(self) -> None:
        own = getattr(self.target, "close", None)
        if own:
            own()


class SharedLibraryApi:
    """A shared library exporting the Windows signatures, called through ctypes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lib = ctypes.CDLL(path)
        c = ctypes
        self._alloc = self._function("VirtualAlloc", c.c_void_p,
                                     [c.c_void_p, c.c_size_t, c.c_uint32, c.c_uint32])
        self._free = self._function("VirtualFree", c.c_int, [c.c_void_p, c.c_size_t, c.c_uint32])
        self._get = self._function("GetWriteWatch", c.c_uint32,
                                   [c.c_uint32, c.c_void_p, c.c_size_t, c.c_void_p,
                                    c.POINTER(c.c_size_t), c.POINTER(c.c_uint32)])
        self._reset = self._function("ResetWriteWatch", c.c_uint32, [c.c_void_p, c.c_size_t])
        self._last_error = self._function("GetLastError", c.c_uint32, [])
        self.has_protect = hasattr(self.lib, "VirtualProtect")
        self._protect = (self._function("VirtualProtect", c.c_int,
                                        [c.c_void_p, c.c_size_t, c.c_uint32,
                                         c.POINTER(c.c_uint32)])
                         if self.has_protect else None)
        self._prepare_kernel_write = (
            self._function("PrepareKernelWrite", None, [c.c_void_p, c.c_size_t])
            if hasattr(self.lib, "PrepareKernelWrite") else None)

    def _function(self, name: str, restype: Any, argtypes: list[Any]) -> Any:
        try:
            function = getattr(self.lib, name)
        except AttributeError:
            raise TypeError(f"{self.path} exports no {name}") from None
        function.restype = restype
        function.argtypes = argtypes
        return function

    def VirtualAlloc(self, address: int, size: int, allocation_type: int,  # noqa: N802
                     protect: int) -> int:
        return int(self._alloc(address or None, size, allocation_type, protect) or 0)

    def VirtualFree(self, address: int, size: int, free_type: int) -> bool:  # noqa: N802
        return bool(self._free(address or None, size, free_type))

    def VirtualProtect(self, address: int, size: int,  # noqa: N802
                       new_protect: int) -> tuple[bool, int]:
        if self._protect is None:
            raise TypeError(f"{self.path} exports no VirtualProtect")
        old = ctypes.c_uint32(0)
        ok = bool(self._protect(address or None, size, new_protect, ctypes.byref(old)))
        return ok, old.value if ok else 0

    def GetWriteWatch(self, flags: int, base: int, size: int,  # noqa: N802
                      addresses: npt.NDArray[np.uintp] | None,
                      count: int | None = None) -> tuple[int, int, int]:
        if count is None:
            count = 0 if addresses is None else len(addresses)
        count_inout = ctypes.c_size_t(count)
        granularity = ctypes.c_uint32(0)
        pointer = None if addresses is None else addresses.ctypes.data
        ret = self._get(flags, base or None, size, pointer, ctypes.byref(count_inout),
                        ctypes.byref(granularity))
        return int(ret), count_inout.value, granularity.value

    def ResetWriteWatch(self, base: int, size: int) -> int:  # noqa: N802
        return int(self._reset(base or None, size))

    def GetLastError(self) -> int:  # noqa: N802
        return int(self._last_error())

    def write(self, address: int, data: bytes) -> None:
        _write_memory(address, data)

    def read(self, address: int, length: int) -> bytes:
        return _read_memory(address, length)

    def kernel_write(self, address: int, data: bytes, size: int) -> int:
        if self._prepare_kernel_write is not None:
            self._prepare_kernel_write(address, size)
        return _kernel_write_memory(address, data, size)

    def close(self) -> None:
        pass


@dataclass
class Implementation:
    """A named way to make a fresh WindowsApi for each trace."""

    name: str
    factory: Callable[[], WindowsApi]
    unavailable: str = ""  # why it cannot run here ("" when it can)
    supports_protect: bool = True


def _load_python_object(spec: str) -> Any:
    module_name, _, attribute = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would
        module = importlib.import_module(module_name)
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def resolve(spec: str) -> Implementation:
    """The implementation a command-line name stands for (see the module doc)."""
    if spec == "model":
        return Implementation("model", ReferenceModel)
    if spec in backends.backend_names():
        reason = backends.backend_status()[spec]
        return Implementation(spec, lambda: WritewatchApi(spec), unavailable=reason)
    if spec.startswith("lib:") or spec.endswith(".so") or ".so." in spec:
        path = spec.removeprefix("lib:")
        if "/" not in path:
            path = os.path.join(".", path)
        library = SharedLibraryApi(path)
        return Implementation(spec, lambda: library, supports_protect=library.has_protect)
    if ":" in spec:
        target = _load_python_object(spec)
        has_api = all(callable(getattr(target, name, None)) for name in _REQUIRED)
        if isinstance(target, type) or (not has_api and callable(target)):
            make: Callable[[], WindowsApi] = lambda: PythonObjectApi(target())  # noqa: E731
        else:
            shared = PythonObjectApi(target)
            make = lambda: shared  # noqa: E731
        probe = make()
        return Implementation(spec, make,
                              supports_protect=callable(getattr(getattr(probe, "target", None),
                                                                "VirtualProtect", None)))
    raise ValueError(f"{spec!r} is not model, a backend ({', '.join(backends.backend_names())}),"
                     " module:attribute, or lib:path.so")


# ---------------------------------------------------------------------------
# Traces: calls on numbered regions (slots), so that every implementation can
# place its regions where it likes and any sub-sequence is still a valid trace.


def _size(value: int) -> str:
    if value and value % P == 0:
        return "P" if value == P else f"{value // P}*P"
    return f"{value:#x}" if value >= 16 else str(value)


def _at(slot: int, offset: int) -> str:
    return f"r{slot}" if offset == 0 else f"r{slot} + {_size(offset)}"


@dataclass(frozen=True)
class Alloc:
    slot: int
    pages: int
    allocation_type: int
    protect: int

    def describe(self) -> str:
        return (f"r{self.slot} = VirtualAlloc(NULL, {_size(self.pages * P)}, "
                f"{allocation_type_name(self.allocation_type)}, {protection_name(self.protect)})")


@dataclass(frozen=True)
class Commit:
    slot: int
    offset: int
    size: int
    protect: int

    def describe(self) -> str:
        return (f"VirtualAlloc({_at(self.slot, self.offset)}, {_size(self.size)}, MEM_COMMIT, "
                f"{protection_name(self.protect)})")


@dataclass(frozen=True)
class Free:
    slot: int
    offset: int
    size: int
    free_type: int

    def describe(self) -> str:
        kind = allocation_type_name(self.free_type) if self.free_type in (
            MEM_DECOMMIT, MEM_RELEASE) else f"{self.free_type:#x}"
        return f"VirtualFree({_at(self.slot, self.offset)}, {_size(self.size)}, {kind})"


@dataclass(frozen=True)
class Protect:
    slot: int
    offset: int
    size: int
    protect: int

    def describe(self) -> str:
        return (f"VirtualProtect({_at(self.slot, self.offset)}, {_size(self.size)}, "
                f"{protection_name(self.protect)}, &old)")


@dataclass(frozen=True)
class Write:
    slot: int
    offset: int
    length: int
    value: int
    by_kernel: bool = False
    delivered: int | None = None  # a kernel read: bytes the pipe holds (None: length)

    @property
    def data(self) -> bytes:
        return bytes([self.value]) * (self.length if self.delivered is None
                                      else self.delivered)

    def describe(self) -> str:
        if self.by_kernel:
            return (f"read(pipe, {_at(self.slot, self.offset)}, {self.length})"
                    f"  /* the kernel writes {len(self.data)} bytes of {self.value:#04x} */")
        return f"memset({_at(self.slot, self.offset)}, {self.value:#04x}, {self.length})"


@dataclass(frozen=True)
class Read:
    slot: int
    offset: int
    length: int

    def describe(self) -> str:
        return f"checksum({_at(self.slot, self.offset)}, {self.length})"


@dataclass(frozen=True)
class GetWatch:
    slot: int | None  # None: a NULL base
    flags: int
    offset: int
    size: int
    count: int
    with_array: bool = True

    def describe(self) -> str:
        flags = {0: "0", WRITE_WATCH_FLAG_RESET: "WRITE_WATCH_FLAG_RESET"}.get(
            self.flags, f"{self.flags:#x}")
        base = "NULL" if self.slot is None else _at(self.slot, self.offset)
        array = "addresses" if self.with_array else "NULL"
        return (f"GetWriteWatch({flags}, {base}, {_size(self.size)}, {array}, "
                f"&count /* = {self.count} */, &granularity)")


@dataclass(frozen=True)
class ResetWatch:
    slot: int
    offset: int
    size: int

    def describe(self) -> str:
        return f"ResetWriteWatch({_at(self.slot, self.offset)}, {_size(self.size)})"


Op = Alloc | Commit | Free | Protect | Write | Read | GetWatch | ResetWatch


class Session:
    """One implementation running one trace: slot -> base address."""

    def __init__(self, windows: WindowsApi) -> None:
        self.api = windows
        self.bases: dict[int, int] = {}

    def model(self) -> ReferenceModel:
        assert isinstance(self.api, ReferenceModel)
        return self.api

    def region(self, slot: int) -> Region | None:
        """The model's region in a slot (only for a session running the model)."""
        base = self.bases.get(slot)
        return None if base is None else self.model().regions.get(base)

    def applicable(self, op: Op) -> bool:
        """May op run now? Asked of the oracle (a session running the model)."""
        if isinstance(op, GetWatch) and op.slot is None:
            return True
        if isinstance(op, Alloc):
            return op.slot not in self.bases
        region = self.region(op.slot)  # type: ignore[arg-type]
        if region is None:
            return False
        if isinstance(op, (Write, Read)):
            if op.length <= 0 or op.offset < 0 or op.offset + op.length > region.npages * P:
                return False
            pages = range(op.offset // P, page_ceil(op.offset + op.length) // P)
            allowed = (PAGE_READWRITE,) if isinstance(op, Write) else (PAGE_READONLY,
                                                                      PAGE_READWRITE)
            return all(region.protection(page) in allowed for page in pages)
        return True

    def failure(self) -> str:
        return f"failed, GetLastError() = {self.api.GetLastError()}"

    def perform(self, op: Op) -> str:
        """Run op; its outcome as comparable text (equal text, equal behaviour)."""
        try:
            return self._perform(op)
        except Exception as exc:  # an implementation's bug is a result to compare
            return f"raised {type(exc).__name__}"

    def _perform(self, op: Op) -> str:
        windows = self.api
        if isinstance(op, Alloc):
            base = windows.VirtualAlloc(0, op.pages * P, op.allocation_type, op.protect)
            if not base:
                return self.failure()
            self.bases[op.slot] = base
            aligned = base % ALLOCATION_GRANULARITY == 0
            return "ok, 64 KiB aligned" if aligned else f"ok, base {base:#x} not 64 KiB aligned"
        if isinstance(op, GetWatch) and op.slot is None:
            return self._get_watch(op, 0)
        base = self.bases[op.slot]  # type: ignore[index]
        if isinstance(op, Commit):
            got = windows.VirtualAlloc(base + op.offset, op.size, MEM_COMMIT, op.protect)
            return f"ok, {_at(op.slot, got - base)}" if got else self.failure()
        if isinstance(op, Free):
            if not windows.VirtualFree(base + op.offset, op.size, op.free_type):
                return self.failure()
            if op.free_type == MEM_RELEASE:
                del self.bases[op.slot]
            return "ok"
        if isinstance(op, Protect):
            ok, old = windows.VirtualProtect(base + op.offset, op.size, op.protect)
            return f"ok, old {protection_name(old)}" if ok else self.failure()
        if isinstance(op, Write):
            data = op.data
            if op.by_kernel:
                try:
                    done = windows.kernel_write(base + op.offset, data, op.length)
                except OSError as exc:
                    return f"the kernel's write failed: {exc.strerror or exc}"
                return f"the kernel wrote {done} bytes"
            windows.write(base + op.offset, data)
            return "done"
        if isinstance(op, Read):
            data = windows.read(base + op.offset, op.length)
            return f"{len(data)} bytes, crc32 {zlib.crc32(data):#010x}"
        if isinstance(op, GetWatch):
            return self._get_watch(op, base)
        ret = windows.ResetWriteWatch(base + op.offset, op.size)
        return "ok" if ret == 0 else (self.failure() if ret == WRITE_WATCH_FAILED
                                      else f"returned {ret:#x}")

    def _get_watch(self, op: GetWatch, base: int) -> str:
        addresses = None
        if op.with_array:
            addresses = np.full(op.count + _GUARD_ENTRIES, _GUARD_VALUE, np.uintp)
        ret, count, granularity = self.api.GetWriteWatch(
            op.flags, base + op.offset if op.slot is not None else 0, op.size, addresses,
            op.count)
        overrun = (addresses is not None
                   and bool((addresses[op.count:] != _GUARD_VALUE).any()))
        tail = "; WROTE PAST THE ARRAY'S CAPACITY" if overrun else ""
        if ret != 0:
            if ret != WRITE_WATCH_FAILED:
                return f"returned {ret:#x}{tail}"
            return f"{self.failure()}, count left {count}{tail}"
        assert addresses is not None
        if count > op.count:
            return f"ok, count {count} exceeds the capacity {op.count}{tail}"
        offsets = [int(a) - base for a in addresses[:count]]
        pages = [f"{offset // P}" if offset % P == 0 else f"+{offset:#x}" for offset in offsets]
        return f"ok, granularity {granularity}, pages [{', '.join(pages)}]{tail}"

    def close(self) -> None:
        """Release what the trace left allocated."""
        for base in self.bases.values():
            # A broken implementation must not stop the run.
            with contextlib.suppress(Exception):
                self.api.VirtualFree(base, 0, MEM_RELEASE)
        self.bases.clear()
        self.api.close()


# ---------------------------------------------------------------------------
# Random traces


_LAYOUT_OPS = (Alloc, Commit, Free, Protect)


class TraceGenerator:
    """Random traces that mostly make sense (writes land on committed read-write
    pages, calls name live regions) with a share of bad parameters."""

    def __init__(self, seed: int, max_slots: int = 3, with_protect: bool = True) -> None:
        self.rng = random.Random(seed)
        # How much a kernel read delivers is drawn apart, so that traces made
        # before reads could come up short stay the same call for call.
        self.read_rng = random.Random(seed ^ 0x5EED)
        self.max_slots = max_slots
        self.with_protect = with_protect

    def trace(self, length: int) -> list[Op]:
        oracle = Session(ReferenceModel())
        ops: list[Op] = []
        while len(ops) < length:
            op = self._next(oracle)
            if op is None:
                continue
            if oracle.applicable(op):
                oracle.perform(op)
            ops.append(op)
        return ops

    def _runs(self, region: Region, allowed: tuple[int, ...]) -> list[tuple[int, int]]:
        """[first, last) page runs whose state is in allowed."""
        runs: list[tuple[int, int]] = []
        page = 0
        while page < region.npages:  # one step per run of equal state
            end = region.run_end(page)
            if region.protection(page) in allowed:
                if runs and runs[-1][1] == page:
                    runs[-1] = (runs[-1][0], end)
                else:
                    runs.append((page, end))
            page = end
        return runs

    def _next(self, oracle: Session) -> Op | None:
        rng = self.rng
        live = sorted(oracle.bases)
        free_slots = [slot for slot in range(self.max_slots) if slot not in oracle.bases]
        kinds = ["write"] * 30 + ["get"] * 25 + ["reset"] * 6 + ["commit"] * 7 + \
            ["free"] * 8 + ["read"] * 5 + ["null"] * 1
        if self.with_protect:
            kinds += ["protect"] * 7
        if free_slots:
            kinds += ["alloc"] * (30 if not live else 4)
        kind = rng.choice(kinds) if live else "alloc"
        if kind == "alloc":
            return self._alloc(rng.choice(free_slots))
        if kind == "null":
            return GetWatch(None, 0, 0, P, 4)
        slot = rng.choice(live)
        region = oracle.region(slot)
        assert region is not None
        if kind == "write":
            return self._write(slot, region)
        if kind == "read":
            runs = self._runs(region, (PAGE_READONLY, PAGE_READWRITE))
            if not runs:
                return None
            first, last = rng.choice(runs)
            offset = rng.randrange(first * P, last * P)
            return Read(slot, offset, rng.randint(1, min(last * P - offset, 3 * P)))
        if kind == "get":
            return self._get(slot, region)
        offset, size = self._range(region)
        if kind == "reset":
            return ResetWatch(slot, offset, size)
        if kind == "commit":
            return Commit(slot, offset, size, self._protection())
        if kind == "protect":
            return Protect(slot, offset, size, self._protection())
        return self._free(slot, region, offset, size)

    def _alloc(self, slot: int) -> Alloc:
        rng = self.rng
        pages = rng.choice((1, 2, 3, 4, 5, 8, 16, 16, 17, 32, 64))
        watched = MEM_RESERVE | MEM_WRITE_WATCH
        allocation_type, protect = rng.choice((
            (watched | MEM_COMMIT, PAGE_READWRITE),
            (watched | MEM_COMMIT, PAGE_READWRITE),
            (watched | MEM_COMMIT, PAGE_READWRITE),
            (watched | MEM_COMMIT, PAGE_READONLY),
            (watched, PAGE_NOACCESS),
            (watched, PAGE_READWRITE),
            (MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE),  # plain memory: not watched
            (MEM_RESERVE, PAGE_NOACCESS),
            (MEM_WRITE_WATCH, PAGE_READWRITE),  # needs MEM_RESERVE: fails
            (MEM_COMMIT | MEM_WRITE_WATCH, PAGE_READWRITE),
        ))
        return Alloc(slot, pages, allocation_type, protect)

    def _protection(self) -> int:
        return self.rng.choice((PAGE_READWRITE, PAGE_READWRITE, PAGE_READWRITE, PAGE_READONLY,
                                PAGE_NOACCESS))

    def _range(self, region: Region) -> tuple[int, int]:
        """(offset, size) in bytes: mostly whole pages inside the region, some
        unaligned, some empty or running past the end."""
        rng = self.rng
        npages = region.npages
        first = rng.randrange(npages) if rng.random() < 0.6 else 0
        last = rng.randint(first + 1, npages)
        offset, size = first * P, (last - first) * P
        roll = rng.random()
        if roll < 0.04:
            size = 0
        elif roll < 0.09:
            size += rng.choice((1, P, npages * P))  # leaves the region
        elif roll < 0.16:
            shift = rng.randrange(1, P)  # unaligned base, still inside
            offset, size = offset + shift, max(size - shift, 1)
        return offset, size

    def _write(self, slot: int, region: Region) -> Op | None:
        rng = self.rng
        runs = self._runs(region, (PAGE_READWRITE,))
        if not runs:
            return None
        first, last = rng.choice(runs)
        start, end = first * P, last * P
        roll = rng.random()
        if roll < 0.5:
            offset, length = rng.randrange(start, end), 1
        elif roll < 0.65 and last - first >= 2:  # straddle a page boundary (item 8)
            boundary = rng.randrange(first + 1, last) * P
            offset, length = boundary - 2, 4
        else:
            offset = rng.randrange(start, end)
            length = rng.randint(1, min(end - offset, 3 * P))
        value = rng.randrange(1, 256)
        if rng.random() >= 0.1:
            return Write(slot, offset, length, value)
        # A kernel read into the buffer: it may deliver all of it, part, or nothing.
        roll = self.read_rng.random()
        delivered = (None if roll < 0.5 else 0 if roll < 0.7
                     else self.read_rng.randrange(length))
        return Write(slot, offset, length, value, by_kernel=True, delivered=delivered)

    def _get(self, slot: int, region: Region) -> GetWatch:
        rng = self.rng
        if rng.random() < 0.5:
            offset, size = 0, region.npages * P
        else:
            offset, size = self._range(region)
        roll = rng.random()
        if roll < 0.55:
            count = region.npages + rng.randint(0, 2)
        elif roll < 0.9:
            count = rng.randint(1, 3)  # capped (item 9)
        elif roll < 0.95:
            count = 0
        else:
            count = rng.randint(1, region.npages)
        flags = rng.choice((0, WRITE_WATCH_FLAG_RESET) * 12 + (2, 3))
        return GetWatch(slot, flags, offset, size, count, with_array=rng.random() > 0.03)

    def _free(self, slot: int, region: Region, offset: int, size: int) -> Free:
        roll = self.rng.random()
        if roll < 0.2:
            return Free(slot, 0, 0, MEM_RELEASE)
        if roll < 0.25:
            return Free(slot, 0, 0, MEM_DECOMMIT)  # the whole allocation
        if roll < 0.3:
            return Free(slot, self.rng.choice((0, P)), self.rng.choice((0, P)),
                        self.rng.choice((MEM_RELEASE, MEM_DECOMMIT | MEM_RELEASE, 0)))
        return Free(slot, offset, size, MEM_DECOMMIT)


# ---------------------------------------------------------------------------
# Running, comparing, shrinking


@dataclass
class Divergence:
    """The first call whose outcome differs between two implementations."""

    reference: str
    candidate: str
    trace: list[Op]
    step: int  # index into trace of the diverging call
    reference_outcome: str
    candidate_outcome: str
    original_length: int = 0
    trace_number: int = 0
    seed: int = 0

    def report(self, indent: str = "    ") -> str:
        width = max(len(self.reference), len(self.candidate)) + 1
        lines = [f"{indent}{op.describe()}" for op in self.trace[:self.step + 1]]
        lines[-1] += "   <- here"
        shrunk = (f"shrunk from {self.original_length} to {self.step + 1} calls"
                  if self.original_length else f"{self.step + 1} calls")
        return "\n".join([
            f"{self.candidate} diverges from {self.reference} (trace {self.trace_number}, "
            f"seed {self.seed}; {shrunk}; P = {P}):",
            *lines,
            f"{indent}{self.reference + ':':<{width}} {_clip(self.reference_outcome)}",
            f"{indent}{self.candidate + ':':<{width}} {_clip(self.candidate_outcome)}",
        ])


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def run_trace(trace: Sequence[Op], reference: Implementation,
              candidates: Sequence[Implementation]) -> tuple[list[Divergence], dict[str, int]]:
    """Run trace on the reference and each candidate in lockstep.

    Returns the first divergence of each candidate (a candidate stops being run
    at its first one) and how many calls were compared for each."""
    oracle = Session(ReferenceModel())
    ref = Session(reference.factory())
    running = {impl.name: Session(impl.factory()) for impl in candidates}
    divergences: list[Divergence] = []
    compared = dict.fromkeys(running, 0)
    try:
        for step, op in enumerate(trace):
            if not running or not oracle.applicable(op):
                continue
            expected_layout = oracle.perform(op)
            expected = ref.perform(op)
            if isinstance(op, _LAYOUT_OPS) and expected != expected_layout:
                # The reference disagrees with the model about which memory
                # exists: nothing after this is safe to run.
                divergences.append(Divergence("model", reference.name, list(trace), step,
                                              expected_layout, expected))
                break
            for name, session in list(running.items()):
                got = session.perform(op)
                compared[name] += 1
                if got != expected:
                    divergences.append(Divergence(reference.name, name, list(trace), step,
                                                  expected, got))
                    running.pop(name).close()
    finally:
        for session in (ref, *running.values()):
            session.close()
    return divergences, compared


def _diverges(trace: list[Op], reference: Implementation,
              candidate: Implementation) -> Divergence | None:
    divergences, _ = run_trace(trace, reference, [candidate])
    return divergences[0] if divergences else None


def _simpler(op: Op) -> Iterator[Op]:
    """Variants of op that are easier to read, to try while shrinking."""
    if isinstance(op, Write):
        if op.by_kernel:
            if op.delivered is None:
                yield replace(op, by_kernel=False)
            else:
                yield replace(op, delivered=None)
        if op.length > 1:
            for offset, length in ((op.offset, 1), (op.offset + op.length - 1, 1),
                                   (op.offset, op.length // 2)):
                delivered = None if op.delivered is None else min(op.delivered, length)
                yield replace(op, offset=offset, length=length, delivered=delivered)
    if isinstance(op, (Commit, Free, Protect, ResetWatch, GetWatch)) and op.size % P:
        yield replace(op, size=page_ceil(op.size))
        if op.size > P:
            yield replace(op, size=page_floor(op.size))
    if isinstance(op, GetWatch) and op.slot is not None:
        if op.flags not in (0, WRITE_WATCH_FLAG_RESET):
            yield replace(op, flags=0)
        if op.offset and op.offset % P:
            yield replace(op, offset=page_floor(op.offset), size=op.size + op.offset % P)
    if isinstance(op, Alloc) and op.pages > 1:
        for pages in (1, 2, 4, 8, 16):
            if pages < op.pages:
                yield replace(op, pages=pages)


def _renumber_slots(trace: list[Op]) -> list[Op]:
    """Name regions r0, r1, ... in the order the trace allocates them."""
    names: dict[int, int] = {}
    for op in trace:
        if isinstance(op, Alloc):
            names.setdefault(op.slot, len(names))
    return [op if op.slot is None or op.slot not in names else replace(op, slot=names[op.slot])
            for op in trace]


def shrink(found: Divergence, reference: Implementation,
           candidate: Implementation) -> Divergence:
    """The shortest trace we can find that still makes candidate diverge:
    delta debugging over the calls, then simpler arguments for each call."""
    trace = found.trace[:found.step + 1]
    best = found
    chunk = max(len(trace) // 2, 1)
    while chunk >= 1:
        removed = False
        start = 0
        while start < len(trace):
            attempt = trace[:start] + trace[start + chunk:]
            result = _diverges(attempt, reference, candidate) if attempt else None
            if result is not None:
                trace, best, removed = attempt[:result.step + 1], result, True
            else:
                start += chunk
        if not removed:
            chunk //= 2
    for index in range(len(trace)):
        for variant in _simpler(trace[index]):
            attempt = [*trace[:index], variant, *trace[index + 1:]]
            result = _diverges(attempt, reference, candidate)
            if result is not None:
                trace, best = attempt[:result.step + 1], result
                break
    renamed = _renumber_slots(trace)
    best = _diverges(renamed, reference, candidate) or best
    best.trace = renamed if best.trace == renamed else trace
    best.original_length = found.step + 1
    best.trace_number, best.seed = found.trace_number, found.seed
    return best


@dataclass
class Verdict:
    implementation: str
    divergence: Divergence | None = None
    compared: int = 0
    skipped: str = ""  # why it did not run


def compare(implementations: Sequence[Implementation], traces: int = 200, length: int = 60,
            seed: int = 1, log: Callable[[str], None] | None = None) -> list[Verdict]:
    """Compare implementations[1:] with implementations[0] on random traces;
    one verdict per candidate, with its first divergence shrunk."""
    reference, *others = implementations
    if reference.unavailable:
        raise ValueError(f"the reference {reference.name} cannot run here: "
                         f"{reference.unavailable}")
    verdicts = {impl.name: Verdict(impl.name, skipped=impl.unavailable) for impl in others}
    candidates = [impl for impl in others if not impl.unavailable]
    with_protect = all(impl.supports_protect for impl in [reference, *candidates])
    for number in range(traces):
        if not candidates:
            break
        trace_seed = seed * 1_000_003 + number
        trace = TraceGenerator(trace_seed, with_protect=with_protect).trace(length)
        divergences, compared = run_trace(trace, reference, candidates)
        for name, calls in compared.items():
            verdicts[name].compared += calls
        for divergence in divergences:
            divergence.trace_number, divergence.seed = number, trace_seed
            by_name = {impl.name: impl for impl in [reference, *candidates]}
            if divergence.reference == "model" and "model" not in by_name:
                by_name["model"] = Implementation("model", ReferenceModel)
            pair = (by_name[divergence.reference], by_name[divergence.candidate])
            if log:
                log(f"  {divergence.candidate}: diverges in trace {number}, shrinking ...")
            shrunk = shrink(divergence, *pair)
            if divergence.candidate == reference.name:
                # The reference itself disagrees with the model about memory
                # layout: no comparison with it can go on safely.
                return [Verdict(reference.name, shrunk), *verdicts.values()]
            verdicts[divergence.candidate].divergence = shrunk
            candidates = [impl for impl in candidates if impl.name != divergence.candidate]
    return list(verdicts.values())


def default_implementations() -> list[str]:
    """The model and every writewatch backend."""
    return ["model", *backends.backend_names()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m writewatch.testing.conformance",
        description="Run implementations of the Windows write-watch API through the same "
                    "random traces and report the first divergence, shrunk. The first one "
                    "named is the reference.")
    parser.add_argument("implementations", nargs="*", metavar="IMPL",
                        help="model | a backend (" + ", ".join(backends.backend_names()) +
                             ") | module:attribute | file.py:attribute | lib:path.so "
                             "(default: model and every backend)")
    parser.add_argument("--traces", type=int, help="random traces (default 200; 30 small)")
    parser.add_argument("--length", type=int, help="calls per trace (default 60; 40 small)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--small", action="store_true", help="a quick run")
    args = parser.parse_args(argv)
    if args.traces is None:
        args.traces = 30 if args.small else 200
    if args.length is None:
        args.length = 40 if args.small else 60
    names = args.implementations or default_implementations()
    if len(names) == 1 and names[0] != "model":
        names = ["model", *names]  # one implementation: compare it with the model
    if len(set(names)) != len(names):
        parser.error("each implementation may be named once")
    try:
        implementations = [resolve(name) for name in names]
    except (ValueError, TypeError, ImportError, AttributeError, OSError) as exc:
        print(f"cannot load an implementation: {exc}", file=sys.stderr)
        return 2
    reference = implementations[0]
    print(f"writewatch conformance: {args.traces} random traces of {args.length} calls "
          f"(seed {args.seed}); reference: {reference.name}")
    try:
        verdicts = compare(implementations, args.traces, args.length, args.seed,
                           log=lambda line: print(line, flush=True))
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    width = max(len(v.implementation) for v in verdicts) if verdicts else 0
    diverged = 0
    for verdict in verdicts:
        if verdict.skipped:
            print(f"  {verdict.implementation:<{width}}  skipped: {verdict.skipped}")
        elif verdict.divergence is None:
            print(f"  {verdict.implementation:<{width}}  agrees "
                  f"({verdict.compared} calls compared)")
        else:
            diverged += 1
            print(f"  {verdict.implementation:<{width}}  DIVERGES")
    for verdict in verdicts:
        if verdict.divergence is not None:
            print()
            print(verdict.divergence.report())
    ran = [v for v in verdicts if not v.skipped]
    if not ran:
        print("nothing to compare: no other implementation can run here")
        return 2
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
