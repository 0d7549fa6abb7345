"""The implementations the differential tester (conformance.py) compares: the
reference model, writewatch's backends, a user's Python object and a shared
library, each behind writewatch's own signatures (WindowsApi), and resolve(),
which turns a name on the command line into one."""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from writewatch import api, backends, watch
from writewatch.backends import BackendName
from writewatch.constants import (
    ERROR_NOT_ENOUGH_MEMORY,
    PAGE_READONLY,
    PAGE_READWRITE,
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


