"""WriteWatchError, and the check every address, size and count goes through."""

from __future__ import annotations

import errno
import operator
from typing import Any

from writewatch.constants import (
    ERROR_INVALID_ADDRESS,
    ERROR_INVALID_PARAMETER,
    ERROR_NOACCESS,
    ERROR_NOT_ENOUGH_MEMORY,
    ERROR_NOT_SUPPORTED,
)

_ERRNO_OF: dict[int, int] = {
    ERROR_NOT_ENOUGH_MEMORY: errno.ENOMEM,
    ERROR_NOT_SUPPORTED: errno.EOPNOTSUPP,
    ERROR_INVALID_PARAMETER: errno.EINVAL,
    ERROR_INVALID_ADDRESS: errno.EFAULT,
    ERROR_NOACCESS: errno.EFAULT,
}


class WriteWatchError(OSError):
    """A write-watch or virtual-memory call failed; .winerror is the Windows code
    GetLastError() would return."""

    def __init__(self, winerror: int, message: str) -> None:
        super().__init__(_ERRNO_OF.get(winerror, errno.EINVAL), message)
        self.winerror = winerror

    def __str__(self) -> str:
        return f"[WinError {self.winerror}] {self.strerror}"


def uint(value: Any, name: str) -> int:
    """An address, size or count: an integer (TypeError otherwise) in 0..2**64-1
    (ERROR_INVALID_PARAMETER otherwise, as a C caller could not pass it)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not 0 <= number < 1 << 64:
        raise WriteWatchError(ERROR_INVALID_PARAMETER, f"{name} {number} is out of range")
    return number
