/*
 * PAGEMAP_SCAN (Linux 6.7) on /proc/PID/pagemap: the pagemap backend's scans.
 * A page reads written once its page-table entry lost the userfaultfd async
 * write-protect bit; PM_SCAN_WP_MATCHING puts the bit back in the same walk.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <unistd.h>

#include "abi.h"

/* page_region entries fetched per ioctl; the loop goes on from walk_end. */
#define WW_SCAN_BATCH 256

static void scan_arg_init(struct pm_scan_arg *arg, uint64_t start, uint64_t end)
{
    memset(arg, 0, sizeof *arg);
    arg->size = sizeof *arg;
    arg->start = start;
    arg->end = end;
    /* Exactly WRITTEN/WRITTEN: the kernel's fast path (see ww_pagemap_scan). */
    arg->category_mask = PAGE_IS_WRITTEN;
    arg->return_mask = PAGE_IS_WRITTEN;
}

/* A scan of [start, end) selecting what filter says (the caller sets the
 * return mask and the vec). */
static void filter_arg_init(struct pm_scan_arg *arg, uint64_t start, uint64_t end,
                            const struct ww_scan_filter *filter)
{
    memset(arg, 0, sizeof *arg);
    arg->size = sizeof *arg;
    arg->start = start;
    arg->end = end;
    arg->flags = filter->flags;
    arg->category_mask = filter->mask;
    arg->category_inverted = filter->inverted;
    arg->category_anyof_mask = filter->anyof;
}

/*
 * The pages of [start, end) that filter selects (its masks; flags PM_SCAN_*)
 * go into out[0..capacity) as (page address - origin), ascending; out may be
 * NULL to only count them (a WP_MATCHING walk that reports nothing). With
 * PM_SCAN_WP_MATCHING each selected page is write-protected again in the same
 * page-table walk (atomic per page); the walk stops when capacity pages were
 * selected, so pages past that point keep their state.
 * Returns the number selected, or -errno; *walk_end is where the walk stopped
 * (end when the whole range was walked).
 */
int64_t ww_pagemap_select(int pagemap_fd, uint64_t start, uint64_t end,
                          const struct ww_scan_filter *filter, uint64_t *out,
                          uint64_t capacity, uint64_t origin, uint64_t *walk_end)
{
    struct page_region batch[WW_SCAN_BATCH];
    struct pm_scan_arg arg;
    uint64_t count = 0;

    *walk_end = start;
    while (start < end && count < capacity) {
        filter_arg_init(&arg, start, end, filter);
        arg.return_mask = filter->mask ? filter->mask : PAGE_IS_WPALLOWED;
        /* Always a vec: without one, WP_MATCHING protects every page and
         * ignores the masks (the kernel's fast path for an exclusive reset). */
        arg.vec = (uint64_t)(uintptr_t)batch;
        arg.vec_len = WW_SCAN_BATCH;
        arg.max_pages = capacity - count;
        long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
        if (n < 0)
            return -errno;
        for (long i = 0; i < n; i++) {
            uint64_t pages = (batch[i].end - batch[i].start) / WW_PAGE_SIZE;
            if (pages > capacity - count) /* the kernel honours max_pages; never trust it past out's end */
                return -EIO;
            for (uint64_t page = batch[i].start; out && page < batch[i].end; page += WW_PAGE_SIZE)
                out[count++] = page - origin;
            if (!out)
                count += pages;
        }
        if (arg.walk_end <= start) /* no progress: never report an unwalked range as clean */
            return -EIO;
        start = arg.walk_end;
        *walk_end = start;
    }
    return (int64_t)count;
}

/*
 * Write the pages written in [start, end) into out[0..capacity), as
 * (page address - origin), ascending. With reset, each reported page is
 * write-protected again in the same walk. Exactly WRITTEN/WRITTEN: the
 * kernel's fast path, and the only mask whose answer for never-populated
 * pages agreed across kernels.
 */
int64_t ww_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, int reset,
                        uint64_t *out, uint64_t capacity, uint64_t origin,
                        uint64_t *walk_end)
{
    struct ww_scan_filter written = {
        .flags = reset ? PM_SCAN_WP_MATCHING : 0, .mask = PAGE_IS_WRITTEN,
    };
    return ww_pagemap_select(pagemap_fd, start, end, &written, out, capacity, origin, walk_end);
}

/*
 * [start, end) pairs of the runs of [start, end) that filter selects, at most
 * max_runs of them (adjacent selected pages form one run); the walk stops at
 * *walk_end. Nothing is changed unless filter says WP_MATCHING.
 */
int64_t ww_pagemap_runs(int pagemap_fd, uint64_t start, uint64_t end,
                        const struct ww_scan_filter *filter, uint64_t *bounds,
                        uint64_t max_runs, uint64_t *walk_end)
{
    struct pm_scan_arg arg;
    filter_arg_init(&arg, start, end, filter);
    arg.return_mask = PAGE_IS_WPALLOWED; /* one category for all: runs merge */
    struct page_region batch[WW_SCAN_BATCH];
    arg.vec = (uint64_t)(uintptr_t)batch;
    arg.vec_len = max_runs < WW_SCAN_BATCH ? max_runs : WW_SCAN_BATCH;
    long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (n < 0)
        return -errno;
    for (long i = 0; i < n; i++) {
        bounds[2 * i] = batch[i].start;
        bounds[2 * i + 1] = batch[i].end;
    }
    *walk_end = arg.walk_end > start ? arg.walk_end : end;
    return n;
}

/* Clip span i of spans (start/end pairs) to [first, last); 0 when empty. */
static int clip_span(const uint64_t *spans, uint64_t i, uint64_t first, uint64_t last,
                     uint64_t *start, uint64_t *end)
{
    *start = spans[2 * i] > first ? spans[2 * i] : first;
    *end = spans[2 * i + 1] < last ? spans[2 * i + 1] : last;
    return *start < *end;
}

/*
 * GetWriteWatch in one call: the written pages of every span (the committed
 * runs of a region, ascending) inside [first, last), as addresses, until out
 * is full. A span not walked because out filled is neither reported nor reset.
 */
int64_t ww_pagemap_get_write_watch(int pagemap_fd, const uint64_t *spans, uint64_t nspans,
                                 uint64_t first, uint64_t last, int reset,
                                 uint64_t *out, uint64_t capacity)
{
    uint64_t count = 0, start, end, walk_end;
    for (uint64_t i = 0; i < nspans && count < capacity; i++) {
        if (!clip_span(spans, i, first, last, &start, &end))
            continue;
        int64_t n = ww_pagemap_scan(pagemap_fd, start, end, reset, out + count,
                                       capacity - count, 0, &walk_end);
        if (n < 0)
            return n;
        count += (uint64_t)n;
    }
    return (int64_t)count;
}

int64_t ww_pagemap_reset_write_watch(int pagemap_fd, const uint64_t *spans, uint64_t nspans,
                               uint64_t first, uint64_t last)
{
    uint64_t start, end;
    for (uint64_t i = 0; i < nspans; i++) {
        if (!clip_span(spans, i, first, last, &start, &end))
            continue;
        int64_t result = ww_pagemap_reset(pagemap_fd, start, end);
        if (result < 0)
            return result;
    }
    return 0;
}

/* Write-protect every page of [start, end) again: one walk, no output. */
int64_t ww_pagemap_reset(int pagemap_fd, uint64_t start, uint64_t end)
{
    struct pm_scan_arg arg;
    scan_arg_init(&arg, start, end);
    arg.flags = PM_SCAN_WP_MATCHING;
    long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    return n < 0 ? -errno : 0;
}

/*
 * 0 when every mapping in [start, end) is registered for async write-protect,
 * -EPERM when one is not. Registered mappings are filtered out by category
 * before their pages are walked, so this costs one VMA lookup each and changes
 * nothing (no WP_MATCHING).
 */
int64_t ww_pagemap_check_watched(int pagemap_fd, uint64_t start, uint64_t end)
{
    struct page_region unused;
    struct pm_scan_arg arg;
    scan_arg_init(&arg, start, end);
    arg.flags = PM_SCAN_CHECK_WPASYNC;
    arg.category_inverted = PAGE_IS_WPALLOWED;
    arg.category_mask = PAGE_IS_WPALLOWED;
    arg.vec = (uint64_t)(uintptr_t)&unused;
    arg.vec_len = 1;
    long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (n >= 0)
        return 0;
    int err = errno;
    /* A kernel without PAGEMAP_SCAN (before 6.7) answers ENOTTY even for a
     * process that has exited: its pagemap then reads empty (no memory left),
     * and that is ESRCH, as the kernels that have the ioctl answer. */
    uint64_t entry;
    if (err == ENOTTY && pread(pagemap_fd, &entry, sizeof entry,
                               (off_t)(start / WW_PAGE_SIZE * sizeof entry)) == 0)
        return -ESRCH;
    return -err;
}

/* The bare ioctl, for probes and tests. */
int64_t ww_pagemap_raw(int pagemap_fd, struct pm_scan_arg *arg)
{
    long n = ioctl(pagemap_fd, PAGEMAP_SCAN, arg);
    return n < 0 ? -errno : n;
}
