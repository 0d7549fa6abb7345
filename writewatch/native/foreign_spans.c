/*
 * The spans process_memwatch watches on the fallbacks (foreign.c), and how a
 * span is brought up to date with what the kernel holds now: whether a
 * watched page is still the one that was armed. A page armed for tracking
 * must still trap writes (mprotect: its VMA is read-only; uffd: its pagemap
 * entry carries the uffd-wp bit), and a page's VMA must still have the
 * protection recorded for it. Otherwise the mapping was replaced (munmap +
 * mmap at the same address), or its owner changed its protection: the page
 * is watched afresh, as a new mapping, and reads as written until cleared.
 * So a replacement is seen at the latest by the next call, and writes made
 * meanwhile are reported by it, never lost. Every function here runs with
 * foreign.c's call mutex held.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "abi.h"
#include "foreign.h"

#define PAGE WW_FOREIGN_PAGE
#define CHUNK_PAGES WW_FOREIGN_CHUNK_PAGES

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

/* ---- the watched spans: one tracking range each, sorted by address ---- */

struct span *spans;
size_t span_count;
static size_t span_capacity;

int span_insert(uint64_t start, uint64_t end, int mode)
{
    if (span_count == span_capacity) {
        size_t capacity = span_capacity ? span_capacity * 2 : 256;
        /* mmap, not malloc: the table is never on a heap page being armed. */
        struct span *grown = mmap(NULL, capacity * sizeof *grown, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (grown == MAP_FAILED)
            return -ENOMEM;
        if (spans) {
            memcpy(grown, spans, span_count * sizeof *spans);
            munmap(spans, span_capacity * sizeof *spans);
        }
        spans = grown;
        span_capacity = capacity;
    }
    size_t at = span_from(start); /* spans are disjoint: the first ending after start */
    memmove(spans + at + 1, spans + at, (span_count - at) * sizeof *spans);
    spans[at] = (struct span){ start, end, mode };
    span_count++;
    return 0;
}

void span_remove(size_t at)
{
    memmove(spans + at, spans + at + 1, (span_count - at - 1) * sizeof *spans);
    span_count--;
}

/* The first span that ends after address: a binary search, so that a call
 * costs O(log n) in the spans watched, not O(n). */
size_t span_from(uint64_t address)
{
    size_t lo = 0, hi = span_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (spans[mid].end <= address)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* ---- starting to watch ---- */

int uffd_register(uint64_t a, uint64_t b)
{
    uint64_t ioctls = 0;
    int result = ww_uffd_register_wp(foreign_uffd, a, b - a, &ioctls);
    if (result == -EBUSY) { /* another userfaultfd of this process holds it */
        refuse("[%#llx, %#llx) cannot be watched: another userfaultfd of this process "
               "watches it", (unsigned long long)a, (unsigned long long)b);
        return -EBUSY;
    }
    if (result)
        return refuse("[%#llx, %#llx) cannot be watched: userfaultfd will not "
                      "write-protect it (%s)",
                      (unsigned long long)a, (unsigned long long)b, strerror(-result));
    if (!(ioctls >> WW_UFFDIO_WRITEPROTECT_BIT & 1))
        return refuse("[%#llx, %#llx) cannot be watched: userfaultfd cannot "
                      "write-protect it on this kernel",
                      (unsigned long long)a, (unsigned long long)b);
    return 0;
}

/* Mark the pages set in bits dirty (tracking's prepare-write marks and disarms
 * them), by runs. */
static int mark_written(uint64_t handle, uint64_t a, uint64_t b, const uint8_t *bits)
{
    uint64_t total = (b - a) / PAGE, run = UINT64_MAX;
    int result = 0;
    for (uint64_t i = 0; i <= total && !result; i++) {
        int written = i < total && bits[i / 8] >> i % 8 & 1;
        if (written && run == UINT64_MAX)
            run = i;
        if (!written && run != UINT64_MAX) {
            result = ww_track_prepare_write(handle, a + run * PAGE, (i - run) * PAGE);
            run = UINT64_MAX;
        }
    }
    return result;
}

/*
 * Watch [a, b) of the span with this handle as a new mapping, with the
 * protection prot its VMA has now. All of it reads as written until cleared;
 * with RENEW_EXACT only the pages written so far.
 */
static int watch_new(int mode, uint64_t handle, uint64_t a, uint64_t b, int prot,
                     enum renewal how)
{
    int exact = how == RENEW_EXACT;
    int result = 0, populated = 0;
    uint8_t *bits = NULL;
    if (mode == WW_MODE_UFFD) {
        /* Read before registering: afterwards write-protect markers in empty
         * entries read as swapped pages. */
        if (exact && !(bits = written_pages(a, b, 1, NULL, &result)))
            return result;
        result = result ? result : uffd_register(a, b);
        /* Before Linux 6.4 write-protect skips empty page table entries: fault
         * the pages in first. A write between the reading above and the arming
         * below is then only reported as part of a new mapping (by calls
         * without NO_REUSED_REGIONS). Not when the watch is being stopped:
         * that populated every page of a new mapping, which the other backend
         * taking it over then read as written (Linux 6.1). Pages are touched
         * only where madvise lacks MADV_POPULATE_WRITE (before 5.14): a range
         * its owner unmaps meanwhile fails madvise, but a touch kills. */
        if (!result && how != RENEW_TO_STOP &&
            !(foreign_uffd_features & UFFD_FEATURE_WP_UNPOPULATED) &&
            (prot & PROT_WRITE)) {
            populated = 1;
            ww_populate_for_write(a, b - a); /* a failure: the mapping changed (M16) */
        }
    }
    if (!result && !exact) {
        free(bits);
        return ww_track_watch(handle, a, b - a, prot, 0);
    }
    /* Armed first, then read: a write after the reading faults and is
     * recorded, one before it shows in pagemap (present pages only: see above). */
    if (!result)
        result = ww_track_watch(handle, a, b - a, prot, 1);
    if (!result && !populated)
        bits = written_pages(a, b, mode == WW_MODE_MPROTECT, bits, &result);
    if (!result)
        result = mark_written(handle, a, b, bits);
    free(bits);
    return result;
}

/* The protection the kernel should show for a watched page in state st. */
static int expected_prot(int mode, int st)
{
    int logical = (st & WW_PAGE_READ ? PROT_READ : 0) | (st & WW_PAGE_WRITE ? PROT_WRITE : 0);
    if (mode == WW_MODE_MPROTECT && (st & WW_PAGE_ARMED) && (st & WW_PAGE_WRITE))
        return PROT_READ;
    return logical;
}

void snapshots_free(struct snapshots *list)
{
    for (size_t i = 0; i < list->count; i++)
        free(list->at[i].state);
    free(list->at);
    list->count = 0;
}

/*
 * The tracking state of every watched page of [start, end), read before the
 * VMAs are: between calls the fault paths only ever unarm a page (mprotect
 * gives it write access), so a page read armed whose VMA turns out writable
 * was unarmed meanwhile or replaced, and one read unarmed whose VMA is
 * read-only had its protection changed by its owner. Read the other way round,
 * an unarm racing the walk would look like the owner's mprotect.
 */
int take_snapshots(uint64_t start, uint64_t end, struct snapshots *list)
{
    size_t first = span_from(start), count = 0;
    while (first + count < span_count && spans[first + count].start < end)
        count++;
    list->at = count ? calloc(count, sizeof *list->at) : NULL;
    if (count && !list->at)
        return -ENOMEM;
    for (size_t i = 0; i < count; i++) {
        struct snapshot *shot = &list->at[list->count++];
        const struct span *span = &spans[first + i];
        shot->start = max_u64(start, span->start);
        shot->end = min_u64(end, span->end);
        uint64_t npages = (shot->end - shot->start) / PAGE;
        shot->state = malloc(npages);
        if (!shot->state)
            return -ENOMEM;
        if (ww_track_states(span->start, shot->start, npages, shot->state))
            memset(shot->state, 0, npages);
    }
    return 0;
}

/* A page's state in the snapshot; 0 (never watched) for one it does not hold. */
int snapshot_state(const struct snapshots *list, uint64_t page)
{
    for (size_t i = 0; i < list->count; i++)
        if (page >= list->at[i].start && page < list->at[i].end)
            return list->at[i].state[(page - list->at[i].start) / PAGE];
    return 0;
}

/*
 * Bring [a, b) of a span, all inside one VMA of protection prot, up to date:
 * pages never watched, and pages whose kernel state no longer is what was
 * armed (the mapping was replaced or its protection changed), are watched as
 * a new mapping.
 */
int refresh(int mode, uint64_t handle, uint64_t a, uint64_t b, int prot, enum renewal how,
                   const struct snapshots *before)
{
    uint64_t entries[CHUNK_PAGES], run = 0;
    int result = 0;
    for (uint64_t at = a; at < b && !result; at += CHUNK_PAGES * PAGE) {
        uint64_t pages = (b - at) / PAGE < CHUNK_PAGES ? (b - at) / PAGE : CHUNK_PAGES;
        result = read_pagemap(at, pages, entries);
        for (uint64_t i = 0; i <= pages && !result; i++) {
            uint64_t page = at + i * PAGE;
            int renew = 0;
            if (i < pages) {
                int st = snapshot_state(before, page);
                uint64_t entry = entries[i];
                /* uffd: an armed page must still carry the write-protect bit.
                 * A page written since its clear is present (not the zero
                 * page) or swapped; one marked written with neither was never
                 * written in a new mapping (or was dropped by its owner's
                 * MADV_DONTNEED): it starts again as new, which
                 * NO_REUSED_REGIONS then reads exactly. */
                renew = !(st & WW_PAGE_WATCHED) ||
                        expected_prot(mode, st) != (prot & (PROT_READ | PROT_WRITE)) ||
                        (mode == WW_MODE_UFFD && (st & WW_PAGE_ARMED) &&
                         !(entry >> WW_PM_UFFD_WP_BIT & 1)) ||
                        ((st & WW_PAGE_DIRTY) && !(st & WW_PAGE_ARMED) && !entry_written(entry));
            }
            if (renew && !run)
                run = page;
            if (!renew && run && (i < pages || page == b)) {
                result = watch_new(mode, handle, run, page, prot, how);
                run = 0;
            }
        }
    }
    return result;
}
