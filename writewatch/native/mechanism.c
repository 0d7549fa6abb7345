/*
 * Which mechanism watches memory, decided once and in C, so that the Python
 * package (backends/__init__.py) and libprocess_memwatch (capi.c) choose
 * alike, and the uffd mechanism's start, which both need in the same order:
 *
 *   pagemap:  userfaultfd async write-protect (WP_ASYNC with WP_UNPOPULATED)
 *             and PAGEMAP_SCAN, Linux 6.7+;
 *   uffd:     synchronous userfaultfd write-protect and a handler thread, 5.7+;
 *   mprotect: read-only pages and a SIGSEGV handler, anywhere.
 *
 * probe.py keeps the descriptive facts (python -m writewatch info); the
 * choice is made here.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "abi.h"

#define UFFD_FLAGS (O_CLOEXEC | O_NONBLOCK)

/* A userfaultfd, UFFD_USER_MODE_ONLY first where user_mode_only. Returns it
 * or -errno. */
static int uffd_open(int user_mode_only)
{
    return user_mode_only ? ww_uffd_open_user_mode_first(UFFD_FLAGS) : ww_uffd_open(UFFD_FLAGS);
}

/* Every userfaultfd feature this kernel offers (0 where none opens). */
static uint64_t uffd_offered(void)
{
    struct uffdio_api api;
    int fd = uffd_open(1);
    if (fd < 0)
        return 0;
    uint64_t offered = ww_uffd_api(fd, 0, &api) ? 0 : api.features;
    close(fd);
    return offered;
}

/* Does PAGEMAP_SCAN work here? Asked over no memory, so nothing changes. */
static int pagemap_scan_works(void)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    struct pm_scan_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.size = sizeof arg;
    arg.category_mask = arg.return_mask = PAGE_IS_WRITTEN;
    int works = ww_pagemap_raw(fd, &arg) >= 0;
    close(fd);
    return works;
}

int ww_mechanism_best(void)
{
    uint64_t offered = uffd_offered();
    uint64_t async = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    if ((offered & async) == async && pagemap_scan_works())
        return WW_MODE_PAGEMAP;
    if (offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        return WW_MODE_UFFD;
    return WW_MODE_MPROTECT;
}

int ww_mechanism_named(const char *name)
{
    static const struct { const char *name; int mode; } names[] = {
        { "auto", 0 },
        { "pagemap", WW_MODE_PAGEMAP },
        { "uffd", WW_MODE_UFFD },
        { "mprotect", WW_MODE_MPROTECT },
    };
    if (!name)
        return 0;
    while (isspace((unsigned char)*name))
        name++;
    size_t length = strlen(name);
    while (length && isspace((unsigned char)name[length - 1]))
        length--;
    if (!length)
        return 0;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strlen(names[i].name) == length && !strncmp(names[i].name, name, length))
            return names[i].mode;
    return -EINVAL;
}

/*
 * Open this process's userfaultfd of the uffd mechanism, enable write-protect
 * (with WP_UNPOPULATED, and THREAD_ID, which lets the handler thread see that
 * a lock holder is itself stopped in a fault, where offered), start the
 * handler thread and hand the descriptor to the foreign-memory code. Opened
 * without UFFD_USER_MODE_ONLY first: then the kernel's own writes into
 * watched memory fault into the handler too (*kernel_faults); that needs
 * privilege or vm.unprivileged_userfaultfd = 1, so it falls back to user mode
 * only. Returns the descriptor or -errno.
 */
int ww_uffd_mechanism_start(uint64_t *features, int *kernel_faults)
{
    int uffd = uffd_open(0);
    *kernel_faults = uffd >= 0;
    if (uffd == -EPERM)
        uffd = uffd_open(1);
    if (uffd < 0)
        return uffd;
    uint64_t offered = uffd_offered();
    uint64_t wanted = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
                      (offered & (UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_THREAD_ID));
    struct uffdio_api api;
    int result = ww_uffd_api(uffd, wanted, &api);
    if (!result)
        result = ww_uffd_handler_start(uffd);
    if (result) {
        close(uffd);
        return result;
    }
    *features = api.features & wanted;
    ww_memwatch_use_uffd(uffd, *features);
    return uffd;
}
