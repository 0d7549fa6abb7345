/*
 * The native index of write-watch regions, for GetWriteWatch in one call.
 *
 * A game calls GetWriteWatch every frame on a small region, where the kernel
 * call itself takes ~1.7 us: Python-level argument checks, region lookup and
 * locking would double that. regions.py mirrors each write-watch region here
 * (its bounds, its backend's handle and its committed spans), and
 * ww_index_get_write_watch and ww_index_reset_write_watch do the Windows checks, the
 * lookup and the scan with no Python in between: these checks are made here only.
 *
 * The regions, and each region's read-write spans, are two-level
 * copy-on-write tables (ctable.h): a lookup is O(log n), an add or a remove
 * rebuilds one chunk and the short top array, never the whole index, and a
 * VirtualProtect changes only the read-write spans it touches.
 *
 * Readers take no lock: they count themselves in index_readers[phase], then
 * load pointers that writers replace whole (copy on write). What a writer
 * replaced is retired and freed after a grace period: the phase flips only
 * once every reader of the other phase has left, and a retired block is freed
 * once the phase has flipped after its retirement and the readers of the old
 * phase have left; so it waits only for the calls that were in flight when it
 * was retired, never for a quiet moment. Reclaiming runs at every update and
 * when the last reader of a phase leaves. The memory held retired is thus
 * bounded by what the updates made during two overlapping calls retired:
 * each update retires one to three chunks (at most CT_CHUNK_MAX items each)
 * and one top array (16 bytes per chunk), a few KiB even with 100k regions.
 * Writers are serialised by index_mutex (region create, release, commit,
 * decommit and protect).
 *
 * A call that found a region counts itself in the entry's users, and removing
 * the entry waits for them: a release returns only after every call scanning
 * the region has finished, so no call goes on scanning (and re-arming) its old
 * address range once another region may have been made there.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "ctable.h"


struct index_spans {
    uint64_t count;
    uint64_t bounds[]; /* start/end pairs, ascending */
};

struct index_entry {
    uint64_t base, end;
    int kind;   /* WW_INDEX_PLAIN, WW_INDEX_PAGEMAP or WW_INDEX_TRACKED */
    int64_t handle; /* the pagemap descriptor, or the tracking handle */
    uint64_t epoch;
    int latched; /* a VirtualProtect latched written pages: Python walks the region */
    struct index_spans *spans;    /* committed */
    struct ct_table writable; /* committed read-write spans: where an output array may lie */
    int users; /* calls scanning this region now */
};

static struct ct_table index_table; /* entries by base */
static uint64_t index_epoch;
static int index_readers[2];  /* readers in each phase */
static int index_phase;       /* the phase new readers count themselves in */
static struct ct_retired *retired_now;    /* retired in this phase */
static struct ct_retired *retired_before; /* retired before the last flip */
static int retired_pending;               /* either list is non-empty */
static pthread_mutex_t index_mutex = PTHREAD_MUTEX_INITIALIZER;

/*
 * Free what no reader can reach any more, and flip the phase. A reader that
 * could reach a block counted itself before the block was retired: in the
 * phase of that moment, or, if it read the phase just before a flip, in the
 * phase before it, which blocks the next flip. So once the readers of the
 * other phase are gone, everything retired before the last flip is free.
 * index_mutex held.
 */
static void reclaim(void)
{
    for (int round = 0; round < 2 && retired_pending; round++) {
        int phase = index_phase;
        if (__atomic_load_n(&index_readers[1 - phase], __ATOMIC_SEQ_CST))
            break;
        ct_retired_free(&retired_before);
        retired_before = retired_now;
        retired_now = NULL;
        __atomic_store_n(&index_phase, 1 - phase, __ATOMIC_SEQ_CST);
        __atomic_store_n(&retired_pending, retired_before != NULL, __ATOMIC_SEQ_CST);
    }
}

/* Retire memory readers may still hold (ct_retire_fn). index_mutex held. */
static void retire_block(void *memory, void *context)
{
    (void)context;
    if (!memory)
        return;
    if (!ct_retired_push(&retired_now, memory))
        __atomic_store_n(&retired_pending, 1, __ATOMIC_SEQ_CST);
}

static void retire(void *memory)
{
    retire_block(memory, NULL);
}

static int reader_enter(void)
{
    int phase = __atomic_load_n(&index_phase, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&index_readers[phase], 1, __ATOMIC_SEQ_CST);
    return phase;
}

/* The last reader of a phase out reclaims, if nobody else is at it. */
static void reader_exit(int phase)
{
    if (__atomic_sub_fetch(&index_readers[phase], 1, __ATOMIC_SEQ_CST) == 0 &&
        __atomic_load_n(&retired_pending, __ATOMIC_SEQ_CST) &&
        pthread_mutex_trylock(&index_mutex) == 0) {
        reclaim();
        pthread_mutex_unlock(&index_mutex);
    }
}

static struct index_entry *find_locked(uint64_t base)
{
    const struct ct_item *item = ct_find(index_table.top, base);
    struct index_entry *entry = item ? item->ptr : NULL;
    return entry && entry->base == base ? entry : NULL;
}

int ww_index_add(uint64_t base, uint64_t length, int kind, int64_t handle)
{
    struct index_entry *entry = calloc(1, sizeof *entry);
    struct index_spans *spans = calloc(1, sizeof *spans);
    if (!entry || !spans) {
        free(entry);
        free(spans);
        return -ENOMEM;
    }
    entry->base = base;
    entry->end = base + length;
    entry->kind = kind;
    entry->handle = handle;
    entry->spans = spans;
    struct ct_item item = { .start = base, .end = base + length, .ptr = entry };
    pthread_mutex_lock(&index_mutex);
    entry->epoch = index_epoch;
    int result = length == 0 || ct_overlaps(index_table.top, base, base + length) ? -EEXIST
        : ct_splice(&index_table, base, base + 1, &item, 1, retire_block, NULL);
    reclaim();
    pthread_mutex_unlock(&index_mutex);
    if (result) {
        free(entry);
        free(spans);
    }
    return result;
}

/* Retire a whole span table (readers may still walk it). index_mutex held. */
static void retire_table(struct ct_table *table)
{
    struct ct_top *top = table->top;
    for (uint64_t c = 0; top && c < top->count; c++)
        retire(top->slots[c].chunk);
    retire(top);
    table->top = NULL;
}

int ww_index_remove(uint64_t base)
{
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    int result = entry ? ct_splice(&index_table, base, base + 1, NULL, 0, retire_block, NULL)
                       : -EINVAL;
    pthread_mutex_unlock(&index_mutex);
    if (result)
        return result;
    /* No new call finds the entry now; wait for those that did. The entry is
     * not retired yet, so it stays valid while we read its count. */
    while (__atomic_load_n(&entry->users, __ATOMIC_SEQ_CST))
        sched_yield();
    pthread_mutex_lock(&index_mutex);
    retire(entry->spans);
    retire_table(&entry->writable);
    retire(entry);
    reclaim();
    pthread_mutex_unlock(&index_mutex);
    return 0;
}

static struct index_spans *spans_copy(const uint64_t *bounds, uint64_t count)
{
    struct index_spans *spans = malloc(sizeof *spans + 2 * count * sizeof spans->bounds[0]);
    if (spans) {
        spans->count = count;
        memcpy(spans->bounds, bounds, 2 * count * sizeof spans->bounds[0]);
    }
    return spans;
}

/* Replace a region's committed spans (and its handle, which changes after
 * fork), marking it current for this process. */
int ww_index_update(uint64_t base, int64_t handle, const uint64_t *bounds, uint64_t count)
{
    struct index_spans *spans = spans_copy(bounds, count);
    if (!spans)
        return -ENOMEM;
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    if (!entry) {
        pthread_mutex_unlock(&index_mutex);
        free(spans);
        return -EINVAL;
    }
    struct index_spans *old = entry->spans;
    __atomic_store_n(&entry->handle, handle, __ATOMIC_SEQ_CST);
    __atomic_store_n(&entry->spans, spans, __ATOMIC_SEQ_CST);
    __atomic_store_n(&entry->epoch, index_epoch, __ATOMIC_SEQ_CST);
    retire(old);
    reclaim();
    pthread_mutex_unlock(&index_mutex);
    return 0;
}

/*
 * Mark pages [first, last) of a region committed read-write (writable) or not:
 * its read-write spans change only around [first, last), at the cost of one
 * or two chunks of the span table, whatever the region's number of runs.
 */
int ww_index_set_writable(uint64_t base, uint64_t first, uint64_t last, int writable)
{
    if (first >= last)
        return 0;
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    if (!entry || first < entry->base || last > entry->end) {
        pthread_mutex_unlock(&index_mutex);
        return -EINVAL;
    }
    /* The spans touching [first, last] (adjacent ones merge) go; what is left
     * of them outside it, or their union with it, comes back. */
    struct ct_top *top = entry->writable.top;
    struct ct_pos pos;
    uint64_t from = first, merged_start = first, merged_end = last, touching = 0;
    struct ct_item repl[2];
    uint64_t n = 0;
    if (ct_first_ending_after(top, first - 1, &pos)) {
        do {
            const struct ct_item *item = ct_at(top, pos);
            if (item->start > last)
                break;
            if (touching++ == 0) {
                from = item->start < first ? item->start : first;
                merged_start = from;
                if (!writable && item->start < first)
                    repl[n++] = (struct ct_item){ item->start, first, NULL };
            }
            if (item->end > merged_end)
                merged_end = item->end;
        } while (ct_next(top, &pos));
    }
    if (writable)
        repl[n++] = (struct ct_item){ merged_start, merged_end, NULL };
    else if (merged_end > last)
        repl[n++] = (struct ct_item){ last, merged_end, NULL };
    int result = 0;
    if (touching || writable)
        result = ct_splice(&entry->writable, from, last + 1, repl, n, retire_block, NULL);
    reclaim();
    pthread_mutex_unlock(&index_mutex);
    return result;
}

/* Set while the region has latched pages (docs/semantics.md rule 11):
 * GetWriteWatch and ResetWriteWatch on it are then refused with
 * WW_REFUSED_LATCHED, after every other check, and regions.py serves them. */
int ww_index_set_latched(uint64_t base, int latched)
{
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    if (entry)
        __atomic_store_n(&entry->latched, latched, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&index_mutex);
    return entry ? 0 : -EINVAL;
}

/* Do the spans (ascending, disjoint) cover [start, end)? O(log n) to find
 * the first, then one step per span inside. */
static int covered(struct ct_table *spans, uint64_t start, uint64_t end)
{
    const struct ct_top *top = ct_load(spans);
    struct ct_pos pos;
    if (start >= end)
        return 1;
    if (!ct_first_ending_after(top, start, &pos))
        return 0;
    do {
        const struct ct_item *item = ct_at(top, pos);
        if (item->start > start)
            return 0;
        start = item->end;
        if (start >= end)
            return 1;
    } while (ct_next(top, &pos));
    return 0;
}

enum { OUTPUT_UNMANAGED, OUTPUT_MANAGED, OUTPUT_REFUSED };

/*
 * An output buffer inside memory writewatch manages may have been made
 * read-only, inaccessible or decommitted after numpy's view of it was taken:
 * numpy still calls it writable, and a store would kill the process. Windows
 * answers ERROR_NOACCESS there. The answer comes from the index's read-write
 * spans, without touching the buffer: a probe that wrote every page would
 * mark every page of a watched buffer written. Memory writewatch does not
 * manage is numpy's to vouch for. Reader count held.
 */
static int output_check(const struct ct_top *table, uint64_t out, uint64_t size)
{
    struct ct_pos pos;
    if (size == 0 || !ct_first_ending_after(table, out, &pos))
        return OUTPUT_UNMANAGED;
    uint64_t end = out + size;
    int managed = OUTPUT_UNMANAGED;
    do {
        struct index_entry *entry = ct_at(table, pos)->ptr;
        if (entry->base >= end)
            break;
        uint64_t first = out > entry->base ? out : entry->base;
        uint64_t last = end < entry->end ? end : entry->end;
        if (!covered(&entry->writable, first, last))
            return OUTPUT_REFUSED;
        managed = OUTPUT_MANAGED;
    } while (ct_next(table, &pos));
    return managed;
}

int ww_output_check(const void *out, uint64_t size)
{
    int phase = reader_enter();
    int verdict = output_check(ct_load(&index_table), (uint64_t)(uintptr_t)out, size);
    reader_exit(phase);
    return verdict == OUTPUT_REFUSED ? -EFAULT : 0;
}

#define REFUSED(reason) (-(int64_t)(WW_REFUSED_BASE + (reason)))

/*
 * Windows' checks on a GetWriteWatch/ResetWriteWatch range, in the order of
 * docs/semantics.md rule 15 after the output array's: flags, size 0, then the
 * write-watch region holding the range rounded out to pages. Reader count held. On success *entry is the
 * region's entry and [*first, *last) the page-aligned range.
 */
static int64_t watched_range(const struct ct_top *table, uint64_t flags, uint64_t base,
                             uint64_t size, struct index_entry **entry, uint64_t *first,
                             uint64_t *last)
{
    if (flags & ~(uint64_t)1)
        return REFUSED(WW_REFUSED_FLAGS);
    if (size == 0)
        return REFUSED(WW_REFUSED_SIZE);
    *first = base & ~(uint64_t)(WW_PAGE_SIZE - 1);
    if (__builtin_add_overflow(base, size, last) ||
        __builtin_add_overflow(*last, WW_PAGE_SIZE - 1, last))
        return REFUSED(WW_REFUSED_LEAVES_REGION); /* wraps: no region reaches that far */
    *last &= ~(uint64_t)(WW_PAGE_SIZE - 1);

    const struct ct_item *item = ct_find(table, *first);
    *entry = item ? item->ptr : NULL;
    if (!*entry || (*entry)->kind == WW_INDEX_PLAIN)
        return REFUSED(WW_REFUSED_NOT_WATCHED);
    if (*last > (*entry)->end)
        return REFUSED(WW_REFUSED_LEAVES_REGION);
    if (__atomic_load_n(&(*entry)->epoch, __ATOMIC_SEQ_CST) != index_epoch)
        return REFUSED(WW_REFUSED_STALE);
    __atomic_add_fetch(&(*entry)->users, 1, __ATOMIC_SEQ_CST);
    return 0;
}

/*
 * GetWriteWatch after the caller checked the output array's type and count:
 * Windows' checks (watched_range), whether out can be written, then the scan.
 * Returns the count, REFUSED(reason), or -(WW_INDEX_ERRNO_BASE + errno) for a
 * kernel failure.
 */
int64_t ww_index_get_write_watch(uint64_t flags, uint64_t base, uint64_t size,
                                 uint64_t *out, uint64_t capacity)
{
    struct index_entry *entry;
    uint64_t first, last;
    int phase = reader_enter();
    const struct ct_top *table = ct_load(&index_table);
    int64_t result = watched_range(table, flags, base, size, &entry, &first, &last);
    int counted = result == 0; /* watched_range counted this call in entry->users */
    int output = result == 0
        ? output_check(table, (uint64_t)(uintptr_t)out, capacity * sizeof *out)
        : OUTPUT_REFUSED;
    if (result == 0 && output == OUTPUT_REFUSED)
        result = REFUSED(WW_REFUSED_OUTPUT);
    if (result == 0 && __atomic_load_n(&entry->latched, __ATOMIC_SEQ_CST))
        result = REFUSED(WW_REFUSED_LATCHED);
    if (result == 0) {
        /* An output array in managed memory gets the addresses only after the
         * scan, and only as many entries as were found: it is written like any
         * memory, so exactly the pages that receive an address read written
         * (from this call on: a scan that wrote as it went could report and
         * reset its own stores). */
        uint64_t room = capacity, pages = (last - first) / WW_PAGE_SIZE, *dest = out;
        if (output == OUTPUT_MANAGED) {
            room = capacity < pages ? capacity : pages;
            dest = malloc((room ? room : 1) * sizeof *dest);
        }
        if (!dest) {
            result = -WW_INDEX_ERRNO_BASE - ENOMEM;
        } else {
            struct index_spans *spans = __atomic_load_n(&entry->spans, __ATOMIC_SEQ_CST);
            int64_t handle = __atomic_load_n(&entry->handle, __ATOMIC_SEQ_CST);
            int64_t n = entry->kind == WW_INDEX_PAGEMAP
                ? ww_pagemap_get_write_watch((int)handle, spans->bounds, spans->count, first, last,
                                             (int)flags, dest, room)
                : ww_track_get_write_watch((uint64_t)handle, spans->bounds, spans->count, first, last,
                                           (int)flags, dest, room);
            if (dest != out) {
                if (n > 0)
                    memcpy(out, dest, (uint64_t)n * sizeof *out);
                free(dest);
            }
            result = n < 0 ? -WW_INDEX_ERRNO_BASE + n : n;
        }
    }
    if (counted)
        __atomic_sub_fetch(&entry->users, 1, __ATOMIC_SEQ_CST);
    reader_exit(phase);
    return result;
}

/* ResetWriteWatch: the same checks, then every committed page re-armed. */
int64_t ww_index_reset_write_watch(uint64_t base, uint64_t size)
{
    struct index_entry *entry;
    uint64_t first, last;
    int phase = reader_enter();
    const struct ct_top *table = ct_load(&index_table);
    int64_t result = watched_range(table, 0, base, size, &entry, &first, &last);
    int counted = result == 0; /* watched_range counted this call in entry->users */
    if (result == 0 && __atomic_load_n(&entry->latched, __ATOMIC_SEQ_CST))
        result = REFUSED(WW_REFUSED_LATCHED);
    if (result == 0) {
        struct index_spans *spans = __atomic_load_n(&entry->spans, __ATOMIC_SEQ_CST);
        int64_t handle = __atomic_load_n(&entry->handle, __ATOMIC_SEQ_CST);
        int64_t n = entry->kind == WW_INDEX_PAGEMAP
            ? ww_pagemap_reset_write_watch((int)handle, spans->bounds, spans->count, first, last)
            : ww_track_get_write_watch((uint64_t)handle, spans->bounds, spans->count, first, last, 1,
                                       NULL, (last - first) / WW_PAGE_SIZE);
        result = n < 0 ? -WW_INDEX_ERRNO_BASE + n : 0;
    }
    if (counted)
        __atomic_sub_fetch(&entry->users, 1, __ATOMIC_SEQ_CST);
    reader_exit(phase);
    return result;
}

/* In a forked child: every entry belongs to the parent until refreshed. */
void ww_index_after_fork_child(void)
{
    pthread_mutex_init(&index_mutex, NULL);
    index_readers[0] = index_readers[1] = 0;
    /* Calls in other threads at fork time do not exist in the child. */
    struct ct_top *top = index_table.top;
    struct ct_pos pos = { 0, 0 };
    if (top && top->count)
        do
            ((struct index_entry *)ct_at(top, pos)->ptr)->users = 0;
        while (ct_next(top, &pos));
    index_epoch++;
}

/*
 * process_memwatch's checks for the calling process, in one native call:
 * the arguments (ww_memwatch_args), then vec (WW_MEMWATCH_BAD_VEC when it lies
 * in region memory that cannot be written). Returns the page-aligned end of
 * the range, -WW_MEMWATCH_* for a refusal (EINVAL), or -WW_MEMWATCH_IN_REGION
 * when the range overlaps a region of the index (watched or not): such ranges
 * keep the regions' rules (M12).
 */
int64_t ww_memwatch_checked(uint64_t start, int64_t length, unsigned int flags,
                            int64_t vec_len, const void *vec)
{
    uint64_t end;
    int bad = ww_memwatch_args(start, length, flags, vec_len, &end);
    if (bad)
        return -bad;
    int phase = reader_enter();
    const struct ct_top *table = ct_load(&index_table);
    if (vec && vec_len > 0 &&
        output_check(table, (uint64_t)(uintptr_t)vec, (uint64_t)vec_len * 8) == OUTPUT_REFUSED)
        bad = WW_MEMWATCH_BAD_VEC;
    else if (ct_overlaps(table, start, end))
        bad = WW_MEMWATCH_IN_REGION;
    reader_exit(phase);
    return bad ? -bad : (int64_t)end;
}

/*
 * process_memwatch on the calling process in one native call: the checks of
 * ww_memwatch_checked, then the backend's walk (kind WW_INDEX_PAGEMAP: its
 * userfaultfd and pagemap descriptors). Returns the count, -errno, or
 * -(WW_MEMWATCH_REFUSED_BASE + reason) for a refusal or a range of region
 * memory (WW_MEMWATCH_IN_REGION). Another kind answers -EOPNOTSUPP before
 * anything is done: Python serves it.
 */
int64_t ww_memwatch_call(int kind, int64_t uffd, int64_t pagemap_fd, uint64_t start,
                         int64_t length, unsigned int flags, int64_t vec_len, uint64_t *vec,
                         struct ww_memwatch_refusal *why)
{
    if (kind != WW_INDEX_PAGEMAP)
        return -EOPNOTSUPP;
    int64_t end = ww_memwatch_checked(start, length, flags, vec_len, vec);
    if (end < 0)
        return -WW_MEMWATCH_REFUSED_BASE + end;
    return ww_memwatch((int)uffd, (int)pagemap_fd, start, (uint64_t)end, flags, vec,
                       (flags & MEMWATCH_SD_GET) ? (uint64_t)vec_len : 0, why);
}
