"""libprocess_memwatch: the proposal's C entry point, shipped in the package.

C code written for the proposal (`#include <linux/memwatch.h>`-style flags and
`process_memwatch(pidfd, start, len, flags, vec, vec_len)`) builds unchanged
against it with the flags `python -m writewatch cflags` prints (README,
"process_memwatch from C"). The library is built at install time from the
same native sources as the extension (build_native.py).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
LIBRARY_NAME = "process_memwatch"


def include_dir() -> Path:
    """Where process_memwatch.h is."""
    return PACKAGE / "native"


def library_path() -> Path:
    return PACKAGE / f"lib{LIBRARY_NAME}.so"


def cflags() -> str:
    """Compiler and linker flags for a C program calling process_memwatch()."""
    lib_dir = library_path().parent
    return f"-I{include_dir()} -L{lib_dir} -Wl,-rpath,{lib_dir} -l{LIBRARY_NAME}"
