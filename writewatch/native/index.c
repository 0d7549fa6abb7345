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
#define _GNU_SOURCE /* process_vm_readv */
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

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
    struct index_spans *spans;
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
    pthread_mutex_unlock(&index_mutex);
    /* No new call finds the entry now; wait for those that did. The entry is
     * not retired yet, so it stays valid while we read its count. */
    while (__atomic_load_n(&entry->users, __ATOMIC_SEQ_CST))
        sched_yield();
    pthread_mutex_lock(&index_mutex);
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

/* Can the kernel read and write [start, start+size)? It answers with EFAULT
 * where a store of ours would crash: copy the bytes out and back in place. */
static int kernel_can_write(uint64_t start, uint64_t size)
{
    char chunk[WW_PAGE_SIZE];
    pid_t self = getpid();
    for (uint64_t done = 0; done < size;) {
        size_t n = size - done < sizeof chunk ? size - done : sizeof chunk;
        struct iovec local = { chunk, n };
        struct iovec remote = { (void *)(uintptr_t)(start + done), n };
        ssize_t got = process_vm_readv(self, &local, 1, &remote, 1, 0);
        if (got < 0 && (errno == ENOSYS || errno == EPERM))
            return 1; /* no way to ask here: trust the caller, as before */
        if (got != (ssize_t)n || process_vm_writev(self, &local, 1, &remote, 1, 0) != got)
            return 0;
        done += n;
    }
    return 1;
}

/*
 * An output buffer inside memory writewatch manages may have been made
 * read-only, inaccessible or decommitted after numpy's view of it was taken:
 * numpy still calls it writable, and a store would kill the process. Windows
 * answers ERROR_NOACCESS there. Armed pages of the tracking backends are made
 * writable first (they are about to be written anyway). Memory writewatch
 * does not manage is numpy's to vouch for. Reader count held.
 */
static int output_ok(const struct index_table *table, uint64_t out, uint64_t size)
{
    if (!table || size == 0)
        return 1;
    uint64_t end = out + size;
    int managed = 0;
    for (uint64_t i = first_ending_after(table, out);
         i < table->count && table->entries[i]->base < end; i++) {
        const struct index_entry *entry = table->entries[i];
        managed = 1;
        if (entry->kind == WW_INDEX_TRACKED) {
            uint64_t first = (out > entry->base ? out : entry->base) & ~(uint64_t)(WW_PAGE_SIZE - 1);
            uint64_t last = ((end < entry->end ? end : entry->end) + WW_PAGE_SIZE - 1)
                            & ~(uint64_t)(WW_PAGE_SIZE - 1);
            ww_track_prepare_write(entry->handle, first, last - first);
        }
    }
    return !managed || kernel_can_write(out, size);
}

int ww_output_check(const void *out, uint64_t size)
{
    __atomic_add_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    int ok = output_ok(__atomic_load_n(&index_table, __ATOMIC_SEQ_CST),
                       (uint64_t)(uintptr_t)out, size);
    __atomic_sub_fetch(&index_readers, 1, __ATOMIC_SEQ_CST);
    return ok ? 0 : -EFAULT;
}

#define REFUSED(reason) (-(int64_t)(WW_REFUSED_BASE + (reason)))

/*
 * Windows' checks on a GetWriteWatch/ResetWriteWatch range, in Wine's order
 * after the output array's: flags, size 0, then the write-watch region holding
 * the range rounded out to pages. Reader count held. On success *entry is the
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
    if (result == 0) {
        if (!output_ok(table, (uint64_t)(uintptr_t)out, capacity * sizeof *out)) {
            result = REFUSED(WW_REFUSED_OUTPUT);
        } else {
            struct index_spans *spans = __atomic_load_n(&entry->spans, __ATOMIC_SEQ_CST);
            int handle = __atomic_load_n(&entry->handle, __ATOMIC_SEQ_CST);
            int64_t n = entry->kind == WW_INDEX_PAGEMAP
                ? ww_pagemap_get_write_watch(handle, spans->bounds, spans->count, first, last,
                                             (int)flags, out, capacity)
                : ww_track_get_write_watch(handle, spans->bounds, spans->count, first, last,
                                           (int)flags, out, capacity);
            result = n < 0 ? -WW_INDEX_ERRNO_BASE + n : n;
        }
        __atomic_sub_fetch(&entry->users, 1, __ATOMIC_SEQ_CST);
    }
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
    if (result == 0) {
        struct index_spans *spans = __atomic_load_n(&entry->spans, __ATOMIC_SEQ_CST);
        int handle = __atomic_load_n(&entry->handle, __ATOMIC_SEQ_CST);
        int64_t n = entry->kind == WW_INDEX_PAGEMAP
            ? ww_pagemap_reset_write_watch(handle, spans->bounds, spans->count, first, last)
            : ww_track_get_write_watch(handle, spans->bounds, spans->count, first, last, 1,
                                       NULL, (last - first) / WW_PAGE_SIZE);
        result = n < 0 ? -WW_INDEX_ERRNO_BASE + n : 0;
        __atomic_sub_fetch(&entry->users, 1, __ATOMIC_SEQ_CST);
    }
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
