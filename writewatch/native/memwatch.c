/*
 * process_memwatch on any memory of the calling process, on userfaultfd async
 * write-protect + PAGEMAP_SCAN (docs/semantics.md rules M1-M20).
 *
 * The kernel holds all the state: a mapping is watched once it is registered
 * for async write-protect on this process's userfaultfd, and a page reads
 * written until a PM_SCAN_WP_MATCHING walk protects it again. Nothing is kept
 * here, so there is nothing to fall out of step with the kernel's mappings:
 * memory unmapped and mapped again is simply not registered any more.
 *
 * The fast path (all of the range registered) is one VMA-level check and one
 * scan. The first GET or CLEAR on memory never watched registers it first; a
 * registered page that was never protected reads written (its page-table entry
 * has no write-protect bit), which is the proposal's "a new mapping reads all
 * written until its first CLEAR" for free (rule M13).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "abi.h"

/* Runs fetched per scan when looking for the parts not yet registered. */
#define MW_RUNS 64

/* Pages written since the mapping was made or last cleared, the shared zero
 * page of a read excluded (MEMWATCH_SD_NO_REUSED_REGIONS, rule M15): written,
 * present or swapped, not PFNZERO. A never-protected page with no page yet
 * reads WRITTEN but is neither present nor swapped. */
static const struct ww_scan_filter no_reused = {
    .mask = PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
    .inverted = PAGE_IS_PFNZERO,
    .anyof = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
};

/* The pages no_reused leaves out that are not protected yet: neither present
 * nor swapped (a uffd-wp marker counts as swapped: already protected), or the
 * zero page. Protecting them reports nothing and loses no write: a write
 * makes a page present and not the zero page, and the kernel checks that under
 * the page-table lock as it protects. */
static const struct ww_scan_filter unwritten = {
    .flags = PM_SCAN_WP_MATCHING,
    .mask = PAGE_IS_SWAPPED,
    .inverted = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
    .anyof = PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
};

/* Mappings of the range that are not registered, holes and VM_PFNMAP left out
 * (the kernel's walk skips both). Nothing is changed. */
static const struct ww_scan_filter unregistered = {
    .mask = PAGE_IS_WPALLOWED,
    .inverted = PAGE_IS_WPALLOWED,
};

static const struct ww_scan_filter registered = {
    .mask = PAGE_IS_WPALLOWED,
};

int ww_memwatch_args(uint64_t start, int64_t length, unsigned int flags, int64_t vec_len,
                     uint64_t *end)
{
    unsigned int all = MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR | MEMWATCH_SD_NO_REUSED_REGIONS;
    if ((flags & ~all) || !(flags & (MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR)))
        return WW_MEMWATCH_BAD_FLAGS;
    if ((flags & MEMWATCH_SD_GET) && vec_len <= 0)
        return WW_MEMWATCH_NO_VEC;
    if (start & (WW_PAGE_SIZE - 1))
        return WW_MEMWATCH_UNALIGNED;
    if (length < 0)
        return WW_MEMWATCH_NEGATIVE_LENGTH;
    /* Rounded up to pages (rule M4); no user address lies past the end. */
    uint64_t pages = ((uint64_t)length + WW_PAGE_SIZE - 1) / WW_PAGE_SIZE;
    if (start > WW_USER_SPACE_END || pages > (WW_USER_SPACE_END - start) / WW_PAGE_SIZE)
        return WW_MEMWATCH_PAST_USER_SPACE;
    *end = start + pages * WW_PAGE_SIZE;
    return 0;
}

int ww_memwatch_open(int *uffd, int *pagemap_fd)
{
    *uffd = ww_uffd_open_user_mode_first(O_CLOEXEC | O_NONBLOCK);
    if (*uffd < 0)
        return *uffd;
    struct uffdio_api api = {
        .api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
    };
    int err = 0;
    if (ioctl(*uffd, UFFDIO_API, &api) < 0)
        err = -errno;
    else if ((*pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)) < 0)
        err = -errno;
    if (err)
        close(*uffd);
    return err;
}

/* The mapping of /proc/self/maps holding address, into why (bounds, name). */
static int describe_mapping(uint64_t address, struct ww_memwatch_refusal *why)
{
    FILE *maps = fopen("/proc/self/maps", "re");
    if (!maps)
        return 0;
    char line[512];
    int found = 0;
    while (!found && fgets(line, sizeof line, maps)) {
        unsigned long long lo, hi;
        int name_at = 0;
        if (sscanf(line, "%llx-%llx %*s %*s %*s %*s %n", &lo, &hi, &name_at) < 2)
            continue;
        if (address < lo || address >= hi)
            continue;
        found = 1;
        why->start = lo;
        why->end = hi;
        char *name = name_at ? line + name_at : line + strlen(line);
        name[strcspn(name, "\n")] = '\0';
        snprintf(why->name, sizeof why->name, "%s", *name ? name : "[anonymous]");
    }
    fclose(maps);
    return found;
}

static int64_t refuse(uint64_t address, int64_t err, struct ww_memwatch_refusal *why)
{
    if (why) {
        memset(why, 0, sizeof *why);
        why->start = address;
        why->end = address + WW_PAGE_SIZE;
        why->err = err;
        describe_mapping(address, why);
    }
    return -EINVAL;
}

/* Register [start, end) for async write-protect; 0 or -errno. */
static int64_t register_wp(int uffd, uint64_t start, uint64_t end)
{
    struct uffdio_register reg = {
        .range = { .start = start, .len = end - start }, .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    if (!(reg.ioctls & (1ULL << WW_UFFDIO_WRITEPROTECT_BIT))) { /* rule K9 */
        struct uffdio_range range = { .start = start, .len = end - start };
        ioctl(uffd, UFFDIO_UNREGISTER, &range);
        return -EOPNOTSUPP;
    }
    return 0;
}

/* The first mapping of [start, end) registration refuses, found one page at a
 * time per mapping (a refused call only: a run spans several mappings). */
static int64_t find_refused(int uffd, uint64_t start, uint64_t end, int64_t err,
                            struct ww_memwatch_refusal *why)
{
    struct ww_memwatch_refusal at;
    for (uint64_t a = start; a < end;) {
        if (!describe_mapping(a, &at))
            break;
        uint64_t stop = at.end < end ? at.end : end;
        int64_t r = register_wp(uffd, a, stop);
        if (r < 0)
            return refuse(a, r, why);
        a = stop;
    }
    return refuse(start, err, why); /* the mappings changed meanwhile */
}

/*
 * Start watching the parts of [start, end) not registered yet (rule M13).
 * Registering alone changes no answer: a registered page never protected reads
 * written, as an unregistered mapping does. EINVAL, with why filled, for a
 * mapping the kernel will not register or cannot scan (VM_PFNMAP).
 */
static int64_t watch_unregistered(int uffd, int pagemap_fd, uint64_t start, uint64_t end,
                                  struct ww_memwatch_refusal *why)
{
    uint64_t bounds[2 * MW_RUNS], cursor = start, walk_end;
    while (cursor < end) {
        int64_t n = ww_pagemap_runs(pagemap_fd, cursor, end, &unregistered, bounds, MW_RUNS,
                                    &walk_end);
        if (n < 0)
            return n;
        for (int64_t i = 0; i < n; i++) {
            int64_t r = register_wp(uffd, bounds[2 * i], bounds[2 * i + 1]);
            if (r < 0)
                return find_refused(uffd, bounds[2 * i], bounds[2 * i + 1], r, why);
        }
        cursor = walk_end;
    }
    int64_t checked = ww_pagemap_check_watched(pagemap_fd, start, end);
    if (checked != -EPERM)
        return checked;
    /* Still a mapping the walk skips: VM_PFNMAP (raw page frames, no page
     * state to watch), or a mapping made meanwhile. Name the first. */
    for (uint64_t a = start; a < end;) {
        struct ww_memwatch_refusal at;
        if (!describe_mapping(a, &at))
            break;
        uint64_t stop = at.end < end ? at.end : end;
        if (ww_pagemap_check_watched(pagemap_fd, a, stop) == -EPERM)
            return refuse(a, 0, why);
        a = stop;
    }
    return -EAGAIN;
}

/* GET (and CLEAR) on registered memory; count or -errno (-EPERM when a part is
 * not registered and check asked for PM_SCAN_CHECK_WPASYNC). */
static int64_t scan(int pagemap_fd, uint64_t start, uint64_t end, unsigned int flags,
                    uint64_t check, uint64_t *vec, uint64_t vec_len)
{
    int clear = flags & MEMWATCH_SD_CLEAR;
    uint64_t walk_end;
    if (!(flags & MEMWATCH_SD_GET))
        return ww_pagemap_reset(pagemap_fd, start, end);
    if (!(flags & MEMWATCH_SD_NO_REUSED_REGIONS)) {
        struct ww_scan_filter written = {
            .flags = check | (clear ? PM_SCAN_WP_MATCHING : 0), .mask = PAGE_IS_WRITTEN,
        };
        return ww_pagemap_select(pagemap_fd, start, end, &written, vec, vec_len, start,
                                 &walk_end);
    }
    struct ww_scan_filter filter = no_reused;
    filter.flags = check | (clear ? PM_SCAN_WP_MATCHING : 0);
    int64_t count = ww_pagemap_select(pagemap_fd, start, end, &filter, vec, vec_len, start,
                                      &walk_end);
    if (count >= 0 && clear && walk_end > start) {
        /* The pages the walk passed and did not report are clean now too. */
        int64_t armed = ww_pagemap_select(pagemap_fd, start, walk_end, &unwritten, NULL,
                                          UINT64_MAX, start, &walk_end);
        if (armed < 0)
            return armed;
    }
    return count;
}

/*
 * process_memwatch on [start, end) of the calling process (arguments checked
 * by ww_memwatch_args), through this process's async userfaultfd and its
 * /proc/self/pagemap. Returns the number of offsets written to vec, or -errno;
 * -EINVAL with why filled when a mapping of the range cannot be watched,
 * before anything was read or cleared.
 */
int64_t ww_memwatch(int uffd, int pagemap_fd, uint64_t start, uint64_t end, unsigned int flags,
                    uint64_t *vec, uint64_t vec_len, struct ww_memwatch_refusal *why)
{
    if (start >= end)
        return 0;
    for (int attempt = 0; attempt < 3; attempt++) {
        int64_t result;
        if (flags & MEMWATCH_SD_CLEAR) {
            /* Checked first: a walk that re-protects and then meets a mapping
             * not registered fails after re-protecting (rule K13). */
            result = ww_pagemap_check_watched(pagemap_fd, start, end);
            if (result == 0)
                return scan(pagemap_fd, start, end, flags, 0, vec, vec_len);
        } else {
            /* A GET changes nothing: the scan checks as it goes. */
            result = scan(pagemap_fd, start, end, flags, PM_SCAN_CHECK_WPASYNC, vec, vec_len);
        }
        if (result != -EPERM)
            return result;
        result = watch_unregistered(uffd, pagemap_fd, start, end, why);
        if (result < 0 && result != -EAGAIN)
            return result;
    }
    return refuse(start, -EAGAIN, why); /* mappings kept changing under the call */
}

/*
 * Stop watching [start, end): unregister what is registered, leaving contents
 * and protection as they were. The memory then reads as never watched.
 */
int64_t ww_memwatch_unwatch(int uffd, int pagemap_fd, uint64_t start, uint64_t end)
{
    uint64_t bounds[2 * MW_RUNS], cursor = start, walk_end;
    while (cursor < end) {
        int64_t n = ww_pagemap_runs(pagemap_fd, cursor, end, &registered, bounds, MW_RUNS,
                                    &walk_end);
        if (n < 0)
            return n;
        for (int64_t i = 0; i < n; i++) {
            struct uffdio_range range = {
                .start = bounds[2 * i], .len = bounds[2 * i + 1] - bounds[2 * i],
            };
            if (ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0)
                return -errno;
        }
        cursor = walk_end;
    }
    return 0;
}
