/*
 * process_memwatch over memory writewatch did not map, on the fallback backends
 * (mprotect + SIGSEGV, synchronous userfaultfd): the malloc heap, a plain mmap,
 * a numpy buffer, transparent huge pages.
 *
 * Watched memory lives in tracking.c's range table like a reservation
 * (ww_track_attach with WW_TRACK_FOREIGN), so the fault paths, the range lock
 * and the arm-before-clear order that make GET|CLEAR atomic are the same ones.
 * What this file adds is what the kernel knows and writewatch does not:
 *
 * - which mappings [start, end) holds now: each call walks the VMAs
 *   (PROCMAP_QUERY on Linux 6.11+, else /proc/self/maps), refuses the ones that
 *   cannot be watched before it touches any, and skips holes;
 * - whether a watched page is still the one that was armed: a page armed for
 *   tracking must still trap writes (mprotect: its VMA is read-only; uffd: its
 *   pagemap entry carries the uffd-wp bit), and a page's VMA must still have the
 *   protection recorded for it. Otherwise the mapping was replaced (munmap +
 *   mmap at the same address), or its owner changed its protection: the page
 *   is watched afresh, as a new mapping, and reads as written until cleared.
 *   So a replacement is seen at the latest by the next call, and writes made
 *   meanwhile are reported by it, never lost.
 *
 * A new mapping reads as written until its first CLEAR (the proposal's
 * VM_SOFTDIRTY): its pages are tracked dirty and left unarmed. With
 * NO_REUSED_REGIONS, memory met for the first time is armed first and then
 * only the pages written before (present in /proc/self/pagemap and not the
 * shared zero page) are marked dirty.
 *
 * Calls are serialised by one mutex (taken before any range lock, and around
 * fork, so a child never inherits it held).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "abi.h"

#define PAGE WW_PAGE_SIZE
#define CHUNK_PAGES 512 /* pagemap entries read at once */
#define NAME_SIZE 256
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

static __thread char memwatch_reason[NAME_SIZE + 128];

const char *ww_memwatch_reason(void)
{
    return memwatch_reason;
}

static int refuse(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(memwatch_reason, sizeof memwatch_reason, format, args);
    va_end(args);
    return -EINVAL;
}

static pthread_mutex_t foreign_mutex = PTHREAD_MUTEX_INITIALIZER;
static int foreign_uffd = -1;
static uint64_t foreign_uffd_features;

/* The uffd backend's descriptor and the features it enabled (set at each open,
 * a forked child's included). */
void ww_memwatch_use_uffd(int uffd, uint64_t features)
{
    pthread_mutex_lock(&foreign_mutex);
    foreign_uffd = uffd;
    foreign_uffd_features = features;
    pthread_mutex_unlock(&foreign_mutex);
}

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

/* ---- the watched spans: one tracking range each, sorted by address ---- */

struct span {
    uint64_t start, end;
    int mode;
};

static struct span *spans;
static size_t span_count, span_capacity;

static int span_insert(uint64_t start, uint64_t end, int mode)
{
    if (span_count == span_capacity) {
        size_t capacity = span_capacity ? span_capacity * 2 : 256;
        /* mmap, not malloc: the table is never on a heap page being armed. */
        struct span *grown = mmap(NULL, capacity * sizeof *grown, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (grown == MAP_FAILED)
            return -ENOMEM;
        if (spans) {
            memcpy(grown, spans, span_count * sizeof *spans);
            munmap(spans, span_capacity * sizeof *spans);
        }
        spans = grown;
        span_capacity = capacity;
    }
    size_t at = 0;
    while (at < span_count && spans[at].start < start)
        at++;
    memmove(spans + at + 1, spans + at, (span_count - at) * sizeof *spans);
    spans[at] = (struct span){ start, end, mode };
    span_count++;
    return 0;
}

static void span_remove(size_t at)
{
    memmove(spans + at, spans + at + 1, (span_count - at - 1) * sizeof *spans);
    span_count--;
}

/* The first span that ends after address. */
static size_t span_from(uint64_t address)
{
    size_t at = 0;
    while (at < span_count && spans[at].end <= address)
        at++;
    return at;
}

/* ---- the kernel's mappings ---- */

struct vma {
    uint64_t start, end;
    int prot, shared, file;
    char name[NAME_SIZE];
};

struct vmas {
    struct vma *at;
    size_t count, capacity;
};

static int vma_push(struct vmas *list, const struct vma *vma)
{
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? list->capacity * 2 : 16;
        struct vma *grown = realloc(list->at, capacity * sizeof *grown);
        if (!grown)
            return -ENOMEM;
        list->at = grown;
        list->capacity = capacity;
    }
    list->at[list->count++] = *vma;
    return 0;
}

/* A descriptor of this process's /proc file, opened again in a forked child
 * (the parent's would describe the parent). */
struct proc_file {
    const char *path;
    int fd;
    pid_t pid;
};

static struct proc_file maps_file = { "/proc/self/maps", -1, 0 };
static struct proc_file pagemap_file = { "/proc/self/pagemap", -1, 0 };

static int proc_fd(struct proc_file *file)
{
    pid_t pid = getpid();
    if (file->fd >= 0 && file->pid == pid)
        return file->fd;
    if (file->fd >= 0)
        close(file->fd);
    file->fd = open(file->path, O_RDONLY | O_CLOEXEC);
    file->pid = pid;
    return file->fd >= 0 ? file->fd : -errno;
}

static int use_procmap_query = 1; /* until the kernel says it has none */

/* Which walk the next calls use: 1 PROCMAP_QUERY, 0 /proc/self/maps text.
 * force_maps 1 selects the text walk (tests and measurements). */
int ww_memwatch_maps_method(int force_maps)
{
    if (force_maps >= 0)
        use_procmap_query = !force_maps;
    return use_procmap_query;
}

static int query_vmas(int fd, uint64_t start, uint64_t end, struct vmas *list)
{
    for (uint64_t address = start; address < end;) {
        struct vma vma = { 0 };
        struct procmap_query q = {
            .size = sizeof q,
            .query_flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
            .query_addr = address,
            .vma_name_size = NAME_SIZE,
            .vma_name_addr = (uint64_t)(uintptr_t)vma.name,
        };
        if (ioctl(fd, PROCMAP_QUERY, &q))
            return errno == ENOENT ? 0 : -errno;
        if (q.vma_start >= end)
            return 0;
        vma.start = q.vma_start;
        vma.end = q.vma_end;
        vma.prot = (q.vma_flags & PROCMAP_QUERY_VMA_READABLE ? PROT_READ : 0) |
                   (q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE ? PROT_WRITE : 0) |
                   (q.vma_flags & PROCMAP_QUERY_VMA_EXECUTABLE ? PROT_EXEC : 0);
        vma.shared = !!(q.vma_flags & PROCMAP_QUERY_VMA_SHARED);
        vma.file = q.inode || q.dev_major || q.dev_minor;
        if (!q.vma_name_size)
            vma.name[0] = 0;
        int failed = vma_push(list, &vma);
        if (failed)
            return failed;
        address = q.vma_end;
    }
    return 0;
}

static int parse_vmas(uint64_t start, uint64_t end, struct vmas *list)
{
    /* Read in one go, so that the lines come from one consistent walk, into
     * memory of its own: the kernel's write into a malloc heap page being
     * watched would fail with EFAULT. */
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t size = 0, capacity = 1 << 16;
    char *text = mmap(NULL, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ssize_t got = 0;
    int failed = text == MAP_FAILED ? -ENOMEM : 0;
    while (!failed && (got = read(fd, text + size, capacity - size - 1)) > 0) {
        size += (size_t)got;
        if (capacity - size < 4096) {
            char *grown = mremap(text, capacity, capacity * 2, MREMAP_MAYMOVE);
            if (grown == MAP_FAILED)
                failed = -ENOMEM;
            else
                text = grown, capacity *= 2;
        }
    }
    failed = failed ? failed : got < 0 ? -errno : 0;
    close(fd);
    if (failed) {
        if (text != MAP_FAILED)
            munmap(text, capacity);
        return failed;
    }
    text[size] = 0;
    int result = 0;
    for (char *line = text; *line && !result;) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        struct vma vma = { 0 };
        unsigned long long low, high, offset, inode;
        unsigned major, minor;
        char perms[5];
        int name_at = 0;
        if (sscanf(line, "%llx-%llx %4s %llx %x:%x %llu %n", &low, &high, perms, &offset,
                   &major, &minor, &inode, &name_at) >= 7 && high > start && low < end) {
            vma.start = low;
            vma.end = high;
            vma.prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
                       (perms[2] == 'x' ? PROT_EXEC : 0);
            vma.shared = perms[3] == 's';
            vma.file = inode || major || minor;
            snprintf(vma.name, sizeof vma.name, "%s", name_at ? line + name_at : "");
            result = vma_push(list, &vma);
        }
        line = next ? next : line + strlen(line);
    }
    munmap(text, capacity);
    return result;
}

/* The VMAs overlapping [start, end), ascending, unclipped. */
static int walk_vmas(uint64_t start, uint64_t end, struct vmas *list)
{
    if (use_procmap_query) {
        int fd = proc_fd(&maps_file);
        int result = fd < 0 ? fd : query_vmas(fd, start, end, list);
        if (result != -ENOTTY && result != -EINVAL)
            return result;
        use_procmap_query = 0; /* before Linux 6.11 */
        list->count = 0;
    }
    return parse_vmas(start, end, list);
}

/* Why [a, b) of vma cannot be watched, as a refusal (0 if it can). */
static int refusal(const struct vma *vma, uint64_t a, uint64_t b, int mode)
{
    if (vma->shared)
        return refuse("[%#llx, %#llx) is a shared mapping%s%s: writes through its other "
                      "mappings would not be seen", (unsigned long long)a,
                      (unsigned long long)b, vma->name[0] ? " of " : "", vma->name);
    if (vma->file)
        return refuse("[%#llx, %#llx) maps the file %s: only anonymous memory can be "
                      "watched", (unsigned long long)a, (unsigned long long)b, vma->name);
    if (vma->name[0] == '[' && strcmp(vma->name, "[heap]") && strncmp(vma->name, "[anon:", 6))
        return refuse("[%#llx, %#llx) is the kernel's %s mapping, which the %s backend "
                      "cannot watch%s", (unsigned long long)a, (unsigned long long)b,
                      vma->name, mode == WW_MODE_UFFD ? "uffd" : "mprotect",
                      strcmp(vma->name, "[stack]") ? ""
                      : " (the write-fault handling runs on it)");
    if (ww_track_internal_overlaps(a, b))
        return refuse("[%#llx, %#llx) holds writewatch's own write-tracking state, which "
                      "its fault handling writes", (unsigned long long)a, (unsigned long long)b);
    /* The calling thread's stacks: the kernel writes signal frames and system
     * call results there, which an armed page fails (EFAULT) or kills. Found
     * once per thread (for the main thread glibc reads /proc/self/maps). */
    static __thread uint64_t stack_low, stack_size;
    static __thread int stack_known;
    if (!stack_known) {
        pthread_attr_t self;
        void *stack = NULL;
        size_t size = 0;
        if (!pthread_getattr_np(pthread_self(), &self)) {
            pthread_attr_getstack(&self, &stack, &size);
            pthread_attr_destroy(&self);
        }
        stack_low = (uint64_t)(uintptr_t)stack;
        stack_size = size;
        stack_known = 1;
    }
    uint64_t low = stack_low, size = stack_size;
    if (size && a < low + size && low < b)
        return refuse("[%#llx, %#llx) holds the calling thread's stack",
                      (unsigned long long)a, (unsigned long long)b);
    stack_t alternate;
    low = !sigaltstack(NULL, &alternate) && !(alternate.ss_flags & SS_DISABLE)
        ? (uint64_t)(uintptr_t)alternate.ss_sp : 0;
    if (low && a < low + alternate.ss_size && low < b)
        return refuse("[%#llx, %#llx) holds the calling thread's alternate signal stack, "
                      "where the fault handler runs", (unsigned long long)a,
                      (unsigned long long)b);
    return 0;
}

/* ---- what the kernel says about pages ---- */

static int read_pagemap(uint64_t address, uint64_t pages, uint64_t *entries)
{
    int fd = proc_fd(&pagemap_file);
    if (fd < 0)
        return fd;
    ssize_t want = (ssize_t)(pages * sizeof *entries);
    return pread(fd, entries, want, (off_t)(address / PAGE * sizeof *entries)) == want
        ? 0 : -EIO;
}

static uint64_t zero_pfn_value; /* 0: unknown (no privilege to see PFNs) */
static pthread_once_t zero_pfn_once = PTHREAD_ONCE_INIT;

/* The shared zero page's frame number, as a read of never-written memory maps it. */
static void find_zero_pfn(void)
{
    volatile char *page = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return;
    uint64_t entry = 0;
    (void)page[0];
    if (!read_pagemap((uint64_t)(uintptr_t)page, 1, &entry) && entry >> WW_PM_PRESENT_BIT)
        zero_pfn_value = entry & ((1ULL << WW_PM_PFN_BITS) - 1);
    munmap((void *)page, PAGE);
}

/* Was the page of this pagemap entry written since it was mapped? Present or
 * swapped, and not the zero page. Without the privilege to see frame numbers
 * the zero page cannot be told apart: a page only read then counts as written
 * (over-reported, never lost). Once a range is registered for uffd
 * write-protect, empty entries can hold markers that read as swapped:
 * swapped pages count only where with_swapped. */
static int written_entry(uint64_t entry, int with_swapped)
{
    if (entry >> WW_PM_SWAPPED_BIT & 1)
        return with_swapped;
    if (!(entry >> WW_PM_PRESENT_BIT & 1))
        return 0;
    uint64_t pfn = entry & ((1ULL << WW_PM_PFN_BITS) - 1);
    return !(pfn && pfn == zero_pfn_value);
}

/* ---- starting to watch ---- */

static int uffd_register(uint64_t a, uint64_t b)
{
    uint64_t ioctls = 0;
    int result = ww_uffd_register_wp(foreign_uffd, a, b - a, &ioctls);
    if (result)
        return refuse("userfaultfd cannot write-protect [%#llx, %#llx): %s",
                      (unsigned long long)a, (unsigned long long)b, strerror(-result));
    if (!(ioctls >> WW_UFFDIO_WRITEPROTECT_BIT & 1))
        return refuse("userfaultfd cannot write-protect [%#llx, %#llx) on this kernel",
                      (unsigned long long)a, (unsigned long long)b);
    return 0;
}

/* One bit per page of [a, b): written before now (see written_entry), added
 * to bits if given. */
static uint8_t *written_pages(uint64_t a, uint64_t b, int with_swapped, uint8_t *bits,
                              int *error)
{
    uint64_t entries[CHUNK_PAGES], total = (b - a) / PAGE;
    if (!bits)
        bits = calloc((total + 7) / 8, 1);
    *error = bits ? 0 : -ENOMEM;
    for (uint64_t done = 0; bits && done < total && !*error; done += CHUNK_PAGES) {
        uint64_t pages = total - done < CHUNK_PAGES ? total - done : CHUNK_PAGES;
        *error = read_pagemap(a + done * PAGE, pages, entries);
        for (uint64_t i = 0; i < pages && !*error; i++)
            if (written_entry(entries[i], with_swapped))
                bits[(done + i) / 8] |= (uint8_t)(1 << (done + i) % 8);
    }
    return bits;
}

/* Mark the pages set in bits dirty (tracking's prepare-write marks and disarms
 * them), by runs. */
static int mark_written(uint64_t handle, uint64_t a, uint64_t b, const uint8_t *bits)
{
    uint64_t total = (b - a) / PAGE, run = UINT64_MAX;
    int result = 0;
    for (uint64_t i = 0; i <= total && !result; i++) {
        int written = i < total && bits[i / 8] >> i % 8 & 1;
        if (written && run == UINT64_MAX)
            run = i;
        if (!written && run != UINT64_MAX) {
            result = ww_track_prepare_write(handle, a + run * PAGE, (i - run) * PAGE);
            run = UINT64_MAX;
        }
    }
    return result;
}

/*
 * Watch [a, b) of the span with this handle as a new mapping, with the
 * protection prot its VMA has now. All of it reads as written until cleared;
 * with exact (NO_REUSED_REGIONS) only the pages written so far.
 */
static int watch_new(int mode, uint64_t handle, uint64_t a, uint64_t b, int prot, int exact)
{
    int result = 0, populated = 0;
    uint8_t *bits = NULL;
    if (exact)
        pthread_once(&zero_pfn_once, find_zero_pfn);
    if (mode == WW_MODE_UFFD) {
        /* Read before registering: afterwards write-protect markers in empty
         * entries read as swapped pages. */
        if (exact && !(bits = written_pages(a, b, 1, NULL, &result)))
            return result;
        result = result ? result : uffd_register(a, b);
        /* Before Linux 6.4 write-protect skips empty page table entries: fault
         * the pages in first. A write between the reading above and the arming
         * below is then only reported as part of a new mapping (by calls
         * without NO_REUSED_REGIONS). */
        if (!result && !(foreign_uffd_features & UFFD_FEATURE_WP_UNPOPULATED) &&
            (prot & PROT_WRITE)) {
            populated = 1;
            if (ww_madvise(a, b - a, MADV_POPULATE_WRITE) < 0)
                ww_touch_for_write(a, b - a);
        }
    }
    if (!result && !exact) {
        free(bits);
        return ww_track_watch(handle, a, b - a, prot, 0);
    }
    /* Armed first, then read: a write after the reading faults and is
     * recorded, one before it shows in pagemap (present pages only: see above). */
    if (!result)
        result = ww_track_watch(handle, a, b - a, prot, 1);
    if (!result && !populated)
        bits = written_pages(a, b, mode == WW_MODE_MPROTECT, bits, &result);
    if (!result)
        result = mark_written(handle, a, b, bits);
    free(bits);
    return result;
}

/* The protection the kernel should show for a watched page in state st. */
static int expected_prot(int mode, int st)
{
    int logical = (st & WW_PAGE_READ ? PROT_READ : 0) | (st & WW_PAGE_WRITE ? PROT_WRITE : 0);
    if (mode == WW_MODE_MPROTECT && (st & WW_PAGE_ARMED) && (st & WW_PAGE_WRITE))
        return PROT_READ;
    return logical;
}

/*
 * The tracking state of every watched page of [start, end), read before the
 * VMAs are: between calls the fault paths only ever unarm a page (mprotect
 * gives it write access), so a page read armed whose VMA turns out writable
 * was unarmed meanwhile or replaced, and one read unarmed whose VMA is
 * read-only had its protection changed by its owner. Read the other way round,
 * an unarm racing the walk would look like the owner's mprotect.
 */
struct snapshot {
    uint64_t start, end; /* of this part of a span */
    uint8_t *state;
};

struct snapshots {
    struct snapshot *at;
    size_t count;
};

static void snapshots_free(struct snapshots *list)
{
    for (size_t i = 0; i < list->count; i++)
        free(list->at[i].state);
    free(list->at);
    list->count = 0;
}

static int take_snapshots(uint64_t start, uint64_t end, struct snapshots *list)
{
    size_t first = span_from(start), count = 0;
    while (first + count < span_count && spans[first + count].start < end)
        count++;
    list->at = count ? calloc(count, sizeof *list->at) : NULL;
    if (count && !list->at)
        return -ENOMEM;
    for (size_t i = 0; i < count; i++) {
        struct snapshot *shot = &list->at[list->count++];
        const struct span *span = &spans[first + i];
        shot->start = max_u64(start, span->start);
        shot->end = min_u64(end, span->end);
        uint64_t npages = (shot->end - shot->start) / PAGE;
        shot->state = malloc(npages);
        if (!shot->state)
            return -ENOMEM;
        if (ww_track_states(span->start, shot->start, npages, shot->state))
            memset(shot->state, 0, npages);
    }
    return 0;
}

/* A page's state in the snapshot; 0 (never watched) for one it does not hold. */
static int snapshot_state(const struct snapshots *list, uint64_t page)
{
    for (size_t i = 0; i < list->count; i++)
        if (page >= list->at[i].start && page < list->at[i].end)
            return list->at[i].state[(page - list->at[i].start) / PAGE];
    return 0;
}

/*
 * Bring [a, b) of a span, all inside one VMA of protection prot, up to date:
 * pages never watched, and pages whose kernel state no longer is what was
 * armed (the mapping was replaced or its protection changed), are watched as
 * a new mapping.
 */
static int refresh(int mode, uint64_t handle, uint64_t a, uint64_t b, int prot, int exact,
                   const struct snapshots *before)
{
    uint64_t entries[CHUNK_PAGES], run = 0;
    int result = 0;
    for (uint64_t at = a; at < b && !result; at += CHUNK_PAGES * PAGE) {
        uint64_t pages = (b - at) / PAGE < CHUNK_PAGES ? (b - at) / PAGE : CHUNK_PAGES;
        if (mode == WW_MODE_UFFD)
            result = read_pagemap(at, pages, entries);
        for (uint64_t i = 0; i <= pages && !result; i++) {
            uint64_t page = at + i * PAGE;
            int renew = 0;
            if (i < pages) {
                int st = snapshot_state(before, page);
                /* uffd: an armed page must still carry the write-protect bit. */
                renew = !(st & WW_PAGE_WATCHED) ||
                        expected_prot(mode, st) != (prot & (PROT_READ | PROT_WRITE)) ||
                        (mode == WW_MODE_UFFD && (st & WW_PAGE_ARMED) &&
                         !(entries[i] >> WW_PM_UFFD_WP_BIT & 1));
            }
            if (renew && !run)
                run = page;
            if (!renew && run && (i < pages || page == b)) {
                result = watch_new(mode, handle, run, page, prot, exact);
                run = 0;
            }
        }
    }
    return result;
}

static pthread_once_t fork_handlers_once = PTHREAD_ONCE_INIT;

static void lock_calls(void) { pthread_mutex_lock(&foreign_mutex); }
static void unlock_calls(void) { pthread_mutex_unlock(&foreign_mutex); }

/* Registered after tracking.c's (kernel.py installs those at import), so it
 * runs first before fork: the order every call takes, this mutex first. */
static void install_fork_handlers(void)
{
    pthread_atfork(lock_calls, unlock_calls, unlock_calls);
}


/* Is some span overlapping [a, b) of another mode? */
static int other_mode(int mode, uint64_t a, uint64_t b)
{
    for (size_t at = span_from(a); at < span_count && spans[at].start < b; at++)
        if (spans[at].mode != mode)
            return refuse("[%#llx, %#llx) is watched by the %s backend",
                          (unsigned long long)max_u64(a, spans[at].start),
                          (unsigned long long)min_u64(b, spans[at].end),
                          spans[at].mode == WW_MODE_UFFD ? "uffd" : "mprotect");
    return 0;
}

/* Start a span over each part of [a, b) no span covers. A part the range table
 * refuses overlaps a writewatch region. */
static int cover(int mode, uint64_t a, uint64_t b)
{
    uint64_t at = a;
    for (size_t s = span_from(a); at < b; s++) {
        uint64_t gap_end = s < span_count ? min_u64(b, spans[s].start) : b;
        if (at < gap_end) {
            int64_t handle = ww_track_attach(at, gap_end - at, mode | WW_TRACK_FOREIGN);
            if (handle == -EEXIST)
                return refuse("[%#llx, %#llx) overlaps a region writewatch allocated; "
                              "watch that region on its own", (unsigned long long)at,
                              (unsigned long long)gap_end);
            int result = handle < 0 ? (int)handle : span_insert(at, gap_end, mode);
            if (result) {
                if (handle >= 0)
                    ww_track_detach((uint64_t)handle);
                return result;
            }
            s++; /* the span just inserted */
        }
        if (s >= span_count)
            break;
        at = max_u64(at, spans[s].end);
    }
    return 0;
}

/* Each part of each VMA piece of [start, end) covered by a span, ascending:
 * call step(mode, span start, a, b, vma) until it returns non-zero. */
typedef int (*piece_step)(int mode, uint64_t handle, uint64_t a, uint64_t b,
                          const struct vma *vma, void *context);

static int each_piece(int mode, uint64_t start, uint64_t end, const struct vmas *list,
                      piece_step step, void *context)
{
    for (size_t v = 0; v < list->count; v++) {
        uint64_t a = max_u64(start, list->at[v].start), b = min_u64(end, list->at[v].end);
        for (size_t s = span_from(a); s < span_count && spans[s].start < b; s++) {
            int result = step(mode, spans[s].start, max_u64(a, spans[s].start),
                              min_u64(b, spans[s].end), &list->at[v], context);
            if (result)
                return result;
        }
    }
    return 0;
}

/* Is [a, b) still all mapped? A piece unmapped during a call (its owner
 * racing it) became a hole, which holds nothing: what failed on it is moot. */
static int still_mapped(uint64_t a, uint64_t b)
{
    struct vmas list = { 0 };
    uint64_t covered = a;
    if (!walk_vmas(a, b, &list))
        for (size_t v = 0; v < list.count && list.at[v].start <= covered; v++)
            covered = max_u64(covered, list.at[v].end);
    free(list.at);
    return covered >= b;
}

static int unless_unmapped(int result, uint64_t a, uint64_t b)
{
    if (!result || still_mapped(a, b))
        return result;
    memwatch_reason[0] = 0;
    return 0;
}

struct refreshing {
    int exact;
    const struct snapshots *before;
};

static int refresh_step(int mode, uint64_t handle, uint64_t a, uint64_t b,
                        const struct vma *vma, void *context)
{
    const struct refreshing *how = context;
    return unless_unmapped(refresh(mode, handle, a, b, vma->prot, how->exact, how->before),
                           a, b);
}

struct scan {
    uint64_t origin, *vec, capacity, count;
    int get, clear;
    const struct snapshots *before;
};

/*
 * Before Linux 6.4 write-protect skips empty page table entries, and a dirty
 * page of foreign memory may have none (its owner's MADV_DONTNEED, or a
 * replaced mapping whose page was dirty before): populate the dirty pages a
 * clear is about to arm. Armed pages are left alone: populating them for
 * writing would fault into the handler and dirty them.
 */
static void populate_dirty(uint64_t a, uint64_t b, const struct snapshots *before)
{
    uint64_t run = 0;
    for (uint64_t page = a; page <= b; page += PAGE) {
        int dirty = page < b && (snapshot_state(before, page) & WW_PAGE_DIRTY);
        if (dirty && !run)
            run = page;
        if (!dirty && run) {
            ww_madvise(run, page - run, MADV_POPULATE_WRITE);
            run = 0;
        }
    }
}

static int scan_step(int mode, uint64_t handle, uint64_t a, uint64_t b,
                     const struct vma *vma, void *context)
{
    struct scan *scan = context;
    if (mode == WW_MODE_UFFD && scan->clear && (vma->prot & PROT_WRITE) &&
        !(foreign_uffd_features & UFFD_FEATURE_WP_UNPOPULATED))
        populate_dirty(a, b, scan->before);
    uint64_t room = scan->get ? scan->capacity - scan->count : (b - a) / PAGE;
    uint64_t *out = scan->get ? scan->vec + scan->count : NULL;
    int64_t n = ww_track_scan(handle, a, b, scan->clear, out, room, scan->origin);
    if (n == -ENOENT && mode == WW_MODE_UFFD) {
        /* The VMA was replaced since the refresh: registered again, its pages
         * are re-armed; the next call's refresh sees the replacement. */
        int failed = uffd_register(a, b);
        n = failed ? failed : ww_track_scan(handle, a, b, scan->clear, out, room, scan->origin);
    }
    if (n < 0)
        return unless_unmapped((int)n, a, b);
    if (scan->get)
        scan->count += (uint64_t)n;
    return scan->get && scan->count >= scan->capacity; /* 1: stop, vec is full */
}

static int check_call(int mode, uint64_t start, uint64_t end)
{
    if (start % PAGE || end % PAGE || end < start)
        return refuse("[%#llx, %#llx) is not a page-aligned range",
                      (unsigned long long)start, (unsigned long long)end);
    if (mode != WW_MODE_MPROTECT && mode != WW_MODE_UFFD)
        return refuse("unknown write-watch mode %d", mode);
    if (mode == WW_MODE_UFFD && foreign_uffd < 0)
        return -EBADF; /* the backend opens its descriptor first */
    pthread_once(&fork_handlers_once, install_fork_handlers);
    return 0;
}

int64_t ww_track_memwatch_any(int mode, uint64_t start, uint64_t end, unsigned flags,
                              uint64_t *vec, uint64_t vec_len)
{
    memwatch_reason[0] = 0;
    int get = flags & WW_MEMWATCH_GET, clear = !!(flags & WW_MEMWATCH_CLEAR);
    if (flags & ~(unsigned)(WW_MEMWATCH_GET | WW_MEMWATCH_CLEAR |
                            WW_MEMWATCH_NO_REUSED_REGIONS) || !(get || clear))
        return refuse("invalid process_memwatch flags %#x", flags);
    if (get && (!vec || !vec_len))
        return refuse("MEMWATCH_SD_GET needs a vec with room");
    int result = check_call(mode, start, end);
    if (result || start == end)
        return result;
    /* A writewatch region: its own table knows what it watches. */
    int region_mode = ww_track_mode_at(start);
    pthread_mutex_lock(&foreign_mutex);
    size_t at = span_from(start);
    int foreign = at < span_count && spans[at].start <= start;
    pthread_mutex_unlock(&foreign_mutex);
    if (region_mode >= 0 && !foreign) {
        if (region_mode != mode)
            return refuse("%#llx is in a region of the %s backend", (unsigned long long)start,
                          region_mode == WW_MODE_UFFD ? "uffd" : "mprotect");
        int64_t n = ww_track_memwatch(mode, start, end, get, clear, vec, vec_len);
        if (n == -EINVAL)
            refuse("[%#llx, %#llx) is not all committed memory of one writewatch region",
                   (unsigned long long)start, (unsigned long long)end);
        return n;
    }

    struct vmas list = { 0 };
    struct snapshots before = { 0 };
    struct refreshing how = { !!(flags & WW_MEMWATCH_NO_REUSED_REGIONS), &before };
    pthread_mutex_lock(&foreign_mutex);
    result = take_snapshots(start, end, &before);
    result = result ? result : walk_vmas(start, end, &list);
    /* Everything refused is refused before anything is watched, read or cleared. */
    result = result ? result : other_mode(mode, start, end);
    for (size_t v = 0; v < list.count && !result; v++)
        result = refusal(&list.at[v], max_u64(start, list.at[v].start),
                         min_u64(end, list.at[v].end), mode);
    for (size_t v = 0; v < list.count && !result; v++)
        result = cover(mode, max_u64(start, list.at[v].start), min_u64(end, list.at[v].end));
    if (!result)
        result = each_piece(mode, start, end, &list, refresh_step, &how);
    struct scan scan = { start, vec, vec_len, 0, get, clear, &before };
    if (!result)
        result = each_piece(mode, start, end, &list, scan_step, &scan);
    pthread_mutex_unlock(&foreign_mutex);
    snapshots_free(&before);
    free(list.at);
    return result < 0 ? result : (int64_t)scan.count;
}

static int unwatch_step(int mode, uint64_t handle, uint64_t a, uint64_t b,
                        const struct vma *vma, void *context)
{
    /* Pages whose mapping changed are first made plain watched pages (their
     * kernel state left as the new mapping has it), so that stopping restores
     * only what this watch changed. */
    int result = refresh(mode, handle, a, b, vma->prot, 0, context);
    if (!result)
        result = ww_track_unwatch(handle, a, b - a);
    if (!result && mode == WW_MODE_UFFD)
        result = ww_uffd_unregister(foreign_uffd, a, b - a);
    return result;
}

/* Stop watching [start, end) in mode, the caller holding the mutex. */
static int unwatch_locked(int mode, uint64_t start, uint64_t end)
{
    struct vmas list = { 0 };
    struct snapshots before = { 0 };
    int result = take_snapshots(start, end, &before);
    result = result ? result : walk_vmas(start, end, &list);
    result = result ? result : other_mode(mode, start, end);
    if (!result)
        result = each_piece(mode, start, end, &list, unwatch_step, &before);
    snapshots_free(&before);
    free(list.at);
    return result;
}

/*
 * writewatch maps a region of its own at [start, end): whatever was watched
 * there was unmapped, and the spans over it are dropped. Their parts outside
 * stop being watched, their protection restored: a span is all or nothing.
 */
void ww_memwatch_evict(uint64_t start, uint64_t end)
{
    pthread_mutex_lock(&foreign_mutex);
    for (size_t at = span_from(start); at < span_count && spans[at].start < end;) {
        struct span span = spans[at];
        if (span.start < start)
            unwatch_locked(span.mode, span.start, start);
        if (span.end > end)
            unwatch_locked(span.mode, end, span.end);
        if (!ww_track_detach(span.start))
            span_remove(at);
        else
            at++;
    }
    pthread_mutex_unlock(&foreign_mutex);
}

int ww_track_memwatch_unwatch(int mode, uint64_t start, uint64_t end)
{
    memwatch_reason[0] = 0;
    int result = check_call(mode, start, end);
    if (result || start == end)
        return result;
    pthread_mutex_lock(&foreign_mutex);
    result = unwatch_locked(mode, start, end);
    /* Spans wholly inside [start, end) are done with; their unmapped parts
     * (holes now) hold no protection to restore. */
    for (size_t at = span_from(start); !result && at < span_count && spans[at].start < end;) {
        if (spans[at].start >= start && spans[at].end <= end) {
            result = ww_track_detach(spans[at].start);
            if (!result)
                span_remove(at);
        } else {
            at++;
        }
    }
    pthread_mutex_unlock(&foreign_mutex);
    return result;
}
