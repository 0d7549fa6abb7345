/* Page protections and page state changes of the fallbacks' ranges
 * (tracking.h). */
#include "tracking.h"

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
int uffd_protect(uint64_t start, uint64_t length, int protect)
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

int mprotect_coalescing(struct track_range *r, uint64_t start, uint64_t length, int prot)
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
int unarm_around(struct track_range *r, uint64_t i)
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
int set_armed(struct track_range *r, uint64_t first, uint64_t last, int armed)
{
    uint64_t start = r->start + first * WW_PAGE_SIZE, length = (last - first) * WW_PAGE_SIZE;
    if (r->mode == WW_MODE_UFFD)
        return uffd_protect(start, length, armed);
    return mprotect_coalescing(r, start, length, armed ? PROT_READ : PROT_READ | PROT_WRITE);
}

int needs_arming(const struct track_range *r, uint8_t st)
{
    if (st & WW_PAGE_ARMED)
        return 0;
    return r->mode == WW_MODE_UFFD || (st & WW_PAGE_WRITE);
}

/* Is the page PROT_READ for tracking (mprotect: watched, writable, armed), so
 * that arming it again changes nothing? */
int read_only_armed(const struct track_range *r, uint8_t st)
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

void drain_deferred(struct track_range *r)
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
 * Disarm (mprotect) each run of pages in [first, last) that has every bit of
 * need, and clear their WW_PAGE_ARMED: one system call per run, not per page.
 * Range lock held.
 */
static int disarm_runs(struct track_range *r, uint64_t first, uint64_t last, uint8_t need)
{
    uint64_t run = TRACK_NO_RUN;
    int result = 0;
    for (uint64_t i = first; i <= last && !result; i++) {
        int disarm = i < last && (r->state[i] & need) == need;
        if (disarm && run == TRACK_NO_RUN)
            run = i;
        if (!disarm && run != TRACK_NO_RUN) {
            result = set_armed(r, run, i, 0);
            for (uint64_t j = run; !result && j < i; j++)
                r->state[j] &= ~WW_PAGE_ARMED;
            run = TRACK_NO_RUN;
        }
    }
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
    if (r->mode == WW_MODE_UFFD)
        result = uffd_protect(start, length, 0);
    else
        result = disarm_runs(r, first, last, WW_PAGE_ARMED);
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
    range_lock(r);
    /* Dirty first: a page that stays armed after a failure reads written,
     * which is one too many, never one too few. */
    for (uint64_t i = first; i < last; i++)
        if (r->state[i] & WW_PAGE_WRITE)
            r->state[i] |= WW_PAGE_DIRTY;
    int result = disarm_runs(r, first, last, WW_PAGE_WRITE | WW_PAGE_ARMED);
    range_unlock(r);
    range_exit(r);
    return result;
}

/* Fault pages in for writing without changing them (an atomic OR of 0 is a
 * write access), for kernels without UFFD_FEATURE_WP_UNPOPULATED. */
int ww_touch_for_write(uint64_t start, uint64_t length)
{
    for (uint64_t a = start; a < start + length; a += WW_PAGE_SIZE)
        __atomic_fetch_or((uint8_t *)(uintptr_t)a, 0, __ATOMIC_RELAXED);
    return 0;
}

/* Does madvise know MADV_POPULATE_WRITE (Linux 5.14)? Asked on a page of
 * our own when the library is loaded, before any call can be walking the
 * process's mappings: asked later, that page would show up for a moment in
 * a concurrent walk over memory writewatch did not allocate (foreign.c). */
static int populate_write_known;

__attribute__((constructor)) static void ask_populate_write(void)
{
    void *page = mmap(NULL, WW_PAGE_SIZE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return; /* unknown: a kernel that refuses it is then touched by hand */
    populate_write_known =
        ww_madvise((uint64_t)(uintptr_t)page, WW_PAGE_SIZE, WW_MADV_POPULATE_WRITE) == 0;
    munmap(page, WW_PAGE_SIZE);
}

/*
 * Fault [start, start+length) in for writing without changing a byte, before
 * write-protecting it on kernels whose write-protect skips empty page table
 * entries (before Linux 6.4). MADV_POPULATE_WRITE where the kernel knows it:
 * then a failure means the mapping changed under the caller (another thread
 * unmapped it or took its write access away) and is returned as it is, never
 * followed by a touch, which would kill the process there. Only a kernel
 * without it (before 5.14) is touched by hand. 0 or -errno.
 */
int ww_populate_for_write(uint64_t start, uint64_t length)
{
    int result = ww_madvise(start, length, WW_MADV_POPULATE_WRITE);
    if (result == -EINVAL && !populate_write_known)
        result = ww_touch_for_write(start, length);
    return result;
}
