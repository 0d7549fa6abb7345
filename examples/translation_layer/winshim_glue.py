"""The Python half of libwinshim.so: the Windows memory functions, implemented
on writewatch.

build.py freezes this file into libwinshim.so with cffi's embedding mode. The
first time C code calls VirtualAlloc, GetWriteWatch, ... the library starts
Python (or joins the one already running in the process) and runs this file;
the functions below then answer every call, in the calling thread. C code
sees plain C functions with the Windows signatures, and pointers it gets from
VirtualAlloc are real memory it reads and writes directly.

Each function sets the thread's last error the way Windows does: on failure,
to the code writewatch reports; on success it is left alone.
"""

import sys
import traceback

import numpy as np
from _winshim import ffi, lib  # the module cffi makes of libwinshim.so itself

import writewatch as ww

_POINTER_SIZE = ffi.sizeof("PVOID")
_ERROR_BAD_LENGTH = 24  # VirtualQuery's answer to a buffer too small (winerror.h)


def _address(pointer):
    return int(ffi.cast("uintptr_t", pointer))


def _failed_with(code, result):
    lib.SetLastError(code)
    return result


def _on_python_error(exception, value, trace):
    """A bug on the Python side must not unwind into C: report it, and fail the
    call with ERROR_INVALID_PARAMETER (the return value is def_extern's error)."""
    print("libwinshim: Python error inside a Windows call:", file=sys.stderr)
    traceback.print_exception(exception, value, trace)
    lib.SetLastError(ww.ERROR_INVALID_PARAMETER)


# The functions are named after the Windows calls they answer (hence N802).
@ffi.def_extern(onerror=_on_python_error)  # returns NULL after a Python error
def winshim_VirtualAlloc(address, size, allocation_type, protect):  # noqa: N802
    base = ww.VirtualAlloc(_address(address), size, allocation_type, protect)
    if not base:
        return _failed_with(ww.GetLastError(), ffi.NULL)
    return ffi.cast("LPVOID", base)


@ffi.def_extern(error=0, onerror=_on_python_error)
def winshim_VirtualFree(address, size, free_type):  # noqa: N802
    if not ww.VirtualFree(_address(address), size, free_type):
        return _failed_with(ww.GetLastError(), 0)
    return 1


@ffi.def_extern(error=0, onerror=_on_python_error)
def winshim_VirtualProtect(address, size, new_protect, old_protect):  # noqa: N802
    if old_protect == ffi.NULL:  # Windows insists on somewhere to put the old value
        return _failed_with(ww.ERROR_NOACCESS, 0)
    done, old = ww.VirtualProtect(_address(address), size, new_protect)
    if not done:
        return _failed_with(ww.GetLastError(), 0)
    old_protect[0] = old
    return 1


@ffi.def_extern(error=ww.WRITE_WATCH_FAILED, onerror=_on_python_error)
def winshim_GetWriteWatch(flags, base, size, addresses, count, granularity):  # noqa: N802
    if count == ffi.NULL or granularity == ffi.NULL:
        return _failed_with(ww.ERROR_NOACCESS, ww.WRITE_WATCH_FAILED)
    capacity = count[0]
    output = None
    if addresses != ffi.NULL and capacity:
        # The C array itself, as numpy sees it: writewatch writes straight into it.
        output = np.frombuffer(ffi.buffer(addresses, capacity * _POINTER_SIZE), np.uintp)
    ret, found, page_size = ww.GetWriteWatch(flags, _address(base), size, output, capacity)
    if ret != 0:
        return _failed_with(ww.GetLastError(), ret)
    count[0] = found
    granularity[0] = page_size
    return 0


@ffi.def_extern(error=ww.WRITE_WATCH_FAILED, onerror=_on_python_error)
def winshim_ResetWriteWatch(base, size):  # noqa: N802
    ret = ww.ResetWriteWatch(_address(base), size)
    if ret != 0:
        return _failed_with(ww.GetLastError(), ret)
    return 0


@ffi.def_extern(error=0, onerror=_on_python_error)
def winshim_VirtualQuery(address, info, length):  # noqa: N802
    """The size of what it stored in *info, or 0 on failure."""
    if info == ffi.NULL or length < ffi.sizeof("MEMORY_BASIC_INFORMATION"):
        return _failed_with(_ERROR_BAD_LENGTH, 0)
    found = ww.VirtualQuery(_address(address))
    if found is None:
        return _failed_with(ww.GetLastError(), 0)
    info.BaseAddress = ffi.cast("PVOID", found.BaseAddress)
    info.AllocationBase = ffi.cast("PVOID", found.AllocationBase)
    info.AllocationProtect = found.AllocationProtect
    info.PartitionId = 0
    info.RegionSize = found.RegionSize
    info.State = found.State
    info.Protect = found.Protect
    info.Type = found.Type
    return ffi.sizeof("MEMORY_BASIC_INFORMATION")


@ffi.def_extern(onerror=_on_python_error)
def winshim_PrepareKernelWrite(address, size):  # noqa: N802
    """Not Windows: what the layer's own ReadFile does before read(2) writes
    into watched memory (see include/windows.h)."""
    ww.prepare_kernel_write(_address(address), size)


lib.winshim_ready()  # from here on the C wrappers trust what these functions return
