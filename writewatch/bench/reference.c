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
 * process_memwatch's raw reference (scenario 8) is the same PAGEMAP_SCAN loop
 * with offsets from the range's start, on the very range writewatch watches
 * (memory it did not allocate, registered by its first call).
 *
 * Beside it, one raw reference per fallback mechanism, tracking the same pages
 * with no Python and none of writewatch's bookkeeping (per-page protections,
 * decommit, deferred faults, counted accesses):
 *
 *   mprotect (as Wine's fallback does it): the committed part is PROT_READ; a
 *     SIGSEGV handler takes the region's mutex, makes the page read-write and
 *     marks it in a byte-per-page dirty array (where vm.max_map_count stops
 *     that, it first protects the whole region again, as writewatch does).
 *     GetWriteWatch collects the dirty bytes under the mutex; with RESET it clears them and re-protects
 *     with one mprotect(PROT_READ) from the first reported page to the last
 *     (pages between are PROT_READ already: the kernel skips them).
 *   uffd: the committed part is registered with a synchronous write-protect
 *     userfaultfd (PAGEFAULT_FLAG_WP, WP_UNPOPULATED where offered) and
 *     write-protected; one native handler thread reads the faults, marks the
 *     page dirty under the region's mutex and removes the protection, which
 *     wakes the writer. RESET re-protects with one UFFDIO_WRITEPROTECT per run
 *     of reported pages, or one from the first reported page to the last
 *     (re-protecting a protected page is harmless) where the runs are so many
 *     that this is cheaper: that call walks every PTE of its range.
 *
 * Compiled at install time beside the extension (build_native.py, cffi API
 * mode) into writewatch.bench._reference, so the benchmark needs no compiler
 * where writewatch is installed from a wheel. Timings are taken here with
 * clock_gettime(CLOCK_MONOTONIC), so no Python runs inside a measured interval.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
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
/* page_region entries per ioctl: the same batch as native/pagemap.c's scan loop. */
#define WWB_SCAN_BATCH 256

/* The mechanism a region is tracked with (the fallbacks' values are
 * writewatch's WW_MODE_*). */
#define WWB_PAGEMAP 0
#define WWB_MPROTECT WW_MODE_MPROTECT
#define WWB_UFFD WW_MODE_UFFD
#define WWB_MAX_FALLBACK_REGIONS 64
/* What one UFFDIO_WRITEPROTECT call costs beside its PTE walk, in PTEs walked
 * (about 1 us a call against about 100 ns a PTE here, 1 GiB: one call per run
 * of dirty pages 3 ms at 1% and 24 ms at 10%, one call over the span 27 ms
 * whatever is dirty): more runs than one per this many pages of the span, and
 * one call over the span is cheaper. */
#define WWB_PTES_PER_CALL 10

struct wwb_region {
    uint64_t base, size;              /* the reservation */
    uint64_t commit_start, commit_end; /* its committed, watched part */
    int mode;                         /* WWB_PAGEMAP, WWB_MPROTECT or WWB_UFFD */
    uint8_t *dirty;                   /* fallbacks: one byte per committed page */
    pthread_mutex_t lock;             /* fallbacks: fault path vs collect-and-reset */
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
                __atomic_store_n(&wwb_pagemap, pagemap, __ATOMIC_RELEASE);
            }
        }
    }
    pthread_mutex_unlock(&wwb_open_mutex);
    return result;
}

/* ---- the fallbacks' raw mechanisms ---- */

static struct wwb_region *wwb_fallbacks[WWB_MAX_FALLBACK_REGIONS]; /* for the fault paths */
static int wwb_sync_uffd = -1;     /* the synchronous write-protect userfaultfd */
static uint64_t wwb_sync_features; /* what it was given */
static struct sigaction wwb_prev_segv;
static __thread int wwb_in_chain __attribute__((tls_model("initial-exec")));

static struct wwb_region *fallback_of(uint64_t address)
{
    for (int i = 0; i < WWB_MAX_FALLBACK_REGIONS; i++) {
        struct wwb_region *r = __atomic_load_n(&wwb_fallbacks[i], __ATOMIC_ACQUIRE);
        if (r && address >= r->commit_start && address < r->commit_end)
            return r;
    }
    return NULL;
}

static int fallback_add(struct wwb_region *r)
{
    for (int i = 0; i < WWB_MAX_FALLBACK_REGIONS; i++) {
        struct wwb_region *empty = NULL;
        if (__atomic_compare_exchange_n(&wwb_fallbacks[i], &empty, r, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 0;
    }
    return -ENOMEM;
}

static void fallback_remove(struct wwb_region *r)
{
    for (int i = 0; i < WWB_MAX_FALLBACK_REGIONS; i++) {
        struct wwb_region *mine = r;
        __atomic_compare_exchange_n(&wwb_fallbacks[i], &mine, NULL, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
}

/* Not ours: whatever handler was there before (writewatch's own, when its
 * mprotect backend runs in this process too). A fault coming back here while
 * we pass it on (two handlers passing it to each other) is nobody's: the
 * default action, which kills on the repeated fault. */
static void wwb_chain_segv(int sig, siginfo_t *info, void *context)
{
    if (!wwb_in_chain) {
        wwb_in_chain = 1;
        if (wwb_prev_segv.sa_flags & SA_SIGINFO) {
            wwb_prev_segv.sa_sigaction(sig, info, context);
            wwb_in_chain = 0;
            return;
        }
        if (wwb_prev_segv.sa_handler != SIG_DFL && wwb_prev_segv.sa_handler != SIG_IGN) {
            wwb_prev_segv.sa_handler(sig);
            wwb_in_chain = 0;
            return;
        }
        wwb_in_chain = 0;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

/* Wine's write-watch fault: the page becomes writable and is marked written. */
static void wwb_segv_handler(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    uint64_t page = (uint64_t)(uintptr_t)info->si_addr & ~(uint64_t)(WW_PAGE_SIZE - 1);
    struct wwb_region *r = info->si_code == SEGV_ACCERR ? fallback_of(page) : NULL;
    if (r && r->mode == WWB_MPROTECT) {
        uint64_t i = (page - r->commit_start) / WW_PAGE_SIZE;
        void *at = (void *)(uintptr_t)page;
        pthread_mutex_lock(&r->lock);
        /* Too many mappings (vm.max_map_count: every writable page among
         * read-only ones is a mapping of its own): protect the whole region
         * again so that it merges back; written pages keep their mark and
         * fault once more. */
        if (mprotect(at, WW_PAGE_SIZE, PROT_READ | PROT_WRITE) && errno == ENOMEM
            && !mprotect((void *)(uintptr_t)r->commit_start, r->commit_end - r->commit_start,
                         PROT_READ))
            mprotect(at, WW_PAGE_SIZE, PROT_READ | PROT_WRITE);
        r->dirty[i] = 1;
        pthread_mutex_unlock(&r->lock);
    } else {
        wwb_chain_segv(sig, info, context);
    }
    errno = saved_errno;
}

/* Put the reference's SIGSEGV handler first (writewatch's mprotect backend
 * puts its own first on each of its calls); the one it displaces is chained. */
int wwb_segv_first(void)
{
    struct sigaction current, action;
    if (sigaction(SIGSEGV, NULL, &current))
        return -errno;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == wwb_segv_handler)
        return 0;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = wwb_segv_handler;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGSEGV, &action, &wwb_prev_segv) ? -errno : 0;
}

static int uffd_wp(uint64_t start, uint64_t length, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = { .start = start, .len = length },
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(wwb_sync_uffd, UFFDIO_WRITEPROTECT, &wp) ? -errno : 0;
}

/* The handler thread: mark the page written, then let the writer go. */
static void *wwb_uffd_handler(void *arg)
{
    (void)arg;
    struct uffd_msg messages[64];
    for (;;) {
        struct pollfd ready = { .fd = wwb_sync_uffd, .events = POLLIN };
        if (poll(&ready, 1, -1) < 0 && errno != EINTR)
            return NULL;
        ssize_t got = read(wwb_sync_uffd, messages, sizeof messages);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            return NULL;
        }
        for (size_t k = 0; k < (size_t)got / sizeof messages[0]; k++) {
            if (messages[k].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t page = messages[k].pagefault_address & ~(uint64_t)(WW_PAGE_SIZE - 1);
            struct wwb_region *r = fallback_of(page);
            if (r) {
                pthread_mutex_lock(&r->lock);
                r->dirty[(page - r->commit_start) / WW_PAGE_SIZE] = 1;
                uffd_wp(page, WW_PAGE_SIZE, 0); /* wakes the writer */
                pthread_mutex_unlock(&r->lock);
            } else {
                struct uffdio_range range = { .start = page, .len = WW_PAGE_SIZE };
                ioctl(wwb_sync_uffd, UFFDIO_WAKE, &range);
            }
        }
    }
}

/* The synchronous write-protect userfaultfd and its handler thread, once. */
static int open_sync_uffd(void)
{
    int result = 0;
    pthread_mutex_lock(&wwb_open_mutex);
    if (wwb_sync_uffd < 0) {
        long fd = syscall(WW_NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
        if (fd < 0 && errno == EINVAL)
            fd = syscall(WW_NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK);
        struct uffdio_api probe = { .api = UFFD_API, .features = 0 };
        if (fd < 0 || ioctl((int)fd, UFFDIO_API, &probe)) {
            result = -errno;
        } else {
            /* The API handshake is once per descriptor: probe, then open anew. */
            close((int)fd);
            fd = syscall(WW_NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
            if (fd < 0 && errno == EINVAL)
                fd = syscall(WW_NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK);
            struct uffdio_api api = {
                .api = UFFD_API,
                .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP
                    | (probe.features & UFFD_FEATURE_WP_UNPOPULATED),
            };
            pthread_t thread;
            pthread_attr_t attr;
            sigset_t all, old;
            if (fd < 0 || ioctl((int)fd, UFFDIO_API, &api)) {
                result = -errno;
            } else {
                wwb_sync_uffd = (int)fd;
                wwb_sync_features = api.features;
                pthread_attr_init(&attr);
                pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
                sigfillset(&all);
                pthread_sigmask(SIG_SETMASK, &all, &old);
                result = -pthread_create(&thread, &attr, wwb_uffd_handler, NULL);
                pthread_sigmask(SIG_SETMASK, &old, NULL);
                pthread_attr_destroy(&attr);
            }
        }
        if (result && fd >= 0 && wwb_sync_uffd != (int)fd)
            close((int)fd);
    }
    pthread_mutex_unlock(&wwb_open_mutex);
    return result;
}

/* Watch [start, start + length) with a fallback mechanism: armed, nothing written. */
static int fallback_arm(struct wwb_region *r, uint64_t length)
{
    uint64_t start = r->commit_start;
    if (r->mode == WWB_MPROTECT)
        return wwb_segv_first() ? -errno
            : mprotect((void *)(uintptr_t)start, length, PROT_READ) ? -errno : 0;
    int result = open_sync_uffd();
    if (result)
        return result;
    struct uffdio_register reg = {
        .range = { .start = start, .len = length },
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (mprotect((void *)(uintptr_t)start, length, PROT_READ | PROT_WRITE)
        || ioctl(wwb_sync_uffd, UFFDIO_REGISTER, &reg))
        return -errno;
    if (!(wwb_sync_features & UFFD_FEATURE_WP_UNPOPULATED))
        for (uint64_t a = start; a < start + length; a += WW_PAGE_SIZE)
            __atomic_fetch_or((uint8_t *)(uintptr_t)a, 0, __ATOMIC_RELAXED);
    return uffd_wp(start, length, 1);
}

/*
 * Reserve size bytes (64 KiB aligned) and commit [offset, offset + length) of
 * them as the pagemap backend commits write-watch pages (mode WWB_PAGEMAP),
 * or watched by a fallback mechanism (WWB_MPROTECT, WWB_UFFD). NULL with *err
 * set (an errno) on failure.
 */
struct wwb_region *wwb_region_new_mode(uint64_t size, uint64_t offset, uint64_t length,
                                       int mode, int *err)
{
    struct wwb_region *r = calloc(1, sizeof *r);
    int result = !r ? -ENOMEM : mode == WWB_PAGEMAP ? open_kernel()
        : mode == WWB_MPROTECT || mode == WWB_UFFD ? 0 : -EINVAL;
    if (!result && mode != WWB_PAGEMAP) {
        r->dirty = calloc(length / WW_PAGE_SIZE + 1, 1);
        result = r->dirty ? 0 : -ENOMEM;
    }
    if (result) {
        if (r)
            free(r->dirty);
        free(r);
        *err = -result;
        return NULL;
    }
    r->mode = mode;
    pthread_mutex_init(&r->lock, NULL);
    uint64_t span = size + WWB_GRANULARITY - WW_PAGE_SIZE;
    void *got = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (got == MAP_FAILED) {
        *err = errno;
        free(r->dirty);
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

    if (mode != WWB_PAGEMAP) {
        result = madvise((void *)(uintptr_t)start, size, MADV_NOHUGEPAGE) ? -errno
            : fallback_add(r);
        if (!result) {
            result = fallback_arm(r, length);
            if (result)
                fallback_remove(r);
        }
        if (result) {
            *err = -result;
            munmap((void *)(uintptr_t)start, size);
            free(r->dirty);
            free(r);
            return NULL;
        }
        *err = 0;
        return r;
    }
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

struct wwb_region *wwb_region_new(uint64_t size, uint64_t offset, uint64_t length, int *err)
{
    return wwb_region_new_mode(size, offset, length, WWB_PAGEMAP, err);
}

void wwb_region_free(struct wwb_region *r)
{
    struct uffdio_range range = { .start = r->commit_start, .len = r->commit_end - r->commit_start };
    if (r->mode == WWB_PAGEMAP)
        ioctl(wwb_uffd, UFFDIO_UNREGISTER, &range);
    else if (r->mode == WWB_UFFD)
        ioctl(wwb_sync_uffd, UFFDIO_UNREGISTER, &range); /* wakes any writer still waiting */
    if (r->mode != WWB_PAGEMAP) {
        /* Unwatched first, so a late fault finds no region; then unmapped. */
        pthread_mutex_lock(&r->lock);
        fallback_remove(r);
        pthread_mutex_unlock(&r->lock);
    }
    munmap((void *)(uintptr_t)r->base, r->size);
    free(r->dirty);
    free(r);
}

/* Before a fallback region is written or scanned: its fault handler first. */
static void before_use(const struct wwb_region *r)
{
    if (r->mode == WWB_MPROTECT)
        wwb_segv_first();
}

/* Re-arm the written pages [first, last) of r (indices) after a collect; lock held. */
static int fallback_rearm(struct wwb_region *r, uint64_t first, uint64_t last)
{
    uint64_t start = r->commit_start + first * WW_PAGE_SIZE, length = (last - first) * WW_PAGE_SIZE;
    if (r->mode == WWB_MPROTECT)
        return mprotect((void *)(uintptr_t)start, length, PROT_READ) ? -errno : 0;
    return uffd_wp(start, length, 1);
}

/*
 * GetWriteWatch on a fallback's raw mechanism: the dirty pages of [start, end)
 * as addresses, ascending; with reset, cleared and re-armed under the lock.
 */
static int64_t fallback_scan(struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                             uint64_t *out, uint64_t capacity)
{
    if (start < r->commit_start)
        start = r->commit_start;
    if (end > r->commit_end)
        end = r->commit_end;
    if (start >= end)
        return 0;
    uint64_t first = (start - r->commit_start) / WW_PAGE_SIZE;
    uint64_t last = (end - r->commit_start) / WW_PAGE_SIZE;
    uint64_t count = 0, lo = UINT64_MAX, hi = 0, runs = 0;
    int result = 0;
    pthread_mutex_lock(&r->lock);
    for (uint64_t i = first; i < last && count < capacity; i++) {
        if (!r->dirty[i])
            continue;
        out[count++] = r->commit_start + i * WW_PAGE_SIZE;
        if (reset) {
            r->dirty[i] = 0;
            runs += lo == UINT64_MAX || hi + 1 != i;
            lo = lo == UINT64_MAX ? i : lo;
            hi = i;
        }
    }
    if (reset && lo != UINT64_MAX) {
        /* One call over the reported span, unless it is mostly clean pages
         * that a call per run would skip (an uffd write-protect walks every
         * PTE of its range; an mprotect skips runs already PROT_READ). */
        if (r->mode == WWB_MPROTECT || runs * WWB_PTES_PER_CALL >= hi + 1 - lo) {
            result = fallback_rearm(r, lo, hi + 1);
        } else {
            /* out holds the reported pages, ascending: one call per run. */
            for (uint64_t k = 0, run = 0; k < count && !result; k++) {
                if (k + 1 < count && out[k + 1] == out[k] + WW_PAGE_SIZE)
                    continue;
                result = fallback_rearm(r, (out[run] - r->commit_start) / WW_PAGE_SIZE,
                                        (out[k] - r->commit_start) / WW_PAGE_SIZE + 1);
                run = k + 1;
            }
        }
    }
    pthread_mutex_unlock(&r->lock);
    return result ? result : (int64_t)count;
}

/*
 * The raw PAGEMAP_SCAN loop: the written pages of [start, end) as (address -
 * origin) into out[0..capacity), ascending; with reset, re-protected in the
 * same walk. Returns the count or -errno.
 */
static int64_t pagemap_collect(uint64_t start, uint64_t end, int reset, uint64_t *out,
                               uint64_t capacity, uint64_t origin)
{
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
                out[count++] = page - origin;
        if (arg.walk_end <= start)
            return -EIO;
        start = arg.walk_end;
    }
    return (int64_t)count;
}

/*
 * GetWriteWatch, raw: the written pages of [start, end) as addresses into
 * out[0..capacity), ascending; with reset, re-protected in the same walk.
 * Returns the count or -errno.
 */
int64_t wwb_scan(const struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                 uint64_t *out, uint64_t capacity)
{
    if (r->mode != WWB_PAGEMAP)
        return fallback_scan((struct wwb_region *)r, start, end, reset, out, capacity);
    return pagemap_collect(start, end, reset, out, capacity, 0);
}

/*
 * process_memwatch's GET (with CLEAR when clear is set), raw, on any range
 * this process registered for async write-protect (whoever registered it):
 * the written pages of [start, end) as byte offsets from start, timed alone
 * into *elapsed_ns. Returns the count or -errno.
 */
int64_t wwb_memwatch_timed(uint64_t start, uint64_t end, int clear, int64_t *vec,
                           uint64_t vec_len, uint64_t *elapsed_ns)
{
    /* Opened once (the read outside the lock only skips the lock after). */
    int result = __atomic_load_n(&wwb_pagemap, __ATOMIC_ACQUIRE) < 0 ? open_kernel() : 0;
    if (result)
        return result;
    uint64_t t0 = now_ns();
    int64_t n = pagemap_collect(start, end, clear, (uint64_t *)vec, vec_len, start);
    *elapsed_ns = now_ns() - t0;
    return n;
}

/* wwb_scan, timed: *elapsed_ns is the time of the scan alone. */
int64_t wwb_scan_timed(const struct wwb_region *r, uint64_t start, uint64_t end, int reset,
                       uint64_t *out, uint64_t capacity, uint64_t *elapsed_ns)
{
    before_use(r);
    uint64_t t0 = now_ns();
    int64_t n = wwb_scan(r, start, end, reset, out, capacity);
    *elapsed_ns = now_ns() - t0;
    return n;
}

/* ResetWriteWatch, raw: one walk re-protecting every page, no output. */
int64_t wwb_reset(const struct wwb_region *r, uint64_t start, uint64_t end)
{
    before_use(r);
    if (r->mode != WWB_PAGEMAP) {
        struct wwb_region *w = (struct wwb_region *)r;
        start = start > r->commit_start ? start : r->commit_start;
        end = end < r->commit_end ? end : r->commit_end;
        if (start >= end)
            return 0;
        uint64_t first = (start - r->commit_start) / WW_PAGE_SIZE;
        uint64_t last = (end - r->commit_start) / WW_PAGE_SIZE;
        pthread_mutex_lock(&w->lock);
        memset(w->dirty + first, 0, last - first);
        int result = fallback_rearm(w, first, last);
        pthread_mutex_unlock(&w->lock);
        return result;
    }
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
    before_use(r);
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
    before_use(r);
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
