"""cffi build script for writewatch._native (API mode, compiled at install).

setup.py names this file in cffi_modules; it is a build input, never imported
by the package. The C sources live in writewatch/native/, split by job:
abi.h (the kernel ABI and every helper's prototype, read both as the cdef and
by the C compiler, so each struct is declared once), syscalls.c (system-call
wrappers), pagemap.c (PAGEMAP_SCAN scans), tracking.c (the fallback backends'
per-page state, SIGSEGV handler and userfaultfd handler thread), foreign.c and
foreign_maps.c (process_memwatch over memory writewatch did not allocate, on
the fallbacks: the kernel's mappings and pagemap read per call), index.c
(the native index behind one-call GetWriteWatch/ResetWriteWatch) and
ctable.h (the lock-free sorted table both of those keep their items in).
"""

from pathlib import Path
from typing import Any

from cffi import FFI

NATIVE = Path(__file__).resolve().parent / "writewatch" / "native"
SOURCES = ["syscalls.c", "pagemap.c", "memwatch.c", "tracking.c", "index.c", "foreign.c",
           "foreign_maps.c"]
# libprocess_memwatch (process_memwatch.h): the proposal's C entry point, pure C
# from the same sources; only process_memwatch is exported.
LIBRARY = "process_memwatch"
LIBRARY_SOURCES = ["pagemap.c", "memwatch.c", "capi.c"]
COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

ffibuilder = FFI()
ffibuilder.cdef((NATIVE / "abi.h").read_text())
ffibuilder.set_source(
    "writewatch._native",
    '#include <stdint.h>\n#include "abi.h"\n',
    sources=[f"writewatch/native/{name}" for name in SOURCES],
    include_dirs=[str(NATIVE)],
    extra_compile_args=COMPILE_ARGS,
    libraries=["pthread"],
)



def build_library(compiler: Any, directory: str, temp: str) -> str:
    """Compile libprocess_memwatch.so into directory with a distutils compiler
    (setup.py's build_ext hands its own); returns the library's path."""
    objects = compiler.compile([str(NATIVE / name) for name in LIBRARY_SOURCES],
                               output_dir=temp, include_dirs=[str(NATIVE)],
                               extra_postargs=[*COMPILE_ARGS, "-fPIC", "-fvisibility=hidden"])
    output = str(Path(directory) / f"lib{LIBRARY}.so")
    compiler.link_shared_object(objects, output, libraries=["pthread"],
                                extra_postargs=["-Wl,-soname,lib" + LIBRARY + ".so"])
    return output


if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(NATIVE.parent.parent), verbose=True)
