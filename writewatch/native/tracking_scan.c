/* Collect-and-reset of the fallbacks' ranges (tracking.h). */
#include "tracking.h"

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

