"""Windows constants, spelled as the Windows SDK spells them.

A leaf module: regions.py raises with these codes and api.py re-exports them.
"""

import enum


class AllocationType(enum.IntFlag):
    """VirtualAlloc / VirtualFree allocation and free types."""

    # In this order, names are joined as Windows code writes them
    # (MEM_RESERVE|MEM_COMMIT). Refused with ERROR_INVALID_PARAMETER, exported
    # so that a porter's code compiles and the refusal can name them:
    # MEM_RESERVE_PLACEHOLDER, MEM_RESET, MEM_TOP_DOWN, MEM_PHYSICAL,
    # MEM_RESET_UNDO and MEM_LARGE_PAGES.
    MEM_RESERVE = 0x2000
    MEM_COMMIT = 0x1000
    MEM_DECOMMIT = 0x4000
    MEM_RELEASE = 0x8000
    MEM_RESERVE_PLACEHOLDER = 0x40000
    MEM_RESET = 0x80000
    MEM_TOP_DOWN = 0x100000
    MEM_WRITE_WATCH = 0x200000
    MEM_PHYSICAL = 0x400000
    MEM_RESET_UNDO = 0x1000000
    MEM_LARGE_PAGES = 0x20000000


class MemoryState(enum.IntEnum):
    """VirtualQuery's State and Type values that are not allocation types."""

    MEM_FREE = 0x10000
    MEM_PRIVATE = 0x20000


class Protection(enum.IntFlag):
    """Page protections."""

    # writewatch supports these
    PAGE_NOACCESS = 0x01
    PAGE_READONLY = 0x02
    PAGE_READWRITE = 0x04
    # ... and refuses these with ERROR_INVALID_PARAMETER (execute, copy-on-write,
    # guard and caching modifiers), exported for the same reason.
    PAGE_WRITECOPY = 0x08
    PAGE_EXECUTE = 0x10
    PAGE_EXECUTE_READ = 0x20
    PAGE_EXECUTE_READWRITE = 0x40
    PAGE_EXECUTE_WRITECOPY = 0x80
    PAGE_GUARD = 0x100
    PAGE_NOCACHE = 0x200
    PAGE_WRITECOMBINE = 0x400


class WriteWatchFlag(enum.IntFlag):
    """GetWriteWatch's flags."""

    WRITE_WATCH_FLAG_RESET = 0x01


class ErrorCode(enum.IntEnum):
    """GetLastError codes."""

    ERROR_SUCCESS = 0
    ERROR_NOT_ENOUGH_MEMORY = 8
    ERROR_NOT_SUPPORTED = 50
    ERROR_INVALID_PARAMETER = 87
    ERROR_INVALID_ADDRESS = 487
    ERROR_NOACCESS = 998


# str() and format() of a constant are its number on every Python (3.11+ does
# this for IntEnum and IntFlag; 3.10 would print "Protection.PAGE_READWRITE"),
# so messages and C-facing code see plain integers, while repr() names it. ~
# is the integer's: a flag class inverts only within its own members
# (~WRITE_WATCH_FLAG_RESET would be 0, and flags & ~RESET would let 7 pass).
# Set after the classes are made: the enum machinery installs its own.
for _constants in (AllocationType, MemoryState, Protection, WriteWatchFlag, ErrorCode):
    _constants.__str__ = int.__repr__  # type: ignore[method-assign]
    _constants.__format__ = int.__format__  # type: ignore[method-assign]
    _constants.__invert__ = int.__invert__  # type: ignore[method-assign]

# The Windows names at module level, as the SDK spells them (still ints: numpy,
# cffi and ctypes take them as they are).
MEM_COMMIT = AllocationType.MEM_COMMIT
MEM_RESERVE = AllocationType.MEM_RESERVE
MEM_DECOMMIT = AllocationType.MEM_DECOMMIT
MEM_RELEASE = AllocationType.MEM_RELEASE
MEM_WRITE_WATCH = AllocationType.MEM_WRITE_WATCH
MEM_RESERVE_PLACEHOLDER = AllocationType.MEM_RESERVE_PLACEHOLDER
MEM_RESET = AllocationType.MEM_RESET
MEM_TOP_DOWN = AllocationType.MEM_TOP_DOWN
MEM_PHYSICAL = AllocationType.MEM_PHYSICAL
MEM_RESET_UNDO = AllocationType.MEM_RESET_UNDO
MEM_LARGE_PAGES = AllocationType.MEM_LARGE_PAGES
MEM_FREE = MemoryState.MEM_FREE
MEM_PRIVATE = MemoryState.MEM_PRIVATE

PAGE_NOACCESS = Protection.PAGE_NOACCESS
PAGE_READONLY = Protection.PAGE_READONLY
PAGE_READWRITE = Protection.PAGE_READWRITE
PAGE_WRITECOPY = Protection.PAGE_WRITECOPY
PAGE_EXECUTE = Protection.PAGE_EXECUTE
PAGE_EXECUTE_READ = Protection.PAGE_EXECUTE_READ
PAGE_EXECUTE_READWRITE = Protection.PAGE_EXECUTE_READWRITE
PAGE_EXECUTE_WRITECOPY = Protection.PAGE_EXECUTE_WRITECOPY
PAGE_GUARD = Protection.PAGE_GUARD
PAGE_NOCACHE = Protection.PAGE_NOCACHE
PAGE_WRITECOMBINE = Protection.PAGE_WRITECOMBINE

WRITE_WATCH_FLAG_RESET = WriteWatchFlag.WRITE_WATCH_FLAG_RESET

ERROR_SUCCESS = ErrorCode.ERROR_SUCCESS
ERROR_NOT_ENOUGH_MEMORY = ErrorCode.ERROR_NOT_ENOUGH_MEMORY
ERROR_NOT_SUPPORTED = ErrorCode.ERROR_NOT_SUPPORTED
ERROR_INVALID_PARAMETER = ErrorCode.ERROR_INVALID_PARAMETER
ERROR_INVALID_ADDRESS = ErrorCode.ERROR_INVALID_ADDRESS
ERROR_NOACCESS = ErrorCode.ERROR_NOACCESS

# What GetWriteWatch / ResetWriteWatch return on failure (Wine returns ~0U): a
# return value, not a flag, so a plain int.
WRITE_WATCH_FAILED = 0xFFFFFFFF

# Definition order (iterating a flag class may sort by value).
_ALLOCATION_TYPE_NAMES = {AllocationType[name].value: name for name in AllocationType.__members__}
_PROTECTION_NAMES = {Protection[name].value: name for name in Protection.__members__}


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
