/*
 * The C entry point of libprocess_memwatch (process_memwatch.h): the
 * proposal's signature, with the calling convention of a system call, over
 * the mechanism this process uses: ww_memwatch (memwatch.c) on pagemap, the
 * fallbacks' ww_track_memwatch_any (foreign.c) on uffd and mprotect. Only
 * process_memwatch is exported; everything else is hidden, so the library and
 * writewatch's Python extension live in one process, each with its own state
 * (its own userfaultfd and handler thread, its own SIGSEGV handler, chained).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "abi.h"
#include "process_memwatch.h"

static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;
/*
 * This process's mechanism and what it opened, at the first call: the one
 * WRITEWATCH_BACKEND names, as the Python package reads it, else the best one
 * that works here (mechanism.c). The fallbacks' handlers start here too: the
 * uffd mechanism's handler thread, the mprotect mechanism's SIGSEGV handler
 * (put back in front at each call, as the Python package does). A forked
 * child inherits the parent's descriptors, which act on the parent's memory
 * (rule K17), and no handler thread: the fork handler marks what was opened
 * stale, and the child's first call opens its own. No system call on the
 * fast path but mprotect's check that its handler is still in front.
 */
static int opened, open_error, open_mode;
static int open_uffd = -1, open_pagemap = -1;
static int stale_uffd = -1, stale_pagemap = -1;

static void child_after_fork(void)
{
    pthread_mutex_init(&open_lock, NULL); /* another thread may have held it */
    if (__atomic_load_n(&opened, __ATOMIC_ACQUIRE)) {
        stale_uffd = open_uffd;
        stale_pagemap = open_pagemap;
        open_uffd = open_pagemap = -1;
        __atomic_store_n(&opened, 0, __ATOMIC_RELEASE);
    }
}

__attribute__((constructor)) static void install_fork_handler(void)
{
    pthread_atfork(NULL, NULL, child_after_fork);
}

/* Open the mechanism; 0 or -errno (ENOSYS: the one asked for does not work here). */
static int open_mechanism(void)
{
    int mode = ww_mechanism_named(getenv("WRITEWATCH_BACKEND"));
    open_mode = mode ? mode : ww_mechanism_best();
    if (open_mode == WW_MODE_PAGEMAP)
        return ww_memwatch_open(&open_uffd, &open_pagemap) ? -ENOSYS : 0;
    if (open_mode < 0)
        return open_mode; /* a name of no mechanism: EINVAL */
    /* Range locks held across fork, so a child's state matches its pages. */
    int result = ww_track_install_fork_handlers();
    if (!result && open_mode == WW_MODE_UFFD) {
        uint64_t features;
        int kernel_faults;
        int uffd = ww_uffd_mechanism_start(&features, &kernel_faults);
        if (uffd >= 0)
            open_uffd = uffd;
        else /* userfaultfd denied or missing: the uffd backend does not work here */
            result = uffd == -EPERM || uffd == -ENOSYS || uffd == -EINVAL ? -ENOSYS : uffd;
    }
    return result;
}

/* 0 and the mechanism with its descriptors, or -errno. */
static int mechanism(int *uffd, int *pagemap_fd, int *mode)
{
    if (!__atomic_load_n(&opened, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&open_lock);
        if (!opened) {
            if (stale_uffd >= 0 || stale_pagemap >= 0) { /* the parent's: never act through them */
                ww_memwatch_use_uffd(-1, 0);
                if (stale_uffd >= 0)
                    close(stale_uffd);
                if (stale_pagemap >= 0)
                    close(stale_pagemap);
                stale_uffd = stale_pagemap = -1;
            }
            open_error = open_mechanism();
            __atomic_store_n(&opened, 1, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&open_lock);
    }
    *uffd = open_uffd;
    *pagemap_fd = open_pagemap;
    *mode = open_mode;
    if (!open_error && open_mode == WW_MODE_MPROTECT)
        return ww_segv_install(); /* in front again, if a handler came since */
    return open_error;
}

/* The pid a pidfd refers to, from /proc/self/fdinfo; -errno if none. */
static int pidfd_pid(int pidfd)
{
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", pidfd);
    FILE *info = fopen(path, "re");
    if (!info)
        return -EINVAL;
    int pid = -EINVAL;
    while (fgets(line, sizeof line, info))
        if (sscanf(line, "Pid: %d", &pid) == 1)
            break;
    fclose(info);
    return pid == -EINVAL ? -EINVAL : pid <= 0 ? -ESRCH : pid;
}

/* Another process, through its /proc/PID/pagemap: memory it watches. */
static int64_t other_process(int pid, uint64_t start, uint64_t end, unsigned int flags,
                             uint64_t *vec, uint64_t vec_len)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -ESRCH;
    int64_t result = ww_pagemap_check_watched(fd, start, end);
    if (result == -EPERM)
        result = -EINVAL;
    uint64_t walk_end;
    if (result == 0 && (flags & MEMWATCH_SD_GET))
        result = ww_pagemap_scan(fd, start, end, flags & MEMWATCH_SD_CLEAR, vec, vec_len, start,
                                 &walk_end);
    else if (result == 0)
        result = ww_pagemap_reset(fd, start, end);
    close(fd);
    return result;
}

__attribute__((visibility("default")))
long process_memwatch(int pidfd, void *start, int len, unsigned int flags, loff_t *vec,
                      int vec_len)
{
    uint64_t first = (uint64_t)(uintptr_t)start, end;
    int64_t result;
    if (ww_memwatch_args(first, len, flags, vec ? vec_len : 0, &end)) {
        result = -EINVAL;
    } else if (end == first) {
        result = 0;
    } else if (pidfd < 0) {
        result = -EINVAL;
    } else {
        int uffd, pagemap_fd, mode;
        int failed = mechanism(&uffd, &pagemap_fd, &mode);
        uint64_t *out = (flags & MEMWATCH_SD_GET) ? (uint64_t *)vec : NULL;
        uint64_t room = out ? (uint64_t)vec_len : 0;
        int pid = pidfd ? pidfd_pid(pidfd) : 0;
        if (pid < 0)
            result = pid;
        else if (pid && pid != getpid()) /* whatever mechanism this process uses */
            result = other_process(pid, first, end, flags, out, room);
        else if (failed)
            result = failed;
        else if (mode == WW_MODE_PAGEMAP)
            result = ww_memwatch(uffd, pagemap_fd, first, end, flags, out, room, NULL);
        else
            result = ww_track_memwatch_any(mode, first, end, flags, out, room);
    }
    if (result == -EBUSY) /* another userfaultfd of this process watches it */
        result = -EINVAL;
    if (result >= 0)
        return (long)result;
    /* The proposal's errors: EINVAL and ESRCH as they are, ENOSYS when nothing
     * works here, any other failure of the kernel is EIO. */
    long err = -result;
    errno = (err == EINVAL || err == ESRCH || err == ENOSYS) ? (int)err : EIO;
    return -1;
}
