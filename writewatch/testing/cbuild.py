"""Compile C with cffi once, into a cache directory, safely under concurrency.

build_cached() compiles a cffi API-mode extension (the benchmark's raw C
reference, the tests' native writer threads) the first time its inputs are
seen, and imports it; later calls, in this process or any other, load the
library already built. The cache key is a hash of everything that goes into
the build (declarations, source, the files it includes, compiler arguments)
plus the cffi version and the interpreter's cache tag.

Builds are made privately and then moved into place (build_privately()), so a
concurrent build, in another pytest process say, never sees a half-written
result: it either builds its own or finds a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

CACHE = Path(tempfile.gettempdir()) / "writewatch-cbuild"


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
    built = sorted(cache.glob(f"{module_name}.*.so"))
    if built:
        library = built[0]
    else:
        import cffi

        builder = cffi.FFI()
        builder.cdef(cdef)
        builder.set_source(module_name, source, include_dirs=include_dirs,
                           libraries=libraries, extra_compile_args=extra_compile_args)
        with build_privately(cache, f"{module_name}-") as work:
            compiled = Path(builder.compile(tmpdir=str(work)))
            library = cache / compiled.name
            os.replace(compiled, library)
    spec = importlib.util.spec_from_file_location(module_name, library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
