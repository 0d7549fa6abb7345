"""Pausing a native call at a point the test chooses.

StalledMemory is anonymous memory registered with a userfaultfd of its own in
MISSING mode: the first store into each of its pages blocks the storing thread
until the test resolves the fault. An output array placed there stops
GetWriteWatch (or process_memwatch) right inside its scan, at its first
store, holding whatever it holds at that point, so a race with a release or a
signal happens in the same order every run.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import struct

import numpy as np
import pytest
from forking import patience

from writewatch import kernel, sandbox

UFFDIO_REGISTER = 0xC020AA00
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_MSG_SIZE = 32


class StalledMemory:
    """npages of memory whose first store into each page waits for resolve()."""

    def __init__(self, npages: int = 1) -> None:
        try:
            self.uffd = kernel.open_uffd()
        except OSError as exc:
            denial = sandbox.userfaultfd_denial(exc.errno or 0).detail
            pytest.skip(f"needs userfaultfd to pause a call: {denial}")
        # One ordinary page in front (array(count, before=...)), then the stalled ones.
        self.lead = kernel.check(kernel.lib.ww_mmap(
            0, (npages + 1) * kernel.PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), "mmap")
        self.size = npages * kernel.PAGE_SIZE
        self.address = self.lead + kernel.PAGE_SIZE
        kernel.uffd_enable_features(self.uffd, 0)
        fcntl.ioctl(self.uffd, UFFDIO_REGISTER,
                    struct.pack("QQQQ", self.address, self.size, UFFDIO_REGISTER_MODE_MISSING, 0))

    def array(self, count: int, before: int = 0) -> np.ndarray:
        """A uintp array of count entries; its first `before` entries (at most a
        page's worth) lie in ordinary memory, so the call pauses at its store
        into entry `before`, the first in the stalled memory."""
        assert (count - before) * 8 <= self.size and before * 8 <= kernel.PAGE_SIZE
        anchor = type("Anchor", (), {})()
        anchor.__array_interface__ = {"version": 3, "shape": (count,), "typestr": "<u8",
                                      "data": (self.address - before * 8, False)}
        return np.asarray(anchor).view(np.uintp)

    def wait_for_fault(self, timeout: float | None = None) -> int:
        """Block until a thread stores into the memory; the faulting address."""
        timeout = patience(60) if timeout is None else timeout
        while True:
            ready, _, _ = select.select([self.uffd], [], [], timeout)
            assert ready, f"no store into the stalled memory within {timeout} s"
            try:
                message = os.read(self.uffd, UFFD_MSG_SIZE)
            except BlockingIOError:
                continue
            event = message[0]
            if event == UFFD_EVENT_PAGEFAULT:
                return int(struct.unpack_from("Q", message, 16)[0])

    def resolve(self) -> None:
        """Let every waiting store go on (each page reads as zeros)."""
        for page in range(self.address, self.address + self.size, kernel.PAGE_SIZE):
            try:
                fcntl.ioctl(self.uffd, UFFDIO_ZEROPAGE,
                            struct.pack("QQQQ", page, kernel.PAGE_SIZE, 0, 0))
            except OSError as exc:
                if exc.errno != errno.EEXIST:  # a page already resolved
                    raise

    def close(self) -> None:
        self.resolve()
        os.close(self.uffd)
        kernel.unmap(self.lead, kernel.PAGE_SIZE + self.size)
