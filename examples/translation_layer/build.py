"""Compile the translation layer at run time: libwinshim.so (the Windows memory
functions, on writewatch) and the ported Windows program against it.

    python examples/translation_layer/build.py     # prints where the files are

libwinshim.so is made with cffi's embedding mode: cffi writes C functions with
the Windows signatures whose bodies call into Python (winshim_glue.py, frozen
into the library), and gcc compiles that. The library does not link libpython
itself, so it can be loaded into a running Python (the differential tester
does, with ctypes) and into a C program linked with libpython.

Builds are cached under build/<hash of the inputs>/, so only the first run
pays for the compiler.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
PROGRAM_SOURCE = HERE / "write_watch_port.c"
GLUE_SOURCE = HERE / "winshim_glue.py"

# cffi's dialect of C declarations (the C compiler checks them against
# include/windows.h through the wrappers below).
_TYPES = """
    typedef int BOOL;
    typedef uint32_t DWORD;
    typedef unsigned int UINT;
    typedef uint32_t ULONG;
    typedef uintptr_t ULONG_PTR;
    typedef size_t SIZE_T;
    typedef void *PVOID;
    typedef void *LPVOID;
    typedef DWORD *PDWORD;
    typedef const void *LPCVOID;
    typedef struct {
        PVOID BaseAddress;
        PVOID AllocationBase;
        DWORD AllocationProtect;
        uint16_t PartitionId;
        SIZE_T RegionSize;
        DWORD State;
        DWORD Protect;
        DWORD Type;
    } MEMORY_BASIC_INFORMATION;
"""
# Implemented in Python (winshim_glue.py), called by the exported C wrappers.
_PYTHON_IMPLEMENTED = """
    LPVOID winshim_VirtualAlloc(LPVOID address, SIZE_T size, DWORD allocation_type,
                                DWORD protect);
    BOOL winshim_VirtualFree(LPVOID address, SIZE_T size, DWORD free_type);
    BOOL winshim_VirtualProtect(LPVOID address, SIZE_T size, DWORD new_protect,
                                PDWORD old_protect);
    UINT winshim_GetWriteWatch(DWORD flags, PVOID base, SIZE_T size, PVOID *addresses,
                               ULONG_PTR *count, ULONG *granularity);
    UINT winshim_ResetWriteWatch(LPVOID base, SIZE_T size);
    SIZE_T winshim_VirtualQuery(LPCVOID address, MEMORY_BASIC_INFORMATION *info,
                                SIZE_T length);
    void winshim_PrepareKernelWrite(PVOID address, SIZE_T size);
"""
# Implemented in C: the last error lives in C, per thread, as on Windows (C code
# reads it without entering Python; the glue sets it from the calling thread),
# and the glue says when it is ready.
_C_IMPLEMENTED = """
    DWORD GetLastError(void);
    void SetLastError(DWORD code);
    void winshim_ready(void);
"""
# The exported Windows functions. If Python cannot start (writewatch not on
# PYTHONPATH, say), cffi makes every Python-implemented call return 0, which
# for GetWriteWatch and ResetWriteWatch would read as success: the wrappers
# turn that into a failure with ERROR_NOT_SUPPORTED instead.
_C_SOURCE = r"""
#include <stdio.h>
#include <windows.h>

static __thread DWORD last_error;
static volatile int python_ready;

CFFI_DLLEXPORT DWORD WINAPI GetLastError(void) { return last_error; }
CFFI_DLLEXPORT void WINAPI SetLastError(DWORD code) { last_error = code; }
static void winshim_ready(void) { python_ready = 1; }

/* Defined further down by cffi: each calls its function in winshim_glue.py. */
LPVOID winshim_VirtualAlloc(LPVOID, SIZE_T, DWORD, DWORD);
BOOL winshim_VirtualFree(LPVOID, SIZE_T, DWORD);
BOOL winshim_VirtualProtect(LPVOID, SIZE_T, DWORD, PDWORD);
UINT winshim_GetWriteWatch(DWORD, PVOID, SIZE_T, PVOID *, ULONG_PTR *, ULONG *);
UINT winshim_ResetWriteWatch(LPVOID, SIZE_T);
SIZE_T winshim_VirtualQuery(LPCVOID, PMEMORY_BASIC_INFORMATION, SIZE_T);
void winshim_PrepareKernelWrite(PVOID, SIZE_T);

static int not_ready(void)
{
    static int told;
    if (!told++)
        fprintf(stderr, "libwinshim: writewatch could not be started in Python; every call "
                        "fails with ERROR_NOT_SUPPORTED\n");
    SetLastError(ERROR_NOT_SUPPORTED);
    return 1;
}

CFFI_DLLEXPORT LPVOID WINAPI VirtualAlloc(LPVOID address, SIZE_T size, DWORD type,
                                          DWORD protect)
{
    LPVOID result = winshim_VirtualAlloc(address, size, type, protect);
    return python_ready || !not_ready() ? result : NULL;
}

CFFI_DLLEXPORT BOOL WINAPI VirtualFree(LPVOID address, SIZE_T size, DWORD type)
{
    BOOL result = winshim_VirtualFree(address, size, type);
    return python_ready || !not_ready() ? result : FALSE;
}

CFFI_DLLEXPORT BOOL WINAPI VirtualProtect(LPVOID address, SIZE_T size, DWORD protect,
                                          PDWORD old)
{
    BOOL result = winshim_VirtualProtect(address, size, protect, old);
    return python_ready || !not_ready() ? result : FALSE;
}

CFFI_DLLEXPORT UINT WINAPI GetWriteWatch(DWORD flags, PVOID base, SIZE_T size,
                                         PVOID *addresses, ULONG_PTR *count,
                                         ULONG *granularity)
{
    UINT result = winshim_GetWriteWatch(flags, base, size, addresses, count, granularity);
    return python_ready || !not_ready() ? result : ~0u;
}

CFFI_DLLEXPORT UINT WINAPI ResetWriteWatch(LPVOID base, SIZE_T size)
{
    UINT result = winshim_ResetWriteWatch(base, size);
    return python_ready || !not_ready() ? result : ~0u;
}

CFFI_DLLEXPORT SIZE_T WINAPI VirtualQuery(LPCVOID address, PMEMORY_BASIC_INFORMATION info,
                                          SIZE_T length)
{
    SIZE_T result = winshim_VirtualQuery(address, info, length);
    return python_ready || !not_ready() ? result : 0;
}

CFFI_DLLEXPORT void WINAPI PrepareKernelWrite(PVOID address, SIZE_T size)
{
    winshim_PrepareKernelWrite(address, size);
}
"""


@dataclass(frozen=True)
class Built:
    library: Path  # libwinshim.so
    program: Path | None  # the port as an executable (needs a shared libpython)
    program_library: Path  # the port as a shared library exporting port_main()


def _python_link_flags() -> list[str] | None:
    """How to link a C program with libpython, or None if there is no shared one."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = sysconfig.get_config_var("LIBDIR")
    version = sysconfig.get_config_var("LDVERSION") or sysconfig.get_python_version()
    if not libdir or not list(Path(libdir).glob(f"libpython{version}.so*")):
        return None
    return [f"-L{libdir}", f"-lpython{version}", f"-Wl,-rpath,{libdir}"]


def _inputs_digest() -> str:
    digest = hashlib.sha256()
    for path in (INCLUDE / "windows.h", PROGRAM_SOURCE, GLUE_SOURCE, Path(__file__)):
        digest.update(path.read_bytes())
    import cffi

    digest.update(f"{sys.version} {cffi.__version__} {sys.executable}".encode())
    return digest.hexdigest()[:16]


def _run(command: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def _compile(work: Path, verbose: bool) -> None:
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(_TYPES + _C_IMPLEMENTED)
    ffibuilder.embedding_api(_PYTHON_IMPLEMENTED)
    ffibuilder.set_source("_winshim", _C_SOURCE)
    ffibuilder.embedding_init_code(GLUE_SOURCE.read_text())
    c_file = work / "_winshim.c"
    with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
        ffibuilder.emit_c_code(str(c_file))  # it prints "generating ..."

    compiler = os.environ.get("CC", "gcc")
    python_include = sysconfig.get_paths()["include"]
    _run([compiler, "-O2", "-fPIC", "-shared", f"-I{INCLUDE}", f"-I{python_include}",
          str(c_file), "-o", str(work / "libwinshim.so")], verbose)
    # The port, unchanged: once as a program, once as a library whose main()
    # is called port_main() so that a running Python can host it.
    # $ORIGIN: found next to the program, wherever the build directory ends up.
    shim = ["-L", str(work), "-lwinshim", "-Wl,-rpath,$ORIGIN"]
    _run([compiler, "-O2", "-fPIC", "-shared", "-Dmain=port_main", f"-I{INCLUDE}",
          str(PROGRAM_SOURCE), "-o", str(work / "libport.so"), *shim], verbose)
    python_link = _python_link_flags()
    if python_link is not None:
        _run([compiler, "-O2", f"-I{INCLUDE}", str(PROGRAM_SOURCE), "-o",
              str(work / "write_watch_port"), *shim, *python_link], verbose)


def build(root: Path = HERE / "build", verbose: bool = False) -> Built:
    """Compile if the inputs changed since the last build; return the files."""
    target = root / _inputs_digest()
    if not (target / "libport.so").exists():
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="partial-", dir=root))
        try:
            _compile(work, verbose)
            try:
                work.rename(target)
            except OSError:  # another process finished the same build first
                shutil.rmtree(work, ignore_errors=True)
        finally:
            if work.exists() and work != target:
                shutil.rmtree(work, ignore_errors=True)
    program = target / "write_watch_port"
    return Built(target / "libwinshim.so", program if program.exists() else None,
                 target / "libport.so")


if __name__ == "__main__":
    built = build(verbose=True)
    print(f"library: {built.library}")
    print(f"program: {built.program or '(no shared libpython: use the library form)'}")
    print(f"program as a library: {built.program_library}")
