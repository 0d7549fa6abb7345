/*
 * A sorted table of disjoint [start, end) items, read lock-free, in two
 * copy-on-write levels: a top array of chunk pointers, each chunk a sorted
 * array of at most CT_CHUNK_MAX items. Used by tracking.c (its ranges), by
 * index.c (its regions, and each region's page states).
 *
 * Readers load the top pointer once (acquire) and then read only immutable
 * memory: a published top and its chunks never change. A lookup by address is
 * two binary searches, O(log n), with no lock and no allocation, so the
 * SIGSEGV handler and the uffd handler thread may use it.
 *
 * Writers are serialised by their caller's mutex. ct_splice replaces the items
 * whose start lies in [from, to) by new ones: it rebuilds only the chunks those
 * items live in (one or two, for an insert or a removal) and copies the top
 * array, O(CT_CHUNK_MAX + n / CT_CHUNK_MIN) work and memory per update, never
 * O(n). What it replaced is handed to the caller's retire function, which must
 * free it only once no reader can still hold it.
 *
 * Header-only (static functions): not read by cffi.
 */
#ifndef WW_CTABLE_H
#define WW_CTABLE_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CT_CHUNK_MAX 256 /* items per chunk at most */
#define CT_CHUNK_MIN 64  /* a chunk rebuilt smaller than this absorbs its neighbour */

struct ct_item {
    uint64_t start, end;
    void *ptr;
};

struct ct_chunk {
    uint64_t count;
    struct ct_item items[];
};

struct ct_slot {
    uint64_t first; /* items[0].start of the chunk */
    struct ct_chunk *chunk;
};

struct ct_top {
    uint64_t count; /* chunks */
    struct ct_slot slots[];
};

struct ct_table {
    struct ct_top *top; /* NULL while empty */
};

typedef void (*ct_retire_fn)(void *memory, void *context);

/* Memory an update replaced, kept on a list until no reader may hold it: each
 * user of the tables has its own rule for when that is. */
struct ct_retired {
    struct ct_retired *next;
    void *memory;
    void (*release)(void *memory); /* how to free it; NULL: free() */
};

/* Keep memory, to be freed by release (NULL: free()), on *list: 0, or -1 if
 * no node could be allocated (then the memory leaks rather than being freed
 * under a reader). */
static inline int ct_retired_push_release(struct ct_retired **list, void *memory,
                                          void (*release)(void *memory))
{
    struct ct_retired *node = malloc(sizeof *node);
    if (!node)
        return -1;
    node->memory = memory;
    node->release = release;
    node->next = *list;
    *list = node;
    return 0;
}

static inline int ct_retired_push(struct ct_retired **list, void *memory)
{
    return ct_retired_push_release(list, memory, NULL);
}

/* Free everything on *list and empty it. */
static inline void ct_retired_free(struct ct_retired **list)
{
    while (*list) {
        struct ct_retired *node = *list;
        *list = node->next;
        if (node->release)
            node->release(node->memory);
        else
            free(node->memory);
        free(node);
    }
}

/*
 * A grace period for memory an update replaced, that makes progress under
 * constant traffic. Readers count themselves in the phase of the moment
 * (ct_grace_enter/exit: two atomic operations, signal-safe) around the short
 * window in which they may hold replaced memory. The phase flips only once
 * every reader of the other phase has left, and memory retired before the
 * last flip is freed at the next one: a reader that could reach it counted
 * itself in the phase of its retirement or, having read the phase just
 * before a flip, in the phase before it, which holds the next flip back. So
 * retired memory waits only for the windows open when it was retired, never
 * for a quiet moment. Writers (retire, reclaim) are serialised by the
 * caller's mutex.
 */
struct ct_grace {
    int readers[2];               /* readers in each phase */
    int phase;                    /* the phase new readers count themselves in */
    struct ct_retired *now;       /* retired in this phase */
    struct ct_retired *before;    /* retired before the last flip */
    int pending;                  /* either list is non-empty */
};

static inline int ct_grace_enter(struct ct_grace *g)
{
    int phase = __atomic_load_n(&g->phase, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&g->readers[phase], 1, __ATOMIC_SEQ_CST);
    return phase;
}

/* Leave the window entered in phase; 1 if it was the last reader of that
 * phase while memory waits (the caller may reclaim, if it can lock). */
static inline int ct_grace_exit(struct ct_grace *g, int phase)
{
    return __atomic_sub_fetch(&g->readers[phase], 1, __ATOMIC_SEQ_CST) == 0 &&
           __atomic_load_n(&g->pending, __ATOMIC_SEQ_CST);
}

/* Keep memory until no reader may hold it, then free it with release (NULL:
 * free(); ct_grace_retire is the ct_retire_fn-shaped form; NULL memory is
 * ignored). Caller's mutex held. */
static inline void ct_grace_retire_release(void *memory, struct ct_grace *g,
                                           void (*release)(void *memory))
{
    if (memory && !ct_retired_push_release(&g->now, memory, release))
        __atomic_store_n(&g->pending, 1, __ATOMIC_SEQ_CST);
}

static inline void ct_grace_retire(void *memory, void *grace)
{
    ct_grace_retire_release(memory, grace, NULL);
}

/* Free what no reader can reach any more, flipping the phase (at most twice).
 * Caller's mutex held. */
static inline void ct_grace_reclaim(struct ct_grace *g)
{
    for (int round = 0; round < 2 && __atomic_load_n(&g->pending, __ATOMIC_SEQ_CST); round++) {
        int phase = g->phase;
        if (__atomic_load_n(&g->readers[1 - phase], __ATOMIC_SEQ_CST))
            break;
        ct_retired_free(&g->before);
        g->before = g->now;
        g->now = NULL;
        __atomic_store_n(&g->phase, 1 - phase, __ATOMIC_SEQ_CST);
        __atomic_store_n(&g->pending, g->before != NULL, __ATOMIC_SEQ_CST);
    }
}

/* How many blocks wait to be freed (for tests). Caller's mutex held. */
static inline int64_t ct_grace_waiting(const struct ct_grace *g)
{
    int64_t count = 0;
    for (const struct ct_retired *node = g->now; node; node = node->next)
        count++;
    for (const struct ct_retired *node = g->before; node; node = node->next)
        count++;
    return count;
}

/* A position: chunk ci, item k. */
struct ct_pos {
    uint64_t ci, k;
};

static inline struct ct_top *ct_load(struct ct_table *table)
{
    return __atomic_load_n(&table->top, __ATOMIC_SEQ_CST);
}

/* The last item whose start <= address: 1 and *pos, or 0 if none. */
static inline int ct_last_at_or_before(const struct ct_top *top, uint64_t address,
                                       struct ct_pos *pos)
{
    if (!top || top->count == 0 || top->slots[0].first > address)
        return 0;
    uint64_t lo = 0, hi = top->count; /* first slot with first > address */
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if (top->slots[mid].first <= address)
            lo = mid + 1;
        else
            hi = mid;
    }
    const struct ct_chunk *chunk = top->slots[lo - 1].chunk;
    uint64_t a = 0, b = chunk->count; /* first item with start > address */
    while (a < b) {
        uint64_t mid = (a + b) / 2;
        if (chunk->items[mid].start <= address)
            a = mid + 1;
        else
            b = mid;
    }
    pos->ci = lo - 1;
    pos->k = a - 1; /* a >= 1: the chunk's first start is <= address */
    return 1;
}

static inline const struct ct_item *ct_at(const struct ct_top *top, struct ct_pos pos)
{
    return &top->slots[pos.ci].chunk->items[pos.k];
}

/* Advance pos; 0 at the end. */
static inline int ct_next(const struct ct_top *top, struct ct_pos *pos)
{
    if (++pos->k < top->slots[pos->ci].chunk->count)
        return 1;
    pos->k = 0;
    return ++pos->ci < top->count;
}

/* The first item ending after address: 1 and *pos, or 0 if none. */
static inline int ct_first_ending_after(const struct ct_top *top, uint64_t address,
                                        struct ct_pos *pos)
{
    if (!top || top->count == 0)
        return 0;
    if (!ct_last_at_or_before(top, address, pos)) {
        pos->ci = pos->k = 0;
        return 1;
    }
    if (ct_at(top, *pos)->end > address)
        return 1;
    return ct_next(top, pos);
}

/* The item holding address, or NULL. */
static inline const struct ct_item *ct_find(const struct ct_top *top, uint64_t address)
{
    struct ct_pos pos;
    if (!ct_last_at_or_before(top, address, &pos))
        return NULL;
    const struct ct_item *item = ct_at(top, pos);
    return address < item->end ? item : NULL;
}

/* Does [start, end) overlap an item? */
static inline int ct_overlaps(const struct ct_top *top, uint64_t start, uint64_t end)
{
    struct ct_pos pos;
    return start < end && ct_first_ending_after(top, start, &pos) && ct_at(top, pos)->start < end;
}

/*
 * Writer (caller's mutex held): replace the items whose start lies in
 * [from, to) by repl[0..n), which must be sorted, disjoint from the items
 * kept, and start in [from, to). Returns 0 or -ENOMEM (nothing changed).
 */
static int ct_splice(struct ct_table *table, uint64_t from, uint64_t to,
                     const struct ct_item *repl, uint64_t n, ct_retire_fn retire, void *context)
{
    struct ct_top *old = table->top;
    uint64_t nchunks = old ? old->count : 0;
    /* Chunks [lo, hi) hold every item with start in [from, to), and repl's place. */
    uint64_t lo = 0, hi = 0;
    if (nchunks) {
        uint64_t a = 0, b = nchunks; /* first slot with first > from */
        while (a < b) {
            uint64_t mid = (a + b) / 2;
            if (old->slots[mid].first <= from)
                a = mid + 1;
            else
                b = mid;
        }
        lo = a ? a - 1 : 0;
        a = lo, b = nchunks; /* first slot with first >= to */
        while (a < b) {
            uint64_t mid = (a + b) / 2;
            if (old->slots[mid].first < to)
                a = mid + 1;
            else
                b = mid;
        }
        hi = a > lo ? a : lo + 1;
    }
    uint64_t kept = 0;
    for (uint64_t c = lo; c < hi; c++)
        for (uint64_t k = 0; k < old->slots[c].chunk->count; k++) {
            uint64_t s = old->slots[c].chunk->items[k].start;
            kept += s < from || s >= to;
        }
    /* A small result absorbs a neighbour, so chunks stay at least
     * CT_CHUNK_MIN full (but the last) and the top stays short. */
    if (kept + n < CT_CHUNK_MIN && nchunks > hi - lo) {
        uint64_t extra = hi < nchunks ? hi++ : --lo;
        kept += old->slots[extra].chunk->count;
    }
    uint64_t total = kept + n;
    struct ct_item *all = total ? malloc(total * sizeof *all) : NULL;
    if (total && !all)
        return -ENOMEM;
    uint64_t at = 0;
    int placed = 0;
    for (uint64_t c = lo; c < hi; c++) {
        const struct ct_chunk *chunk = old->slots[c].chunk;
        for (uint64_t k = 0; k < chunk->count; k++) {
            uint64_t s = chunk->items[k].start;
            if (!placed && s >= from) {
                if (n) /* repl may be NULL for a removal */
                    memcpy(all + at, repl, n * sizeof *repl);
                at += n;
                placed = 1;
            }
            if (s < from || s >= to)
                all[at++] = chunk->items[k];
        }
    }
    if (!placed && n) {
        memcpy(all + at, repl, n * sizeof *repl);
        at += n;
    }
    uint64_t made = (total + CT_CHUNK_MAX - 1) / CT_CHUNK_MAX;
    uint64_t new_count = nchunks - (hi - lo) + made;
    struct ct_top *top = NULL;
    struct ct_chunk **chunks = made ? calloc(made, sizeof *chunks) : NULL;
    int failed = made && !chunks;
    for (uint64_t c = 0; c < made && !failed; c++) {
        uint64_t begin = total * c / made, end = total * (c + 1) / made;
        chunks[c] = malloc(sizeof *chunks[c] + (end - begin) * sizeof(struct ct_item));
        if (!chunks[c]) {
            failed = 1;
            break;
        }
        chunks[c]->count = end - begin;
        memcpy(chunks[c]->items, all + begin, (end - begin) * sizeof *all);
    }
    if (!failed && new_count) {
        top = malloc(sizeof *top + new_count * sizeof top->slots[0]);
        failed = !top;
    }
    free(all);
    if (failed) {
        for (uint64_t c = 0; chunks && c < made; c++)
            free(chunks[c]);
        free(chunks);
        return -ENOMEM;
    }
    if (top) {
        top->count = new_count;
        uint64_t t = 0;
        for (uint64_t c = 0; c < lo; c++)
            top->slots[t++] = old->slots[c];
        for (uint64_t c = 0; c < made; c++) {
            top->slots[t].first = chunks[c]->items[0].start;
            top->slots[t++].chunk = chunks[c];
        }
        for (uint64_t c = hi; c < nchunks; c++)
            top->slots[t++] = old->slots[c];
    }
    free(chunks);
    __atomic_store_n(&table->top, top, __ATOMIC_SEQ_CST);
    for (uint64_t c = lo; c < hi; c++)
        retire(old->slots[c].chunk, context);
    if (old)
        retire(old, context);
    return 0;
}

#endif
