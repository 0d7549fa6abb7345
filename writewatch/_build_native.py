"""cffi build script for writewatch._native (API mode, compiled at install).

setup.py names this file in cffi_modules; nothing here is imported at run time.
The kernel ABI and the helpers' prototypes live in _abi.h, read both as the cdef
and by the C compiler, so every struct is declared exactly once.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ABI_HEADER = (HERE / "_abi.h").read_text()

ffibuilder = FFI()
ffibuilder.cdef(ABI_HEADER)
ffibuilder.set_source(
    "writewatch._native",
    "#include <stdint.h>\n" + (HERE / "_helpers.c").read_text(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
