"""Whether this process sees page frame numbers in /proc/self/pagemap (a
helper, not a test module).

The kernel shows them only to a process with CAP_SYS_ADMIN (zero for anyone
else). The fallback backends tell the shared zero page of a read from a written
page by its frame number (docs/semantics.md rule M20): without them a page
that was only read counts as written under MEMWATCH_SD_NO_REUSED_REGIONS, one
too many, never one too few. The pagemap backend asks the kernel
(PAGE_IS_PFNZERO) and needs no privilege.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

PFN_MASK = (1 << 55) - 1


def frame_numbers_hidden() -> bool:
    written = ctypes.create_string_buffer(b"x")  # a present page with a frame of its own
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(ctypes.addressof(written) // mmap.PAGESIZE * 8)
        (entry,) = struct.unpack("<Q", pagemap.read(8))
    return entry & PFN_MASK == 0


def read_pages_count(write_watch_backend: str | None) -> bool:
    """Does a page that was only read count as written under
    MEMWATCH_SD_NO_REUSED_REGIONS on this backend, in this process?"""
    return write_watch_backend in ("uffd", "mprotect") and frame_numbers_hidden()
