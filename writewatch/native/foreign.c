/*
 * process_memwatch over memory writewatch did not map, on the fallback backends
 * (mprotect + SIGSEGV, synchronous userfaultfd): the malloc heap, a plain mmap,
 * a numpy buffer, transparent huge pages.
 *
 * Watched memory lives in tracking.c's range table like a reservation
 * (ww_track_attach with WW_TRACK_FOREIGN), so the fault paths, the range lock
 * and the arm-before-clear order that make GET|CLEAR atomic are the same ones.
 * What this file adds is what the kernel knows and writewatch does not:
 *
 * - which mappings [start, end) holds now: each call walks the VMAs
 *   (PROCMAP_QUERY on Linux 6.11+, else /proc/self/maps), refuses the ones that
 *   cannot be watched before it touches any, and skips holes;
 * - whether a watched page is still the one that was armed (foreign_spans.c,
 *   which keeps the spans watched and brings them up to date).
 *
 * A new mapping reads as written until its first CLEAR (the proposal's
 * VM_SOFTDIRTY): its pages are tracked dirty and left unarmed. With
 * NO_REUSED_REGIONS, memory met for the first time is armed first and then
 * only the pages written before (present in /proc/self/pagemap and not the
 * shared zero page) are marked dirty.
 *
 * Calls are serialised by one mutex (taken before any range lock, and around
 * fork, so a child never inherits it held).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>

#include "abi.h"
#include "foreign.h"

#define PAGE WW_FOREIGN_PAGE

static pthread_mutex_t foreign_mutex = PTHREAD_MUTEX_INITIALIZER;
int foreign_uffd = -1;
uint64_t foreign_uffd_features;

/* The uffd backend's descriptor and the features it enabled (set at each open,
 * a forked child's included). */
void ww_memwatch_use_uffd(int uffd, uint64_t features)
{
    pthread_mutex_lock(&foreign_mutex);
    foreign_uffd = uffd;
    foreign_uffd_features = features;
    pthread_mutex_unlock(&foreign_mutex);
}

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

static pthread_once_t fork_handlers_once = PTHREAD_ONCE_INIT;

static void lock_calls(void) { pthread_mutex_lock(&foreign_mutex); }
static void unlock_calls(void) { pthread_mutex_unlock(&foreign_mutex); }

/* Registered after tracking.c's (kernel.py installs those at import), so it
 * runs first before fork: the order every call takes, this mutex first. */
static void install_fork_handlers(void)
{
    pthread_atfork(lock_calls, unlock_calls, unlock_calls);
}


static int unwatch_locked(int mode, uint64_t start, uint64_t end);

/* Spans of the other backend overlapping [a, b) (memory it watched that was
 * unmapped and mapped again, or watched through both): that backend stops
 * watching them, restoring what it armed, and this one starts afresh. */
static int other_mode(int mode, uint64_t a, uint64_t b)
{
    for (size_t at = span_from(a); at < span_count && spans[at].start < b;) {
        struct span span = spans[at];
        if (span.mode == mode) {
            at++;
            continue;
        }
        if (span.mode == WW_MODE_UFFD && foreign_uffd < 0)
            return refuse("[%#llx, %#llx) is watched by the uffd backend, which this process "
                          "has not opened", (unsigned long long)span.start,
                          (unsigned long long)span.end);
        int result = unwatch_locked(span.mode, span.start, span.end);
        if (span.mode == WW_MODE_UFFD)
            result = 0; /* what userfaultfd no longer has registered traps nothing */
        result = result ? result : ww_track_detach(span.start);
        if (result)
            return result;
        span_remove(at);
    }
    return 0;
}

/* Start a span over each part of [a, b) no span covers. A part the range table
 * refuses overlaps a writewatch region. */
static int cover(int mode, uint64_t a, uint64_t b)
{
    uint64_t at = a;
    for (size_t s = span_from(a); at < b; s++) {
        uint64_t gap_end = s < span_count ? min_u64(b, spans[s].start) : b;
        if (at < gap_end) {
            int64_t handle = ww_track_attach(at, gap_end - at, mode | WW_TRACK_FOREIGN);
            if (handle == -EEXIST)
                return refuse("[%#llx, %#llx) overlaps a region writewatch allocated; "
                              "watch that region on its own", (unsigned long long)at,
                              (unsigned long long)gap_end);
            int result = handle < 0 ? (int)handle : span_insert(at, gap_end, mode);
            if (result) {
                if (handle >= 0)
                    ww_track_detach((uint64_t)handle);
                return result;
            }
            s++; /* the span just inserted */
        }
        if (s >= span_count)
            break;
        at = max_u64(at, spans[s].end);
    }
    return 0;
}

/* Each part of each VMA piece of [start, end) covered by a span, ascending:
 * call step(mode, span start, a, b, vma) until it returns non-zero. */
typedef int (*piece_step)(int mode, uint64_t handle, uint64_t a, uint64_t b,
                          const struct vma *vma, void *context);

static int each_piece(int mode, uint64_t start, uint64_t end, const struct vmas *list,
                      piece_step step, void *context)
{
    for (size_t v = 0; v < list->count; v++) {
        uint64_t a = max_u64(start, list->at[v].start), b = min_u64(end, list->at[v].end);
        for (size_t s = span_from(a); s < span_count && spans[s].start < b; s++) {
            int result = step(mode, spans[s].start, max_u64(a, spans[s].start),
                              min_u64(b, spans[s].end), &list->at[v], context);
            if (result)
                return result;
        }
    }
    return 0;
}

/* Is [a, b) still all mapped? A piece unmapped during a call (its owner
 * racing it) became a hole, which holds nothing: what failed on it is moot. */
static int still_mapped(uint64_t a, uint64_t b)
{
    struct vmas list = { 0 };
    uint64_t covered = a;
    if (!walk_vmas(a, b, &list))
        for (size_t v = 0; v < list.count && list.at[v].start <= covered; v++)
            covered = max_u64(covered, list.at[v].end);
    free(list.at);
    return covered >= b;
}

/*
 * A step failed on [a, b): moot if the mapping changed under the call (rule
 * M16: the next call reads it as new). It did if [a, b) is unmapped now, or if
 * the kernel answered ENOMEM (part of the range was not mapped when mprotect
 * or madvise got there) while the process is not out of mappings: its owner
 * may have mapped something else there since (a VirtualFree and a new
 * VirtualAlloc at the same address, on Linux 6.1).
 */
static int unless_unmapped(int result, uint64_t a, uint64_t b)
{
    if (!result)
        return result;
    int changed = !still_mapped(a, b) || (result == -ENOMEM && !at_map_count_limit());
    if (!changed)
        return result;
    refuse_clear();
    return 0;
}

struct refreshing {
    int exact;
    const struct snapshots *before;
};

static int refresh_step(int mode, uint64_t handle, uint64_t a, uint64_t b,
                        const struct vma *vma, void *context)
{
    const struct refreshing *how = context;
    return unless_unmapped(refresh(mode, handle, a, b, vma->prot,
                                   how->exact ? RENEW_EXACT : RENEW_WRITTEN, how->before),
                           a, b);
}

struct scan {
    uint64_t origin, *vec, capacity, count;
    int get, clear;
    const struct snapshots *before;
};

/*
 * Before Linux 6.4 write-protect skips empty page table entries, and a dirty
 * page of foreign memory may have none (its owner's MADV_DONTNEED, or a
 * replaced mapping whose page was dirty before): populate the dirty pages a
 * clear is about to arm. Armed pages are left alone: populating them for
 * writing would fault into the handler and dirty them.
 */
static void populate_dirty(uint64_t a, uint64_t b, const struct snapshots *before)
{
    uint64_t run = 0;
    for (uint64_t page = a; page <= b; page += PAGE) {
        int dirty = page < b && (snapshot_state(before, page) & WW_PAGE_DIRTY);
        if (dirty && !run)
            run = page;
        if (!dirty && run) {
            ww_madvise(run, page - run, WW_MADV_POPULATE_WRITE);
            run = 0;
        }
    }
}

static int scan_step(int mode, uint64_t handle, uint64_t a, uint64_t b,
                     const struct vma *vma, void *context)
{
    struct scan *scan = context;
    if (mode == WW_MODE_UFFD && scan->clear && (vma->prot & PROT_WRITE) &&
        !(foreign_uffd_features & UFFD_FEATURE_WP_UNPOPULATED))
        populate_dirty(a, b, scan->before);
    uint64_t room = scan->get ? scan->capacity - scan->count : (b - a) / PAGE;
    uint64_t *out = scan->get ? scan->vec + scan->count : NULL;
    int64_t n = ww_track_scan(handle, a, b, scan->clear, out, room, scan->origin);
    if (n == -ENOENT && mode == WW_MODE_UFFD) {
        /* The VMA was replaced since the refresh: registered again, its pages
         * are re-armed; the next call's refresh sees the replacement. */
        int failed = uffd_register(a, b);
        n = failed ? failed : ww_track_scan(handle, a, b, scan->clear, out, room, scan->origin);
    }
    if (n < 0)
        return unless_unmapped((int)n, a, b);
    if (scan->get)
        scan->count += (uint64_t)n;
    return scan->get && scan->count >= scan->capacity; /* 1: stop, vec is full */
}

static int check_call(int mode, uint64_t start, uint64_t end)
{
    if (start % PAGE || end % PAGE || end < start)
        return refuse("[%#llx, %#llx) is not a page-aligned range",
                      (unsigned long long)start, (unsigned long long)end);
    if (mode != WW_MODE_MPROTECT && mode != WW_MODE_UFFD)
        return refuse("unknown write-watch mode %d", mode);
    if (mode == WW_MODE_UFFD && foreign_uffd < 0)
        return -EBADF; /* the backend opens its descriptor first */
    pthread_once(&fork_handlers_once, install_fork_handlers);
    return 0;
}

/*
 * A span whose memory its owner unmapped keeps its tracking range (and state
 * array) until a call or an eviction reaches its addresses, which for memory
 * never watched again is never: a collector that watches each arena it maps
 * would leak one per arena. So once the spans have doubled since the last
 * sweep, one walk over every mapping of the process drops the spans that no
 * mapping overlaps any more (their memory reads as new if mapped again, rule
 * M16, as it would at the next call). writewatch's own mappings do not count:
 * the next span's state array often lands in the hole the last one left, and
 * no span ever covers them (foreign_maps.c refuses them). A hole that some
 * other mapping took keeps its span until a call reaches it. So the spans
 * stay within about twice those whose addresses are still mapped, and the
 * sweep costs, amortised, a constant per span made. Mutex held.
 */
#define SWEEP_AT_LEAST 64
static size_t sweep_at = SWEEP_AT_LEAST;

static int by_start(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Is [start, end) inside the union of the sorted, merged pairs? */
static int inside(const uint64_t *pairs, size_t count, uint64_t start, uint64_t end)
{
    size_t lo = 0, hi = count; /* the first pair ending after start */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (pairs[2 * mid + 1] <= start)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < count && pairs[2 * lo] <= start && pairs[2 * lo + 1] >= end;
}

static void sweep_unmapped(void)
{
    if (span_count < sweep_at)
        return;
    struct vmas list = { 0 };
    uint64_t *own = NULL;
    int64_t owned = ww_track_internal_mappings(&own);
    if (owned >= 0 && !walk_vmas(0, WW_USER_SPACE_END, &list)) {
        size_t merged = 0; /* own's pairs sorted, touching ones merged */
        qsort(own, (size_t)owned, 2 * sizeof *own, by_start);
        for (size_t i = 0; i < (size_t)owned; i++) {
            if (merged && own[2 * i] <= own[2 * merged - 1]) {
                own[2 * merged - 1] = max_u64(own[2 * merged - 1], own[2 * i + 1]);
            } else {
                own[2 * merged] = own[2 * i];
                own[2 * merged++ + 1] = own[2 * i + 1];
            }
        }
        size_t kept = 0, v = 0;
        for (size_t at = 0; at < span_count; at++) {
            while (v < list.count && list.at[v].end <= spans[at].start)
                v++;
            int mapped = 0;
            for (size_t w = v; !mapped && w < list.count && list.at[w].start < spans[at].end; w++)
                mapped = !inside(own, merged, list.at[w].start, list.at[w].end);
            if (mapped || ww_track_detach(spans[at].start))
                spans[kept++] = spans[at];
        }
        span_count = kept;
    }
    free(own);
    free(list.at);
    sweep_at = 2 * span_count > SWEEP_AT_LEAST ? 2 * span_count : SWEEP_AT_LEAST;
}

size_t ww_memwatch_span_count(void)
{
    pthread_mutex_lock(&foreign_mutex);
    size_t count = span_count;
    pthread_mutex_unlock(&foreign_mutex);
    return count;
}

int64_t ww_track_memwatch_any(int mode, uint64_t start, uint64_t end, unsigned flags,
                              uint64_t *vec, uint64_t vec_len)
{
    refuse_clear();
    int get = flags & WW_MEMWATCH_GET, clear = !!(flags & WW_MEMWATCH_CLEAR);
    if (flags & ~(unsigned)(WW_MEMWATCH_GET | WW_MEMWATCH_CLEAR |
                            WW_MEMWATCH_NO_REUSED_REGIONS) || !(get || clear))
        return refuse("invalid process_memwatch flags %#x", flags);
    if (get && (!vec || !vec_len))
        return refuse("MEMWATCH_SD_GET needs a vec with room");
    int result = check_call(mode, start, end);
    if (result || start == end)
        return result;
    /* A writewatch region: its own table knows what it watches. */
    int region_mode = ww_track_mode_at(start);
    pthread_mutex_lock(&foreign_mutex);
    size_t at = span_from(start);
    int foreign = at < span_count && spans[at].start <= start;
    pthread_mutex_unlock(&foreign_mutex);
    if (region_mode >= 0 && !foreign) {
        if (region_mode != mode)
            return refuse("%#llx is in a region of the %s backend", (unsigned long long)start,
                          region_mode == WW_MODE_UFFD ? "uffd" : "mprotect");
        int64_t n = ww_track_memwatch(mode, start, end, get, clear, vec, vec_len);
        if (n == -EINVAL)
            refuse("[%#llx, %#llx) is not all committed memory of one writewatch region",
                   (unsigned long long)start, (unsigned long long)end);
        return n;
    }

    struct vmas list = { 0 };
    struct snapshots before = { 0 };
    struct refreshing how = { !!(flags & WW_MEMWATCH_NO_REUSED_REGIONS), &before };
    pthread_mutex_lock(&foreign_mutex);
    result = take_snapshots(start, end, &before);
    result = result ? result : walk_vmas(start, end, &list);
    /* Everything refused is refused before anything is watched, read or cleared. */
    result = result ? result : other_mode(mode, start, end);
    for (size_t v = 0; v < list.count && !result; v++)
        result = refusal(&list.at[v], max_u64(start, list.at[v].start),
                         min_u64(end, list.at[v].end), mode);
    for (size_t v = 0; v < list.count && !result; v++)
        result = cover(mode, max_u64(start, list.at[v].start), min_u64(end, list.at[v].end));
    if (!result)
        result = each_piece(mode, start, end, &list, refresh_step, &how);
    struct scan scan = { start, vec, vec_len, 0, get, clear, &before };
    if (!result)
        result = each_piece(mode, start, end, &list, scan_step, &scan);
    sweep_unmapped();
    pthread_mutex_unlock(&foreign_mutex);
    snapshots_free(&before);
    free(list.at);
    return result < 0 ? result : (int64_t)scan.count;
}

static int unwatch_step(int mode, uint64_t handle, uint64_t a, uint64_t b,
                        const struct vma *vma, void *context)
{
    /* A mapping no call would watch (a library mapped where watched memory
     * was unmapped) holds nothing of this watch: left as it is. Restoring
     * "its" protection would drop PROT_EXEC from a library's code. */
    if (refusal(vma, a, b, mode)) {
        refuse_clear();
        return 0;
    }
    /* Pages whose mapping changed are first made plain watched pages (their
     * kernel state left as the new mapping has it), so that stopping restores
     * only what this watch changed. */
    int result = refresh(mode, handle, a, b, vma->prot, RENEW_TO_STOP, context);
    if (!result)
        result = ww_track_unwatch(handle, a, b - a);
    if (!result && mode == WW_MODE_UFFD)
        result = ww_uffd_unregister(foreign_uffd, a, b - a);
    return result;
}

/* Stop watching [start, end) in mode, the caller holding the mutex. */
static int unwatch_locked(int mode, uint64_t start, uint64_t end)
{
    struct vmas list = { 0 };
    struct snapshots before = { 0 };
    int result = take_snapshots(start, end, &before);
    result = result ? result : walk_vmas(start, end, &list);
    result = result ? result : other_mode(mode, start, end);
    if (!result)
        result = each_piece(mode, start, end, &list, unwatch_step, &before);
    snapshots_free(&before);
    free(list.at);
    return result;
}

/*
 * writewatch maps a region of its own at [start, end): whatever was watched
 * there was unmapped, and the spans over it are dropped. Their parts outside
 * stop being watched, their protection restored: a span is all or nothing.
 */
void ww_memwatch_evict(uint64_t start, uint64_t end)
{
    pthread_mutex_lock(&foreign_mutex);
    for (size_t at = span_from(start); at < span_count && spans[at].start < end;) {
        struct span span = spans[at];
        if (span.start < start)
            unwatch_locked(span.mode, span.start, start);
        if (span.end > end)
            unwatch_locked(span.mode, end, span.end);
        if (!ww_track_detach(span.start))
            span_remove(at);
        else
            at++;
    }
    pthread_mutex_unlock(&foreign_mutex);
}

int ww_track_memwatch_unwatch(int mode, uint64_t start, uint64_t end)
{
    refuse_clear();
    int result = check_call(mode, start, end);
    if (result || start == end)
        return result;
    pthread_mutex_lock(&foreign_mutex);
    result = unwatch_locked(mode, start, end);
    /* Spans wholly inside [start, end) are done with; their unmapped parts
     * (holes now) hold no protection to restore. */
    for (size_t at = span_from(start); !result && at < span_count && spans[at].start < end;) {
        if (spans[at].start >= start && spans[at].end <= end) {
            result = ww_track_detach(spans[at].start);
            if (!result)
                span_remove(at);
        } else {
            at++;
        }
    }
    pthread_mutex_unlock(&foreign_mutex);
    return result;
}
