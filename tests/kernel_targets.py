"""Watched memory for the kernel to write into (a helper, not a test module),
shared by test_kernel_writes.py and test_kernel_copies.py.

for_kernel() makes a view ready for a write the kernel makes on the process's
behalf (prepare_kernel_write, on the backends whose armed pages would make the
kernel fail with EFAULT); payload() gives reproducible bytes to write; the
region fixture is 16 watched pages in the two states the kernel can meet.
Test modules import region_fixture to use the fixture as ``region``.
"""

from __future__ import annotations

import numpy as np
import pytest

import writewatch as ww
from writewatch import backends

P = ww.PAGE_SIZE


def for_kernel(target: np.ndarray, nbytes: int | None = None) -> np.ndarray:
    """target, made ready for the kernel to write its first nbytes."""
    if backends.backend().kernel_writes_fault():
        ww.prepare_kernel_write(target.ctypes.data, target.nbytes if nbytes is None else nbytes)
    return target


def payload(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(name="region", params=["unpopulated", "populated-and-reset"])
def region_fixture(request, watched):
    """16 watched pages, never touched, or touched everywhere and then reset
    (the kernel then meets present write-protected pages instead of
    never-touched ones)."""
    region = watched(16)
    if request.param == "populated-and-reset":
        region.view()[::P] = 0
        assert region.written(ww.WRITE_WATCH_FLAG_RESET) == list(range(16))
    assert region.written() == []
    return region
