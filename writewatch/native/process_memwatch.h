/*
 * process_memwatch(): the system call proposed for Linux in 2022 (never
 * merged), as a library function. C code written for the proposal builds
 * unchanged against libprocess_memwatch:
 *
 *     cc prog.c $(python -m writewatch cflags)
 *
 * It returns the number of offsets written to vec, or -1 with errno set, as a
 * system call does: EINVAL (bad arguments, a mapping that cannot be watched,
 * a WRITEWATCH_BACKEND naming no backend), ESRCH (the process is gone or may
 * not be inspected), ENOSYS (the backend WRITEWATCH_BACKEND names does not
 * work here), EIO (any other failure of the kernel). The semantics are
 * writewatch's docs/semantics.md, rules M1-M20.
 *
 * Every backend works from C. Unless WRITEWATCH_BACKEND names one, the first
 * call picks the best that works here: pagemap (userfaultfd async
 * write-protect and PAGEMAP_SCAN, Linux 6.7+), else uffd (userfaultfd
 * write-protect, 5.7+), else mprotect. The library starts the fallbacks'
 * handlers itself: uffd's handler thread; mprotect's SIGSEGV handler, put
 * back in front at each call (a handler installed later must chain to the one
 * it replaced). A forked child opens its own descriptors at its first call.
 *
 * What the fallbacks cannot do (README, "From C"):
 * - mprotect: the kernel's own writes into armed memory (read(2) into a
 *   watched buffer) fail with EFAULT; so do they on uffd where userfaultfd is
 *   only allowed for user-mode faults. A thread that blocks SIGSEGV cannot
 *   write armed memory on mprotect.
 * - There is no unwatch: memory given back to free() stays watched; write its
 *   armed pages before freeing it, or watch memory the program maps itself
 *   (munmap ends a watch).
 * - Another process, through a pidfd: only what /proc/PID/pagemap allows, on
 *   every backend: memory that process watches with the pagemap backend.
 * - With writewatch's Python package in the same process: memory watched
 *   through both must not overlap.
 */
#ifndef PROCESS_MEMWATCH_H
#define PROCESS_MEMWATCH_H

#include <sys/types.h>

#ifndef MEMWATCH_SD_GET
#define MEMWATCH_SD_GET 0x1
#define MEMWATCH_SD_CLEAR 0x2
#define MEMWATCH_SD_NO_REUSED_REGIONS 0x4
#endif

#ifdef __cplusplus
extern "C" {
#endif

long process_memwatch(int pidfd, void *start, int len, unsigned int flags, loff_t *vec,
                      int vec_len);

#ifdef __cplusplus
}
#endif

#endif
