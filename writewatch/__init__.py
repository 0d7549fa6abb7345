"""writewatch: the Windows write-watch API (VirtualAlloc with MEM_WRITE_WATCH,
GetWriteWatch, ResetWriteWatch) for Linux, on the kernel's PAGEMAP_SCAN ioctl
with userfaultfd async write-protect.

Layers, each calling only the one below: api (Windows-shaped functions, last
error, WatchedMemory) -> regions (the region table, validation, numpy views) ->
kernel (system calls, process_memwatch, backends).
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
)
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
    MEM_PRIVATE,
    MEM_RELEASE,
    MEM_RESERVE,
    MEM_WRITE_WATCH,
    PAGE_NOACCESS,
    PAGE_READONLY,
    PAGE_READWRITE,
    WRITE_WATCH_FAILED,
    WRITE_WATCH_FLAG_RESET,
)
from writewatch.kernel import (
    MEMWATCH_SD_CLEAR,
    MEMWATCH_SD_GET,
    MEMWATCH_SD_NO_REUSED_REGIONS,
    Capabilities,
    probe,
    process_memwatch,
)
from writewatch.regions import (
    ALLOCATION_GRANULARITY,
    MEMORY_BASIC_INFORMATION,
    PAGE_SIZE,
    WriteWatchError,
    as_array,
    prepare_kernel_write,
)

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
    "MEM_PRIVATE",
    "MEM_RELEASE",
    "MEM_RESERVE",
    "MEM_WRITE_WATCH",
    "PAGE_NOACCESS",
    "PAGE_READONLY",
    "PAGE_READWRITE",
    "PAGE_SIZE",
    "WRITE_WATCH_FAILED",
    "WRITE_WATCH_FLAG_RESET",
    "Capabilities",
    "GetLastError",
    "GetWriteWatch",
    "ResetWriteWatch",
    "SetLastError",
    "VirtualAlloc",
    "VirtualFree",
    "VirtualProtect",
    "VirtualQuery",
    "WatchedMemory",
    "WriteWatchError",
    "as_array",
    "prepare_kernel_write",
    "probe",
    "process_memwatch",
]
