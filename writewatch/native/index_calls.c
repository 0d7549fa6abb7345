/*
 * The calls the native index serves (index.c explains the index): Windows'
 * range checks of GetWriteWatch and ResetWriteWatch (docs/semantics.md rule
 * 15) and their scans, process_memwatch's checks for the calling process, and
 * the output holds that keep an output array writable while a call stores
 * into it. Readers only: nothing here takes a lock.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "ctable.h"
#include "index.h"

/* Are pages [start, end) of a region all committed read-write, with no
 * change under way? O(log n) to find the first run, then one step per run
 * inside. */
static int writable(struct ct_table *pages, uint64_t start, uint64_t end)
{
    const struct ct_top *top = ct_load(pages);
    struct ct_pos pos;
    if (start >= end)
        return 1;
    if (!ct_first_ending_after(top, start, &pos))
        return 0;
    do {
        const struct ct_item *run = ct_at(top, pos);
        if (run->start > start ||
            (run_value(run) & (WW_PAGES_WRITABLE | WW_PAGES_CHANGING)) != WW_PAGES_WRITABLE)
            return 0;
        start = run->end;
        if (start >= end)
            return 1;
    } while (ct_next(top, &pos));
    return 0;
}

enum { OUTPUT_UNMANAGED, OUTPUT_MANAGED, OUTPUT_REFUSED };

/* The regions an output buffer lies in, counted while the call stores into it. */
#define OUTPUT_HOLD_MAX 64
struct output_hold {
    int count;
    uint64_t phases; /* bit i: the phase entries[i] was counted in */
    struct index_entry *entries[OUTPUT_HOLD_MAX];
};

static void output_release(struct output_hold *hold)
{
    for (int i = 0; i < hold->count; i++)
        entry_exit(hold->entries[i], (int)(hold->phases >> i & 1));
    hold->count = 0;
}

/*
 * An output buffer inside memory writewatch manages may have been made
 * read-only, inaccessible or decommitted after numpy's view of it was taken,
 * or become so while the call runs: numpy still calls it writable, and a
 * store would kill the process. Windows answers ERROR_NOACCESS there. The
 * answer comes from the region's page states, without touching the
 * buffer (a probe that wrote every page would mark every page of a watched
 * buffer written), and the call stays counted in each region the buffer lies
 * in until output_release: a protection change or decommit of those regions
 * quiesces, so the buffer stays writable until the call has stored into it.
 * Memory writewatch does not manage is numpy's to vouch for. Reader count
 * held. A buffer across more than OUTPUT_HOLD_MAX regions (each at least
 * 64 KiB, all adjacent) is refused.
 */
static int output_hold(const struct ct_top *table, uint64_t out, uint64_t size,
                       struct output_hold *hold)
{
    struct ct_pos pos;
    hold->count = 0;
    hold->phases = 0;
    if (size == 0 || !ct_first_ending_after(table, out, &pos))
        return OUTPUT_UNMANAGED;
    uint64_t end = out + size;
    do {
        struct index_entry *entry = ct_at(table, pos)->ptr;
        if (entry->base >= end)
            break;
        if (hold->count == OUTPUT_HOLD_MAX) {
            output_release(hold);
            return OUTPUT_REFUSED;
        }
        hold->phases |= (uint64_t)entry_enter(entry) << hold->count;
        hold->entries[hold->count++] = entry;
        uint64_t first = out > entry->base ? out : entry->base;
        uint64_t last = end < entry->end ? end : entry->end;
        if (!writable(&entry->pages, first, last)) {
            output_release(hold);
            return OUTPUT_REFUSED;
        }
    } while (ct_next(table, &pos));
    return hold->count ? OUTPUT_MANAGED : OUTPUT_UNMANAGED;
}

int ww_output_check(const void *out, uint64_t size)
{
    struct output_hold hold;
    int phase = reader_enter();
    int verdict = output_hold(ct_load(&index_table), (uint64_t)(uintptr_t)out, size, &hold);
    output_release(&hold);
    reader_exit(phase);
    return verdict == OUTPUT_REFUSED ? -EFAULT : 0;
}

#define REFUSED(reason) (-(int64_t)(WW_REFUSED_BASE + (reason)))

/*
 * Windows' checks on a GetWriteWatch/ResetWriteWatch range, in the order of
 * docs/semantics.md rule 15 after the output array's: flags, size 0, then the
 * write-watch region holding the range rounded out to pages. Reader count held.
 * On success *entry is the region's entry, counted in *phase (entry_exit
 * when done), and [*first, *last) the page-aligned range.
 */
static int64_t watched_range(const struct ct_top *table, uint64_t flags, uint64_t base,
                             uint64_t size, struct index_entry **entry, int *phase,
                             uint64_t *first, uint64_t *last)
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
    *phase = entry_enter(*entry);
    int64_t refused = 0;
    if (__atomic_load_n(&(*entry)->removed, __ATOMIC_SEQ_CST))
        refused = REFUSED(WW_REFUSED_NOT_WATCHED); /* released: as if not found */
    else if (__atomic_load_n(&(*entry)->epoch, __ATOMIC_SEQ_CST) != index_epoch)
        refused = REFUSED(WW_REFUSED_STALE);
    if (refused)
        entry_exit(*entry, *phase);
    return refused;
}

/*
 * GetWriteWatch after the caller checked the output array's type and count:
 * Windows' checks (watched_range), whether out can be written, then the scan.
 * Returns the count, REFUSED(reason), or -(WW_INDEX_ERRNO_BASE + errno) for a
 * kernel failure.
 */
static inline __attribute__((always_inline)) int64_t
get_write_watch(uint64_t flags, uint64_t base, uint64_t size, uint64_t *out, uint64_t capacity,
                uint64_t origin, unsigned shift)
{
    struct index_entry *entry;
    struct output_hold hold; /* not zeroed whole: this is the per-frame path */
    hold.count = 0;
    uint64_t first, last;
    int entry_phase, phase = reader_enter();
    const struct ct_top *table = ct_load(&index_table);
    int64_t result = watched_range(table, flags, base, size, &entry, &entry_phase, &first, &last);
    int counted = result == 0; /* watched_range counted this call in the entry */
    int output = result == 0
        ? output_hold(table, (uint64_t)(uintptr_t)out, capacity * sizeof *out, &hold)
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
            for (int64_t i = 0; (origin || shift) && i < n; i++)
                dest[i] = (dest[i] - origin) >> shift;
            if (dest != out) {
                if (n > 0)
                    memcpy(out, dest, (uint64_t)n * sizeof *out);
                free(dest);
            }
            result = n < 0 ? -WW_INDEX_ERRNO_BASE + n : n;
        }
    }
    output_release(&hold);
    if (counted)
        entry_exit(entry, entry_phase);
    reader_exit(phase);
    return result;
}

int64_t ww_index_get_write_watch(uint64_t flags, uint64_t base, uint64_t size,
                                 uint64_t *out, uint64_t capacity)
{
    return get_write_watch(flags, base, size, out, capacity, 0, 0);
}

/*
 * GetWriteWatch with each address given as (address - origin) >> shift (an
 * offset, a page index): converted before the store, so that the output array
 * is stored into once, while the call holds it, never by a second pass after.
 */
int64_t ww_index_get_write_watch_as(uint64_t flags, uint64_t base, uint64_t size,
                                    uint64_t *out, uint64_t capacity, uint64_t origin,
                                    unsigned shift)
{
    return get_write_watch(flags, base, size, out, capacity, origin, shift);
}

/* ResetWriteWatch: the same checks, then every committed page re-armed. */
int64_t ww_index_reset_write_watch(uint64_t base, uint64_t size)
{
    struct index_entry *entry;
    uint64_t first, last;
    int entry_phase, phase = reader_enter();
    const struct ct_top *table = ct_load(&index_table);
    int64_t result = watched_range(table, 0, base, size, &entry, &entry_phase, &first, &last);
    int counted = result == 0; /* watched_range counted this call in the entry */
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
        entry_exit(entry, entry_phase);
    reader_exit(phase);
    return result;
}

/*
 * process_memwatch's checks for the calling process, in one native call:
 * the arguments (ww_memwatch_args), then vec (WW_MEMWATCH_BAD_VEC when it lies
 * in region memory that cannot be written). Returns the page-aligned end of
 * the range, -WW_MEMWATCH_* for a refusal (EINVAL), or -WW_MEMWATCH_IN_REGION
 * when the range overlaps a region of the index (watched or not): such ranges
 * keep the regions' rules (M12).
 */
/* ww_memwatch_checked's work. On success the regions vec lies in stay counted
 * in hold, and this reader in *phase, until memwatch_release: the caller stores
 * into vec in between (entries stay reachable while the reader is counted). */
static int64_t memwatch_checked_held(uint64_t start, int64_t length, unsigned int flags,
                                     int64_t vec_len, const void *vec, struct output_hold *hold,
                                     int *phase)
{
    uint64_t end;
    hold->count = 0;
    int bad = ww_memwatch_args(start, length, flags, vec_len, &end);
    if (bad)
        return -bad;
    *phase = reader_enter();
    const struct ct_top *table = ct_load(&index_table);
    if (vec && vec_len > 0 &&
        output_hold(table, (uint64_t)(uintptr_t)vec, (uint64_t)vec_len * 8, hold)
            == OUTPUT_REFUSED)
        bad = WW_MEMWATCH_BAD_VEC;
    else if (ct_overlaps(table, start, end))
        bad = WW_MEMWATCH_IN_REGION;
    if (bad) {
        output_release(hold);
        reader_exit(*phase);
        return -bad;
    }
    return (int64_t)end;
}

static void memwatch_release(struct output_hold *hold, int phase)
{
    output_release(hold);
    reader_exit(phase);
}

int64_t ww_memwatch_checked(uint64_t start, int64_t length, unsigned int flags,
                            int64_t vec_len, const void *vec)
{
    struct output_hold hold;
    int phase;
    int64_t end = memwatch_checked_held(start, length, flags, vec_len, vec, &hold, &phase);
    if (end >= 0)
        memwatch_release(&hold, phase);
    return end;
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
    /* vec stays counted in its regions until the walk has stored into it (a
     * protection change or decommit of them waits), as GetWriteWatch's output. */
    struct output_hold hold;
    int phase;
    int64_t end = memwatch_checked_held(start, length, flags, vec_len, vec, &hold, &phase);
    if (end < 0)
        return -WW_MEMWATCH_REFUSED_BASE + end;
    int64_t result = ww_memwatch((int)uffd, (int)pagemap_fd, start, (uint64_t)end, flags, vec,
                                 (flags & MEMWATCH_SD_GET) ? (uint64_t)vec_len : 0, why);
    memwatch_release(&hold, phase);
    return result;
}
