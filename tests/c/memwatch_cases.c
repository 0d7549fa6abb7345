/*
 * A C program written for the proposed process_memwatch system call, built
 * unchanged against libprocess_memwatch:  cc memwatch_cases.c $(python -m writewatch cflags)
 * It restates the proposal's selftest checks on a 10-page mmap (with and
 * without MEMWATCH_SD_NO_REUSED_REGIONS), its sanity and unmapped-range cases
 * and its clear/write/get loop, and a fork (rule K17) (iterations from argv[1]); prints TAP and exits
 * 1 on the first failed check. Each message states the rule (docs/semantics.md).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <process_memwatch.h>

static int checks;

static void check(int ok, const char *rule)
{
    printf("%s %d - %s\n", ok ? "ok" : "not ok", ++checks, rule);
    if (!ok)
        exit(1);
}

/* The pages (offsets / page size) a call reports, as a bit mask; -1 on error. */
static long pages(char *start, long len, unsigned flags, int vec_len, long page)
{
    loff_t vec[64];
    long n = process_memwatch(0, start, (int)len, flags, vec, vec_len);
    if (n < 0)
        return -1;
    long mask = 0;
    for (long i = 0; i < n; i++)
        mask |= 1L << (vec[i] / page);
    return mask;
}

static void cases(long page, unsigned extra)
{
    int n = 10;
    long all = (1L << n) - 1;
    char *mem = mmap(NULL, n * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned get = MEMWATCH_SD_GET | extra, get_clear = get | MEMWATCH_SD_CLEAR;
    if (mem == MAP_FAILED)
        exit(2);
    long first = pages(mem, n * page, get_clear, n - 2, page);
    long rest = pages(mem, n * page, get_clear, n, page);
    if (extra)
        check(first == 0 && rest == 0, "M15: with NO_REUSED_REGIONS untouched new pages are clean");
    else
        check(first == (all >> 2) && rest == (3L << (n - 2)),
              "M13: all new pages read written until a CLEAR; a capped GET|CLEAR clears what it reported");
    check(pages(mem, n * page, get, n, page) == 0, "M7: no page reads written after a CLEAR");
    memset(mem + page, -1, (n - 2) * page);
    check(pages(mem, n * page, get, n, page) == (all & ~1L & ~(1L << (n - 1))),
          "M5: exactly the written pages are reported");
    process_memwatch(0, mem, n * page, MEMWATCH_SD_CLEAR | extra, NULL, 0);
    mem[n / 2 * page]++;
    check(pages(mem, n * page, get, n, page) == 1L << (n / 2), "M5: the written middle page");
    process_memwatch(0, mem, n * page, MEMWATCH_SD_CLEAR | extra, NULL, 0);
    mem[n / 2 * page]++;
    mem[(n / 2 + 1) * page]++;
    check(pages(mem + n / 2 * page, 2 * page, get, n, page) == 3,
          "M5: offsets are from start: two middle pages read 0 and 1");
    memset(mem, -1, n * page);
    check(pages(mem + page, 2 * page, get_clear, 2, page) == 3 &&
              pages(mem, n * page, get, n, page) == (all & ~6L),
          "M6: GET|CLEAR of pages 1-2 clears exactly those");
    memset(mem, -1, n * page);
    check(process_memwatch(0, mem, n * page, MEMWATCH_SD_CLEAR | extra, NULL, 0) == 0 &&
              pages(mem, n * page, get, n, page) == 0,
          "M7: CLEAR alone clears the whole range");
    munmap(mem, n * page);
}

/* K17: a forked child watches its own memory through its own descriptors,
 * and the parent's watch goes on, blind to the child's writes. */
static void forked(long page)
{
    char *mem = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned get_clear = MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR;
    int status = -1;
    if (mem == MAP_FAILED)
        exit(2);
    process_memwatch(0, mem, 4 * page, MEMWATCH_SD_CLEAR, NULL, 0);
    pid_t child = fork();
    if (child == 0) {
        mem[2 * page]++;
        int ok = process_memwatch(0, mem, 4 * page, MEMWATCH_SD_CLEAR, NULL, 0) == 0;
        mem[page]++;
        ok = ok && pages(mem, 4 * page, get_clear, 4, page) == 2;
        mem[3 * page]++;
        _exit(ok && pages(mem, 4 * page, get_clear, 4, page) == 8 ? 0 : 1);
    }
    waitpid(child, &status, 0);
    check(child > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "K17: a forked child watches its own memory");
    mem[0]++;
    check(pages(mem, 4 * page, get_clear, 4, page) == 1,
          "K17: the parent's watch goes on after a fork, blind to the child's writes");
    munmap(mem, 4 * page);
}

int main(int argc, char **argv)
{
    long page = sysconf(_SC_PAGESIZE);
    int iterations = argc > 1 ? atoi(argv[1]) : 10000;
    loff_t vec[100];
    char *mem = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    check(process_memwatch(0, mem, page, 0, vec, 100) == -1 && errno == EINVAL,
          "M2: no flag is EINVAL");
    check(process_memwatch(0, mem, page, 0x01000000, vec, 100) == -1 && errno == EINVAL,
          "M2: an unknown flag is EINVAL");
    check(process_memwatch(0, mem, page, MEMWATCH_SD_GET | 0xFF, vec, 100) == -1 && errno == EINVAL,
          "M2: known flags mixed with unknown ones are EINVAL");
    check(process_memwatch(-1, mem, page, MEMWATCH_SD_GET, vec, 100) == -1, "M11: pidfd -1 fails");
    check(process_memwatch(1, mem, page, MEMWATCH_SD_GET, vec, 100) == -1,
          "M11: a descriptor that is no pidfd fails");
    check(process_memwatch(0, mem, page, MEMWATCH_SD_GET | MEMWATCH_SD_CLEAR, vec, 100) >= 0,
          "M6: GET|CLEAR with a vec larger than the range succeeds");
    check(process_memwatch(0, (void *)(1UL << 47), page, MEMWATCH_SD_CLEAR, NULL, 0) == -1 &&
              errno == EINVAL, "M11: a range past the end of user space is EINVAL");
    munmap(mem, page);
    cases(page, 0);
    cases(page, MEMWATCH_SD_NO_REUSED_REGIONS);
    forked(page);
    char *hole = mmap(NULL, 64 * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(hole, 64 * page);
    check(process_memwatch(0, hole, 64 * page, MEMWATCH_SD_GET, vec, 64) == 0,
          "M16: a GET over a hole succeeds and reports nothing");
    check(process_memwatch(0, NULL, 0x7FFFFFFF, MEMWATCH_SD_CLEAR, NULL, 0) == 0,
          "M18: a CLEAR of [0, 0x7FFFFFFF) succeeds");
    char *one = aligned_alloc(page, page);
    int i = 0;
    process_memwatch(0, one, page, MEMWATCH_SD_CLEAR, NULL, 0);
    for (; i < iterations; i++) {
        if (process_memwatch(0, one, page, MEMWATCH_SD_GET, vec, 1) != 0)
            break;
        process_memwatch(0, one, page, MEMWATCH_SD_CLEAR, NULL, 0);
        one[0]++;
        if (process_memwatch(0, one, page, MEMWATCH_SD_GET, vec, 1) != 1)
            break;
        process_memwatch(0, one, page, MEMWATCH_SD_CLEAR, NULL, 0);
    }
    free(one);
    check(i == iterations, "M5, M7: clear / write / get on an aligned_alloc page, every iteration");
    printf("1..%d\n", checks);
    return 0;
}
