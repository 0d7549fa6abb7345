"""Native writer threads for concurrency tests (a helper, not a test module).

``NativeWriters(base, npages, nthreads, seed)`` starts nthreads plain pthreads
that write into [base, base + npages * 4096) until stopped. Each thread has its
own xorshift64 state; every iteration it picks a pseudo-random page and a random
8-byte aligned slot in it and stores its own incrementing 64-bit counter there
(a volatile store, so every write really reaches memory), then, if pause_ns is
set, busy-waits that long. The threads never touch the GIL: the main thread can
poll GetWriteWatch while they write.

Dense writing (no pause) re-dirties every page continuously, which hides lost
writes: a page whose write was wrongly reset is simply written again. A pause of
a microsecond or so leaves each page's last write at a random moment, so a test
comparing final contents can see a write that was dropped.

    with NativeWriters(base, 256, nthreads=2, seed=7) as writers:
        ...                      # memory changes under your feet
        done = writers.stop()    # join; the number of stores made

Stop the writers before freeing the memory they write to (leaving the ``with``
block does it). The C part is compiled once with cffi (API mode) into a cache
directory under tempfile.gettempdir(), keyed by a hash of its source
(writewatch.testing.cbuild).
"""

from __future__ import annotations

import os
from types import TracebackType

from writewatch.testing.cbuild import build_cached

_CDEF = """
struct nw_writers;
struct nw_writers *nw_start(uint64_t base, uint64_t npages, int nthreads, uint64_t seed,
                            uint64_t pause_ns, int *err);
uint64_t nw_writes(struct nw_writers *w);
uint64_t nw_stop(struct nw_writers *w);
"""

_SOURCE = r"""
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define NW_PAGE 4096u

struct nw_writers;

struct nw_thread {
    pthread_t tid;
    struct nw_writers *owner;
    uint64_t seed;
    uint64_t writes;            /* atomic: read by nw_writes while running */
};

struct nw_writers {
    uintptr_t base;
    uint64_t npages;
    uint64_t pause_ns;          /* busy-wait after each store (0: none) */
    int nthreads;
    int stop;                   /* atomic */
    struct nw_thread threads[];
};

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t xorshift64(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

static uint64_t nw_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *nw_run(void *arg)
{
    struct nw_thread *t = arg;
    struct nw_writers *w = t->owner;
    uint64_t state = t->seed, counter = 0;

    while (!__atomic_load_n(&w->stop, __ATOMIC_RELAXED)) {
        uint64_t r = xorshift64(&state);
        uint64_t page = (r >> 9) % w->npages;
        uint64_t slot = r & (NW_PAGE / 8 - 1);
        volatile uint64_t *p = (volatile uint64_t *)(w->base + page * NW_PAGE + slot * 8);
        *p = ++counter;
        __atomic_store_n(&t->writes, counter, __ATOMIC_RELAXED);
        if (w->pause_ns) {
            uint64_t until = nw_now_ns() + w->pause_ns;
            while (nw_now_ns() < until && !__atomic_load_n(&w->stop, __ATOMIC_RELAXED))
                ;
        }
    }
    return NULL;
}

static uint64_t nw_join(struct nw_writers *w, int started)
{
    uint64_t total = 0;
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < started; i++) {
        pthread_join(w->threads[i].tid, NULL);
        total += w->threads[i].writes;
    }
    free(w);
    return total;
}

struct nw_writers *nw_start(uint64_t base, uint64_t npages, int nthreads, uint64_t seed,
                            uint64_t pause_ns, int *err)
{
    struct nw_writers *w;

    if (npages == 0 || nthreads <= 0) {
        *err = EINVAL;
        return NULL;
    }
    w = calloc(1, sizeof *w + (size_t)nthreads * sizeof w->threads[0]);
    if (!w) {
        *err = ENOMEM;
        return NULL;
    }
    w->base = (uintptr_t)base;
    w->npages = npages;
    w->pause_ns = pause_ns;
    w->nthreads = nthreads;
    for (int i = 0; i < nthreads; i++) {
        struct nw_thread *t = &w->threads[i];
        t->owner = w;
        t->seed = splitmix64(seed * 1000003u + (uint64_t)i) | 1;  /* xorshift: never 0 */
        int rc = pthread_create(&t->tid, NULL, nw_run, t);
        if (rc) {
            nw_join(w, i);
            *err = rc;
            return NULL;
        }
    }
    *err = 0;
    return w;
}

uint64_t nw_writes(struct nw_writers *w)
{
    uint64_t total = 0;
    for (int i = 0; i < w->nthreads; i++)
        total += __atomic_load_n(&w->threads[i].writes, __ATOMIC_RELAXED);
    return total;
}

uint64_t nw_stop(struct nw_writers *w)
{
    return nw_join(w, w->nthreads);
}
"""


# cbuild imports cffi only when called: a missing cffi fails only the tests
# importing this module.
_native = build_cached("native_writers", _CDEF, _SOURCE,
                       extra_compile_args=["-O2", "-Wall", "-pthread"], libraries=["pthread"])
ffi, lib = _native.ffi, _native.lib


class NativeWriters:
    """nthreads pthreads storing counters into random 8-byte slots of random
    pages of [base, base + npages * 4096) until stop(), each pausing pause_ns
    (busy-wait) after every store. A context manager: leaving the block stops
    them."""

    def __init__(self, base: int, npages: int, nthreads: int = 2, seed: int = 1,
                 pause_ns: int = 0) -> None:
        err = ffi.new("int *")
        handle = lib.nw_start(base, npages, nthreads, seed & (2**64 - 1), pause_ns, err)
        if handle == ffi.NULL:
            raise OSError(err[0], f"cannot start {nthreads} writer threads: "
                                  f"{os.strerror(err[0])}")
        self._handle = handle
        self.total: int | None = None  # the number of stores, once stopped

    @property
    def running(self) -> bool:
        return self._handle is not None

    def writes(self) -> int:
        """Stores made so far (a running total while the threads run)."""
        return self.total if self._handle is None else int(lib.nw_writes(self._handle))

    def stop(self) -> int:
        """Stop and join the threads; returns the number of stores they made.
        Calling it again returns the same number."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self.total = int(lib.nw_stop(handle))
        assert self.total is not None
        return self.total

    def __enter__(self) -> NativeWriters:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:
        # Never leave threads writing into memory that may be freed next.
        if getattr(self, "_handle", None) is not None:
            self.stop()
