"""cffi build script for writewatch's compiled parts (API mode, compiled at install).

setup.py names the builders here in cffi_modules and calls build_library; this
file is a build input, never imported by the package.

ffibuilder: writewatch._native, the extension. The C sources live in
writewatch/native/, split by job: abi.h (the kernel ABI and every helper's
prototype, read both as the cdef and by the C compiler, so each struct is
declared once), syscalls.c (system-call wrappers), pagemap.c (PAGEMAP_SCAN
scans), memwatch.c (process_memwatch on any memory), mechanism.c (which
mechanism is the default, decided for Python and C alike), tracking*.c (the fallback
backends' per-page state, by concern: tracking.h says which file holds what),
foreign.c, foreign_spans.c and foreign_maps.c (process_memwatch over memory
writewatch did not allocate, on the fallbacks: the calls, the spans watched
and how each is brought up to date, the kernel's mappings and pagemap read
per call),
index.c (the native index behind one-call GetWriteWatch/ResetWriteWatch),
python_calls.c (the common GetWriteWatch and process_memwatch calls as
CPython functions) and
ctable.h (the lock-free sorted table both of those keep their items in).

build_library: libprocess_memwatch.so, the proposal's C entry point (capi.c,
process_memwatch.h), a plain C library from the same sources: every mechanism,
with the fallbacks' handlers started by the library itself.

reference_builder: writewatch.bench._reference, the benchmark's raw C
references (writewatch/bench/reference.c). Compiled here rather than when the
benchmark runs, so that `python -m writewatch bench` from a wheel needs neither
a compiler nor setuptools.
"""

from pathlib import Path
from typing import Any

from cffi import FFI

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "writewatch" / "native"
# Every mechanism's sources: the extension and libprocess_memwatch both build them.
MECHANISM_SOURCES = ["syscalls.c", "pagemap.c", "memwatch.c", "mechanism.c", "tracking.c",
                     "tracking_arming.c", "tracking_scan.c", "tracking_faults.c", "foreign.c",
                     "foreign_spans.c", "foreign_maps.c"]
SOURCES = [*MECHANISM_SOURCES, "index.c", "index_calls.c", "python_calls.c"]
# libprocess_memwatch (process_memwatch.h): the proposal's C entry point, pure C
# from the same sources (the Windows layer's index aside); only
# process_memwatch is exported.
LIBRARY = "process_memwatch"
LIBRARY_SOURCES = [*MECHANISM_SOURCES, "capi.c"]
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

# Only the reference's own functions: the kernel structs stay declared once,
# in native/abi.h, which reference.c includes.
REFERENCE_CDEF = """
struct wwb_region {
    uint64_t base, size;
    uint64_t commit_start, commit_end;
    int mode;
    ...;
};
struct wwb_writers;
struct wwb_region *wwb_region_new(uint64_t size, uint64_t offset, uint64_t length, int *err);
struct wwb_region *wwb_region_new_mode(uint64_t size, uint64_t offset, uint64_t length,
                                       int mode, int *err);
int wwb_segv_first(void);
void wwb_region_free(struct wwb_region *r);
int64_t wwb_scan_timed(const struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                       uint64_t *out, uint64_t capacity, uint64_t *elapsed_ns);
int64_t wwb_scan(const struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                 uint64_t *out, uint64_t capacity);
int64_t wwb_reset(const struct wwb_region *r, uint64_t start, uint64_t end);
int64_t wwb_memwatch_timed(uint64_t start, uint64_t end, int clear, int64_t *vec,
                           uint64_t vec_len, uint64_t *elapsed_ns);
int64_t wwb_scan_loop(const struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                      uint64_t dirty, uint64_t iterations, uint64_t expected,
                      uint64_t *out, uint64_t capacity, uint64_t *samples);
void wwb_timer_floor(uint64_t iterations, uint64_t *samples);
uint64_t wwb_touch(uint64_t base, const uint32_t *pages, uint64_t count);
struct wwb_writers *wwb_writers_start(uint64_t base, uint64_t npages, int nthreads,
                                      uint64_t seed, uint64_t delay_ns, int *err);
void wwb_writers_stop(struct wwb_writers *w, uint64_t *writes, uint64_t *write_ns);
int64_t wwb_watch_loop(const struct wwb_region *r, uint64_t start, uint64_t end,
                       uint64_t duration_ns, uint64_t period_ns, uint64_t *out,
                       uint64_t capacity, uint64_t *samples, uint64_t max_samples,
                       uint64_t *pages);
"""

reference_builder = FFI()
reference_builder.cdef(REFERENCE_CDEF)
reference_builder.set_source(
    "writewatch.bench._reference",
    (ROOT / "writewatch" / "bench" / "reference.c").read_text(),
    include_dirs=[str(NATIVE)],
    extra_compile_args=["-O2", "-Wall", "-pthread"],
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
    for builder in (ffibuilder, reference_builder):
        builder.compile(tmpdir=str(ROOT), verbose=True)
