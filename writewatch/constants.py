"""Windows constants, spelled as the Windows SDK spells them.

A leaf module: regions.py raises with these codes and api.py re-exports them.
"""

# VirtualAlloc / VirtualFree allocation and free types
MEM_COMMIT = 0x1000
MEM_RESERVE = 0x2000
MEM_DECOMMIT = 0x4000
MEM_RELEASE = 0x8000
MEM_FREE = 0x10000
MEM_PRIVATE = 0x20000
MEM_WRITE_WATCH = 0x200000
# Allocation types Windows has and writewatch refuses with ERROR_INVALID_PARAMETER,
# exported so that a porter's code compiles and the refusal can name them.
MEM_RESERVE_PLACEHOLDER = 0x40000
MEM_RESET = 0x80000
MEM_TOP_DOWN = 0x100000
MEM_PHYSICAL = 0x400000
MEM_RESET_UNDO = 0x1000000
MEM_LARGE_PAGES = 0x20000000

# Page protections writewatch supports
PAGE_NOACCESS = 0x01
PAGE_READONLY = 0x02
PAGE_READWRITE = 0x04
# ... and those it refuses with ERROR_INVALID_PARAMETER (execute, copy-on-write,
# guard and caching modifiers), exported for the same reason.
PAGE_WRITECOPY = 0x08
PAGE_EXECUTE = 0x10
PAGE_EXECUTE_READ = 0x20
PAGE_EXECUTE_READWRITE = 0x40
PAGE_EXECUTE_WRITECOPY = 0x80
PAGE_GUARD = 0x100
PAGE_NOCACHE = 0x200
PAGE_WRITECOMBINE = 0x400

WRITE_WATCH_FLAG_RESET = 0x01

# GetLastError codes
ERROR_SUCCESS = 0
ERROR_NOT_ENOUGH_MEMORY = 8
ERROR_NOT_SUPPORTED = 50
ERROR_INVALID_PARAMETER = 87
ERROR_INVALID_ADDRESS = 487
ERROR_NOACCESS = 998

# What GetWriteWatch / ResetWriteWatch return on failure (Wine returns ~0U).
WRITE_WATCH_FAILED = 0xFFFFFFFF


_ALLOCATION_TYPE_NAMES = {
    MEM_RESERVE: "MEM_RESERVE", MEM_COMMIT: "MEM_COMMIT", MEM_DECOMMIT: "MEM_DECOMMIT",
    MEM_RELEASE: "MEM_RELEASE", MEM_RESERVE_PLACEHOLDER: "MEM_RESERVE_PLACEHOLDER",
    MEM_RESET: "MEM_RESET", MEM_TOP_DOWN: "MEM_TOP_DOWN", MEM_WRITE_WATCH: "MEM_WRITE_WATCH",
    MEM_PHYSICAL: "MEM_PHYSICAL", MEM_RESET_UNDO: "MEM_RESET_UNDO",
    MEM_LARGE_PAGES: "MEM_LARGE_PAGES",
}
_PROTECTION_NAMES = {
    PAGE_NOACCESS: "PAGE_NOACCESS", PAGE_READONLY: "PAGE_READONLY",
    PAGE_READWRITE: "PAGE_READWRITE", PAGE_WRITECOPY: "PAGE_WRITECOPY",
    PAGE_EXECUTE: "PAGE_EXECUTE", PAGE_EXECUTE_READ: "PAGE_EXECUTE_READ",
    PAGE_EXECUTE_READWRITE: "PAGE_EXECUTE_READWRITE",
    PAGE_EXECUTE_WRITECOPY: "PAGE_EXECUTE_WRITECOPY", PAGE_GUARD: "PAGE_GUARD",
    PAGE_NOCACHE: "PAGE_NOCACHE", PAGE_WRITECOMBINE: "PAGE_WRITECOMBINE",
}


def _flag_names(value: int, names: dict[int, str]) -> str:
    """value as SDK names joined by "|", with unnamed bits in hex ("0" for none)."""
    parts = [name for bit, name in names.items() if value & bit]
    rest = value & ~sum(bit for bit in names if value & bit)
    if rest:
        parts.append(f"{rest:#x}")
    elif not parts:
        parts.append("0")
    return "|".join(parts)


def allocation_type_name(value: int) -> str:
    """An allocation or free type as the SDK spells it: "MEM_RESERVE|MEM_TOP_DOWN"."""
    return _flag_names(value, _ALLOCATION_TYPE_NAMES)


def protection_name(value: int) -> str:
    """A page protection as the SDK spells it: "PAGE_EXECUTE_READWRITE"."""
    return _flag_names(value, _PROTECTION_NAMES)
