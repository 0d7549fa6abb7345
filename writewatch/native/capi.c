/*
 * The C entry point of libprocess_memwatch (process_memwatch.h): the
 * proposal's signature over ww_memwatch (memwatch.c), with the calling
 * convention of a system call. Only process_memwatch is exported; everything
 * else is hidden, so the library and writewatch's Python extension can live in
 * one process.
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

/* The fallbacks' foreign-memory entry (the uffd and mprotect mechanisms),
 * when the library is built with it. */
extern int64_t ww_track_memwatch_any(int mode, uint64_t start, uint64_t end, unsigned flags,
                                     uint64_t *vec, uint64_t vec_len) __attribute__((weak));

static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;
/* This process's descriptors and mechanism, opened and chosen at the first
 * call. A forked child inherits the parent's descriptors, which act on the
 * parent's memory (rule K17): the fork handler marks them stale, and the
 * child's first call opens its own. No system call on the fast path. */
static int opened, stale_uffd = -1, stale_pagemap = -1;
static int open_uffd = -1, open_pagemap = -1, open_error, open_mode;

/* The mechanism: WRITEWATCH_BACKEND as the Python package reads it (unset,
 * empty or "auto": the best one that works). */
static int mechanism(void)
{
    const char *name = getenv("WRITEWATCH_BACKEND");
    if (!name || !*name || !strcmp(name, "auto") || !strcmp(name, "pagemap"))
        return 0;
    if (!strcmp(name, "uffd"))
        return WW_MODE_UFFD;
    if (!strcmp(name, "mprotect"))
        return WW_MODE_MPROTECT;
    return -1;
}

static void child_after_fork(void)
{
    pthread_mutex_init(&open_lock, NULL); /* another thread may have held it */
    if (__atomic_load_n(&opened, __ATOMIC_ACQUIRE)) {
        stale_uffd = open_uffd;
        stale_pagemap = open_pagemap;
        __atomic_store_n(&opened, 0, __ATOMIC_RELEASE);
    }
}

__attribute__((constructor)) static void install_fork_handler(void)
{
    pthread_atfork(NULL, NULL, child_after_fork);
}

/* 0 and the descriptors, or -errno when async write-protect is missing. */
static int descriptors(int *uffd, int *pagemap_fd, int *mode)
{
    if (!__atomic_load_n(&opened, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&open_lock);
        if (!opened) {
            if (stale_uffd >= 0) { /* the parent's: never act through them */
                close(stale_uffd);
                close(stale_pagemap);
                stale_uffd = stale_pagemap = -1;
            }
            open_mode = mechanism();
            open_error = ww_memwatch_open(&open_uffd, &open_pagemap);
            __atomic_store_n(&opened, 1, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&open_lock);
    }
    *uffd = open_uffd;
    *pagemap_fd = open_pagemap;
    *mode = open_mode;
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
        int opened_error = descriptors(&uffd, &pagemap_fd, &mode);
        uint64_t *out = (flags & MEMWATCH_SD_GET) ? (uint64_t *)vec : NULL;
        uint64_t room = out ? (uint64_t)vec_len : 0;
        int pid = pidfd ? pidfd_pid(pidfd) : 0;
        if (pid < 0)
            result = pid;
        else if (pid && pid != getpid())
            result = mode == 0 ? other_process(pid, first, end, flags, out, room) : -ESRCH;
        else if (mode < 0)
            result = -EINVAL;
        else if (mode > 0)
            result = ww_track_memwatch_any ? ww_track_memwatch_any(mode, first, end, flags, out,
                                                                   room)
                                           : -ENOSYS;
        else if (opened_error)
            result = -ENOSYS; /* no userfaultfd async write-protect here */
        else
            result = ww_memwatch(uffd, pagemap_fd, first, end, flags, out, room, NULL);
    }
    if (result >= 0)
        return (long)result;
    /* The proposal's errors: EINVAL and ESRCH as they are, ENOSYS when nothing
     * works here, any other failure of the kernel is EIO. */
    long err = -result;
    errno = (err == EINVAL || err == ESRCH || err == ENOSYS) ? (int)err : EIO;
    return -1;
}
