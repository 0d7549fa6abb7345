"""Guard-page toolkit for the hostile-input tests (a helper, not a test module).

Guarded is memory whose last data byte is followed by a PROT_NONE guard page,
every other byte a canary: an array placed to end at the guard page turns an
overrun into a crash, and changed_outside() lists any other byte a call wrote.
make_array() and make_vec() build the addresses and vec arguments the fuzzers
pass (every kind of right and wrong array, in guarded memory where they are
arrays); is_addresses_array() says which of them GetWriteWatch accepts.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

import numpy as np

import writewatch as ww

P = ww.PAGE_SIZE
CANARY_BYTE = 0xA5

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class Guarded:
    """Memory whose last data byte is followed by a PROT_NONE page. Arrays are
    placed to end exactly at the guard page; every other byte holds a canary.
    changed_outside() lists what a call modified outside the bytes it may write."""

    def __init__(self, nbytes: int) -> None:
        self.data_size = max(1, -(-nbytes // P)) * P
        self.mm = mmap.mmap(-1, self.data_size + P)
        raw = np.frombuffer(self.mm, np.uint8)
        self.address = raw.ctypes.data
        if _libc.mprotect(self.address + self.data_size, P, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of the guard page")
        self.raw = raw[:self.data_size]
        self.raw[:] = CANARY_BYTE
        self.before: np.ndarray | None = None

    def at_end(self, nbytes: int) -> np.ndarray:
        """nbytes of uint8 ending at the guard page."""
        return self.raw[self.data_size - nbytes:]

    def snapshot(self) -> None:
        self.before = self.raw.copy()

    def changed_outside(self, start: int, end: int) -> list[int]:
        """Addresses (at most 8) whose byte changed since snapshot(), outside
        the address range [start, end)."""
        assert self.before is not None
        diff = np.flatnonzero(self.raw != self.before) + self.address
        return [int(a) for a in diff if not start <= a < end][:8]


class Sub(np.ndarray):
    """An ndarray subclass: a valid addresses array all the same."""


ARRAY_KINDS = ["uintp"] * 6 + [
    "none", "readonly", "uint64", "Q", "subclass", "empty", "in-watched-region",
    "int64", "uint32", "float64", "object", "2-D", "strided", "reversed", "big-endian",
    "list", "bytearray", "memoryview", "0-d", "int",
]


def make_array(kind: str, length: int, watched: int) -> tuple[Any, Guarded | None]:
    """An addresses argument of the given kind, in guarded memory where it is
    an array; the "in-watched-region" kind is a view of watched memory at the
    address watched."""
    if kind == "none":
        return None, None
    if kind == "list":
        return [0] * length, None
    if kind == "int":
        return length, None
    if kind == "in-watched-region":
        length = max(1, length)
        return ww.as_array(watched, length * 8, np.uintp), None
    if kind in ("bytearray", "memoryview"):
        buffer = bytearray(length * 8)
        return (buffer if kind == "bytearray" else memoryview(buffer)), None
    dtype = {"int64": np.int64, "uint32": np.uint32, "float64": np.float64,
             "big-endian": ">u8", "uint64": np.uint64, "Q": "Q",
             "object": object}.get(kind, np.uintp)
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        return np.zeros(length, dtype), None
    itemsize = dtype.itemsize
    step = 2 if kind == "strided" else 1
    nbytes = max(length * step, 1) * itemsize
    guard = Guarded(nbytes + 64)
    memory = guard.at_end(nbytes).view(dtype)
    if kind == "empty":
        array = memory[:0]
    elif kind == "0-d":
        array = memory[-1:].reshape(())
    elif kind == "strided":
        array = memory[1::2] if length > 1 else memory[-1:]
        array = array[:length]
    elif kind == "reversed":
        array = memory[::-1][:length]
    elif kind == "2-D":
        array = memory[:(length // 2) * 2].reshape(-1, 2) if length >= 2 else memory.reshape(1, -1)
    else:
        array = memory[:length]
    if kind == "subclass":
        array = array.view(Sub)
    if kind == "readonly":
        array.flags.writeable = False
    return array, guard


def is_addresses_array(value: Any) -> bool:
    """What GetWriteWatch accepts: None or a 1-D C-contiguous uintp ndarray."""
    return value is None or (isinstance(value, np.ndarray) and value.ndim == 1
                             and value.dtype == np.uintp and value.flags.c_contiguous)


def make_vec(kind: str, length: int) -> tuple[Any, Guarded | None]:
    """A process_memwatch vec argument of the given kind, in guarded memory
    where it is an array."""
    if kind == "none":
        return None, None
    if kind == "list":
        return [0] * length, None
    dtype = np.uint64 if kind == "uint64" else np.int64
    step = 2 if kind == "strided" else 1
    nbytes = max(1, length * step) * 8
    guard = Guarded(nbytes + 64)
    memory = guard.at_end(nbytes).view(dtype)
    if kind == "empty":
        return memory[:0], guard
    if kind == "strided":
        return memory[1::2][:length], guard
    if kind == "2-D":
        return memory.reshape(1, -1), guard
    vec = memory[:length]
    if kind == "readonly":
        vec.flags.writeable = False
    return vec, guard
