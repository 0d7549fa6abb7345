/*
 * The native index of write-watch regions, for GetWriteWatch in one call.
 *
 * A game calls GetWriteWatch every frame on a small region, where the kernel
 * call itself takes ~1.7 us: Python-level argument checks, region lookup and
 * locking would double that. So the index is the home of every reservation's
 * state: its bounds, its backend's handle, and its pages' commit, protection
 * and latch state as runs. regions.py asks it and changes it, and keeps no
 * copy; ww_index_get_write_watch and ww_index_reset_write_watch do the
 * Windows checks, the lookup and the scan with no Python in between: these
 * checks are made here only.
 *
 * The regions, and each region's page runs, are two-level copy-on-write
 * tables (ctable.h): a lookup is O(log n), an add or a remove rebuilds one
 * chunk and the short top array, never the whole index, and a VirtualProtect
 * changes only the runs it touches.
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
    retire_table(&entry->pages);
    retire(entry);
    reclaim();
    pthread_mutex_unlock(&index_mutex);
    return 0;
}

/*
 * A region's page states are runs of equal value in a copy-on-write table
 * (entry->pages): pages in no run are reserved and not latched. Committed
 * spans (what a scan walks), whether an output array may lie somewhere, and
 * whether Python must walk the region's calls (the latch) are all read from
 * it, so no other layer keeps a copy. A change rewrites only the runs it
 * touches and their neighbours (which it may merge with), one or two chunks
 * of the table; the committed spans are rebuilt only when a page is
 * committed or decommitted.
 */

struct run_builder {
    struct ct_item *runs;
    uint64_t count;
    uint64_t latched;    /* runs built with WW_PAGES_LATCHED */
    int commit_changed;  /* a page went from reserved to committed or back */
};

static void build_run(struct run_builder *b, uint64_t start, uint64_t end, uint64_t value)
{
    if (start >= end || value == 0)
        return;
    struct ct_item *last = b->count ? &b->runs[b->count - 1] : NULL;
    if (last && last->end == start && run_value(last) == value) {
        last->end = end;
        return;
    }
    b->runs[b->count++] = (struct ct_item){ start, end, (void *)(uintptr_t)value };
    b->latched += (value & WW_PAGES_LATCHED) != 0;
}

/* Pages [start, end) held old; those inside [first, last) change. */
static void build_changed(struct run_builder *b, uint64_t start, uint64_t end, uint64_t old,
                          uint64_t first, uint64_t last, uint64_t mask, uint64_t bits)
{
    uint64_t lo = first < start ? start : first > end ? end : first;
    uint64_t hi = last < start ? start : last > end ? end : last;
    uint64_t new = (old & ~mask) | bits;
    build_run(b, start, lo, old);
    build_run(b, lo, hi, new);
    build_run(b, hi, end, old);
    if (lo < hi && !(old & WW_PAGES_PROTECTION) != !(new & WW_PAGES_PROTECTION))
        b->commit_changed = 1;
}

static uint64_t run_count(const struct ct_top *top)
{
    uint64_t count = 0;
    for (uint64_t c = 0; top && c < top->count; c++)
        count += top->slots[c].chunk->count;
    return count;
}

/* Fill spans (room for every run) with the committed runs merged. */
static void committed_spans(const struct ct_top *top, struct index_spans *spans)
{
    struct ct_pos pos = { 0, 0 };
    spans->count = 0;
    if (!top || !top->count)
        return;
    do {
        const struct ct_item *run = ct_at(top, pos);
        if (!(run_value(run) & WW_PAGES_PROTECTION))
            continue;
        if (spans->count && spans->bounds[2 * spans->count - 1] == run->start) {
            spans->bounds[2 * spans->count - 1] = run->end;
        } else {
            spans->bounds[2 * spans->count] = run->start;
            spans->bounds[2 * spans->count + 1] = run->end;
            spans->count++;
        }
    } while (ct_next(top, &pos));
}

static void update_latched(struct index_entry *entry)
{
    __atomic_store_n(&entry->latched, entry->latching || entry->latched_runs != 0,
                     __ATOMIC_SEQ_CST);
}

/*
 * Pages [first, last) of a region take (value & ~mask) | bits. The runs
 * touching [first, last] go (adjacent ones may merge); what is left of them
 * outside it, and the changed pages, come back. Nothing changes on failure.
 */
int ww_index_set_pages(uint64_t base, uint64_t first, uint64_t last, uint64_t mask,
                       uint64_t bits)
{
    if (first >= last || (bits & ~mask))
        return first == last ? 0 : -EINVAL;
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    if (!entry || first < entry->base || last > entry->end || (first | last) % WW_PAGE_SIZE) {
        pthread_mutex_unlock(&index_mutex);
        return -EINVAL;
    }
    struct ct_top *top = entry->pages.top;
    struct ct_pos start_pos, pos;
    uint64_t from = first, to_end = last, touching = 0, old_latched = 0;
    int any = ct_first_ending_after(top, first - 1, &start_pos);
    for (pos = start_pos; any; any = ct_next(top, &pos)) {
        const struct ct_item *run = ct_at(top, pos);
        if (run->start > last)
            break;
        if (touching++ == 0 && run->start < first)
            from = run->start;
        if (run->end > to_end)
            to_end = run->end;
        old_latched += (run_value(run) & WW_PAGES_LATCHED) != 0;
    }
    /* Each old run and each gap between them splits in at most three. */
    struct run_builder b = { malloc(3 * (2 * touching + 1) * sizeof *b.runs), 0, 0, 0 };
    if (!b.runs) {
        pthread_mutex_unlock(&index_mutex);
        return -ENOMEM;
    }
    uint64_t at = from;
    for (pos = start_pos, any = touching != 0; any && touching--; any = ct_next(top, &pos)) {
        const struct ct_item *run = ct_at(top, pos);
        build_changed(&b, at, run->start, 0, first, last, mask, bits);
        build_changed(&b, run->start, run->end, run_value(run), first, last, mask, bits);
        at = run->end;
    }
    build_changed(&b, at, to_end, 0, first, last, mask, bits);
    struct index_spans *spans = NULL;
    if (b.commit_changed) {
        uint64_t room = run_count(top) + b.count;
        spans = malloc(sizeof *spans + 2 * room * sizeof spans->bounds[0]);
    }
    int result = b.commit_changed && !spans ? -ENOMEM
        : ct_splice(&entry->pages, from, last + 1, b.runs, b.count, retire_block, NULL);
    if (result == 0) {
        entry->latched_runs += b.latched - old_latched;
        update_latched(entry);
        if (spans) {
            committed_spans(entry->pages.top, spans);
            retire(__atomic_exchange_n(&entry->spans, spans, __ATOMIC_SEQ_CST));
        }
    } else {
        free(spans);
    }
    free(b.runs);
    reclaim();
    pthread_mutex_unlock(&index_mutex);
    return result;
}

/*
 * The runs of pages [first, last) of a region, covering it, as (start, end,
 * value & mask) triples, adjacent runs of equal masked value merged (reserved
 * pages read 0). At most capacity runs: a full answer may go on, from the
 * last run's end. Returns the number of runs, or -EINVAL.
 */
int64_t ww_index_pages(uint64_t base, uint64_t first, uint64_t last, uint64_t mask,
                       uint64_t *runs, uint64_t capacity)
{
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    if (!entry || first > last || first < entry->base || last > entry->end) {
        pthread_mutex_unlock(&index_mutex);
        return -EINVAL;
    }
    const struct ct_top *top = entry->pages.top;
    struct ct_pos pos;
    uint64_t count = 0, at = first;
    int any = ct_first_ending_after(top, first, &pos);
    while (at < last) {
        const struct ct_item *run = any ? ct_at(top, pos) : NULL;
        uint64_t end = last, value = 0;
        if (run && run->start <= at) {
            end = run->end < last ? run->end : last;
            value = run_value(run) & mask;
            any = ct_next(top, &pos);
        } else if (run && run->start < last) {
            end = run->start;
        }
        if (count && runs[3 * count - 2] == at && runs[3 * count - 1] == value) {
            runs[3 * count - 2] = end;
        } else if (count < capacity) {
            runs[3 * count] = at;
            runs[3 * count + 1] = end;
            runs[3 * count + 2] = value;
            count++;
        } else {
            break;
        }
        at = end;
    }
    pthread_mutex_unlock(&index_mutex);
    return (int64_t)count;
}

/* In a forked child: the region's new handle, and it is current again. */
int ww_index_refresh(uint64_t base, int64_t handle)
{
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    if (entry) {
        __atomic_store_n(&entry->handle, handle, __ATOMIC_SEQ_CST);
        __atomic_store_n(&entry->epoch, index_epoch, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&index_mutex);
    return entry ? 0 : -EINVAL;
}

/* 1 if the region was made or refreshed in this process (not a parent), 0 if
 * not, -EINVAL if it is not in the index. */
int ww_index_current(uint64_t base)
{
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    int result = !entry ? -EINVAL : entry->epoch == index_epoch;
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

/* While a region has latched pages (docs/semantics.md rule 11), or a
 * VirtualProtect is latching them (latching set), GetWriteWatch and
 * ResetWriteWatch on it are refused with WW_REFUSED_LATCHED, after every
 * other check, and latch.py serves them. */
int ww_index_set_latching(uint64_t base, int latching)
{
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    if (entry) {
        entry->latching = latching;
        update_latched(entry);
    }
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
