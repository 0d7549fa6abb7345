/*
 * Thin system-call wrappers (mmap, mprotect, madvise, userfaultfd), each
 * returning a result or -errno so that Python turns errors into OSError in one
 * place. They run without the GIL.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include "abi.h"

int64_t ww_mmap(uint64_t addr, uint64_t length, int prot, int flags)
{
    void *p = mmap((void *)(uintptr_t)addr, length, prot, flags, -1, 0);
    return p == MAP_FAILED ? -errno : (int64_t)(uintptr_t)p;
}

int ww_munmap(uint64_t addr, uint64_t length)
{
    return munmap((void *)(uintptr_t)addr, length) ? -errno : 0;
}

int ww_mprotect(uint64_t addr, uint64_t length, int prot)
{
    return mprotect((void *)(uintptr_t)addr, length, prot) ? -errno : 0;
}

int ww_madvise(uint64_t addr, uint64_t length, int advice)
{
    return madvise((void *)(uintptr_t)addr, length, advice) ? -errno : 0;
}

int ww_uffd_open(int flags)
{
    long fd = syscall(WW_NR_USERFAULTFD, flags);
    return fd < 0 ? -errno : (int)fd;
}

/* UFFD_USER_MODE_ONLY first (Linux 5.11: an unprivileged process may open one
 * under vm.unprivileged_userfaultfd = 0), without it on kernels that refuse
 * the flag (EINVAL). */
int ww_uffd_open_user_mode_first(int flags)
{
    int fd = ww_uffd_open(flags | UFFD_USER_MODE_ONLY);
    return fd == -EINVAL ? ww_uffd_open(flags) : fd;
}

int ww_uffd_api(int uffd, uint64_t features, struct uffdio_api *out)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(uffd, UFFDIO_API, &api))
        return -errno;
    *out = api;
    return 0;
}

int ww_uffd_register_wp(int uffd, uint64_t start, uint64_t length, uint64_t *ioctls)
{
    struct uffdio_register reg = {
        .range = { .start = start, .len = length },
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

int ww_uffd_unregister(int uffd, uint64_t start, uint64_t length)
{
    struct uffdio_range range = { .start = start, .len = length };
    return ioctl(uffd, UFFDIO_UNREGISTER, &range) ? -errno : 0;
}

int ww_uffd_writeprotect(int uffd, uint64_t start, uint64_t length, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = { .start = start, .len = length },
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) ? -errno : 0;
}
