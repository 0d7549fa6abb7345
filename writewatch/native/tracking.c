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
 * The fault path never waits for a thread that may be waiting for it: a
 * fault on a range whose lock is held by the faulting thread itself (a signal
 * handler storing into watched memory in the middle of a reset), or by a
 * thread stopped in the fault path (track_blocked: two threads whose handlers
 * store into each other's regions), gives the page write access at once and
 * leaves the page in the range's deferred list; the lock holder records it as
 * written when it lets the lock go, after anything it did to the page. The
 * uffd handler thread never waits for a range lock at all: a fault whose
 * range is locked by a running thread waits in its queue, tried again after
 * short naps, while it serves every other fault.
 *
 * The range table is a two-level copy-on-write table by address (ctable.h):
 * read lock-free and without allocating, by the fault path included, in
 * O(log n); updated by attach and detach in O(chunk + n / chunk), never O(n),
 * and with no cap on the number of ranges. A range's handle is its start
 * address (opaque to Python). Every native access to a range, by a call or by
 * a fault, is counted in that range's users, and detach waits for those only:
 * a release never waits for calls on other regions. Table memory an update
 * replaced, and the range itself, are freed after a grace period (ct_grace)
 * that covers only the lookup, so it ends under constant traffic too.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* ppoll */
#endif
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
    int users;                                /* counted native accesses (range_enter) */
    int detached;                             /* out of the table: no new access */
    int lock;                                 /* 0 free, 1 held, 2 held, sleepers */
    int owner;                                /* the lock holder's thread id */
    int deferred_pending;                     /* pages below, or an overflow */
    int deferred_overflow;                    /* more than fit: treat all as written */
    uint64_t deferred[TRACK_DEFERRED_MAX];    /* pages written while the lock was held */
};

static struct ct_table track_table;   /* ranges by start address */
static pthread_mutex_t track_slots_mutex = PTHREAD_MUTEX_INITIALIZER; /* attach/detach */
static struct ct_grace track_grace;   /* table memory and ranges replaced */
static int track_sync_uffd = -1; /* this process's uffd of the uffd backend */

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

/*
 * Count a native access to the range holding address (NULL, uncounted, if
 * none): lock-free, no allocation, O(log n), so the fault path uses it too.
 * The lookup runs in a grace window, so the table memory and the range it
 * reads stay allocated; the count then keeps the range from being freed
 * until range_exit. A range being detached is not entered: detach marks it
 * before it waits for the count, and the count is made before the mark is
 * read, so either detach waits for this access or this access sees the mark.
 */
static struct track_range *range_enter_at(uint64_t address)
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

static void range_exit(struct track_range *r)
{
    __atomic_sub_fetch(&r->users, 1, __ATOMIC_SEQ_CST);
}

/* range_enter_at for the range with this handle (its start). */
static struct track_range *range_enter(uint64_t handle)
{
    struct track_range *r = range_enter_at(handle);
    if (r && r->start != handle) {
        range_exit(r);
        return NULL;
    }
    return r;
}

/* range_enter for [start, start+length) inside the range (NULL, uncounted, if not). */
static struct track_range *range_enter_span(uint64_t handle, uint64_t start, uint64_t length)
{
    struct track_range *r = range_enter(handle);
    if (r && (start < r->start || start + length > r->end)) {
        range_exit(r);
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

int64_t ww_track_attach(uint64_t start, uint64_t length, int mode)
{
    struct track_range *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    r->start = start;
    r->end = start + length;
    r->mode = mode;
    r->state_size = (length / WW_PAGE_SIZE + WW_PAGE_SIZE - 1) & ~(uint64_t)(WW_PAGE_SIZE - 1);
    void *state = mmap(NULL, r->state_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (state == MAP_FAILED) {
        free(r);
        return -ENOMEM;
    }
    r->state = state;
    if (mode == WW_MODE_MPROTECT)
        share_one_anon_vma(start, length);
    struct ct_item item = { .start = r->start, .end = r->end, .ptr = r };
    pthread_mutex_lock(&track_slots_mutex);
    int result = length == 0 || ct_overlaps(track_table.top, r->start, r->end) ? -EEXIST
        : ct_splice(&track_table, r->start, r->start + 1, &item, 1, ct_grace_retire,
                    &track_grace);
    ct_grace_reclaim(&track_grace);
    pthread_mutex_unlock(&track_slots_mutex);
    if (result) {
        munmap(state, r->state_size);
        free(r);
        return result;
    }
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
    ct_grace_retire(r, &track_grace); /* a lookup may still hold it */
    ct_grace_reclaim(&track_grace);
    pthread_mutex_unlock(&track_slots_mutex);
    return 0;
}

/* The mode (WW_MODE_MPROTECT or WW_MODE_UFFD) of the range holding address,
 * or -ENOENT. */
int ww_track_mode_at(uint64_t address)
{
    struct track_range *r = range_enter_at(address);
    if (!r)
        return -ENOENT;
    int mode = r->mode;
    range_exit(r);
    return mode;
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
    range_exit(r);
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
    range_exit(r);
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
    range_exit(r);
    return result;
}

/* True when [p, p+size) overlaps memory that faults into a tracking handler. */
static int overlaps_tracked(uint64_t p, uint64_t size)
{
    int phase = ct_grace_enter(&track_grace);
    int overlaps = ct_overlaps(ct_load(&track_table), p, p + size);
    ct_grace_exit(&track_grace, phase);
    return overlaps;
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
    range_exit(r);
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
    struct track_range *r = range_enter_at(start);
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
    if (r)
        range_exit(r);
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
        range_exit(r);
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
    range_exit(r);
    return result;
}

/* ---- who is stopped in the fault path ---- */

/*
 * Threads stopped in our fault path: in the SIGSEGV handler trying to take a
 * range lock, or stopped in a uffd write fault the handler thread has read
 * and not let go yet. A fault on a range whose lock holder is listed here
 * never waits for it: the holder may be stopped until this very fault is
 * resolved (its signal handler stored into watched memory while it held the
 * lock). Each waiter lists itself before it looks at the holder, so of two
 * threads that would wait for each other the later one sees the earlier and
 * does not wait. Lock-free and signal-safe.
 */
#define TRACK_BLOCKED_MAX 256
static int track_blocked[TRACK_BLOCKED_MAX];

/* List tid; the slot, or -1 if the list is full (then the caller must not wait). */
static int blocked_add(int tid)
{
    for (int i = 0; tid && i < TRACK_BLOCKED_MAX; i++) {
        int free = 0;
        if (__atomic_compare_exchange_n(&track_blocked[i], &free, tid, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
            return i;
    }
    return -1;
}

static void blocked_remove(int slot)
{
    if (slot >= 0)
        __atomic_store_n(&track_blocked[slot], 0, __ATOMIC_SEQ_CST);
}

static int is_blocked(int tid)
{
    for (int i = 0; tid && i < TRACK_BLOCKED_MAX; i++)
        if (__atomic_load_n(&track_blocked[i], __ATOMIC_SEQ_CST) == tid)
            return 1;
    return 0;
}

/* Is r's lock held by a thread stopped in the fault path (itself included)? */
static int holder_blocked(const struct track_range *r)
{
    return __atomic_load_n(&r->lock, __ATOMIC_ACQUIRE) &&
           is_blocked(__atomic_load_n(&r->owner, __ATOMIC_RELAXED));
}

/* ---- the mprotect backend's SIGSEGV handler ---- */

/*
 * Where our handler stands in a chain of handlers. Each time it takes first
 * place from a foreign handler it is installed through another entry point
 * (a level), and that level remembers the handler it displaced. A foreign
 * handler that chains to the one it replaced (crash reporters, JITs,
 * language runtimes do) reaches us again through the older level, which
 * passes the fault on to what that level displaced, down to the first
 * handler we replaced. One that declines a fault by putting back the handler
 * it replaced and returning puts back the older level, so the repeated fault
 * goes down the same way. A fault that is not ours thus ends in the default
 * action at the bottom of the chain instead of going round it forever.
 */
#define TRACK_SEGV_LEVELS 8
static struct sigaction track_displaced[TRACK_SEGV_LEVELS]; /* what level k replaced */
static int track_segv_front = -1; /* the level last seen in front */

/* 1 + the level this thread is passing a fault down from (0: none). A fault
 * reaching a level at or above it again has gone round a cycle. Initial-exec
 * TLS: a signal handler must not allocate it lazily. */
static __thread int track_chaining __attribute__((tls_model("initial-exec")));

/* A real fault repeats on return and kills the process with SIGSEGV as if we
 * had never been here; a sent signal is raised again. */
static void default_action(int sig, const siginfo_t *info)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (info->si_code <= 0)
        raise(sig);
}

static void chain_segv(int level, int sig, siginfo_t *info, void *context)
{
    const struct sigaction *prev = &track_displaced[level];
    int chaining = track_chaining - 1;
    /* A sent (or re-raised) SIGSEGV means "die": a handler like faulthandler
     * reports a fault, restores the handler it replaced (possibly this one) and
     * raises the signal again; passing that on again would loop. */
    int callable = info->si_code > 0 && (chaining < 0 || level < chaining) &&
        ((prev->sa_flags & SA_SIGINFO) ||
         (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN));
    if (!callable) {
        default_action(sig, info);
        return;
    }
    track_chaining = level + 1;
    if (prev->sa_flags & SA_SIGINFO)
        prev->sa_sigaction(sig, info, context);
    else
        prev->sa_handler(sig);
    track_chaining = chaining + 1;
}

/* The last write fault this thread could not claim: retried once, since a
 * release or decommit racing the write may have given the page its access
 * back (and forgotten it) between the fault and this handler. Initial-exec
 * TLS: a signal handler must not allocate it lazily. */
static __thread uint64_t track_unclaimed_fault __attribute__((tls_model("initial-exec")));

/*
 * The lock holder cannot settle this write now (it is this thread, which a
 * signal handler interrupted inside a call, or it is stopped in the fault
 * path itself): give the page write access at once and leave it in the
 * deferred list, which the holder drains when it unlocks, after anything it
 * did to the page (or the next holder, when it took the lock). 1 if the
 * write may go on.
 */
static int defer_write(struct track_range *r, uint64_t page)
{
    uint8_t st = __atomic_load_n(&r->state[(page - r->start) / WW_PAGE_SIZE], __ATOMIC_RELAXED);
    if (!(st & WW_PAGE_WRITE))
        return 0; /* not writable: a real access violation */
    /* Read-only here whether or not it is marked armed yet (a reset makes
     * pages read-only before it marks them armed). */
    if (mprotect((void *)(uintptr_t)page, WW_PAGE_SIZE, PROT_READ | PROT_WRITE))
        return 0;
    defer_page(r, page);
    return 1;
}

/* Take r's lock, unless its holder is stopped in the fault path: 0 then. */
static int lock_unless_holder_blocked(struct track_range *r, int tid, int listed)
{
    for (int spin = 0;; spin++) {
        if (spin < TRACK_LOCK_SPINS ? range_trylock(r, tid) : range_trylock_contended(r, tid))
            return 1;
        if (!listed || holder_blocked(r))
            return 0;
        if (spin < TRACK_LOCK_SPINS)
            cpu_relax();
        else /* re-checked after each nap: the holder may stop in the fault path later */
            lock_sleep(&r->lock, TRACK_LOCK_NAP_NS);
    }
}

/* Record a write fault on page of r (mprotect) and give the page write access
 * back; 1 if the write may go on. */
static int claim_write_fault(struct track_range *r, uint64_t page)
{
    uint64_t i = (page - r->start) / WW_PAGE_SIZE;
    int tid = this_thread();
    if (held_by(r, tid))
        return defer_write(r, page); /* never wait for ourselves */
    int slot = blocked_add(tid);
    int locked = lock_unless_holder_blocked(r, tid, slot >= 0);
    blocked_remove(slot);
    if (!locked)
        return defer_write(r, page);
    int handled = 0;
    uint8_t st = r->state[i];
    if (st & WW_PAGE_WRITE) {
        /* Not armed: another thread disarmed it first (then this mprotect
         * changes nothing), or a failed coalesce left it read-only. */
        int err = mprotect_coalescing(r, page, WW_PAGE_SIZE, PROT_READ | PROT_WRITE);
        if (!err) {
            r->state[i] = (st & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
            handled = 1;
        } else if (err == -ENOMEM && !unarm_around(r, i)) {
            handled = 1; /* the write proceeds, over-reported */
        }
    }
    range_unlock(r);
    return handled;
}

static void segv_handler(int level, int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    int handled = 0;
    if (info->si_code == SEGV_ACCERR) {
        uint64_t page = (uint64_t)(uintptr_t)info->si_addr & ~(uint64_t)(WW_PAGE_SIZE - 1);
        struct track_range *r = range_enter_at(page);
        if (r) {
            if (r->mode == WW_MODE_MPROTECT)
                handled = claim_write_fault(r, page);
            range_exit(r);
        }
        if (handled) {
            track_unclaimed_fault = 0;
        } else if (!track_chaining && track_unclaimed_fault != page) {
            track_unclaimed_fault = page; /* retry once; a real fault comes back */
            handled = 1;
        } else {
            track_unclaimed_fault = 0;
        }
    }
    errno = saved_errno;
    if (!handled)
        chain_segv(level, sig, info, context);
}

#define TRACK_SEGV_ENTRY(k) \
    static void segv_entry_##k(int sig, siginfo_t *info, void *context) \
    { segv_handler(k, sig, info, context); }
TRACK_SEGV_ENTRY(0) TRACK_SEGV_ENTRY(1) TRACK_SEGV_ENTRY(2) TRACK_SEGV_ENTRY(3)
TRACK_SEGV_ENTRY(4) TRACK_SEGV_ENTRY(5) TRACK_SEGV_ENTRY(6) TRACK_SEGV_ENTRY(7)
static void (*const track_segv_entries[TRACK_SEGV_LEVELS])(int, siginfo_t *, void *) = {
    segv_entry_0, segv_entry_1, segv_entry_2, segv_entry_3,
    segv_entry_4, segv_entry_5, segv_entry_6, segv_entry_7,
};

/* The level of our entry point installed in front, or -1. */
static int segv_level_in_front(const struct sigaction *current)
{
    if (!(current->sa_flags & SA_SIGINFO))
        return -1;
    for (int k = 0; k < TRACK_SEGV_LEVELS; k++)
        if (current->sa_sigaction == track_segv_entries[k])
            return k;
    return -1;
}

static pthread_mutex_t track_segv_mutex = PTHREAD_MUTEX_INITIALIZER;
static const int track_sync_signals[] = { SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS };

/* Put the handler first, in front of whatever handler is there now (one
 * installed after ours, like a late faulthandler.enable(), included), at the
 * level above the one that handler most likely displaced: the last one seen
 * in front. */
int ww_segv_install(void)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current))
        return -errno;
    int level = segv_level_in_front(&current);
    if (level >= 0) {
        __atomic_store_n(&track_segv_front, level, __ATOMIC_RELAXED);
        return 0;
    }
    pthread_mutex_lock(&track_segv_mutex);
    int result = 0;
    if (sigaction(SIGSEGV, NULL, &current)) {
        result = -errno;
    } else if (segv_level_in_front(&current) < 0) {
        /* Past the last level the top one is reused: a chain through it
         * still ends, by the cycle check, in the default action. */
        level = track_segv_front + 1 < TRACK_SEGV_LEVELS ? track_segv_front + 1
                                                         : TRACK_SEGV_LEVELS - 1;
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = track_segv_entries[level];
        action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
        /* Other signals wait until the handler returns: one whose handler
         * stores into watched memory would otherwise fault while SIGSEGV is
         * blocked, and the kernel kills a thread that does. Faults stay
         * deliverable. */
        sigfillset(&action.sa_mask);
        for (int k = 0; k < (int)(sizeof track_sync_signals / sizeof *track_sync_signals); k++)
            sigdelset(&action.sa_mask, track_sync_signals[k]);
        track_displaced[level] = current;
        if (sigaction(SIGSEGV, &action, NULL))
            result = -errno;
        else
            __atomic_store_n(&track_segv_front, level, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&track_segv_mutex);
    return result;
}

int ww_segv_installed(void)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current))
        return -errno;
    return segv_level_in_front(&current) >= 0;
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

/* A write fault read from the uffd and not resolved yet; its thread is stopped
 * until it is (listed in track_blocked at slot). */
struct track_fault {
    uint64_t page;
    int slot;
};

/* Faults waiting for a range lock: the handler thread's own, never shared
 * (reset in a forked child, which has no handler thread). */
static struct track_fault *track_waiting;
static size_t track_waiting_count, track_waiting_room;

/*
 * Try to resolve a write fault: record the page as written and let its thread
 * go. The handler thread never waits for a range lock: it could be held by a
 * thread stopped in a fault only this thread resolves. If the lock is held
 * by a thread stopped in the fault path, the page is deferred to it (released
 * now, recorded when it unlocks); if it is held by a running thread, the
 * fault waits in the queue and is tried again (0). 1 once resolved.
 */
static int resolve_write_fault(uint64_t page)
{
    struct track_range *r = range_enter_at(page);
    if (!r || r->mode != WW_MODE_UFFD) {
        if (r)
            range_exit(r);
        release_writer(page); /* unknown page: the faulting thread must not hang */
        return 1;
    }
    int resolved = 1;
    if (range_trylock(r, this_thread())) {
        uint64_t i = (page - r->start) / WW_PAGE_SIZE;
        if (r->state[i] & WW_PAGE_WATCHED)
            r->state[i] = (r->state[i] & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
        release_writer(page);
        range_unlock(r);
    } else if (holder_blocked(r)) {
        release_writer(page);
        defer_page(r, page);
    } else {
        resolved = 0;
    }
    range_exit(r);
    return resolved;
}

/* Queue a fault read from the uffd (listing its thread); resolve it at once
 * if it cannot be queued. */
static void queue_write_fault(uint64_t page, int tid)
{
    if (track_waiting_count == track_waiting_room) {
        size_t room = track_waiting_room ? 2 * track_waiting_room : 64;
        struct track_fault *grown = realloc(track_waiting, room * sizeof *grown);
        if (grown) {
            track_waiting = grown;
            track_waiting_room = room;
        }
    }
    int slot = track_waiting_count < track_waiting_room ? blocked_add(tid) : -1;
    if (slot < 0) {
        /* Not listed, it must not wait behind a lock it may hold: defer. */
        struct track_range *r = range_enter_at(page);
        release_writer(page);
        if (r) {
            if (r->mode == WW_MODE_UFFD)
                defer_page(r, page);
            range_exit(r);
        }
        return;
    }
    track_waiting[track_waiting_count++] = (struct track_fault){ .page = page, .slot = slot };
}

/* Resolve what can be resolved; repeated while it makes progress, since a
 * fault resolved may let a lock holder go on. */
static void resolve_waiting(void)
{
    for (int progress = 1; progress;) {
        progress = 0;
        size_t kept = 0;
        for (size_t k = 0; k < track_waiting_count; k++) {
            struct track_fault fault = track_waiting[k];
            if (resolve_write_fault(fault.page)) {
                blocked_remove(fault.slot);
                progress = 1;
            } else {
                track_waiting[kept++] = fault;
            }
        }
        track_waiting_count = kept;
    }
}

static void *uffd_handler_main(void *arg)
{
    int uffd = (int)(intptr_t)arg;
    struct uffd_msg messages[64];
    for (;;) {
        /* Faults waiting for a lock are tried again after a short nap. */
        struct timespec nap = { .tv_sec = 0, .tv_nsec = TRACK_LOCK_NAP_NS };
        struct pollfd ready = { .fd = uffd, .events = POLLIN };
        int polled = ppoll(&ready, 1, track_waiting_count ? &nap : NULL, NULL);
        if (polled < 0 && errno != EINTR)
            break;
        if (polled > 0 && (ready.revents & (POLLERR | POLLHUP | POLLNVAL)))
            break;
        if (polled > 0) {
            ssize_t got = read(uffd, messages, sizeof messages);
            if (got < 0 && errno != EAGAIN && errno != EINTR)
                break;
            for (ssize_t i = 0; got > 0 && i < got / (ssize_t)sizeof messages[0]; i++)
                if (messages[i].event == UFFD_EVENT_PAGEFAULT)
                    queue_write_fault(messages[i].pagefault_address &
                                          ~(uint64_t)(WW_PAGE_SIZE - 1),
                                      (int)(uint32_t)messages[i].pagefault_feat);
        }
        resolve_waiting();
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
