/*
 * Userspace write tracking for the fallback backends, where the kernel keeps
 * no dirty state for us:
 *
 *   mprotect: armed pages are PROT_READ; the SIGSEGV handler records the first
 *             write and gives the page write access back.
 *   uffd:     armed pages are userfaultfd write-protected (synchronous mode);
 *             a handler thread records the fault and removes the protection,
 *             which also wakes the faulting thread.
 *
 * One range per reservation, one state byte per page (DIRTY, ARMED and the
 * page's logical READ/WRITE protection). The state array is mapped
 * MAP_NORESERVE, so only pages whose state is touched cost memory.
 *
 * A per-range lock serialises the fault path with collect-and-reset: a
 * reset arms the pages it reports before it clears their DIRTY bit, and a
 * fault arriving meanwhile waits for the lock, so a write is reported either
 * by this call or by the next, never lost. The lock spins briefly, then sleeps
 * on a futex (async-signal-safe, so SIGSEGV handlers wait the same way): with
 * more threads than CPUs a holder preempted mid-call gets the CPU back instead
 * of waiters yielding to one another.
 *
 * The fault path never waits for something the faulting thread may hold: a
 * fault taken while the faulting thread itself holds the range lock (a signal
 * handler storing into watched memory in the middle of a reset) gives the page
 * write access at once and leaves the page in the range's deferred list; the
 * lock holder records it as written when it lets the lock go, after anything
 * it did to the page.
 *
 * The range table is a two-level copy-on-write table by address (ctable.h):
 * read lock-free and without allocating, by the fault path included, in
 * O(log n); updated by attach and detach in O(chunk + n / chunk), never O(n),
 * and with no cap on the number of ranges. A range's handle is its start
 * address (opaque to Python). Every native access to a range, by a call or by
 * a fault, is counted in track_users; a range, and any table memory an update
 * replaced, is freed only once no counted access is left that could reach it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <linux/futex.h>

#include "abi.h"
#include "ctable.h"

#define TRACK_NO_RUN UINT64_MAX
#define TRACK_DEFERRED_MAX 64
/* Lock word: 0 free, 1 held, 2 held and someone may sleep on it. */
#define TRACK_LOCK_SPINS 100        /* brief spin before sleeping */
#define TRACK_LOCK_NAP_NS 200000    /* the uffd handler thread's wait, re-checked */

struct track_range {
    uint64_t start, end;
    uint8_t *state;
    uint64_t state_size;
    int mode;
    int foreign;                              /* foreign.c's: memory no region holds */
    int lock;                                 /* 0 free, 1 held, 2 held, sleepers */
    int owner;                                /* the lock holder's thread id */
    int deferred_pending;                     /* pages below, or an overflow */
    int deferred_overflow;                    /* more than fit: treat all as written */
    uint64_t deferred[TRACK_DEFERRED_MAX];    /* pages written while the lock was held */
};

static struct ct_table track_table;   /* ranges by start address */
static pthread_mutex_t track_slots_mutex = PTHREAD_MUTEX_INITIALIZER; /* attach/detach */
static struct ct_retired *track_retired; /* table memory replaced; mutex held */
static int track_users;          /* native accesses to ranges in progress */
static int track_sync_uffd = -1; /* this process's uffd of the uffd backend */
static struct sigaction track_prev_segv;

static int this_thread(void)
{
    return (int)syscall(SYS_gettid); /* async-signal-safe, unlike pthread_self's TLS */
}

static void drain_deferred(struct track_range *r);

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Sleep while the lock word is 2, at most ns (0: no limit). Signal-safe. */
static void lock_sleep(int *word, long ns)
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

static int range_trylock(struct track_range *r, int tid)
{
    int free = 0;
    if (!__atomic_compare_exchange_n(&r->lock, &free, 1, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return 0;
    return range_acquired(r, tid);
}

/* Take the lock marking it contended (2), as a thread that slept on it must:
 * others may still sleep there, and the unlock has to wake them. */
static int range_trylock_contended(struct track_range *r, int tid)
{
    if (__atomic_exchange_n(&r->lock, 2, __ATOMIC_ACQUIRE))
        return 0;
    return range_acquired(r, tid);
}

/* Spin briefly (the holder may be running on another CPU), then sleep. */
static void range_lock(struct track_range *r)
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

static void range_unlock(struct track_range *r)
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
static int held_by(const struct track_range *r, int tid)
{
    return __atomic_load_n(&r->lock, __ATOMIC_ACQUIRE) &&
           __atomic_load_n(&r->owner, __ATOMIC_RELAXED) == tid;
}

/* Leave page in r's deferred list (lock-free; signal-safe). */
static void defer_page(struct track_range *r, uint64_t page)
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

/* Count a native access to the range with this handle (NULL, uncounted, if none). */
static struct track_range *range_enter(uint64_t handle);
static void range_exit(void)
{
    __atomic_sub_fetch(&track_users, 1, __ATOMIC_SEQ_CST);
}

/* The range holding address (caller counted in track_users): lock-free,
 * no allocation, O(log n): the fault path's lookup. */
static struct track_range *range_of(uint64_t address)
{
    const struct ct_item *item = ct_find(ct_load(&track_table), address);
    return item ? item->ptr : NULL;
}

static struct track_range *range_at_handle(uint64_t handle)
{
    struct track_range *r = range_of(handle);
    return r && r->start == handle ? r : NULL;
}

static struct track_range *range_enter(uint64_t handle)
{
    __atomic_add_fetch(&track_users, 1, __ATOMIC_SEQ_CST);
    struct track_range *r = range_at_handle(handle);
    if (!r)
        range_exit();
    return r;
}

/* range_enter for [start, start+length) inside the range (NULL, uncounted, if not). */
static struct track_range *range_enter_span(uint64_t handle, uint64_t start, uint64_t length)
{
    struct track_range *r = range_enter(handle);
    if (r && (start < r->start || start + length > r->end)) {
        range_exit();
        return NULL;
    }
    return r;
}

static uint8_t prot_bits(int prot)
{
    return (prot & PROT_READ ? WW_PAGE_READ : 0) | (prot & PROT_WRITE ? WW_PAGE_WRITE : 0);
}

/* The page protection that makes the next write fault, or the logical one. */
static int armed_prot(uint8_t bits, int prot)
{
    return bits & WW_PAGE_WRITE ? PROT_READ : prot;
}

/*
 * Older kernels (Linux 6.1, measured) write-protect within one VMA per call and
 * answer ENOENT, changing nothing, for a range across VMAs (after a decommit
 * and recommit, for instance): halve the range until each call fits in one.
 */
static int uffd_protect(uint64_t start, uint64_t length, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = { .start = start, .len = length },
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    if (!ioctl(track_sync_uffd, UFFDIO_WRITEPROTECT, &wp))
        return 0;
    if (errno != ENOENT || length <= WW_PAGE_SIZE)
        return -errno;
    uint64_t half = length / WW_PAGE_SIZE / 2 * WW_PAGE_SIZE;
    int result = uffd_protect(start, half, protect);
    return result ? result : uffd_protect(start + half, length - half, protect);
}

/*
 * Too many mappings (vm.max_map_count): every unarmed page splits a VMA. Arm
 * all writable pages of the range again so that runs of equal protection merge
 * back; their DIRTY bits stay, and each just faults once more. A run is marked
 * armed only once the kernel armed it: a page marked armed but writable would
 * lose its writes, one marked unarmed but read-only only faults once more.
 * Lock held.
 */
static int coalesce(struct track_range *r)
{
    uint64_t npages = (r->end - r->start) / WW_PAGE_SIZE, run = TRACK_NO_RUN;
    int result = 0;
    for (uint64_t i = 0; i <= npages; i++) {
        if (i < npages && (r->state[i] & WW_PAGE_READ)) {
            if (run == TRACK_NO_RUN)
                run = i;
        } else if (run != TRACK_NO_RUN) {
            if (mprotect((void *)(uintptr_t)(r->start + run * WW_PAGE_SIZE),
                         (i - run) * WW_PAGE_SIZE, PROT_READ))
                result = -errno;
            else
                for (uint64_t j = run; j < i; j++)
                    if (r->state[j] & WW_PAGE_WRITE)
                        r->state[j] |= WW_PAGE_ARMED;
            run = TRACK_NO_RUN;
        }
    }
    return result;
}

static int mprotect_coalescing(struct track_range *r, uint64_t start, uint64_t length, int prot)
{
    if (!mprotect((void *)(uintptr_t)start, length, prot))
        return 0;
    if (errno != ENOMEM || coalesce(r))
        return -errno;
    return mprotect((void *)(uintptr_t)start, length, prot) ? -errno : 0;
}

/*
 * The kernel refused to split a VMA (ENOMEM: vm.max_map_count reached, and
 * coalescing could not bring the count down, for instance because other
 * mappings of the process fill it). Page i is armed and writable and must
 * become writable without a new VMA: give write access back to a run of armed
 * writable pages around it instead, marking every page of the run written
 * (over-reporting is allowed, losing a write or the process is not). The
 * smallest run first: one side of i needs one split, the whole run none (its
 * neighbours have other protections, so its ends are VMA boundaries already).
 * Lock held.
 */
static int unarm_around(struct track_range *r, uint64_t i)
{
    uint64_t npages = (r->end - r->start) / WW_PAGE_SIZE, first = i, last = i + 1;
    const uint8_t armed_writable = WW_PAGE_ARMED | WW_PAGE_WRITE;
    while (first > 0 && (r->state[first - 1] & armed_writable) == armed_writable)
        first--;
    while (last < npages && (r->state[last] & armed_writable) == armed_writable)
        last++;
    uint64_t tries[3][2] = {{first, i + 1}, {i, last}, {first, last}};
    if (last - i < i + 1 - first) { /* the shorter side first */
        tries[0][0] = i, tries[0][1] = last;
        tries[1][0] = first, tries[1][1] = i + 1;
    }
    for (int t = 0; t < 3; t++) {
        uint64_t a = tries[t][0], b = tries[t][1];
        if (mprotect((void *)(uintptr_t)(r->start + a * WW_PAGE_SIZE), (b - a) * WW_PAGE_SIZE,
                     PROT_READ | PROT_WRITE))
            continue;
        for (uint64_t j = a; j < b; j++)
            r->state[j] = (r->state[j] & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
        return 0;
    }
    return -errno;
}

/* Arm (or disarm) pages [first, last) of r. Lock held. */
static int set_armed(struct track_range *r, uint64_t first, uint64_t last, int armed)
{
    uint64_t start = r->start + first * WW_PAGE_SIZE, length = (last - first) * WW_PAGE_SIZE;
    if (r->mode == WW_MODE_UFFD)
        return uffd_protect(start, length, armed);
    return mprotect_coalescing(r, start, length, armed ? PROT_READ : PROT_READ | PROT_WRITE);
}

static int needs_arming(const struct track_range *r, uint8_t st)
{
    if (st & WW_PAGE_ARMED)
        return 0;
    return r->mode == WW_MODE_UFFD || (st & WW_PAGE_WRITE);
}

/* Is the page PROT_READ for tracking (mprotect: watched, writable, armed), so
 * that arming it again changes nothing? */
static int read_only_armed(const struct track_range *r, uint8_t st)
{
    uint8_t armed = WW_PAGE_WATCHED | WW_PAGE_WRITE | WW_PAGE_ARMED;
    return r->mode == WW_MODE_MPROTECT && (st & armed) == armed;
}

static int logical_prot(uint8_t st)
{
    return (st & WW_PAGE_READ ? PROT_READ : 0) | (st & WW_PAGE_WRITE ? PROT_WRITE : 0);
}

/*
 * Pages [first, last) were written while the lock was held by someone who may
 * have re-armed them since (defer_page): record them as written and give each
 * watched one its logical protection, unarmed. Lock held.
 */
static void settle_written(struct track_range *r, uint64_t first, uint64_t last)
{
    for (uint64_t i = first; i < last; i++) {
        uint8_t st = r->state[i];
        if (!(st & WW_PAGE_WATCHED))
            continue; /* unwatched meanwhile, and left its logical protection */
        uint64_t page = r->start + i * WW_PAGE_SIZE;
        int failed = r->mode == WW_MODE_UFFD
            ? uffd_protect(page, WW_PAGE_SIZE, 0)
            : mprotect_coalescing(r, page, WW_PAGE_SIZE, logical_prot(st));
        /* If it stays armed, its next write faults once more: still written. */
        r->state[i] = (failed ? st : st & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
    }
}

static void drain_deferred(struct track_range *r)
{
    if (!__atomic_load_n(&r->deferred_pending, __ATOMIC_ACQUIRE))
        return;
    __atomic_store_n(&r->deferred_pending, 0, __ATOMIC_SEQ_CST);
    for (int i = 0; i < TRACK_DEFERRED_MAX; i++) {
        uint64_t page = __atomic_exchange_n(&r->deferred[i], 0, __ATOMIC_SEQ_CST);
        if (page >= r->start && page < r->end) {
            uint64_t at = (page - r->start) / WW_PAGE_SIZE;
            settle_written(r, at, at + 1);
        }
    }
    /* Over-reporting is allowed, losing a write is not. */
    if (__atomic_exchange_n(&r->deferred_overflow, 0, __ATOMIC_SEQ_CST))
        settle_written(r, 0, (r->end - r->start) / WW_PAGE_SIZE);
}

/* ---- the range table (Python never uses one handle from two threads at once) ---- */

/* Table memory an update replaced: freed once no counted access may hold it.
 * track_slots_mutex held. */
static void track_retire(void *memory, void *context)
{
    (void)context;
    ct_retired_push(&track_retired, memory);
}

/* Free the retired memory if no access is counted: one that starts now loads
 * the current table, which reaches none of it. track_slots_mutex held. */
static void track_reclaim(void)
{
    if (__atomic_load_n(&track_users, __ATOMIC_SEQ_CST))
        return;
    ct_retired_free(&track_retired);
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
 * ww_track_internal_overlaps to keep such pages out). */
static struct track_range *range_alloc(void)
{
    void *r = mmap(NULL, sizeof(struct track_range), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return r == MAP_FAILED ? NULL : r;
}

static void range_free(struct track_range *r)
{
    munmap(r, sizeof *r);
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
        range_free(r);
        return -ENOMEM;
    }
    r->state = state;
    if (mode == WW_MODE_MPROTECT && !foreign)
        share_one_anon_vma(start, length);
    struct ct_item item = { .start = r->start, .end = r->end, .ptr = r };
    if (!foreign) /* a new reservation replaces whatever was watched there */
        ww_memwatch_evict(r->start, r->end);
    pthread_mutex_lock(&track_slots_mutex);
    int result = length == 0 || ct_overlaps(track_table.top, r->start, r->end) ? -EEXIST
        : ct_splice(&track_table, r->start, r->start + 1, &item, 1, track_retire, NULL);
    track_reclaim();
    pthread_mutex_unlock(&track_slots_mutex);
    if (result) {
        munmap(state, r->state_size);
        range_free(r);
        return result;
    }
    return (int64_t)start;
}

int ww_track_detach(uint64_t handle)
{
    pthread_mutex_lock(&track_slots_mutex);
    struct track_range *r = range_at_handle(handle);
    int result = r ? ct_splice(&track_table, handle, handle + 1, NULL, 0, track_retire, NULL)
                   : -EINVAL;
    pthread_mutex_unlock(&track_slots_mutex);
    if (result)
        return result;
    /* A call or fault that found r before the store is still counted. */
    while (__atomic_load_n(&track_users, __ATOMIC_SEQ_CST))
        sched_yield();
    munmap(r->state, r->state_size);
    range_free(r);
    pthread_mutex_lock(&track_slots_mutex);
    track_reclaim();
    pthread_mutex_unlock(&track_slots_mutex);
    return 0;
}

/* The mode (WW_MODE_MPROTECT or WW_MODE_UFFD) of the region's range holding
 * address, or -ENOENT (also for foreign.c's spans: they are no region). */
int ww_track_mode_at(uint64_t address)
{
    __atomic_add_fetch(&track_users, 1, __ATOMIC_SEQ_CST);
    struct track_range *r = range_of(address);
    int mode = r && !r->foreign ? r->mode : -ENOENT; /* regions only */
    range_exit();
    return mode;
}

static uint64_t track_handler_stack[2]; /* the uffd handler thread's [low, high) */

static int spans_overlap(uint64_t a, uint64_t b, uint64_t lo, uint64_t hi)
{
    return a < hi && lo < b;
}

/* Does [start, end) hold memory the fault path writes (a range's struct or
 * state, the uffd handler thread's stack)? Arming it would make the fault path
 * fault on itself. Whole pages count. */
int ww_track_internal_overlaps(uint64_t start, uint64_t end)
{
    const uint64_t mask = WW_PAGE_SIZE - 1;
    int found = spans_overlap(start, end, track_handler_stack[0], track_handler_stack[1]);
    pthread_mutex_lock(&track_slots_mutex);
    struct ct_top *top = track_table.top;
    struct ct_pos pos = { 0, 0 };
    if (!found && top && top->count)
        do {
            const struct track_range *r = ct_at(top, pos)->ptr;
            uint64_t at = (uint64_t)(uintptr_t)r, state = (uint64_t)(uintptr_t)r->state;
            found = spans_overlap(start, end, at & ~mask, (at + sizeof *r + mask) & ~mask) ||
                    spans_overlap(start, end, state, state + r->state_size);
        } while (!found && ct_next(top, &pos));
    pthread_mutex_unlock(&track_slots_mutex);
    return found;
}

/* The state bytes of npages pages from address, in one counted access. */
int ww_track_states(uint64_t handle, uint64_t address, uint64_t npages, uint8_t *out)
{
    struct track_range *r = range_enter_span(handle, address, npages * WW_PAGE_SIZE);
    if (!r)
        return -EINVAL;
    memcpy(out, r->state + (address - r->start) / WW_PAGE_SIZE, npages);
    range_exit();
    return 0;
}

int ww_track_state(uint64_t handle, uint64_t address)
{
    struct track_range *r = range_enter(handle);
    if (!r)
        return -EINVAL;
    int result = address < r->start || address >= r->end
        ? -EINVAL : r->state[(address - r->start) / WW_PAGE_SIZE];
    range_exit();
    return result;
}

/* ---- page state changes ---- */

int ww_track_watch(uint64_t handle, uint64_t start, uint64_t length, int prot, int clean)
{
    struct track_range *r = range_enter_span(handle, start, length);
    if (!r)
        return -EINVAL;
    uint8_t bits = prot_bits(prot) | WW_PAGE_WATCHED;
    uint64_t first = (start - r->start) / WW_PAGE_SIZE, last = first + length / WW_PAGE_SIZE;
    int result = 0;
    range_lock(r);
    if (r->mode == WW_MODE_UFFD) {
        if (clean)
            result = uffd_protect(start, length, 1);
        if (!result && mprotect((void *)(uintptr_t)start, length, prot))
            result = -errno;
        if (clean)
            bits |= WW_PAGE_ARMED;
    } else {
        result = mprotect_coalescing(r, start, length, clean ? armed_prot(bits, prot) : prot);
        if (clean && (bits & WW_PAGE_WRITE))
            bits |= WW_PAGE_ARMED;
    }
    if (!result)
        memset(r->state + first, clean ? bits : bits | WW_PAGE_DIRTY, last - first);
    range_unlock(r);
    range_exit();
    return result;
}

/*
 * Forget pages about to be decommitted or released. Armed pages get their
 * logical protection back first, under the lock: a write racing the release
 * then completes instead of faulting on a page no handler claims any more,
 * and a writer blocked in a uffd write-protect fault is woken.
 */
int ww_track_unwatch(uint64_t handle, uint64_t start, uint64_t length)
{
    struct track_range *r = range_enter_span(handle, start, length);
    if (!r)
        return -EINVAL;
    uint64_t first = (start - r->start) / WW_PAGE_SIZE, last = first + length / WW_PAGE_SIZE;
    int result = 0;
    range_lock(r);
    if (r->mode == WW_MODE_UFFD) {
        result = uffd_protect(start, length, 0);
    } else {
        uint64_t run = TRACK_NO_RUN;
        for (uint64_t i = first; i <= last && !result; i++) {
            int armed = i < last && (r->state[i] & WW_PAGE_ARMED);
            if (armed && run == TRACK_NO_RUN)
                run = i;
            if (!armed && run != TRACK_NO_RUN) {
                result = set_armed(r, run, i, 0);
                run = TRACK_NO_RUN;
            }
        }
    }
    if (!result)
        memset(r->state + first, 0, last - first);
    range_unlock(r);
    range_exit();
    return result;
}

int ww_track_protect(uint64_t handle, uint64_t start, uint64_t length, int prot)
{
    struct track_range *r = range_enter_span(handle, start, length);
    if (!r)
        return -EINVAL;
    uint8_t bits = prot_bits(prot) | WW_PAGE_WATCHED;
    uint64_t first = (start - r->start) / WW_PAGE_SIZE, last = first + length / WW_PAGE_SIZE;
    int result;
    range_lock(r);
    if (r->mode == WW_MODE_UFFD) {
        /* The write-protect bit survives mprotect: dirty state is untouched. */
        result = mprotect((void *)(uintptr_t)start, length, prot) ? -errno : 0;
        for (uint64_t i = first; !result && i < last; i++)
            r->state[i] = (r->state[i] & (WW_PAGE_DIRTY | WW_PAGE_ARMED)) | bits;
    } else {
        /* Writable pages come back armed; a dirty one keeps its bit and
         * faults once more, which is cheaper than one VMA per dirty page. */
        result = mprotect_coalescing(r, start, length, armed_prot(bits, prot));
        uint8_t armed = bits & WW_PAGE_WRITE ? WW_PAGE_ARMED : 0;
        for (uint64_t i = first; !result && i < last; i++)
            r->state[i] = (r->state[i] & WW_PAGE_DIRTY) | bits | armed;
    }
    range_unlock(r);
    range_exit();
    return result;
}

/* True when [p, p+size) overlaps memory that faults into a tracking handler. */
static int overlaps_tracked(uint64_t p, uint64_t size)
{
    return ct_overlaps(ct_load(&track_table), p, p + size);
}

/*
 * Report the dirty pages of [start, end) into out (page - origin, ascending,
 * at most capacity); with reset, arm exactly the reported pages and only then
 * clear their DIRTY bit, all under the range lock. out may be NULL.
 */
static int64_t track_written(struct track_range *r, uint64_t start, uint64_t end, int reset,
                             uint64_t *out, uint64_t capacity, uint64_t origin);

int64_t ww_track_scan(uint64_t handle, uint64_t start, uint64_t end, int reset,
                         uint64_t *out, uint64_t capacity, uint64_t origin)
{
    /* Counted like a fault handler: the lock-free GetWriteWatch and
     * process_memwatch may get here while the region is being released, and
     * detach waits for them before freeing the range. */
    struct track_range *r = range_enter(handle);
    if (!r)
        return -EINVAL;
    int64_t result = -EINVAL;
    if (start >= r->start && end <= r->end && start <= end)
        result = track_written(r, start, end, reset, out, capacity, origin);
    range_exit();
    return result;
}

/*
 * process_memwatch on tracked memory, in one counted access: the range holding
 * start, of the given mode, must watch every page of [start, end) (-EINVAL
 * otherwise, before anything is read or cleared). get: report offsets from
 * start into out, clearing them with clear; else re-arm the whole range.
 */
int64_t ww_track_memwatch(int mode, uint64_t start, uint64_t end, int get, int clear,
                          uint64_t *out, uint64_t capacity)
{
    __atomic_add_fetch(&track_users, 1, __ATOMIC_SEQ_CST);
    struct track_range *r = range_of(start);
    int64_t result = -EINVAL;
    if (r && r->mode == mode && end <= r->end && start <= end) {
        int watched = 1;
        for (uint64_t a = start; a < end && watched; a += WW_PAGE_SIZE)
            watched = r->state[(a - r->start) / WW_PAGE_SIZE] & WW_PAGE_WATCHED;
        if (watched && get)
            result = track_written(r, start, end, clear, out, capacity, start);
        else if (watched)
            result = track_written(r, start, end, 1, NULL, (end - start) / WW_PAGE_SIZE, 0);
        if (result > 0 && !get)
            result = 0;
    }
    range_exit();
    return result;
}

static int64_t track_written(struct track_range *r, uint64_t start, uint64_t end, int reset,
                             uint64_t *out, uint64_t capacity, uint64_t origin)
{
    uint64_t first = (start - r->start) / WW_PAGE_SIZE, last = (end - r->start) / WW_PAGE_SIZE;
    uint64_t room = capacity < last - first ? capacity : last - first;
    if (room == 0)
        return 0;
    /* Writing into watched memory under the lock would fault into a handler
     * that waits for the same lock: collect into private memory then. */
    uint64_t *dest = out; /* NULL: reset without reporting (ResetWriteWatch) */
    if (out && overlaps_tracked((uint64_t)(uintptr_t)out, room * sizeof *out)) {
        dest = malloc(room * sizeof *dest);
        if (!dest)
            return -ENOMEM;
    }
    /* Pages to arm go in runs [run, run_end). With mprotect a run also spans
     * pages that are PROT_READ already (writable and armed): one mprotect over
     * them leaves those as they are and costs one call, not one per run. */
    uint64_t count = 0, i = first, run = TRACK_NO_RUN, run_end = 0;
    int result = 0;
    range_lock(r);
    for (; i < last && count < room; i++) {
        uint8_t st = r->state[i];
        int arm = (st & WW_PAGE_DIRTY) && reset && needs_arming(r, st);
        if (!arm && run != TRACK_NO_RUN && !read_only_armed(r, st)) {
            result = set_armed(r, run, run_end, 1);
            run = TRACK_NO_RUN;
            if (result)
                break;
        }
        if (!(st & WW_PAGE_DIRTY))
            continue;
        if (dest)
            dest[count] = r->start + i * WW_PAGE_SIZE - origin;
        count++;
        if (arm) {
            if (run == TRACK_NO_RUN)
                run = i;
            run_end = i + 1;
        }
    }
    if (!result && run != TRACK_NO_RUN)
        result = set_armed(r, run, run_end, 1);
    if (!result && reset) {
        /* i is one past the last page walked: clear exactly what was reported. */
        for (uint64_t j = first; j < i; j++) {
            uint8_t st = r->state[j];
            if (st & WW_PAGE_DIRTY)
                r->state[j] = (st & ~WW_PAGE_DIRTY) |
                              (needs_arming(r, st) ? WW_PAGE_ARMED : 0);
        }
    }
    range_unlock(r);
    if (dest != out) {
        if (!result)
            memcpy(out, dest, count * sizeof *out);
        free(dest);
    }
    return result ? result : (int64_t)count;
}

/* ww_track_scan over every span (start/end pairs) inside [first, last), as
 * addresses, until out is full; out NULL resets without reporting. */
int64_t ww_track_get_write_watch(uint64_t handle, const uint64_t *spans, uint64_t nspans,
                               uint64_t first, uint64_t last, int reset,
                               uint64_t *out, uint64_t capacity)
{
    /* A native SIGSEGV handler installed since the last call is put behind
     * ours again: from here on tracked writes reach us first. */
    struct track_range *r = range_enter(handle);
    if (r && r->mode == WW_MODE_MPROTECT)
        ww_segv_install();
    if (r)
        range_exit();
    uint64_t count = 0;
    int64_t result = 0;
    for (uint64_t i = 0; i < nspans && count < capacity; i++) {
        uint64_t start = spans[2 * i] > first ? spans[2 * i] : first;
        uint64_t end = spans[2 * i + 1] < last ? spans[2 * i + 1] : last;
        if (start >= end)
            continue;
        int64_t n = ww_track_scan(handle, start, end, reset, out ? out + count : NULL,
                                     capacity - count, 0);
        if (n < 0) {
            result = n;
            break;
        }
        count += (uint64_t)n;
    }
    return result < 0 ? result : (int64_t)count;
}

/*
 * Before the kernel writes into [start, start+length) (read(2) and friends):
 * mark the writable pages dirty and disarm them, so the kernel's write does not
 * fail with EFAULT on a page only armed for tracking.
 */
int ww_track_prepare_write(uint64_t handle, uint64_t start, uint64_t length)
{
    struct track_range *r = range_enter_span(handle, start, length);
    if (!r)
        return -EINVAL;
    uint64_t first = (start - r->start) / WW_PAGE_SIZE, last = first + length / WW_PAGE_SIZE;
    uint64_t run = TRACK_NO_RUN;
    int result = 0;
    range_lock(r);
    for (uint64_t i = first; i <= last && !result; i++) {
        int disarm = i < last && (r->state[i] & WW_PAGE_WRITE) && (r->state[i] & WW_PAGE_ARMED);
        if (disarm && run == TRACK_NO_RUN)
            run = i;
        if (!disarm && run != TRACK_NO_RUN) {
            result = set_armed(r, run, i, 0);
            for (uint64_t j = run; !result && j < i; j++)
                r->state[j] &= ~WW_PAGE_ARMED;
            run = TRACK_NO_RUN;
        }
        if (i < last && (r->state[i] & WW_PAGE_WRITE))
            r->state[i] |= WW_PAGE_DIRTY;
    }
    range_unlock(r);
    range_exit();
    return result;
}

/* ---- the mprotect backend's SIGSEGV handler ---- */

static void chain_segv(int sig, siginfo_t *info, void *context)
{
    if (info->si_code > 0 && (track_prev_segv.sa_flags & SA_SIGINFO)) {
        track_prev_segv.sa_sigaction(sig, info, context);
        return;
    }
    /* A sent (or re-raised) SIGSEGV means "die": a handler like faulthandler
     * reports a fault, restores the handler it replaced (possibly this one) and
     * raises the signal again; passing that on again would loop. */
    if (info->si_code > 0 && track_prev_segv.sa_handler != SIG_DFL &&
        track_prev_segv.sa_handler != SIG_IGN) {
        track_prev_segv.sa_handler(sig);
        return;
    }
    /* Default action: a real fault repeats on return and kills the process
     * with SIGSEGV as if we had never been here; a sent signal is re-raised. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (info->si_code <= 0)
        raise(sig);
}

/* The last write fault this thread could not claim: retried once, since a
 * release or decommit racing the write may have given the page its access
 * back (and forgotten it) between the fault and this handler. Initial-exec
 * TLS: a signal handler must not allocate it lazily. */
static __thread uint64_t track_unclaimed_fault __attribute__((tls_model("initial-exec")));

static void segv_handler(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    int handled = 0;
    if (info->si_code == SEGV_ACCERR) {
        uint64_t page = (uint64_t)(uintptr_t)info->si_addr & ~(uint64_t)(WW_PAGE_SIZE - 1);
        __atomic_add_fetch(&track_users, 1, __ATOMIC_SEQ_CST);
        struct track_range *r = range_of(page);
        if (r && r->mode == WW_MODE_MPROTECT) {
            uint64_t i = (page - r->start) / WW_PAGE_SIZE;
            int tid = this_thread();
            if (held_by(r, tid)) {
                /* This thread holds the lock: a signal handler interrupted it
                 * inside a call. Never wait for ourselves: give the page write
                 * access now and let the holder record it when it unlocks.
                 * Nobody else changes the state while we hold the lock. */
                uint8_t st = r->state[i];
                if ((st & WW_PAGE_ARMED) && (st & WW_PAGE_WRITE)) {
                    if (!mprotect((void *)(uintptr_t)page, WW_PAGE_SIZE, PROT_READ | PROT_WRITE)) {
                        defer_page(r, page);
                        handled = 1;
                    }
                } else if (st & WW_PAGE_WRITE) {
                    handled = 1;
                }
            } else {
                range_lock(r);
                uint8_t st = r->state[i];
                if (st & WW_PAGE_WRITE) {
                    /* Not armed: another thread disarmed it first (then this
                     * mprotect changes nothing), or a failed coalesce left it
                     * read-only. */
                    int err = mprotect_coalescing(r, page, WW_PAGE_SIZE, PROT_READ | PROT_WRITE);
                    if (!err) {
                        r->state[i] = (st & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
                        handled = 1;
                    } else if (err == -ENOMEM && !unarm_around(r, i)) {
                        handled = 1; /* the write proceeds, over-reported */
                    }
                }
                range_unlock(r);
            }
        }
        range_exit();
        if (handled) {
            track_unclaimed_fault = 0;
        } else if (track_unclaimed_fault != page) {
            track_unclaimed_fault = page; /* retry once; a real fault comes back */
            handled = 1;
        } else {
            track_unclaimed_fault = 0;
        }
    }
    errno = saved_errno;
    if (!handled)
        chain_segv(sig, info, context);
}

/* Put the handler first, in front of whatever handler is there now (one
 * installed after ours, like a late faulthandler.enable(), included). */
int ww_segv_install(void)
{
    if (ww_segv_installed() == 1)
        return 0;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = segv_handler;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGSEGV, &action, &track_prev_segv) ? -errno : 0;
}

int ww_segv_installed(void)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current))
        return -errno;
    return (current.sa_flags & SA_SIGINFO) && current.sa_sigaction == segv_handler;
}

/* ---- the uffd backend's handler thread ---- */

/* Let the faulting thread go: remove the write-protection, which wakes it, or,
 * where the range was unregistered meanwhile, wake it directly. */
static void release_writer(uint64_t page)
{
    if (uffd_protect(page, WW_PAGE_SIZE, 0)) {
        struct uffdio_range range = { .start = page, .len = WW_PAGE_SIZE };
        ioctl(track_sync_uffd, UFFDIO_WAKE, &range);
    }
}

/* Is tid among the threads whose faults wait in batch[0..n)? */
static int faulting(const struct uffd_msg *batch, size_t n, int tid)
{
    for (size_t i = 0; i < n; i++)
        if (batch[i].event == UFFD_EVENT_PAGEFAULT && (int)(uint32_t)batch[i].pagefault_feat == tid)
            return 1;
    return 0;
}

/*
 * Record the write fault batch[k] and let its thread go. The lock holder may
 * itself be stopped in a write fault this thread has yet to resolve (a signal
 * handler interrupted it inside a call): then the page is deferred to the
 * holder instead of waiting for it.
 */
static void resolve_write_fault(const struct uffd_msg *batch, size_t n, size_t k)
{
    uint64_t page = batch[k].pagefault_address & ~(uint64_t)(WW_PAGE_SIZE - 1);
    __atomic_add_fetch(&track_users, 1, __ATOMIC_SEQ_CST);
    struct track_range *r = range_of(page);
    if (r && r->mode == WW_MODE_UFFD) {
        int tid = this_thread(), waits = 0;
        for (;;) {
            if (waits > TRACK_LOCK_SPINS ? range_trylock_contended(r, tid)
                                         : range_trylock(r, tid)) {
                uint64_t i = (page - r->start) / WW_PAGE_SIZE;
                if (r->state[i] & WW_PAGE_WATCHED)
                    r->state[i] = (r->state[i] & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
                release_writer(page);
                range_unlock(r);
                break;
            }
            int owner = __atomic_load_n(&r->owner, __ATOMIC_RELAXED);
            if (owner && faulting(batch, n, owner)) {
                release_writer(page);
                defer_page(r, page);
                break;
            }
            /* Spin briefly, then sleep until the holder unlocks, but never
             * for long: the checks above are made again after each nap. */
            if (++waits <= TRACK_LOCK_SPINS) {
                cpu_relax();
                continue;
            }
            int held = 1;
            if (__atomic_compare_exchange_n(&r->lock, &held, 2, 0, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED) || held == 2)
                lock_sleep(&r->lock, TRACK_LOCK_NAP_NS);
        }
    } else {
        release_writer(page); /* unknown page: the faulting thread must not hang */
    }
    range_exit();
}

static void *uffd_handler_main(void *arg)
{
    int uffd = (int)(intptr_t)arg;
    struct uffd_msg messages[64];
    pthread_attr_t self;
    void *stack;
    size_t stack_size;
    if (!pthread_getattr_np(pthread_self(), &self)) {
        if (!pthread_attr_getstack(&self, &stack, &stack_size)) {
            track_handler_stack[0] = (uint64_t)(uintptr_t)stack;
            track_handler_stack[1] = (uint64_t)(uintptr_t)stack + stack_size;
        }
        pthread_attr_destroy(&self);
    }
    for (;;) {
        struct pollfd ready = { .fd = uffd, .events = POLLIN };
        if (poll(&ready, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (ready.revents & (POLLERR | POLLHUP | POLLNVAL))
            break;
        ssize_t got = read(uffd, messages, sizeof messages);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            break;
        }
        size_t n = (size_t)got / sizeof messages[0];
        for (size_t i = 0; i < n; i++)
            if (messages[i].event == UFFD_EVENT_PAGEFAULT)
                resolve_write_fault(messages, n, i);
    }
    return NULL;
}

int ww_uffd_handler_start(int uffd)
{
    pthread_attr_t attr;
    pthread_t thread;
    sigset_t all, old;
    track_sync_uffd = uffd;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    /* Signals stay with Python's threads: the handler thread blocks them all. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int result = pthread_create(&thread, &attr, uffd_handler_main, (void *)(intptr_t)uffd);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return -result;
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
    track_unlock_all();
    track_users = 0;
    track_sync_uffd = -1;
}

static pthread_once_t track_fork_handlers_once = PTHREAD_ONCE_INIT;
static int track_fork_handlers_error;

static void track_install_fork_handlers_once(void)
{
    track_fork_handlers_error = pthread_atfork(track_lock_all, track_unlock_all,
                                               track_after_fork_child);
}

/* Register the fork handlers (once per process; forked children inherit
 * them). Returns 0 or -errno. */
int ww_track_install_fork_handlers(void)
{
    pthread_once(&track_fork_handlers_once, track_install_fork_handlers_once);
    return -track_fork_handlers_error;
}

/* Fault pages in for writing without changing them (an atomic OR of 0 is a
 * write access), for kernels without UFFD_FEATURE_WP_UNPOPULATED. */
int ww_touch_for_write(uint64_t start, uint64_t length)
{
    for (uint64_t a = start; a < start + length; a += WW_PAGE_SIZE)
        __atomic_fetch_or((uint8_t *)(uintptr_t)a, 0, __ATOMIC_RELAXED);
    return 0;
}
