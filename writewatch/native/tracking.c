/* The fallbacks' range table: ranges by address, their locks, counted
 * access, the deferred list, and fork (tracking.h says how the files divide). */
#include "tracking.h"

struct ct_table track_table;   /* ranges by start address */
static pthread_mutex_t track_slots_mutex = PTHREAD_MUTEX_INITIALIZER; /* attach/detach */
struct ct_grace track_grace;   /* table memory and ranges replaced */
int track_sync_uffd = -1; /* this process's uffd of the uffd backend */

int this_thread(void)
{
    return (int)syscall(SYS_gettid); /* async-signal-safe, unlike pthread_self's TLS */
}

void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Sleep while the lock word is 2, at most ns (0: no limit). Signal-safe. */
void lock_sleep(int *word, long ns)
{
    struct timespec limit = { .tv_sec = 0, .tv_nsec = ns };
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, 2, ns ? &limit : NULL, NULL, 0);
}

/* The lock is ours: record the holder and settle pages deferred to it. */
static int range_acquired(struct track_range *r, int tid)
{
    __atomic_store_n(&r->owner, tid, __ATOMIC_RELAXED);
    drain_deferred(r);
    return 1;
}

int range_trylock(struct track_range *r, int tid)
{
    int free = 0;
    if (!__atomic_compare_exchange_n(&r->lock, &free, 1, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return 0;
    return range_acquired(r, tid);
}

/* Take the lock marking it contended (2), as a thread that slept on it must:
 * others may still sleep there, and the unlock has to wake them. */
int range_trylock_contended(struct track_range *r, int tid)
{
    if (__atomic_exchange_n(&r->lock, 2, __ATOMIC_ACQUIRE))
        return 0;
    return range_acquired(r, tid);
}

/* Spin briefly (the holder may be running on another CPU), then sleep. */
void range_lock(struct track_range *r)
{
    int tid = this_thread();
    for (int spin = 0; spin < TRACK_LOCK_SPINS; spin++) {
        if (!__atomic_load_n(&r->lock, __ATOMIC_RELAXED) && range_trylock(r, tid))
            return;
        cpu_relax();
    }
    while (!range_trylock_contended(r, tid))
        lock_sleep(&r->lock, 0);
}

void range_unlock(struct track_range *r)
{
    for (;;) {
        drain_deferred(r);
        __atomic_store_n(&r->owner, 0, __ATOMIC_RELAXED);
        if (__atomic_exchange_n(&r->lock, 0, __ATOMIC_RELEASE) == 2)
            syscall(SYS_futex, &r->lock, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        /* A page deferred after the drain, by a thread that found the lock
         * still held, is drained here unless another holder took over. */
        if (!__atomic_load_n(&r->deferred_pending, __ATOMIC_ACQUIRE) ||
            !range_trylock(r, this_thread()))
            return;
    }
}

/* Is the range lock held by thread tid? */
int held_by(const struct track_range *r, int tid)
{
    return __atomic_load_n(&r->lock, __ATOMIC_ACQUIRE) &&
           __atomic_load_n(&r->owner, __ATOMIC_RELAXED) == tid;
}

/* Leave page in r's deferred list (lock-free; signal-safe). */
void defer_page(struct track_range *r, uint64_t page)
{
    int placed = 0;
    for (int i = 0; i < TRACK_DEFERRED_MAX && !placed; i++) {
        uint64_t empty = 0;
        placed = __atomic_compare_exchange_n(&r->deferred[i], &empty, page, 0,
                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    if (!placed)
        __atomic_store_n(&r->deferred_overflow, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&r->deferred_pending, 1, __ATOMIC_SEQ_CST);
}

/*
 * Count a native access to the range holding address (NULL, uncounted, if
 * none): lock-free, no allocation, O(log n), so the fault path uses it too.
 * The lookup runs in a grace window, so the table memory and the range it
 * reads stay allocated; the count then keeps the range from being freed
 * until range_exit. A range being detached is not entered: detach marks it
 * before it waits for the count, and the count is made before the mark is
 * read, so either detach waits for this access or this access sees the mark.
 */
struct track_range *range_enter_at(uint64_t address)
{
    int phase = ct_grace_enter(&track_grace);
    const struct ct_item *item = ct_find(ct_load(&track_table), address);
    struct track_range *r = item ? item->ptr : NULL;
    if (r) {
        __atomic_add_fetch(&r->users, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&r->detached, __ATOMIC_SEQ_CST)) {
            __atomic_sub_fetch(&r->users, 1, __ATOMIC_SEQ_CST);
            r = NULL;
        }
    }
    ct_grace_exit(&track_grace, phase);
    return r;
}

void range_exit(struct track_range *r)
{
    __atomic_sub_fetch(&r->users, 1, __ATOMIC_SEQ_CST);
}

/* range_enter_at for the range with this handle (its start). */
struct track_range *range_enter(uint64_t handle)
{
    struct track_range *r = range_enter_at(handle);
    if (r && r->start != handle) {
        range_exit(r);
        return NULL;
    }
    return r;
}

/* range_enter for [start, start+length) inside the range (NULL, uncounted, if not). */
struct track_range *range_enter_span(uint64_t handle, uint64_t start, uint64_t length)
{
    struct track_range *r = range_enter(handle);
    if (r && (start < r->start || start + length > r->end)) {
        range_exit(r);
        return NULL;
    }
    return r;
}

/* ---- the range table (Python never uses one handle from two threads at once) ---- */

/* The range with this handle, in the current table. track_slots_mutex held. */
static struct track_range *range_at_handle(uint64_t handle)
{
    const struct ct_item *item = ct_find(track_table.top, handle);
    struct track_range *r = item ? item->ptr : NULL;
    return r && r->start == handle ? r : NULL;
}

/* Table memory (and ranges) replaced and waiting for their grace period. */
int64_t ww_track_retired_waiting(void)
{
    pthread_mutex_lock(&track_slots_mutex);
    int64_t count = ct_grace_waiting(&track_grace);
    pthread_mutex_unlock(&track_slots_mutex);
    return count;
}

/*
 * Give a fresh PROT_NONE reservation its anon_vma now, while it is one VMA:
 * every VMA later split off shares it, so VMAs of equal protection can merge
 * back (coalesce). Left to the first write faults, each page written apart
 * from others would get an anon_vma of its own, and VMAs with different
 * anon_vmas never merge: on Linux 6.1 a region then ran out of mappings that
 * coalescing could not give back. Costs one page fault; the page is dropped.
 */
static void share_one_anon_vma(uint64_t start, uint64_t length)
{
    void *p = (void *)(uintptr_t)start;
    if (mprotect(p, length, PROT_READ | PROT_WRITE))
        return; /* only a hint: tracking works without it, merging less */
    *(volatile char *)p = 0;
    madvise(p, WW_PAGE_SIZE, MADV_DONTNEED);
    mprotect(p, length, PROT_NONE);
}

/* A range's struct is written by the fault path, so it gets a mapping of its
 * own, never a malloc heap page that process_memwatch may arm (foreign.c asks
 * ww_track_internal_overlaps to keep such pages out). Freed after the grace
 * period like table memory, by range_release instead of free(). */
static struct track_range *range_alloc(void)
{
    void *r = mmap(NULL, sizeof(struct track_range), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return r == MAP_FAILED ? NULL : r;
}

static void range_release(void *r)
{
    munmap(r, sizeof(struct track_range));
}

#define TRACK_ATTACH_TRIES 1000

/* Are the ranges overlapping [start, end) all foreign.c's spans?
 * track_slots_mutex held. */
static int only_foreign_overlap(const struct ct_top *top, uint64_t start, uint64_t end)
{
    struct ct_pos pos;
    if (!ct_first_ending_after(top, start, &pos))
        return 0;
    do {
        const struct ct_item *item = ct_at(top, pos);
        if (item->start >= end)
            break;
        if (!((const struct track_range *)item->ptr)->foreign)
            return 0;
    } while (ct_next(top, &pos));
    return 1;
}

int64_t ww_track_attach(uint64_t start, uint64_t length, int mode)
{
    struct track_range *r = range_alloc();
    if (!r)
        return -ENOMEM;
    int foreign = mode & WW_TRACK_FOREIGN; /* memory writewatch did not map: keep its data */
    mode &= ~WW_TRACK_FOREIGN;
    r->start = start;
    r->end = start + length;
    r->mode = mode;
    r->foreign = foreign;
    r->state_size = (length / WW_PAGE_SIZE + WW_PAGE_SIZE - 1) & ~(uint64_t)(WW_PAGE_SIZE - 1);
    void *state = mmap(NULL, r->state_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (state == MAP_FAILED) {
        range_release(r);
        return -ENOMEM;
    }
    r->state = state;
    struct ct_item item = { .start = r->start, .end = r->end, .ptr = r };
    int result;
    for (int tries = 0;; tries++) {
        if (!foreign) /* a new reservation replaces whatever was watched there */
            ww_memwatch_evict(r->start, r->end);
        pthread_mutex_lock(&track_slots_mutex);
        int overlaps = ct_overlaps(track_table.top, r->start, r->end);
        /* process_memwatch in another thread may have watched the new
         * reservation as foreign memory after the eviction, before it is a
         * region: evict again (it sees the region once it is in the table). */
        int again = overlaps && !foreign && tries < TRACK_ATTACH_TRIES &&
                    only_foreign_overlap(track_table.top, r->start, r->end);
        result = length == 0 || overlaps ? -EEXIST
            : ct_splice(&track_table, r->start, r->start + 1, &item, 1, ct_grace_retire,
                        &track_grace);
        ct_grace_reclaim(&track_grace);
        pthread_mutex_unlock(&track_slots_mutex);
        if (!again)
            break;
        sched_yield();
    }
    if (result) {
        munmap(state, r->state_size);
        range_release(r); /* never in the table: no reader can hold it */
        return result;
    }
    /* Only now that the region is in the table: before, process_memwatch in
     * another thread could take the fresh reservation for foreign memory and
     * arm the page this writes (a crash), or leave it readable. */
    if (mode == WW_MODE_MPROTECT && !foreign)
        share_one_anon_vma(start, length);
    return (int64_t)start;
}

int ww_track_detach(uint64_t handle)
{
    pthread_mutex_lock(&track_slots_mutex);
    struct track_range *r = range_at_handle(handle);
    int result = -EINVAL;
    if (r) {
        __atomic_store_n(&r->detached, 1, __ATOMIC_SEQ_CST);
        result = ct_splice(&track_table, handle, handle + 1, NULL, 0, ct_grace_retire,
                           &track_grace);
        if (result)
            __atomic_store_n(&r->detached, 0, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&track_slots_mutex);
    if (result)
        return result;
    /* Wait for the calls and faults counted on this range, and only those:
     * a release does not wait for other regions' traffic. */
    while (__atomic_load_n(&r->users, __ATOMIC_SEQ_CST))
        sched_yield();
    munmap(r->state, r->state_size); /* read only under a count */
    pthread_mutex_lock(&track_slots_mutex);
    ct_grace_retire_release(r, &track_grace, range_release); /* a lookup may still hold it */
    ct_grace_reclaim(&track_grace);
    pthread_mutex_unlock(&track_slots_mutex);
    return 0;
}

/* The mode (WW_MODE_MPROTECT or WW_MODE_UFFD) of the region's range holding
 * address, or -ENOENT (also for foreign.c's spans: they are no region). */
int ww_track_mode_at(uint64_t address)
{
    struct track_range *r = range_enter_at(address);
    if (!r)
        return -ENOENT;
    int mode = r->foreign ? -ENOENT : r->mode; /* regions only */
    range_exit(r);
    return mode;
}

static int spans_overlap(uint64_t a, uint64_t b, uint64_t lo, uint64_t hi)
{
    return a < hi && lo < b;
}

/* The whole pages of a range's own mappings, its struct's and its state's,
 * as two [start, end) pairs. */
static void range_mappings(const struct track_range *r, uint64_t pairs[4])
{
    const uint64_t mask = WW_PAGE_SIZE - 1;
    uint64_t at = (uint64_t)(uintptr_t)r, state = (uint64_t)(uintptr_t)r->state;
    pairs[0] = at & ~mask;
    pairs[1] = (at + sizeof *r + mask) & ~mask;
    pairs[2] = state;
    pairs[3] = state + ((r->state_size + mask) & ~mask);
}

/* Does [start, end) hold memory the fault path writes (a range's struct or
 * state, the uffd handler thread's stack)? Arming it would make the fault path
 * fault on itself. Whole pages count. */
int ww_track_internal_overlaps(uint64_t start, uint64_t end)
{
    uint64_t low, high;
    handler_stack(&low, &high);
    int found = spans_overlap(start, end, low, high);
    pthread_mutex_lock(&track_slots_mutex);
    struct ct_top *top = track_table.top;
    struct ct_pos pos = { 0, 0 };
    if (!found && top && top->count)
        do {
            uint64_t pairs[4];
            range_mappings(ct_at(top, pos)->ptr, pairs);
            found = spans_overlap(start, end, pairs[0], pairs[1]) ||
                    spans_overlap(start, end, pairs[2], pairs[3]);
        } while (!found && ct_next(top, &pos));
    pthread_mutex_unlock(&track_slots_mutex);
    return found;
}

/* Every mapping of the fault path's (each range's struct and state, the uffd
 * handler thread's stack) as whole-page [start, end) pairs, into a malloc'd
 * array *out: the number of pairs, or -ENOMEM. Unsorted. */
int64_t ww_track_internal_mappings(uint64_t **out)
{
    pthread_mutex_lock(&track_slots_mutex);
    struct ct_top *top = track_table.top;
    uint64_t ranges = 0;
    for (uint64_t c = 0; top && c < top->count; c++)
        ranges += top->slots[c].chunk->count;
    uint64_t *pairs = malloc((2 * ranges + 1) * 2 * sizeof *pairs), n = 0;
    if (pairs && ranges) {
        struct ct_pos pos = { 0, 0 };
        do {
            range_mappings(ct_at(top, pos)->ptr, pairs + 2 * n);
            n += 2;
        } while (ct_next(top, &pos));
    }
    pthread_mutex_unlock(&track_slots_mutex);
    if (!pairs)
        return -ENOMEM;
    uint64_t low, high;
    handler_stack(&low, &high);
    if (low < high) {
        pairs[2 * n] = low;
        pairs[2 * n++ + 1] = high;
    }
    *out = pairs;
    return (int64_t)n;
}

/* The state bytes of npages pages from address, in one counted access. */
int ww_track_states(uint64_t handle, uint64_t address, uint64_t npages, uint8_t *out)
{
    struct track_range *r = range_enter_span(handle, address, npages * WW_PAGE_SIZE);
    if (!r)
        return -EINVAL;
    memcpy(out, r->state + (address - r->start) / WW_PAGE_SIZE, npages);
    range_exit(r);
    return 0;
}

int ww_track_state(uint64_t handle, uint64_t address)
{
    struct track_range *r = range_enter(handle);
    if (!r)
        return -EINVAL;
    int result = address < r->start || address >= r->end
        ? -EINVAL : r->state[(address - r->start) / WW_PAGE_SIZE];
    range_exit(r);
    return result;
}

/*
 * Around fork: a handler or a reset in another thread may be half-way between
 * changing a page's protection and recording it. Holding every range lock
 * while the process forks gives the child state that matches its page
 * protections. The locks are taken by pthread_atfork handlers, inside fork()
 * itself, not by an os.register_at_fork hook: a Python hook would return to
 * the interpreter holding them and wait for the GIL, while the thread holding
 * the GIL may be stopped in a write fault whose handler waits for one of them.
 * Inside fork() the forking thread already holds the GIL, and every range
 * lock holder is native code that finishes without it.
 */
static void track_lock_all(void)
{
    pthread_mutex_lock(&track_slots_mutex);
    struct ct_top *top = track_table.top;
    struct ct_pos pos = { 0, 0 };
    if (top && top->count)
        do
            range_lock(ct_at(top, pos)->ptr);
        while (ct_next(top, &pos));
}

static void track_unlock_all(void)
{
    struct ct_top *top = track_table.top;
    struct ct_pos pos = { 0, 0 };
    if (top && top->count)
        do
            range_unlock(ct_at(top, pos)->ptr);
        while (ct_next(top, &pos));
    pthread_mutex_unlock(&track_slots_mutex);
}

/* In a forked child: the locks this thread took are released, and no handler
 * thread exists (threads do not survive fork). */
static void track_after_fork_child(void)
{
    struct ct_top *top = track_table.top;
    struct ct_pos pos = { 0, 0 };
    if (top && top->count)
        do
            ((struct track_range *)ct_at(top, pos)->ptr)->users = 0;
        while (ct_next(top, &pos));
    track_grace.readers[0] = track_grace.readers[1] = 0;
    memset(track_blocked, 0, sizeof track_blocked);
    track_waiting_count = 0;
    track_unlock_all();
    track_sync_uffd = -1;
    track_faults_after_fork_child();
}

/* Before fork, inside it: the fault paths note whether the process forks
 * alone, then every range lock is taken. */
static void track_before_fork(void)
{
    track_faults_before_fork();
    track_lock_all();
}

static pthread_once_t track_fork_handlers_once = PTHREAD_ONCE_INIT;
static int track_fork_handlers_error;

static void track_install_fork_handlers_once(void)
{
    track_fork_handlers_error = pthread_atfork(track_before_fork, track_unlock_all,
                                               track_after_fork_child);
}

/* Register the fork handlers (once per process; forked children inherit
 * them). Returns 0 or -errno. */
int ww_track_install_fork_handlers(void)
{
    pthread_once(&track_fork_handlers_once, track_install_fork_handlers_once);
    return -track_fork_handlers_error;
}

