"""Compile C with cffi once, into a cache directory, safely under concurrency.

build_cached() compiles a cffi API-mode extension (the tests' native writer
threads and signal handlers) the first time its inputs are seen, and imports
it; later calls, in this process or any other, load the library already built.
The cache key is a hash of everything that goes into the build (declarations,
source, the files it includes, compiler arguments) plus the cffi version and
the interpreter's cache tag.

cffi writes the C (emit_c_code needs nothing more) and the C compiler is
called directly, not through setuptools, which virtual environments on Python
3.12+ no longer include. Without a compiler or the Python headers,
CompilerMissingError says what to install. (What the product itself needs compiled,
the extension and the benchmark's reference, is compiled at install time.)

Builds are made privately and then moved into place (build_privately()), so a
concurrent build, in another pytest process say, never sees a half-written
result: it either builds its own or finds a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

CACHE = Path(tempfile.gettempdir()) / "writewatch-cbuild"


class CompilerMissingError(RuntimeError):
    """No C compiler, or no Python headers, to build with: the message says
    what to install."""


def compiler() -> list[str]:
    """The C compiler command: $CC if set, else gcc or cc from PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("gcc", "cc"):
        if shutil.which(name):
            return [name]
    raise CompilerMissingError("compiling this C helper needs a C compiler: install gcc "
                          "(apt install gcc, dnf install gcc) or set CC")


def python_include() -> str:
    """The directory holding Python.h for this interpreter."""
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        version = sysconfig.get_python_version()
        raise CompilerMissingError(f"compiling this C helper needs the Python {version} headers "
                              f"(no Python.h in {include}): install python{version}-dev "
                              f"(Debian, Ubuntu) or python{version.replace('.', '')}-devel")
    return include


def compile_shared(source: Path, output: Path, *, include_dirs: Iterable[str] = (),
                   libraries: Iterable[str] = (), extra_args: Iterable[str] = ()) -> None:
    """Compile one C file into a shared library with the C compiler, directly."""
    command = [*compiler(), "-shared", "-fPIC", f"-I{python_include()}",
               *(f"-I{d}" for d in include_dirs), *extra_args, str(source),
               "-o", str(output), *(f"-l{lib}" for lib in libraries)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stdout}{result.stderr}")


def inputs_digest(*parts: str | bytes) -> str:
    """16 hex digits naming a build of these inputs with this cffi on this
    interpreter."""
    import cffi  # here, so that importing this module never needs cffi

    digest = hashlib.sha256()
    for part in (*parts, cffi.__version__, sys.implementation.cache_tag):
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def build_privately(cache: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory inside cache to build in, removed on leaving the
    block with whatever is still in it: move the results into place (with
    os.replace or a rename, atomic within cache) before leaving."""
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=cache))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_cached(name: str, cdef: str, source: str, *, include_dirs: Iterable[str] = (),
                 libraries: Iterable[str] = (), extra_compile_args: Iterable[str] = (),
                 depends: Iterable[Path] = (), cache: Path = CACHE) -> ModuleType:
    """The cffi API-mode module for cdef and source (with its ffi and lib),
    compiled into cache unless a build of the same inputs is already there.
    depends: files the source includes, hashed into the key with everything
    else. The module is named ``_<name>_<key>``."""
    include_dirs, libraries = [str(d) for d in include_dirs], list(libraries)
    extra_compile_args = list(extra_compile_args)
    key = inputs_digest(cdef, source, *(Path(p).read_bytes() for p in depends),
                        repr((include_dirs, libraries, extra_compile_args)))
    module_name = f"_{name}_{key}"
    library = cache / f"{module_name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not library.exists():
        import cffi

        builder = cffi.FFI()
        builder.cdef(cdef)
        builder.set_source(module_name, source)
        with build_privately(cache, f"{module_name}-") as work:
            c_file = work / f"{module_name}.c"
            with contextlib.redirect_stdout(io.StringIO()):  # it prints "generating ..."
                builder.emit_c_code(str(c_file))
            compiled = work / library.name
            compile_shared(c_file, compiled, include_dirs=include_dirs, libraries=libraries,
                           extra_args=extra_compile_args)
            os.replace(compiled, library)
    spec = importlib.util.spec_from_file_location(module_name, library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
