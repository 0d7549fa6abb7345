"""numpy views of VirtualAlloc memory: as_array.

A view keeps its region's address space mapped even after VirtualFree
(MEM_RELEASE), so that Python code holding one never faults on unmapped memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from writewatch import regions
from writewatch.constants import ERROR_INVALID_ADDRESS, PAGE_NOACCESS, PAGE_READONLY
from writewatch.errors import WriteWatchError, uint
from writewatch.kernel import page_ceil, page_floor
from writewatch.regions import RESERVED


class _ViewAnchor:
    """The base object of a view: numpy reads the memory's address from
    __array_interface__, and the view keeps this (and so the mapping) alive."""

    __slots__ = ("__array_interface__", "mapping")

    def __init__(self, address: int, size: int, readonly: bool, mapping: regions.Mapping) -> None:
        self.__array_interface__ = {
            "version": 3,
            "shape": (size,),
            "typestr": "|u1",
            "data": (address, readonly),
        }
        self.mapping = mapping


def as_array(address: Any, size: Any, dtype: npt.DTypeLike = np.uint8) -> np.ndarray:
    """A numpy view of [address, address+size) of a VirtualAlloc region.

    Every page must be committed and accessible; the view is read-only where a
    page is PAGE_READONLY. The view keeps the memory mapped even after
    VirtualFree(MEM_RELEASE). Decommitting or making its pages PAGE_NOACCESS
    while the view is in use makes them fault, as on Windows."""
    address = uint(address, "address")
    size = uint(size, "size")
    dtype = np.dtype(dtype)
    if size == 0 or dtype.itemsize == 0 or size % dtype.itemsize:
        raise ValueError(f"size {size} is not a positive multiple of {dtype} "
                         f"({dtype.itemsize} bytes)")
    region = regions.find(address)
    if region is None or address + size > region.end:
        raise WriteWatchError(ERROR_INVALID_ADDRESS,
                              f"[{address:#x}, {address + size:#x}) is not inside one "
                              "VirtualAlloc region")
    first, last = page_floor(address), page_ceil(address + size)
    with region.lock:
        if region.mapping is None:
            raise WriteWatchError(ERROR_INVALID_ADDRESS, "the region was released")
        states = {value for _, _, value in region.spans(first, last)}
        if states & {RESERVED, PAGE_NOACCESS}:
            raise WriteWatchError(ERROR_INVALID_ADDRESS,
                                  "the range is not all committed and accessible")
        anchor = _ViewAnchor(address, size, PAGE_READONLY in states, region.mapping)
    return np.asarray(anchor).view(dtype)
