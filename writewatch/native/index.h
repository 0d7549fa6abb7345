/*
 * The native index's internals, shared by its two halves: index.c keeps the
 * table of regions and makes its changes (add, remove, the page states, the
 * latched flag, the grace period that frees what a change replaced); index_calls.c serves the calls that read it (GetWriteWatch,
 * ResetWriteWatch, process_memwatch's checks, output holds). index.c's opening
 * comment explains the design.
 */
#ifndef WW_INDEX_H
#define WW_INDEX_H

#include <stdint.h>

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
    /* The region's page states (WW_PAGES_* bits, in each item's ptr) as runs
     * of equal value; pages in no run are reserved and not latched. The only
     * home of the commit, protection and latch state of a region. */
    struct ct_table pages;
    struct index_spans *spans; /* its committed runs merged: what a scan walks */
    uint64_t latched_runs;     /* runs with WW_PAGES_LATCHED */
    int latching;              /* a VirtualProtect is latching (latch.py) */
    int latched;  /* latching || latched_runs: Python walks the region's calls */
    int users[2]; /* calls using this region now, in each phase */
    int phase;    /* the phase new calls count themselves in */
    int removed;  /* out of the table: a call that counted itself late backs out */
};

static inline uint64_t run_value(const struct ct_item *run)
{
    return (uint64_t)(uintptr_t)run->ptr;
}

#define WW_HIDDEN __attribute__((visibility("hidden")))

/* The table and its reader counts (index.c owns them; writers hold its mutex). */
extern WW_HIDDEN struct ct_table index_table; /* entries by base */
extern WW_HIDDEN uint64_t index_epoch;        /* bumped in a forked child */
extern WW_HIDDEN int index_readers[2];        /* readers in each phase */
extern WW_HIDDEN int index_phase;             /* the phase new readers count themselves in */
extern WW_HIDDEN int retired_pending;         /* memory waits for readers to leave */

/* Free retired memory if no writer is at it (index.c). */
WW_HIDDEN void index_reclaim_if_free(void);

/* Count a call in the entry; everything the call reads of it comes after. */
static inline int entry_enter(struct index_entry *entry)
{
    int phase = __atomic_load_n(&entry->phase, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&entry->users[phase], 1, __ATOMIC_SEQ_CST);
    return phase;
}

static inline void entry_exit(struct index_entry *entry, int phase)
{
    __atomic_sub_fetch(&entry->users[phase], 1, __ATOMIC_SEQ_CST);
}

/* A reader counts itself before loading any pointer of the table. */
static inline int reader_enter(void)
{
    int phase = __atomic_load_n(&index_phase, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&index_readers[phase], 1, __ATOMIC_SEQ_CST);
    return phase;
}

/* The last reader of a phase out reclaims, if nobody else is at it. */
static inline void reader_exit(int phase)
{
    if (__atomic_sub_fetch(&index_readers[phase], 1, __ATOMIC_SEQ_CST) == 0 &&
        __atomic_load_n(&retired_pending, __ATOMIC_SEQ_CST))
        index_reclaim_if_free();
}

#endif
