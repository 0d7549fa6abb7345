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
 * A call counts itself in the entry of every region it uses (the one it
 * scans, any holding its output array) before reading anything of it, and
 * ww_index_quiesce waits for the calls counted before it began. A change is
 * made in two steps: tell the index (new calls see it), quiesce, then change
 * the memory. So no call scans (and re-arms) a released range a new region
 * may own, walks pages being unregistered by a decommit (pagemap would read
 * them written), stores into an output array made unwritable, or resets
 * between a VirtualProtect's latch scan and its latch (the latched flag
 * sends calls to the region's lock meanwhile). Two phases, flipped by each
 * quiesce: it waits only for calls already counted, never for a quiet moment.
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
#include "index.h"

/*
 * Wait for every call counted in the entry before now. A call that read the
 * entry's old state counted itself before the change was stored, in either
 * phase: the first wait drains the phase new calls do not use, the flip sends
 * new calls there, the second drains the one they used. One quiesce per entry
 * at a time (the region's lock serialises the changes).
 */
static void entry_quiesce(struct index_entry *entry)
{
    int phase = __atomic_load_n(&entry->phase, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&entry->users[1 - phase], __ATOMIC_SEQ_CST))
        sched_yield();
    __atomic_store_n(&entry->phase, 1 - phase, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&entry->users[phase], __ATOMIC_SEQ_CST))
        sched_yield();
}

struct ct_table index_table;
uint64_t index_epoch;
int index_readers[2];
int index_phase;
int retired_pending;
static struct ct_retired *retired_now;    /* retired in this phase */
static struct ct_retired *retired_before; /* retired before the last flip */
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

void index_reclaim_if_free(void)
{
    if (pthread_mutex_trylock(&index_mutex) == 0) {
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
    if (!result)
        __atomic_store_n(&entry->removed, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&index_mutex);
    if (result)
        return result;
    /* No new call finds the entry now; wait for those that did (one that
     * counts itself from now on sees removed and backs out). The entry is not
     * retired yet, so it stays valid while we read its counts. */
    entry_quiesce(entry);
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

/*
 * Wait for every call on the region (scanning it, or storing its output into
 * it) that began before now: after a change to the region's entry, before the
 * memory changes. The caller holds the region's lock, so the entry is not
 * removed meanwhile.
 */
int ww_index_quiesce(uint64_t base)
{
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    pthread_mutex_unlock(&index_mutex);
    if (!entry)
        return -EINVAL;
    entry_quiesce(entry);
    return 0;
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

/* In a forked child: every entry belongs to the parent until refreshed. */
void ww_index_after_fork_child(void)
{
    pthread_mutex_init(&index_mutex, NULL);
    index_readers[0] = index_readers[1] = 0;
    /* Calls in other threads at fork time do not exist in the child. */
    struct ct_top *top = index_table.top;
    struct ct_pos pos = { 0, 0 };
    if (top && top->count)
        do {
            struct index_entry *entry = ct_at(top, pos)->ptr;
            entry->users[0] = entry->users[1] = 0;
        } while (ct_next(top, &pos));
    index_epoch++;
}
