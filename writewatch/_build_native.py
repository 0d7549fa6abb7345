"""cffi build script for writewatch._native (API mode, compiled at install).

setup.py names this file in cffi_modules; nothing here is imported at run time.
The kernel ABI and the helpers' prototypes live in _abi.h, read both as the cdef
and by the C compiler, so every struct is declared exactly once. _helpers.c holds
the system-call wrappers and the PAGEMAP_SCAN loop; _tracking.c the fallback
backends' signal handler, handler thread and per-page state; _index.c the
native index of write-watch regions behind the one-call GetWriteWatch.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ABI_HEADER = (HERE / "_abi.h").read_text()

ffibuilder = FFI()
ffibuilder.cdef(ABI_HEADER)
ffibuilder.set_source(
    "writewatch._native",
    '#include <stdint.h>\n#include "_abi.h"\n',
    sources=["writewatch/_helpers.c", "writewatch/_tracking.c", "writewatch/_index.c"],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
