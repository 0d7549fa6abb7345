/*
 * The raw C reference of writewatch's benchmarks (python -m writewatch bench),
 * and the C code every benchmark's writes come from.
 *
 * The reference makes the kernel calls the pagemap backend makes, set up the
 * way it sets them up, with no Python anywhere: a 64 KiB-aligned PROT_NONE
 * MAP_NORESERVE reservation with MADV_NOHUGEPAGE, its committed part
 * registered with a userfaultfd in async write-protect mode (WP_ASYNC |
 * WP_UNPOPULATED), write-protected and made read-write; GetWriteWatch is
 * PAGEMAP_SCAN with category_mask = return_mask = PAGE_IS_WRITTEN, max_pages =
 * the room left, PM_SCAN_WP_MATCHING for RESET, 256 page_region entries per
 * ioctl, expanded into an array of page addresses.
 *
 * Compiled at bench time by writewatch/bench.py (cffi API mode, cached under
 * the temporary directory, keyed by a hash of this file and _abi.h); it is not
 * part of the installed extension. Timings are taken here with
 * clock_gettime(CLOCK_MONOTONIC), so no Python runs inside a measured interval.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include "abi.h"

#define WWB_GRANULARITY 0x10000u
/* page_region entries per ioctl: the same batch as _helpers.c's scan loop. */
#define WWB_SCAN_BATCH 256

struct wwb_region {
    uint64_t base, size;              /* the reservation */
    uint64_t commit_start, commit_end; /* its committed, watched part */
};

static int wwb_uffd = -1;
static int wwb_pagemap = -1;
static pthread_mutex_t wwb_open_mutex = PTHREAD_MUTEX_INITIALIZER;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000u),
                           .tv_nsec = (long)(ns % 1000000000u) };
    while (nanosleep(&ts, &ts) && errno == EINTR)
        ;
}

/* This process's userfaultfd (async write-protect) and pagemap descriptor,
 * opened once, as the pagemap backend opens its own. */
static int open_kernel(void)
{
    int result = 0;
    pthread_mutex_lock(&wwb_open_mutex);
    if (wwb_pagemap < 0) {
        long fd = syscall(WW_NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
        if (fd < 0 && errno == EINVAL) /* before Linux 5.11 */
            fd = syscall(WW_NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK);
        struct uffdio_api api = {
            .api = UFFD_API,
            .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
        };
        if (fd < 0) {
            result = -errno;
        } else if (ioctl((int)fd, UFFDIO_API, &api)) {
            result = -errno;
            close((int)fd);
        } else {
            int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
            if (pagemap < 0) {
                result = -errno;
                close((int)fd);
            } else {
                wwb_uffd = (int)fd;
                wwb_pagemap = pagemap;
            }
        }
    }
    pthread_mutex_unlock(&wwb_open_mutex);
    return result;
}

/*
 * Reserve size bytes (64 KiB aligned) and commit [offset, offset + length) of
 * them as the pagemap backend commits write-watch pages. NULL with *err set
 * (an errno) on failure.
 */
struct wwb_region *wwb_region_new(uint64_t size, uint64_t offset, uint64_t length, int *err)
{
    struct wwb_region *r = calloc(1, sizeof *r);
    int result = r ? open_kernel() : -ENOMEM;
    if (result) {
        free(r);
        *err = -result;
        return NULL;
    }
    uint64_t span = size + WWB_GRANULARITY - WW_PAGE_SIZE;
    void *got = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (got == MAP_FAILED) {
        *err = errno;
        free(r);
        return NULL;
    }
    uint64_t start = ((uint64_t)(uintptr_t)got + WWB_GRANULARITY - 1) & ~(uint64_t)(WWB_GRANULARITY - 1);
    if (start > (uint64_t)(uintptr_t)got)
        munmap(got, start - (uint64_t)(uintptr_t)got);
    if ((uint64_t)(uintptr_t)got + span > start + size)
        munmap((void *)(uintptr_t)(start + size), (uint64_t)(uintptr_t)got + span - start - size);
    r->base = start;
    r->size = size;
    r->commit_start = start + offset;
    r->commit_end = start + offset + length;

    struct uffdio_register reg = {
        .range = { .start = r->commit_start, .len = length },
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    struct uffdio_writeprotect wp = {
        .range = { .start = r->commit_start, .len = length },
        .mode = UFFDIO_WRITEPROTECT_MODE_WP,
    };
    if (madvise((void *)(uintptr_t)start, size, MADV_NOHUGEPAGE)
        || ioctl(wwb_uffd, UFFDIO_REGISTER, &reg)
        || ioctl(wwb_uffd, UFFDIO_WRITEPROTECT, &wp)
        || mprotect((void *)(uintptr_t)r->commit_start, length, PROT_READ | PROT_WRITE)) {
        *err = errno;
        munmap((void *)(uintptr_t)start, size);
        free(r);
        return NULL;
    }
    *err = 0;
    return r;
}

void wwb_region_free(struct wwb_region *r)
{
    struct uffdio_range range = { .start = r->commit_start, .len = r->commit_end - r->commit_start };
    ioctl(wwb_uffd, UFFDIO_UNREGISTER, &range);
    munmap((void *)(uintptr_t)r->base, r->size);
    free(r);
}

/*
 * GetWriteWatch, raw: the written pages of [start, end) as addresses into
 * out[0..capacity), ascending; with reset, re-protected in the same walk.
 * Returns the count or -errno.
 */
int64_t wwb_scan(const struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                 uint64_t *out, uint64_t capacity)
{
    (void)r;
    struct page_region batch[WWB_SCAN_BATCH];
    struct pm_scan_arg arg;
    uint64_t count = 0;
    while (start < end && count < capacity) {
        memset(&arg, 0, sizeof arg);
        arg.size = sizeof arg;
        arg.flags = reset ? PM_SCAN_WP_MATCHING : 0;
        arg.start = start;
        arg.end = end;
        arg.vec = (uint64_t)(uintptr_t)batch;
        arg.vec_len = WWB_SCAN_BATCH;
        arg.max_pages = capacity - count;
        arg.category_mask = PAGE_IS_WRITTEN;
        arg.return_mask = PAGE_IS_WRITTEN;
        long n = ioctl(wwb_pagemap, PAGEMAP_SCAN, &arg);
        if (n < 0)
            return -errno;
        for (long i = 0; i < n; i++)
            for (uint64_t page = batch[i].start; page < batch[i].end && count < capacity;
                 page += WW_PAGE_SIZE)
                out[count++] = page;
        if (arg.walk_end <= start)
            return -EIO;
        start = arg.walk_end;
    }
    return (int64_t)count;
}

/* wwb_scan, timed: *elapsed_ns is the time of the scan alone. */
int64_t wwb_scan_timed(const struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                       uint64_t *out, uint64_t capacity, uint64_t *elapsed_ns)
{
    uint64_t t0 = now_ns();
    int64_t n = wwb_scan(r, start, end, reset, out, capacity);
    *elapsed_ns = now_ns() - t0;
    return n;
}

/* ResetWriteWatch, raw: one walk re-protecting every page, no output. */
int64_t wwb_reset(const struct wwb_region *r, uint64_t start, uint64_t end)
{
    (void)r;
    struct pm_scan_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.size = sizeof arg;
    arg.flags = PM_SCAN_WP_MATCHING;
    arg.start = start;
    arg.end = end;
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    return ioctl(wwb_pagemap, PAGEMAP_SCAN, &arg) < 0 ? -errno : 0;
}

/*
 * The small-call loop: iterations GetWriteWatch calls on [start, end), each
 * timed alone into samples[i]; before each, when dirty is nonzero, one byte is
 * written at that address (outside the timed interval). Returns how many calls
 * found exactly `expected` pages, or -errno.
 */
int64_t wwb_scan_loop(const struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                      uint64_t dirty, uint64_t iterations, uint64_t expected,
                      uint64_t *out, uint64_t capacity, uint64_t *samples)
{
    int64_t right = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        if (dirty)
            *(volatile uint8_t *)(uintptr_t)dirty = (uint8_t)i;
        uint64_t t0 = now_ns();
        int64_t n = wwb_scan(r, start, end, reset, out, capacity);
        samples[i] = now_ns() - t0;
        if (n < 0)
            return n;
        right += (uint64_t)n == expected;
    }
    return right;
}

/* Empty timed intervals: what the two clock reads add to each sample. */
void wwb_timer_floor(uint64_t iterations, uint64_t *samples)
{
    for (uint64_t i = 0; i < iterations; i++) {
        uint64_t t0 = now_ns();
        samples[i] = now_ns() - t0;
    }
}

/*
 * Write one byte to each of count pages of base: page pages[i] (an index) in
 * that order, or pages 0..count-1 when pages is NULL. Returns the elapsed ns
 * of the whole loop.
 */
uint64_t wwb_touch(uint64_t base, const uint32_t *pages, uint64_t count)
{
    uint64_t t0 = now_ns();
    if (pages) {
        for (uint64_t i = 0; i < count; i++)
            *(volatile uint8_t *)(uintptr_t)(base + (uint64_t)pages[i] * WW_PAGE_SIZE) = (uint8_t)(i + 1);
    } else {
        for (uint64_t i = 0; i < count; i++)
            *(volatile uint8_t *)(uintptr_t)(base + i * WW_PAGE_SIZE) = (uint8_t)(i + 1);
    }
    return now_ns() - t0;
}

/* ---- Wine's microbenchmark shape: writer threads on random pages ---- */

struct wwb_writer {
    pthread_t tid;
    struct wwb_writers *owner;
    uint64_t seed;
    uint64_t writes, write_ns; /* read after join */
};

struct wwb_writers {
    uint64_t base, npages, delay_ns;
    int nthreads;
    int stop; /* atomic */
    struct wwb_writer threads[];
};

static uint64_t xorshift64(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

/* Each write of a random page is timed alone (two clock reads around one
 * store); then the thread sleeps delay_ns (timer slack 1 ns so the delay is
 * what was asked, not the default 50 us). */
static void *writer_main(void *arg)
{
    struct wwb_writer *t = arg;
    struct wwb_writers *w = t->owner;
    uint64_t state = t->seed, writes = 0, total = 0;
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    while (!__atomic_load_n(&w->stop, __ATOMIC_RELAXED)) {
        uint64_t page = (xorshift64(&state) >> 11) % w->npages;
        volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(w->base + page * WW_PAGE_SIZE + (writes & 63) * 64);
        uint64_t t0 = now_ns();
        *p = (uint8_t)writes;
        total += now_ns() - t0;
        writes++;
        if (w->delay_ns)
            sleep_ns(w->delay_ns);
    }
    t->writes = writes;
    t->write_ns = total;
    return NULL;
}

static void writers_join(struct wwb_writers *w, int started, uint64_t *writes, uint64_t *write_ns)
{
    uint64_t count = 0, total = 0;
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < started; i++) {
        pthread_join(w->threads[i].tid, NULL);
        count += w->threads[i].writes;
        total += w->threads[i].write_ns;
    }
    *writes = count;
    *write_ns = total;
    free(w);
}

struct wwb_writers *wwb_writers_start(uint64_t base, uint64_t npages, int nthreads, uint64_t seed,
                                      uint64_t delay_ns, int *err)
{
    if (npages == 0 || nthreads <= 0) {
        *err = EINVAL;
        return NULL;
    }
    struct wwb_writers *w = calloc(1, sizeof *w + (size_t)nthreads * sizeof w->threads[0]);
    if (!w) {
        *err = ENOMEM;
        return NULL;
    }
    w->base = base;
    w->npages = npages;
    w->delay_ns = delay_ns;
    w->nthreads = nthreads;
    for (int i = 0; i < nthreads; i++) {
        struct wwb_writer *t = &w->threads[i];
        uint64_t unused;
        t->owner = w;
        t->seed = (seed * 0x9E3779B97F4A7C15ull + (uint64_t)i * 0xBF58476D1CE4E5B9ull) | 1;
        int rc = pthread_create(&t->tid, NULL, writer_main, t);
        if (rc) {
            writers_join(w, i, &unused, &unused);
            *err = rc;
            return NULL;
        }
    }
    *err = 0;
    return w;
}

/* Stop and join the writers: the number of writes and their summed time. */
void wwb_writers_stop(struct wwb_writers *w, uint64_t *writes, uint64_t *write_ns)
{
    writers_join(w, w->nthreads, writes, write_ns);
}

/*
 * The watcher side of Wine's shape, raw: for duration_ns, GetWriteWatch with
 * RESET over [start, end) then a sleep of period_ns. Returns the number of
 * calls (each one's ns in samples[i] while i < max_samples) or -errno;
 * *pages is the sum of their counts.
 */
int64_t wwb_watch_loop(const struct wwb_region *r, uint64_t start, uint64_t end,
                       uint64_t duration_ns, uint64_t period_ns, uint64_t *out,
                       uint64_t capacity, uint64_t *samples, uint64_t max_samples,
                       uint64_t *pages)
{
    uint64_t stop = now_ns() + duration_ns, calls = 0;
    *pages = 0;
    while (now_ns() < stop) {
        uint64_t t0 = now_ns();
        int64_t n = wwb_scan(r, start, end, 1, out, capacity);
        uint64_t elapsed = now_ns() - t0;
        if (n < 0)
            return n;
        if (calls < max_samples)
            samples[calls] = elapsed;
        calls++;
        *pages += (uint64_t)n;
        sleep_ns(period_ns);
    }
    return (int64_t)calls;
}
