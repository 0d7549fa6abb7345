"""Compile the translation layer at run time: libwinshim.so (the Windows memory
functions, on writewatch) and the ported Windows program against it.

    python examples/translation_layer/build.py          # prints where the files are
    python examples/translation_layer/build.py --flags  # flags for your own C program
    python examples/translation_layer/build.py --run prog.c [ARGS...]  # build it, run it

libwinshim.so is made with cffi's embedding mode: cffi writes C functions with
the Windows signatures whose bodies call into Python (winshim_glue.py, frozen
into the library), and gcc compiles that. The library does not link libpython
itself, so it can be loaded into a running Python (the differential tester
does, with ctypes) and into a C program linked with libpython.

The directories this interpreter imports writewatch, numpy and cffi from are
baked into the library: a C program linked with it finds them without
PYTHONPATH, from any virtual environment (the library's constructor hands them
to the embedded interpreter before it starts, since cffi imports its backend
first), ahead of any other writewatch the embedded interpreter's own
site-packages may hold (PYTHONPATH, when set, still comes first); the library
and libpython are found through the program's rpath, without LD_LIBRARY_PATH.

Builds are cached under build/<hash of the inputs>/, so only the first run
pays for the compiler (where this checkout cannot be written, another user's or
a read-only tree, under ~/.cache/writewatch/translation_layer/ instead);
writewatch.testing.cbuild supplies the hash and the build-privately-then-rename
step that keeps concurrent builds apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from writewatch.testing.cbuild import (
    build_privately,
    compiler,
    inputs_digest,
    python_include,
)

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
static void winshim_ready(void) { python_ready = 1; winshim_restore_environment(); }

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


def _python_setup_source() -> str:
    """C that sets the embedded interpreter up before a C program starts it.

    PYTHONHOME: this interpreter's standard library. Left to itself, Python
    finds its home through the first `python3` on PATH, which may be another
    installation (the system's) whose libraries do not match the libpython the
    program was linked with.

    PYTHONPATH: the import paths (after any the user set). cffi imports its
    _cffi_backend as Python starts, before the library's start-up code could
    extend sys.path, and the embedded interpreter is the base one, which knows
    nothing of a virtual environment's site-packages.

    Both are put back as they were once Python is up (winshim_ready), so the
    program's own child processes do not inherit them. Loaded into a running
    Python (ctypes), it changes nothing."""
    home = json.dumps(str(Path(sys.base_prefix).resolve()))  # C string literals
    paths = json.dumps(os.pathsep.join(_import_paths()))
    return f"""#include <stdlib.h>
#include <string.h>
extern int Py_IsInitialized(void);
static char *winshim_saved[2];
static int winshim_env_set;
static const char *const winshim_env_names[2] = {{"PYTHONHOME", "PYTHONPATH"}};

static void __attribute__((constructor)) winshim_python_setup(void)
{{
    const char *home = getenv("PYTHONHOME"), *path = getenv("PYTHONPATH");
    static const char ours[] = {paths};
    char *joined;
    if (Py_IsInitialized())
        return;
    winshim_saved[0] = home ? strdup(home) : NULL;
    winshim_saved[1] = path ? strdup(path) : NULL;
    winshim_env_set = 1;
    if (!home)
        setenv("PYTHONHOME", {home}, 1);
    if (!path || !*path) {{
        setenv("PYTHONPATH", ours, 1);
    }} else if ((joined = malloc(strlen(path) + sizeof ours + 1)) != NULL) {{
        strcpy(joined, path);
        strcat(joined, ":");
        strcat(joined, ours);
        setenv("PYTHONPATH", joined, 1);
        free(joined);
    }}
}}

static void winshim_restore_environment(void)
{{
    if (!winshim_env_set)
        return;
    winshim_env_set = 0;
    for (int i = 0; i < 2; i++) {{
        if (winshim_saved[i])
            setenv(winshim_env_names[i], winshim_saved[i], 1);
        else
            unsetenv(winshim_env_names[i]);
        free(winshim_saved[i]);
        winshim_saved[i] = NULL;
    }}
}}
"""


def _import_paths() -> list[str]:
    """Where this interpreter imports what the glue needs from: the library
    appends them to sys.path when it starts Python."""
    import cffi
    import numpy

    import writewatch

    paths: list[str] = []
    for module in (writewatch, numpy, cffi):
        path = str(Path(module.__file__ or ".").resolve().parent.parent)
        if path not in paths:
            paths.append(path)
    return paths


def path_prelude() -> str:
    """Python code putting the import paths on sys.path right after the
    PYTHONPATH entries: ahead of the embedded interpreter's own site-packages,
    which may hold another writewatch."""
    return ("import os as _os, sys as _sys\n"
            "_first = [_p for _p in _os.environ.get('PYTHONPATH', '').split(_os.pathsep) if _p]\n"
            "_at = 0\n"
            "while _at < len(_sys.path) and (_sys.path[_at] in _first or not _sys.path[_at]):\n"
            "    _at += 1\n"
            f"_sys.path[_at:_at] = [_p for _p in {_import_paths()!r} if _p not in _first]\n"
            "del _os, _sys, _first, _at\n")


def _init_code() -> str:
    """The embedded interpreter's start-up code: the import paths, then the glue."""
    return path_prelude() + GLUE_SOURCE.read_text()


def _inputs_digest() -> str:
    """The build directory's name: a hash of the inputs, where writewatch, numpy
    and cffi are imported from, this Python and cffi."""
    files = (INCLUDE / "windows.h", PROGRAM_SOURCE, GLUE_SOURCE, Path(__file__))
    return inputs_digest(repr(_import_paths()), *(path.read_bytes() for path in files),
                         sys.version, sys.executable)


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
    ffibuilder.set_source("_winshim", _python_setup_source() + _C_SOURCE)
    ffibuilder.embedding_init_code(_init_code())
    c_file = work / "_winshim.c"
    with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
        ffibuilder.emit_c_code(str(c_file))  # it prints "generating ..."

    cc = compiler()
    _run([*cc, "-O2", "-fPIC", "-shared", f"-I{INCLUDE}", f"-I{python_include()}",
          str(c_file), "-o", str(work / "libwinshim.so")], verbose)
    # The port, unchanged: once as a program, once as a library whose main()
    # is called port_main() so that a running Python can host it.
    # $ORIGIN: found next to the program, wherever the build directory ends up.
    shim = ["-L", str(work), "-lwinshim", "-Wl,-rpath,$ORIGIN"]
    _run([*cc, "-O2", "-fPIC", "-shared", "-Dmain=port_main", f"-I{INCLUDE}",
          str(PROGRAM_SOURCE), "-o", str(work / "libport.so"), *shim], verbose)
    python_link = _python_link_flags()
    if python_link is not None:
        _run([*cc, "-O2", f"-I{INCLUDE}", str(PROGRAM_SOURCE), "-o",
              str(work / "write_watch_port"), *shim, *python_link], verbose)


def default_root() -> Path:
    """build/ next to this file when it can be written, else the user's cache."""
    local = HERE / "build"
    with contextlib.suppress(OSError):
        local.mkdir(exist_ok=True)
    if os.access(local, os.W_OK | os.X_OK):
        return local
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "writewatch" / "translation_layer"


def build(root: Path | None = None, verbose: bool = False) -> Built:
    """Compile if the inputs changed since the last build; return the files."""
    root = root or default_root()
    target = root / _inputs_digest()
    if not (target / "libport.so").exists():
        with build_privately(root, "partial-") as work:
            _compile(work, verbose)
            with contextlib.suppress(OSError):  # another process finished the same build first
                work.rename(target)
    program = target / "write_watch_port"
    return Built(target / "libwinshim.so", program if program.exists() else None,
                 target / "libport.so")


def c_flags(built: Built) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for a C program of your own that calls the
    Windows functions through libwinshim.so. Raises RuntimeError when this
    Python has no shared libpython to link against."""
    python_link = _python_link_flags()
    if python_link is None:
        raise RuntimeError("this Python has no shared libpython: a C program cannot embed it; "
                           "build your code as a shared library and load it from Python, as "
                           "run.py does with libport.so")
    directory = str(built.library.parent)
    return ([f"-I{INCLUDE}"],
            [f"-L{directory}", "-lwinshim", f"-Wl,-rpath,{directory}", *python_link])


def build_and_run(source: Path, arguments: list[str], verbose: bool = False) -> int:
    """Compile source against libwinshim.so, run it with arguments, return its
    exit status."""
    compile_flags, link_flags = c_flags(build(verbose=verbose))
    with tempfile.TemporaryDirectory(prefix="winshim-run-") as work:
        program = Path(work) / source.stem
        _run([*compiler(), "-O2", *compile_flags, str(source), "-o",
              str(program), *link_flags], verbose)
        return subprocess.call([str(program), *arguments])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build.py", description="Compile libwinshim.so (the Windows memory functions on "
        "writewatch) and write_watch_port.c against it; print where they are.")
    parser.add_argument("--flags", action="store_true",
                        help="print the gcc flags that compile and link your own C program "
                             "against libwinshim.so (no PYTHONPATH or LD_LIBRARY_PATH needed)")
    parser.add_argument("--run", metavar="PROG.c", type=Path,
                        help="compile PROG.c against libwinshim.so and run it; arguments "
                             "after it go to the program")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not echo compiler commands")
    args, rest = parser.parse_known_args(argv)
    if rest and args.run is None:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.run is not None:
            return build_and_run(args.run, rest, verbose=not args.quiet)
        built = build(verbose=not (args.quiet or args.flags))
        if args.flags:
            compile_flags, link_flags = c_flags(built)
            print(f"gcc {' '.join(compile_flags)} prog.c -o prog {' '.join(link_flags)}")
            return 0
    except RuntimeError as exc:  # CompilerMissingError among them: it says what to install
        print(f"build.py: {exc}", file=sys.stderr)
        return 2
    print(f"library: {built.library}")
    print(f"program: {built.program or '(no shared libpython: use the library form)'}")
    print(f"program as a library: {built.program_library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
