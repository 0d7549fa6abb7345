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
 * A per-range spinlock serialises the fault path with collect-and-reset: a
 * reset arms the pages it reports before it clears their DIRTY bit, and a
 * fault arriving meanwhile waits for the lock, so a write is reported either
 * by this call or by the next, never lost. The range table is read lock-free
 * by the handlers (atomic slot pointers); a range is freed only after every
 * handler that might have seen it has finished.
 */
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

#include "_abi.h"

#define TRACK_PAGE 4096u
#define TRACK_MAX_RANGES 16384
#define TRACK_NO_RUN UINT64_MAX

struct track_range {
    uint64_t start, end;
    uint8_t *state;
    uint64_t state_size;
    int mode;
    int lock;
};

static struct track_range *track_ranges[TRACK_MAX_RANGES];
static pthread_mutex_t track_slots_mutex = PTHREAD_MUTEX_INITIALIZER; /* attach/detach */
static int track_slots_used;     /* slots [0, used) may hold a range */
static int track_handlers_active;
static int track_sync_uffd = -1; /* this process's uffd of the uffd backend */
static struct sigaction track_prev_segv;

static void range_lock(struct track_range *r)
{
    while (__atomic_exchange_n(&r->lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();
}

static void range_unlock(struct track_range *r)
{
    __atomic_store_n(&r->lock, 0, __ATOMIC_RELEASE);
}

static struct track_range *range_of(uint64_t address)
{
    int used = __atomic_load_n(&track_slots_used, __ATOMIC_ACQUIRE);
    for (int i = 0; i < used; i++) {
        struct track_range *r = __atomic_load_n(&track_ranges[i], __ATOMIC_ACQUIRE);
        if (r && address >= r->start && address < r->end)
            return r;
    }
    return NULL;
}

static struct track_range *range_at_slot(int slot)
{
    if (slot < 0 || slot >= TRACK_MAX_RANGES)
        return NULL;
    return __atomic_load_n(&track_ranges[slot], __ATOMIC_ACQUIRE);
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
    if (errno != ENOENT || length <= TRACK_PAGE)
        return -errno;
    uint64_t half = length / TRACK_PAGE / 2 * TRACK_PAGE;
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
    uint64_t npages = (r->end - r->start) / TRACK_PAGE, run = TRACK_NO_RUN;
    int result = 0;
    for (uint64_t i = 0; i <= npages; i++) {
        if (i < npages && (r->state[i] & WW_PAGE_READ)) {
            if (run == TRACK_NO_RUN)
                run = i;
        } else if (run != TRACK_NO_RUN) {
            if (mprotect((void *)(uintptr_t)(r->start + run * TRACK_PAGE),
                         (i - run) * TRACK_PAGE, PROT_READ))
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
    uint64_t npages = (r->end - r->start) / TRACK_PAGE, first = i, last = i + 1;
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
        if (mprotect((void *)(uintptr_t)(r->start + a * TRACK_PAGE), (b - a) * TRACK_PAGE,
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
    uint64_t start = r->start + first * TRACK_PAGE, length = (last - first) * TRACK_PAGE;
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

/* ---- the range table (Python never uses one slot from two threads at once) ---- */

static int free_slot(void)
{
    for (int i = 0; i < TRACK_MAX_RANGES; i++)
        if (!__atomic_load_n(&track_ranges[i], __ATOMIC_ACQUIRE))
            return i;
    return -ENOMEM;
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
    madvise(p, TRACK_PAGE, MADV_DONTNEED);
    mprotect(p, length, PROT_NONE);
}

int ww_track_attach(uint64_t start, uint64_t length, int mode)
{
    struct track_range *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    r->start = start;
    r->end = start + length;
    r->mode = mode;
    r->state_size = (length / TRACK_PAGE + TRACK_PAGE - 1) & ~(uint64_t)(TRACK_PAGE - 1);
    void *state = mmap(NULL, r->state_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (state == MAP_FAILED) {
        free(r);
        return -ENOMEM;
    }
    r->state = state;
    if (mode == WW_MODE_MPROTECT)
        share_one_anon_vma(start, length);
    pthread_mutex_lock(&track_slots_mutex);
    int slot = free_slot();
    if (slot >= 0) {
        __atomic_store_n(&track_ranges[slot], r, __ATOMIC_RELEASE);
        if (slot >= __atomic_load_n(&track_slots_used, __ATOMIC_ACQUIRE))
            __atomic_store_n(&track_slots_used, slot + 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&track_slots_mutex);
    if (slot < 0) {
        munmap(state, r->state_size);
        free(r);
    }
    return slot;
}

int ww_track_detach(int slot)
{
    pthread_mutex_lock(&track_slots_mutex);
    struct track_range *r = range_at_slot(slot);
    if (r)
        __atomic_store_n(&track_ranges[slot], NULL, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&track_slots_mutex);
    if (!r)
        return -EINVAL;
    /* A handler that found r before the store is still counted here. */
    while (__atomic_load_n(&track_handlers_active, __ATOMIC_SEQ_CST))
        sched_yield();
    munmap(r->state, r->state_size);
    free(r);
    return 0;
}

int ww_track_find(uint64_t address)
{
    int used = __atomic_load_n(&track_slots_used, __ATOMIC_ACQUIRE);
    for (int i = 0; i < used; i++) {
        struct track_range *r = __atomic_load_n(&track_ranges[i], __ATOMIC_ACQUIRE);
        if (r && address >= r->start && address < r->end)
            return i;
    }
    return -1;
}

int ww_track_all_watched(int slot, uint64_t start, uint64_t end)
{
    struct track_range *r = range_at_slot(slot);
    if (!r || start < r->start || end > r->end)
        return 0;
    for (uint64_t a = start; a < end; a += TRACK_PAGE)
        if (!(r->state[(a - r->start) / TRACK_PAGE] & WW_PAGE_WATCHED))
            return 0;
    return 1;
}

int ww_track_state(int slot, uint64_t address)
{
    struct track_range *r = range_at_slot(slot);
    if (!r || address < r->start || address >= r->end)
        return -EINVAL;
    return r->state[(address - r->start) / TRACK_PAGE];
}

/* ---- page state changes ---- */

int ww_track_watch(int slot, uint64_t start, uint64_t length, int prot, int clean)
{
    struct track_range *r = range_at_slot(slot);
    if (!r || start < r->start || start + length > r->end)
        return -EINVAL;
    uint8_t bits = prot_bits(prot) | WW_PAGE_WATCHED;
    uint64_t first = (start - r->start) / TRACK_PAGE, last = first + length / TRACK_PAGE;
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
    return result;
}

int ww_track_unwatch(int slot, uint64_t start, uint64_t length)
{
    struct track_range *r = range_at_slot(slot);
    if (!r || start < r->start || start + length > r->end)
        return -EINVAL;
    range_lock(r);
    memset(r->state + (start - r->start) / TRACK_PAGE, 0, length / TRACK_PAGE);
    range_unlock(r);
    return 0;
}

int ww_track_protect(int slot, uint64_t start, uint64_t length, int prot)
{
    struct track_range *r = range_at_slot(slot);
    if (!r || start < r->start || start + length > r->end)
        return -EINVAL;
    uint8_t bits = prot_bits(prot) | WW_PAGE_WATCHED;
    uint64_t first = (start - r->start) / TRACK_PAGE, last = first + length / TRACK_PAGE;
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
    return result;
}

/* True when [p, p+size) overlaps memory that faults into a tracking handler. */
static int overlaps_tracked(uint64_t p, uint64_t size)
{
    int used = __atomic_load_n(&track_slots_used, __ATOMIC_ACQUIRE);
    for (int i = 0; i < used; i++) {
        struct track_range *r = __atomic_load_n(&track_ranges[i], __ATOMIC_ACQUIRE);
        if (r && p < r->end && p + size > r->start)
            return 1;
    }
    return 0;
}

/*
 * Report the dirty pages of [start, end) into out (page - origin, ascending,
 * at most capacity); with reset, arm exactly the reported pages and only then
 * clear their DIRTY bit, all under the range lock. out may be NULL.
 */
static int64_t track_written(struct track_range *r, uint64_t start, uint64_t end, int reset,
                             uint64_t *out, uint64_t capacity, uint64_t origin);

int64_t ww_track_written(int slot, uint64_t start, uint64_t end, int reset,
                         uint64_t *out, uint64_t capacity, uint64_t origin)
{
    /* Counted like a fault handler: the lock-free GetWriteWatch and
     * process_memwatch may get here while the region is being released, and
     * detach waits for them before freeing the range. */
    __atomic_add_fetch(&track_handlers_active, 1, __ATOMIC_SEQ_CST);
    struct track_range *r = range_at_slot(slot);
    int64_t result = -EINVAL;
    if (r && start >= r->start && end <= r->end && start <= end)
        result = track_written(r, start, end, reset, out, capacity, origin);
    __atomic_sub_fetch(&track_handlers_active, 1, __ATOMIC_SEQ_CST);
    return result;
}

static int64_t track_written(struct track_range *r, uint64_t start, uint64_t end, int reset,
                             uint64_t *out, uint64_t capacity, uint64_t origin)
{
    uint64_t first = (start - r->start) / TRACK_PAGE, last = (end - r->start) / TRACK_PAGE;
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
    uint64_t count = 0, i = first, run = TRACK_NO_RUN;
    int result = 0;
    range_lock(r);
    for (; i < last && count < room; i++) {
        uint8_t st = r->state[i];
        if (!(st & WW_PAGE_DIRTY)) {
            if (run != TRACK_NO_RUN && reset) {
                result = set_armed(r, run, i, 1);
                run = TRACK_NO_RUN;
                if (result)
                    break;
            }
            continue;
        }
        if (dest)
            dest[count] = r->start + i * TRACK_PAGE - origin;
        count++;
        if (reset && needs_arming(r, st) && run == TRACK_NO_RUN)
            run = i;
        else if (reset && !needs_arming(r, st) && run != TRACK_NO_RUN) {
            result = set_armed(r, run, i, 1);
            run = TRACK_NO_RUN;
            if (result)
                break;
        }
    }
    if (!result && run != TRACK_NO_RUN)
        result = set_armed(r, run, i, 1);
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

/* ww_track_written over every span (start/end pairs) inside [first, last), as
 * addresses, until out is full; out NULL resets without reporting. */
int64_t ww_track_written_spans(int slot, const uint64_t *spans, uint64_t nspans,
                               uint64_t first, uint64_t last, int reset,
                               uint64_t *out, uint64_t capacity)
{
    uint64_t count = 0;
    int64_t result = 0;
    for (uint64_t i = 0; i < nspans && count < capacity; i++) {
        uint64_t start = spans[2 * i] > first ? spans[2 * i] : first;
        uint64_t end = spans[2 * i + 1] < last ? spans[2 * i + 1] : last;
        if (start >= end)
            continue;
        int64_t n = ww_track_written(slot, start, end, reset, out ? out + count : NULL,
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
int ww_track_prepare_write(int slot, uint64_t start, uint64_t length)
{
    struct track_range *r = range_at_slot(slot);
    if (!r || start < r->start || start + length > r->end)
        return -EINVAL;
    uint64_t first = (start - r->start) / TRACK_PAGE, last = first + length / TRACK_PAGE;
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

static void segv_handler(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    int handled = 0;
    if (info->si_code == SEGV_ACCERR) {
        uint64_t page = (uint64_t)(uintptr_t)info->si_addr & ~(uint64_t)(TRACK_PAGE - 1);
        __atomic_add_fetch(&track_handlers_active, 1, __ATOMIC_SEQ_CST);
        struct track_range *r = range_of(page);
        if (r && r->mode == WW_MODE_MPROTECT) {
            uint64_t i = (page - r->start) / TRACK_PAGE;
            range_lock(r);
            uint8_t st = r->state[i];
            if (st & WW_PAGE_WRITE) {
                /* Not armed: another thread disarmed it first (then this
                 * mprotect changes nothing), or a failed coalesce left it
                 * read-only. */
                int err = mprotect_coalescing(r, page, TRACK_PAGE, PROT_READ | PROT_WRITE);
                if (!err) {
                    r->state[i] = (st & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
                    handled = 1;
                } else if (err == -ENOMEM && !unarm_around(r, i)) {
                    handled = 1; /* the write proceeds, over-reported */
                }
            }
            range_unlock(r);
        }
        __atomic_sub_fetch(&track_handlers_active, 1, __ATOMIC_SEQ_CST);
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

static void resolve_write_fault(uint64_t address)
{
    uint64_t page = address & ~(uint64_t)(TRACK_PAGE - 1);
    __atomic_add_fetch(&track_handlers_active, 1, __ATOMIC_SEQ_CST);
    struct track_range *r = range_of(page);
    if (r && r->mode == WW_MODE_UFFD) {
        range_lock(r);
        uint64_t i = (page - r->start) / TRACK_PAGE;
        r->state[i] = (r->state[i] & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
    }
    /* Unprotect even an unknown page: the faulting thread must not hang. */
    uffd_protect(page, TRACK_PAGE, 0);
    if (r && r->mode == WW_MODE_UFFD)
        range_unlock(r);
    __atomic_sub_fetch(&track_handlers_active, 1, __ATOMIC_SEQ_CST);
}

static void *uffd_handler_main(void *arg)
{
    int uffd = (int)(intptr_t)arg;
    struct uffd_msg messages[64];
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
        for (size_t i = 0; i < (size_t)got / sizeof messages[0]; i++)
            if (messages[i].event == UFFD_EVENT_PAGEFAULT)
                resolve_write_fault(messages[i].pagefault_address);
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
    int used = __atomic_load_n(&track_slots_used, __ATOMIC_ACQUIRE);
    for (int i = 0; i < used; i++)
        if (track_ranges[i])
            range_lock(track_ranges[i]);
}

static void track_unlock_all(void)
{
    int used = __atomic_load_n(&track_slots_used, __ATOMIC_ACQUIRE);
    for (int i = 0; i < used; i++)
        if (track_ranges[i])
            range_unlock(track_ranges[i]);
    pthread_mutex_unlock(&track_slots_mutex);
}

/* In a forked child: the locks this thread took are released, and no handler
 * thread exists (threads do not survive fork). */
static void track_after_fork_child(void)
{
    track_unlock_all();
    track_handlers_active = 0;
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
    for (uint64_t a = start; a < start + length; a += TRACK_PAGE)
        __atomic_fetch_or((uint8_t *)(uintptr_t)a, 0, __ATOMIC_RELAXED);
    return 0;
}
