/*
 * The native index of write-watch regions, for GetWriteWatch in one call.
 *
 * A game calls GetWriteWatch every frame on a small region, where the kernel
 * call itself takes ~1.7 us: Python-level argument checks, region lookup and
 * locking would double that. regions.py mirrors each write-watch region here
 * (its bounds, its backend's handle and its committed spans), and
 * ww_get_write_watch does the Windows checks, the lookup and the scan with no
 * Python in between.
 *
 * Readers take no lock: they count themselves in index_readers, then load
 * pointers that writers replace whole (copy on write). A writer frees what it
 * replaced only when no reader is inside; otherwise it parks it on a retire
 * list, emptied at the next quiet moment. Writers are serialised by
 * index_mutex (region create, release, commit and decommit are rare).
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_abi.h"

#define INDEX_PAGE 4096u

struct index_spans {
    uint64_t count;
    uint64_t bounds[]; /* start/end pairs, ascending */
};

struct index_entry {
    uint64_t base, end;
    int kind;   /* WW_INDEX_PAGEMAP or WW_INDEX_TRACKED */
    int handle; /* the pagemap descriptor, or the tracking slot */
    uint64_t epoch;
    struct index_spans *spans;
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
    pthread_mutex_lock(&index_mutex);
    entry->epoch = index_epoch;
    struct index_table *old = index_table;
    uint64_t count = old ? old->count : 0;
    struct index_table *table = malloc(sizeof *table + (count + 1) * sizeof table->entries[0]);
    if (!table) {
        pthread_mutex_unlock(&index_mutex);
        free(entry);
        free(spans);
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
    retire(entry->spans);
    retire(entry);
    pthread_mutex_unlock(&index_mutex);
    return 0;
}

/* Replace a region's committed spans (and its handle, which changes after
 * fork), marking it current for this process. */
int ww_index_update(uint64_t base, int handle, const uint64_t *bounds, uint64_t count)
{
    struct index_spans *spans = malloc(sizeof *spans + 2 * count * sizeof spans->bounds[0]);
    if (!spans)
        return -ENOMEM;
    spans->count = count;
    memcpy(spans->bounds, bounds, 2 * count * sizeof spans->bounds[0]);
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
    pthread_mutex_unlock(&index_mutex);
    return 0;
}

/*
 * GetWriteWatch after the caller checked the output array: flags, size, the
 * region lookup and the range, in Wine's order, then the scan. Returns the
 * count, -ERROR_INVALID_PARAMETER, -WW_INDEX_SLOW (a forked child must refresh
 * the region first), or -(WW_INDEX_ERRNO_BASE + errno) for a kernel failure.
 */
int64_t ww_get_write_watch(uint64_t flags, uint64_t base, uint64_t size,
                           uint64_t *out, uint64_t capacity)
{
    if (flags & ~(uint64_t)1 || size == 0)
        return -87;
    uint64_t first = base & ~(uint64_t)(INDEX_PAGE - 1);
    uint64_t last = base + size + (INDEX_PAGE - 1);
    if (last < base) /* wrapped: no region reaches that far */
        return -87;
    last &= ~(uint64_t)(INDEX_PAGE - 1);

    __atomic_add_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    int64_t result = -87;
    struct index_table *table = __atomic_load_n(&index_table, __ATOMIC_SEQ_CST);
    struct index_entry *entry = NULL;
    if (table) {
        uint64_t lo = 0, hi = table->count; /* first entry with base > first */
        while (lo < hi) {
            uint64_t mid = (lo + hi) / 2;
            if (table->entries[mid]->base <= first)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo > 0 && first < table->entries[lo - 1]->end)
            entry = table->entries[lo - 1];
    }
    if (entry && last <= entry->end) {
        if (__atomic_load_n(&entry->epoch, __ATOMIC_SEQ_CST) != index_epoch) {
            result = -WW_INDEX_SLOW;
        } else {
            struct index_spans *spans = __atomic_load_n(&entry->spans, __ATOMIC_SEQ_CST);
            int handle = __atomic_load_n(&entry->handle, __ATOMIC_SEQ_CST);
            int64_t n = entry->kind == WW_INDEX_PAGEMAP
                ? ww_pagemap_written_spans(handle, spans->bounds, spans->count, first, last,
                                           (int)flags, out, capacity)
                : ww_track_written_spans(handle, spans->bounds, spans->count, first, last,
                                         (int)flags, out, capacity);
            result = n < 0 ? -WW_INDEX_ERRNO_BASE + n : n;
        }
    }
    __atomic_sub_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    return result;
}

/* In a forked child: every entry belongs to the parent until refreshed. */
void ww_index_after_fork_child(void)
{
    pthread_mutex_init(&index_mutex, NULL);
    index_readers = 0;
    index_epoch++;
}
