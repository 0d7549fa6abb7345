"""writewatch: the Windows write-watch API for Linux.

Which pages of a memory region were written since you last asked, with the
semantics of Windows' VirtualAlloc(MEM_WRITE_WATCH), GetWriteWatch and
ResetWriteWatch, on the fastest mechanism the machine has (PAGEMAP_SCAN with
userfaultfd async write-protect on Linux 6.7+; userfaultfd or mprotect
fallbacks elsewhere)::

    import numpy as np
    import writewatch as ww

    base = ww.VirtualAlloc(0, 16 * ww.PAGE_SIZE,
                           ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                           ww.PAGE_READWRITE)
    ww.as_array(base, 16 * ww.PAGE_SIZE)[3 * ww.PAGE_SIZE] = 1
    addresses = np.zeros(16, np.uintp)
    ret, count, granularity = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, base,
                                               16 * ww.PAGE_SIZE, addresses)
    assert (ret, count) == (0, 1) and addresses[0] == base + 3 * ww.PAGE_SIZE
    ww.VirtualFree(base, 0, ww.MEM_RELEASE)

Or, from Python code::

    with ww.WatchedMemory(1 << 20) as mem:        # backend="mprotect" to choose
        mem.array[5 * ww.PAGE_SIZE] = 1
        pages = mem.written(reset=True, unit="page")   # array([5], dtype=uint64)
        ww.read_into(open("data.bin", "rb"), mem.view(0, 4096))  # on every backend

Or over memory Python code already has (a numpy array, bytearray, mmap)::

    state = ww.aligned_empty((100_000, 512), np.float32)  # pages of its own
    with ww.WatchedBuffer(state) as watched:
        state[[7, 5000]] += 1
        rows = watched.written(reset=True, unit="row")   # array([6, 7, 5000, 5001])

This module lists every public name; README.md states the rules.
"""

from writewatch.api import (
    GetLastError,
    GetWriteWatch,
    ResetWriteWatch,
    SetLastError,
    VirtualAlloc,
    VirtualFree,
    VirtualProtect,
    VirtualQuery,
    WatchedMemory,
    last_error_reason,
    read_into,
    recv_into,
    region_info,
)
from writewatch.backends import BackendName
from writewatch.buffers import WatchedBuffer, aligned_empty
from writewatch.constants import (
    ERROR_INVALID_ADDRESS,
    ERROR_INVALID_PARAMETER,
    ERROR_NOACCESS,
    ERROR_NOT_ENOUGH_MEMORY,
    ERROR_NOT_SUPPORTED,
    ERROR_SUCCESS,
    MEM_COMMIT,
    MEM_DECOMMIT,
    MEM_FREE,
    MEM_LARGE_PAGES,
    MEM_PHYSICAL,
    MEM_PRIVATE,
    MEM_RELEASE,
    MEM_RESERVE,
    MEM_RESERVE_PLACEHOLDER,
    MEM_RESET,
    MEM_RESET_UNDO,
    MEM_TOP_DOWN,
    MEM_WRITE_WATCH,
    PAGE_EXECUTE,
    PAGE_EXECUTE_READ,
    PAGE_EXECUTE_READWRITE,
    PAGE_EXECUTE_WRITECOPY,
    PAGE_GUARD,
    PAGE_NOACCESS,
    PAGE_NOCACHE,
    PAGE_READONLY,
    PAGE_READWRITE,
    PAGE_WRITECOMBINE,
    PAGE_WRITECOPY,
    WRITE_WATCH_FAILED,
    WRITE_WATCH_FLAG_RESET,
    AllocationType,
    ErrorCode,
    MemoryState,
    Protection,
    WriteWatchFlag,
)
from writewatch.errors import WriteWatchError
from writewatch.kernel import PAGE_SIZE
from writewatch.memory import MEMORY_BASIC_INFORMATION, RegionInfo
from writewatch.memwatch import (
    MEMWATCH_SD_CLEAR,
    MEMWATCH_SD_GET,
    MEMWATCH_SD_NO_REUSED_REGIONS,
    process_memwatch,
)
from writewatch.probe import Capabilities, probe
from writewatch.regions import ALLOCATION_GRANULARITY
from writewatch.views import as_array
from writewatch.watch import prepare_kernel_write

__version__ = "0.1.0"

__all__ = [
    "ALLOCATION_GRANULARITY",
    "ERROR_INVALID_ADDRESS",
    "ERROR_INVALID_PARAMETER",
    "ERROR_NOACCESS",
    "ERROR_NOT_ENOUGH_MEMORY",
    "ERROR_NOT_SUPPORTED",
    "ERROR_SUCCESS",
    "MEMORY_BASIC_INFORMATION",
    "MEMWATCH_SD_CLEAR",
    "MEMWATCH_SD_GET",
    "MEMWATCH_SD_NO_REUSED_REGIONS",
    "MEM_COMMIT",
    "MEM_DECOMMIT",
    "MEM_FREE",
    "MEM_LARGE_PAGES",
    "MEM_PHYSICAL",
    "MEM_PRIVATE",
    "MEM_RELEASE",
    "MEM_RESERVE",
    "MEM_RESERVE_PLACEHOLDER",
    "MEM_RESET",
    "MEM_RESET_UNDO",
    "MEM_TOP_DOWN",
    "MEM_WRITE_WATCH",
    "PAGE_EXECUTE",
    "PAGE_EXECUTE_READ",
    "PAGE_EXECUTE_READWRITE",
    "PAGE_EXECUTE_WRITECOPY",
    "PAGE_GUARD",
    "PAGE_NOACCESS",
    "PAGE_NOCACHE",
    "PAGE_READONLY",
    "PAGE_READWRITE",
    "PAGE_SIZE",
    "PAGE_WRITECOMBINE",
    "PAGE_WRITECOPY",
    "WRITE_WATCH_FAILED",
    "WRITE_WATCH_FLAG_RESET",
    "AllocationType",
    "BackendName",
    "Capabilities",
    "ErrorCode",
    "GetLastError",
    "GetWriteWatch",
    "MemoryState",
    "Protection",
    "RegionInfo",
    "ResetWriteWatch",
    "SetLastError",
    "VirtualAlloc",
    "VirtualFree",
    "VirtualProtect",
    "VirtualQuery",
    "WatchedBuffer",
    "WatchedMemory",
    "WriteWatchError",
    "WriteWatchFlag",
    "aligned_empty",
    "as_array",
    "last_error_reason",
    "prepare_kernel_write",
    "probe",
    "process_memwatch",
    "read_into",
    "recv_into",
    "region_info",
]
