/*
 * What the kernel says about this process's memory, for foreign.c: its
 * mappings (PROCMAP_QUERY on Linux 6.11+, /proc/self/maps text before) and
 * which pages were written since they were mapped (/proc/self/pagemap).
 * Every buffer the kernel writes here is on the stack or mapped apart: a
 * malloc'd one may sit on an armed heap page (EFAULT).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "abi.h"
#include "foreign.h"

#define PAGE WW_FOREIGN_PAGE
#define CHUNK_PAGES WW_FOREIGN_CHUNK_PAGES
#define NAME_SIZE WW_FOREIGN_NAME_SIZE

static __thread char memwatch_reason[NAME_SIZE + 128];

const char *ww_memwatch_reason(void)
{
    return memwatch_reason;
}

int refuse(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(memwatch_reason, sizeof memwatch_reason, format, args);
    va_end(args);
    return -EINVAL;
}

void refuse_clear(void)
{
    memwatch_reason[0] = 0;
}


/* ---- the kernel's mappings ---- */

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

/* Shared memory by its name in /proc/self/maps (MAP_SHARED|MAP_ANONYMOUS,
 * memfd, SysV): the device number cannot tell, as 9p and overlay files have
 * major 0 too. */
static int shmem_name(int shared, const char *name)
{
    return shared && (!strncmp(name, "/dev/zero", 9) || !strncmp(name, "/memfd:", 7) ||
                      !strncmp(name, "/SYSV", 5) || !strncmp(name, "[anon_shmem:", 12));
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
        vma.shmem = shmem_name(vma.shared, vma.name);
        if (!q.vma_name_size)
            vma.name[0] = 0;
        int failed = vma_push(list, &vma);
        if (failed)
            return failed;
        address = q.vma_end;
    }
    return 0;
}

/* One line of /proc/self/maps, added to list if it overlaps [start, end). */
static int parse_line(const char *line, uint64_t start, uint64_t end, struct vmas *list)
{
    struct vma vma = { 0 };
    unsigned long long low, high, offset, inode;
    unsigned major, minor;
    char perms[5];
    int name_at = 0;
    if (sscanf(line, "%llx-%llx %4s %llx %x:%x %llu %n", &low, &high, perms, &offset,
               &major, &minor, &inode, &name_at) < 7 || high <= start || low >= end)
        return 0;
    vma.start = low;
    vma.end = high;
    vma.prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
               (perms[2] == 'x' ? PROT_EXEC : 0);
    vma.shared = perms[3] == 's';
    vma.file = inode || major || minor;
    snprintf(vma.name, sizeof vma.name, "%s", name_at ? line + name_at : "");
    vma.shmem = shmem_name(vma.shared, vma.name); /* after the name is read */
    return vma_push(list, &vma);
}

static int parse_vmas(uint64_t start, uint64_t end, struct vmas *list)
{
    /* Read into a buffer on the stack, line by line: a mapping made for the
     * text would itself be listed, then unmapped, and read as watchable
     * memory where the caller's range holds a hole (Linux 6.1 answered ENOMEM
     * and EINVAL for a GET over a hole); a malloc'd one may sit on an armed
     * heap page (EFAULT). A line too long for it keeps the start of its name. */
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    char text[4096 + NAME_SIZE];
    size_t held = 0;
    int result = 0, skipping = 0; /* skipping: the rest of a line too long */
    ssize_t got = 0;
    while (!result && (got = read(fd, text + held, sizeof text - 1 - held)) > 0) {
        held += (size_t)got;
        text[held] = 0;
        char *line = text, *next;
        while (!result && (next = strchr(line, '\n'))) {
            *next = 0;
            if (!skipping)
                result = parse_line(line, start, end, list);
            skipping = 0;
            line = next + 1;
        }
        held -= (size_t)(line - text);
        if (held == sizeof text - 1) { /* one line fills the buffer */
            if (!skipping)
                result = parse_line(text, start, end, list);
            skipping = 1;
            held = 0;
        }
        memmove(text, line, held);
    }
    if (!result && got < 0)
        result = -errno;
    else if (!result && held && !skipping) {
        text[held] = 0;
        result = parse_line(text, start, end, list);
    }
    close(fd);
    return result;
}

/* Is the process at vm.max_map_count (a split adds up to two mappings)?
 * Counts the lines of /proc/self/maps through a buffer on the stack, for the
 * reason parse_vmas gives. */
int at_map_count_limit(void)
{
    char text[4096] = { 0 };
    int fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC);
    ssize_t got = fd < 0 ? -1 : read(fd, text, 31);
    if (fd >= 0)
        close(fd);
    long limit = got > 0 ? strtol(text, NULL, 10) : 0, mappings = 0;
    fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (limit <= 0 || fd < 0) {
        if (fd >= 0)
            close(fd);
        return 1;
    }
    while ((got = read(fd, text, sizeof text)) > 0)
        for (ssize_t i = 0; i < got; i++)
            mappings += text[i] == '\n';
    close(fd);
    return got < 0 || mappings + 2 >= limit;
}

/* The VMAs overlapping [start, end), ascending, unclipped. */
int walk_vmas(uint64_t start, uint64_t end, struct vmas *list)
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

/* ---- what the kernel says about pages ---- */

int read_pagemap(uint64_t address, uint64_t pages, uint64_t *entries)
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

/* One bit per page of [a, b): written before now (see written_entry), added
 * to bits if given. */
int entry_written(uint64_t entry)
{
    pthread_once(&zero_pfn_once, find_zero_pfn);
    return written_entry(entry, 1);
}

uint8_t *written_pages(uint64_t a, uint64_t b, int with_swapped, uint8_t *bits,
                              int *error)
{
    uint64_t entries[CHUNK_PAGES], total = (b - a) / PAGE;
    pthread_once(&zero_pfn_once, find_zero_pfn);
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


/* Why [a, b) of vma cannot be watched, as a refusal (0 if it can). */
int refusal(const struct vma *vma, uint64_t a, uint64_t b, int mode)
{
    const char *backend = mode == WW_MODE_UFFD ? "uffd" : "mprotect";
    unsigned long long from = a, to = b;
    /* Shared memory (MAP_SHARED|MAP_ANONYMOUS, memfd, SysV) is watched through
     * this process's mapping of it: writes through other mappings (another
     * process's) are not seen, as on every backend. */
    if (vma->shared && !vma->shmem)
        return refuse("[%#llx, %#llx) (%s) cannot be watched by the %s backend: a shared "
                      "mapping of a file on disk", from, to, vma->name, backend);
    if (vma->file && !vma->shmem)
        return refuse("[%#llx, %#llx) (%s) cannot be watched by the %s backend: only "
                      "anonymous and shared memory can, not a private file mapping",
                      from, to, vma->name, backend);
    if (vma->name[0] == '[' && strcmp(vma->name, "[heap]") && strncmp(vma->name, "[anon", 5))
        return refuse("[%#llx, %#llx) (%s) cannot be watched by the %s backend: a special "
                      "mapping of the kernel%s", from, to, vma->name, backend,
                      strcmp(vma->name, "[stack]") ? ""
                      : " (the main thread's stack, which write faults are handled on)");
    /* Arming is PROT_READ, and tracking keeps only read and write access:
     * JIT code armed would lose PROT_EXEC, and the next call into it kill. */
    if (mode == WW_MODE_MPROTECT && (vma->prot & PROT_EXEC))
        return refuse("[%#llx, %#llx) (%s) cannot be watched by the mprotect backend: "
                      "executable memory (arming it read-only would take its PROT_EXEC "
                      "away)", from, to, *vma->name ? vma->name : "[anonymous]");
    if (ww_track_internal_overlaps(a, b))
        return refuse("[%#llx, %#llx) cannot be watched: it holds writewatch's own "
                      "write-tracking state, which its fault handling writes", from, to);
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
        return refuse("[%#llx, %#llx) cannot be watched: it holds the calling thread's "
                      "stack", from, to);
    stack_t alternate;
    low = !sigaltstack(NULL, &alternate) && !(alternate.ss_flags & SS_DISABLE)
        ? (uint64_t)(uintptr_t)alternate.ss_sp : 0;
    if (low && a < low + alternate.ss_size && low < b)
        return refuse("[%#llx, %#llx) cannot be watched: it holds the calling thread's "
                      "alternate signal stack, where the fault handler runs", from, to);
    return 0;
}
