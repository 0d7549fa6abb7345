/*
 * process_memwatch(): the system call proposed for Linux in 2022 (never
 * merged), as a library function. C code written for the proposal builds
 * unchanged against libprocess_memwatch:
 *
 *     cc prog.c $(python -m writewatch cflags)
 *
 * It returns the number of offsets written to vec, or -1 with errno set
 * (EINVAL, ESRCH, EIO; ENOSYS when no mechanism works here), as a system call
 * does. The semantics are writewatch's docs/semantics.md, rules M1-M20.
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
