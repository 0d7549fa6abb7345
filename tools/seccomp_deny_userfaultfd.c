/*
 * seccomp_deny_userfaultfd: run a command under a seccomp filter that makes
 * the userfaultfd system call fail, the way container runtimes' default
 * seccomp profiles do (Docker's and Podman's answer EPERM), and allows
 * every other system call.
 *
 *   seccomp_deny_userfaultfd [--errno=EPERM|ENOSYS] COMMAND [ARG...]
 *
 * A classic BPF filter, installed with prctl(PR_SET_NO_NEW_PRIVS) and
 * prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER), so no privilege is needed and
 * the filter is inherited by every child, across execve. A system call of
 * another architecture (a 32-bit int 0x80 on x86_64) kills the process: its
 * numbers differ, so the filter could not tell userfaultfd from the rest.
 * x32 system calls are refused with the same errno.
 *
 * Built by tools/sandbox-tests: gcc -O2 -Wall -o PROG seccomp_deny_userfaultfd.c
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define FILTER_ARCH AUDIT_ARCH_X86_64
#define FOREIGN_NR_BIT 0x40000000u /* __X32_SYSCALL_BIT */
#elif defined(__aarch64__)
#define FILTER_ARCH AUDIT_ARCH_AARCH64
#define FOREIGN_NR_BIT 0x80000000u /* no such ABI: never matches a real number */
#else
#error "add this architecture's AUDIT_ARCH_* value"
#endif

#ifndef __NR_userfaultfd
#error "this C library's headers have no __NR_userfaultfd"
#endif

static void usage(FILE *to)
{
    fputs("usage: seccomp_deny_userfaultfd [--errno=EPERM|ENOSYS] COMMAND [ARG...]\n"
          "Run COMMAND with the userfaultfd system call denied by a seccomp filter\n"
          "(EPERM by default, as container runtimes' default profiles answer).\n", to);
}

int main(int argc, char **argv)
{
    int denied_errno = EPERM;
    int first = 1;

    if (argc > 1 && strncmp(argv[1], "--errno=", 8) == 0) {
        const char *name = argv[1] + 8;
        if (strcmp(name, "EPERM") == 0) {
            denied_errno = EPERM;
        } else if (strcmp(name, "ENOSYS") == 0) {
            denied_errno = ENOSYS;
        } else {
            fprintf(stderr, "seccomp_deny_userfaultfd: unknown errno %s\n", name);
            usage(stderr);
            return 2;
        }
        first = 2;
    }
    if (argc > 1 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        usage(stdout);
        return 0;
    }
    if (first >= argc) {
        usage(stderr);
        return 2;
    }

    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, FILTER_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, FOREIGN_NR_BIT, 1, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (denied_errno & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {
        .len = (unsigned short)(sizeof(filter) / sizeof(filter[0])),
        .filter = filter,
    };

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("seccomp_deny_userfaultfd: prctl(PR_SET_NO_NEW_PRIVS)");
        return 126;
    }
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0) != 0) {
        perror("seccomp_deny_userfaultfd: prctl(PR_SET_SECCOMP)");
        return 126;
    }
    /* Prove the filter works before trusting a run under it. */
    errno = 0;
    if (syscall(__NR_userfaultfd, 0) != -1 || errno != denied_errno) {
        fprintf(stderr, "seccomp_deny_userfaultfd: the filter did not deny userfaultfd "
                        "(errno %d)\n", errno);
        return 126;
    }
    execvp(argv[first], argv + first);
    fprintf(stderr, "seccomp_deny_userfaultfd: cannot run %s: %s\n", argv[first],
            strerror(errno));
    return 127;
}
