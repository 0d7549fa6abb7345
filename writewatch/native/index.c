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
 * Readers take no lock: they count themselves in index_readers, then load
 * pointers that writers replace whole (copy on write). A writer frees what it
 * replaced only when no reader is inside; otherwise it parks it on a retire
 * list, emptied at the next quiet moment. Writers are serialised by
 * index_mutex (region create, release, commit and decommit are rare).
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


struct index_spans {
    uint64_t count;
    uint64_t bounds[]; /* start/end pairs, ascending */
};

struct index_entry {
    uint64_t base, end;
    int kind;   /* WW_INDEX_PLAIN, WW_WW_PAGE_SIZEMAP or WW_INDEX_TRACKED */
    int handle; /* the pagemap descriptor, or the tracking slot */
    uint64_t epoch;
    int latched; /* a VirtualProtect latched written pages: Python walks the region */
    struct index_spans *spans;    /* committed */
    struct index_spans *writable; /* committed read-write: where an output array may lie */
    int users; /* calls scanning this region now */
};

struct index_table {
    uint64_t count;
    struct index_entry *entries[]; /* by base, ascending */
};

struct retired {
    struct retired *next;
    void *memory;
};

static struct index_table *index_table;
static uint64_t index_epoch;
static int index_readers;
static struct retired *retire_list;
static pthread_mutex_t index_mutex = PTHREAD_MUTEX_INITIALIZER;

/* Free memory no reader can reach any more. index_mutex held. */
static void retire(void *memory)
{
    if (memory) {
        struct retired *node = malloc(sizeof *node);
        if (!node)
            return; /* leak rather than free under a reader */
        node->memory = memory;
        node->next = retire_list;
        retire_list = node;
    }
    if (__atomic_load_n(&index_readers, __ATOMIC_SEQ_CST))
        return;
    while (retire_list) {
        struct retired *node = retire_list;
        retire_list = node->next;
        free(node->memory);
        free(node);
    }
}

static struct index_entry *find_locked(uint64_t base)
{
    struct index_table *table = index_table;
    for (uint64_t i = 0; table && i < table->count; i++)
        if (table->entries[i]->base == base)
            return table->entries[i];
    return NULL;
}

int ww_index_add(uint64_t base, uint64_t length, int kind, int handle)
{
    struct index_entry *entry = calloc(1, sizeof *entry);
    struct index_spans *spans = calloc(1, sizeof *spans);
    struct index_spans *writable = calloc(1, sizeof *writable);
    if (!entry || !spans || !writable) {
        free(entry);
        free(spans);
        free(writable);
        return -ENOMEM;
    }
    entry->base = base;
    entry->end = base + length;
    entry->kind = kind;
    entry->handle = handle;
    entry->spans = spans;
    entry->writable = writable;
    pthread_mutex_lock(&index_mutex);
    entry->epoch = index_epoch;
    struct index_table *old = index_table;
    uint64_t count = old ? old->count : 0;
    struct index_table *table = malloc(sizeof *table + (count + 1) * sizeof table->entries[0]);
    if (!table) {
        pthread_mutex_unlock(&index_mutex);
        free(entry);
        free(spans);
        free(writable);
        return -ENOMEM;
    }
    uint64_t at = 0;
    while (at < count && old->entries[at]->base < base)
        at++;
    for (uint64_t i = 0; i < at; i++)
        table->entries[i] = old->entries[i];
    table->entries[at] = entry;
    for (uint64_t i = at; i < count; i++)
        table->entries[i + 1] = old->entries[i];
    table->count = count + 1;
    __atomic_store_n(&index_table, table, __ATOMIC_SEQ_CST);
    retire(old);
    pthread_mutex_unlock(&index_mutex);
    return 0;
}

int ww_index_remove(uint64_t base)
{
    pthread_mutex_lock(&index_mutex);
    struct index_table *old = index_table;
    struct index_entry *entry = find_locked(base);
    if (!entry) {
        pthread_mutex_unlock(&index_mutex);
        return -EINVAL;
    }
    struct index_table *table = malloc(sizeof *table + old->count * sizeof table->entries[0]);
    if (!table) {
        pthread_mutex_unlock(&index_mutex);
        return -ENOMEM;
    }
    table->count = 0;
    for (uint64_t i = 0; i < old->count; i++)
        if (old->entries[i] != entry)
            table->entries[table->count++] = old->entries[i];
    __atomic_store_n(&index_table, table, __ATOMIC_SEQ_CST);
    retire(old);
    pthread_mutex_unlock(&index_mutex);
    /* No new call finds the entry now; wait for those that did. The entry is
     * not retired yet, so it stays valid while we read its count. */
    while (__atomic_load_n(&entry->users, __ATOMIC_SEQ_CST))
        sched_yield();
    pthread_mutex_lock(&index_mutex);
    retire(entry->spans);
    retire(entry->writable);
    retire(entry);
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

/* Replace a region's committed and committed read-write spans (and its
 * handle, which changes after fork), marking it current for this process. */
int ww_index_update(uint64_t base, int handle, const uint64_t *bounds, uint64_t count,
                    const uint64_t *writable_bounds, uint64_t writable_count)
{
    struct index_spans *spans = spans_copy(bounds, count);
    struct index_spans *writable = spans_copy(writable_bounds, writable_count);
    if (!spans || !writable) {
        free(spans);
        free(writable);
        return -ENOMEM;
    }
    pthread_mutex_lock(&index_mutex);
    struct index_entry *entry = find_locked(base);
    if (!entry) {
        pthread_mutex_unlock(&index_mutex);
        free(spans);
        free(writable);
        return -EINVAL;
    }
    struct index_spans *old = entry->spans, *old_writable = entry->writable;
    __atomic_store_n(&entry->handle, handle, __ATOMIC_SEQ_CST);
    __atomic_store_n(&entry->spans, spans, __ATOMIC_SEQ_CST);
    __atomic_store_n(&entry->writable, writable, __ATOMIC_SEQ_CST);
    __atomic_store_n(&entry->epoch, index_epoch, __ATOMIC_SEQ_CST);
    retire(old);
    retire(old_writable);
    pthread_mutex_unlock(&index_mutex);
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

/* The first entry that ends after address, or table->count. */
static uint64_t first_ending_after(const struct index_table *table, uint64_t address)
{
    uint64_t lo = 0, hi = table->count;
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if (table->entries[mid]->end <= address)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Does spans (ascending, disjoint, adjacent ones merged) cover [start, end)? */
static int covered(const struct index_spans *spans, uint64_t start, uint64_t end)
{
    for (uint64_t i = 0; i < spans->count && start < end; i++) {
        if (spans->bounds[2 * i + 1] <= start)
            continue;
        if (spans->bounds[2 * i] > start)
            return 0;
        start = spans->bounds[2 * i + 1];
    }
    return start >= end;
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
static int output_check(const struct index_table *table, uint64_t out, uint64_t size)
{
    if (!table || size == 0)
        return OUTPUT_UNMANAGED;
    uint64_t end = out + size;
    int managed = OUTPUT_UNMANAGED;
    for (uint64_t i = first_ending_after(table, out);
         i < table->count && table->entries[i]->base < end; i++) {
        const struct index_entry *entry = table->entries[i];
        uint64_t first = out > entry->base ? out : entry->base;
        uint64_t last = end < entry->end ? end : entry->end;
        if (!covered(__atomic_load_n(&entry->writable, __ATOMIC_SEQ_CST), first, last))
            return OUTPUT_REFUSED;
        managed = OUTPUT_MANAGED;
    }
    return managed;
}

int ww_output_check(const void *out, uint64_t size)
{
    __atomic_add_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    int verdict = output_check(__atomic_load_n(&index_table, __ATOMIC_SEQ_CST),
                               (uint64_t)(uintptr_t)out, size);
    __atomic_sub_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    return verdict == OUTPUT_REFUSED ? -EFAULT : 0;
}

#define REFUSED(reason) (-(int64_t)(WW_REFUSED_BASE + (reason)))

/*
 * Windows' checks on a GetWriteWatch/ResetWriteWatch range, in the order of
 * docs/semantics.md rule 15 after the output array's: flags, size 0, then the
 * write-watch region holding the range rounded out to pages. Reader count held. On success *entry is the
 * region's entry and [*first, *last) the page-aligned range.
 */
static int64_t watched_range(const struct index_table *table, uint64_t flags, uint64_t base,
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

    *entry = NULL;
    if (table) {
        uint64_t lo = 0, hi = table->count; /* first entry with base > first */
        while (lo < hi) {
            uint64_t mid = (lo + hi) / 2;
            if (table->entries[mid]->base <= *first)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo > 0 && *first < table->entries[lo - 1]->end)
            *entry = table->entries[lo - 1];
    }
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
    __atomic_add_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    struct index_table *table = __atomic_load_n(&index_table, __ATOMIC_SEQ_CST);
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
            int handle = __atomic_load_n(&entry->handle, __ATOMIC_SEQ_CST);
            int64_t n = entry->kind == WW_INDEX_PAGEMAP
                ? ww_pagemap_get_write_watch(handle, spans->bounds, spans->count, first, last,
                                             (int)flags, dest, room)
                : ww_track_get_write_watch(handle, spans->bounds, spans->count, first, last,
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
    __atomic_sub_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    return result;
}

/* ResetWriteWatch: the same checks, then every committed page re-armed. */
int64_t ww_index_reset_write_watch(uint64_t base, uint64_t size)
{
    struct index_entry *entry;
    uint64_t first, last;
    __atomic_add_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    struct index_table *table = __atomic_load_n(&index_table, __ATOMIC_SEQ_CST);
    int64_t result = watched_range(table, 0, base, size, &entry, &first, &last);
    int counted = result == 0; /* watched_range counted this call in entry->users */
    if (result == 0 && __atomic_load_n(&entry->latched, __ATOMIC_SEQ_CST))
        result = REFUSED(WW_REFUSED_LATCHED);
    if (result == 0) {
        struct index_spans *spans = __atomic_load_n(&entry->spans, __ATOMIC_SEQ_CST);
        int handle = __atomic_load_n(&entry->handle, __ATOMIC_SEQ_CST);
        int64_t n = entry->kind == WW_INDEX_PAGEMAP
            ? ww_pagemap_reset_write_watch(handle, spans->bounds, spans->count, first, last)
            : ww_track_get_write_watch(handle, spans->bounds, spans->count, first, last, 1,
                                       NULL, (last - first) / WW_PAGE_SIZE);
        result = n < 0 ? -WW_INDEX_ERRNO_BASE + n : 0;
    }
    if (counted)
        __atomic_sub_fetch(&entry->users, 1, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    return result;
}

/* In a forked child: every entry belongs to the parent until refreshed. */
void ww_index_after_fork_child(void)
{
    pthread_mutex_init(&index_mutex, NULL);
    index_readers = 0;
    /* Calls in other threads at fork time do not exist in the child. */
    for (uint64_t i = 0; index_table && i < index_table->count; i++)
        index_table->entries[i]->users = 0;
    index_epoch++;
}
