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

# Page protections writewatch supports (execute, guard and no-cache are refused)
PAGE_NOACCESS = 0x01
PAGE_READONLY = 0x02
PAGE_READWRITE = 0x04

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

