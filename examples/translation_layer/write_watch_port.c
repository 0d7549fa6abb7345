/* A Windows program that uses the write-watch API, compiled unchanged on
 * Linux against libwinshim.so (see run.py).
 *
 * Part 1 checks the API the way Wine's conformance tests do (docs/semantics.md
 * rules 1-13, 15, 16), and what a layer's ReadFile must do for write watch
 * (rule 14). Part 2 is the work such code exists for: an
 * incremental save state. A heap is written frame after frame; after each
 * frame GetWriteWatch(WRITE_WATCH_FLAG_RESET) with a fixed-size address array
 * (called again while it comes back full) names the pages to copy into the
 * snapshot, and the snapshot must equal the heap every frame.
 *
 * Usage: write_watch_port [--small]
 * Exit status: 0 when every check passed and every snapshot matched.
 * The last line of output is "RESULT key=value ..." for run.py's table.
 */
#include <windows.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

static int checks, failures;

#define ok(condition, ...)                                        \
    do {                                                          \
        checks++;                                                 \
        if (!(condition)) {                                       \
            failures++;                                           \
            printf("  FAIL (line %d): ", __LINE__);               \
            printf(__VA_ARGS__);                                  \
            printf("\n");                                         \
        }                                                         \
    } while (0)

static SIZE_T page;

/* GetWriteWatch into addresses[capacity]; returns the count, or -1 on failure. */
static long written(DWORD flags, char *base, SIZE_T size, PVOID *addresses, ULONG_PTR capacity)
{
    ULONG_PTR count = capacity;
    ULONG granularity = 0;
    if (GetWriteWatch(flags, base, size, addresses, &count, &granularity) != 0)
        return -1;
    if (granularity != page)
        return -2;
    return (long)count;
}

static void check_api(void)
{
    PVOID addresses[2048];
    ULONG_PTR count;
    ULONG granularity;
    DWORD old;
    UINT ret;
    long n;
    char *base, *mem;

    /* item 1: MEM_WRITE_WATCH needs MEM_RESERVE */
    SetLastError(0xdeadbeef);
    mem = VirtualAlloc(NULL, 16 * page, MEM_WRITE_WATCH, PAGE_READWRITE);
    ok(mem == NULL && GetLastError() == ERROR_INVALID_PARAMETER,
       "MEM_WRITE_WATCH alone: %p, error %u", (void *)mem, GetLastError());
    mem = VirtualAlloc(NULL, 16 * page, MEM_RESERVE | MEM_WRITE_WATCH, PAGE_NOACCESS);
    ok(mem != NULL, "reserve-only write watch failed, error %u", GetLastError());
    /* item 16: a reserve-only region reports nothing and can be reset */
    ok(written(0, mem, 16 * page, addresses, 16) == 0, "reserve-only region reported pages");
    ok(ResetWriteWatch(mem, 16 * page) == 0, "ResetWriteWatch on a reserve-only region failed");
    ok(VirtualFree(mem, 0, MEM_RELEASE), "release failed");

    base = VirtualAlloc(NULL, 16 * page, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                        PAGE_READWRITE);
    ok(base != NULL, "VirtualAlloc(MEM_WRITE_WATCH) failed, error %u", GetLastError());
    if (!base)
        return;
    ok((ULONG_PTR)base % 0x10000 == 0, "base %p is not 64 KiB aligned", (void *)base);

    /* item 2: fresh and committed pages are clean */
    ok(written(0, base, 16 * page, addresses, 16) == 0, "a fresh region reported pages");

    /* item 3: one write, one page, page granularity */
    base[page + 1] = 1;
    count = 16;
    ret = GetWriteWatch(0, base, 16 * page, addresses, &count, &granularity);
    ok(ret == 0 && count == 1 && addresses[0] == base + page && granularity == page,
       "one write: ret %u count %lu first %p granularity %u", ret, (unsigned long)count,
       count ? addresses[0] : NULL, granularity);

    /* item 4: RESET resets what it reported */
    ok(written(WRITE_WATCH_FLAG_RESET, base, 16 * page, addresses, 16) == 1, "RESET call");
    ok(written(0, base, 16 * page, addresses, 16) == 0, "pages still written after RESET");

    /* item 5: ascending whatever the write order */
    base[9 * page] = 1;
    base[2 * page] = 1;
    base[5 * page] = 1;
    n = written(0, base, 16 * page, addresses, 16);
    ok(n == 3 && addresses[0] == base + 2 * page && addresses[1] == base + 5 * page &&
       addresses[2] == base + 9 * page, "not ascending (%ld pages)", n);

    /* item 6: a sub-range reports only its own pages */
    n = written(0, base + 3 * page, 4 * page, addresses, 16);
    ok(n == 1 && addresses[0] == base + 5 * page, "sub-range reported %ld pages", n);

    /* item 7: ResetWriteWatch resets only its range */
    ok(ResetWriteWatch(base, 3 * page) == 0, "ResetWriteWatch failed");
    n = written(0, base, 16 * page, addresses, 16);
    ok(n == 2 && addresses[0] == base + 5 * page, "partial reset left %ld pages", n);
    ResetWriteWatch(base, 16 * page);

    /* item 8: a 4-byte write across a page boundary dirties both pages */
    memset(base + 4 * page - 2, 7, 4);
    n = written(WRITE_WATCH_FLAG_RESET, base, 16 * page, addresses, 16);
    ok(n == 2 && addresses[0] == base + 3 * page && addresses[1] == base + 4 * page,
       "straddling write reported %ld pages", n);

    /* item 9: a capped RESET resets only the pages it returned */
    base[1 * page] = base[6 * page] = base[11 * page] = 1;
    n = written(WRITE_WATCH_FLAG_RESET, base, 16 * page, addresses, 1);
    ok(n == 1 && addresses[0] == base + page, "capped RESET returned %ld", n);
    n = written(0, base, 16 * page, addresses, 16);
    ok(n == 2 && addresses[0] == base + 6 * page && addresses[1] == base + 11 * page,
       "pages not returned were reset too (%ld left)", n);
    ResetWriteWatch(base, 16 * page);

    /* item 10: protection changes neither dirty nor reset */
    base[2 * page] = 1;
    ok(VirtualProtect(base, 16 * page, PAGE_READONLY, &old) && old == PAGE_READWRITE,
       "VirtualProtect to read-only failed, error %u", GetLastError());
    ok(VirtualProtect(base, 16 * page, PAGE_READWRITE, &old) && old == PAGE_READONLY,
       "VirtualProtect back failed, error %u", GetLastError());
    n = written(WRITE_WATCH_FLAG_RESET, base, 16 * page, addresses, 16);
    ok(n == 1 && addresses[0] == base + 2 * page, "protection change: %ld pages", n);

    /* item 11: decommit clears the dirty state, recommitted pages start clean */
    base[7 * page] = 1;
    ok(VirtualFree(base + 7 * page, page, MEM_DECOMMIT), "decommit failed");
    ok(VirtualAlloc(base + 7 * page, page, MEM_COMMIT, PAGE_READWRITE) == base + 7 * page,
       "recommit failed, error %u", GetLastError());
    ok(written(0, base, 16 * page, addresses, 16) == 0 && base[7 * page] == 0,
       "a decommitted page kept its dirty state or its contents");

    /* item 15: parameter errors, in Wine's order */
    count = 0;
    ret = GetWriteWatch(0, base, 16 * page, addresses, &count, &granularity);
    ok(ret != 0 && GetLastError() == ERROR_INVALID_PARAMETER, "count 0: error %u",
       GetLastError());
    count = 16;
    ret = GetWriteWatch(0, base, 16 * page, NULL, &count, &granularity);
    ok(ret != 0 && GetLastError() == ERROR_NOACCESS, "no array: error %u", GetLastError());
    count = 16;
    ret = GetWriteWatch(2, base, 16 * page, addresses, &count, &granularity);
    ok(ret != 0 && GetLastError() == ERROR_INVALID_PARAMETER && count == 16,
       "bad flags: error %u", GetLastError());
    ret = GetWriteWatch(0, base, 0, addresses, &count, &granularity);
    ok(ret != 0 && GetLastError() == ERROR_INVALID_PARAMETER, "size 0: error %u",
       GetLastError());
    ret = GetWriteWatch(0, base, 32 * page, addresses, &count, &granularity);
    ok(ret != 0 && GetLastError() == ERROR_INVALID_PARAMETER, "size x2: error %u",
       GetLastError());
    ret = GetWriteWatch(0, base + 15 * page, page + 1, addresses, &count, &granularity);
    ok(ret != 0 && GetLastError() == ERROR_INVALID_PARAMETER, "one byte past: error %u",
       GetLastError());
    ret = GetWriteWatch(0, NULL, page, addresses, &count, &granularity);
    ok(ret != 0 && GetLastError() == ERROR_INVALID_PARAMETER, "NULL base: error %u",
       GetLastError());
    ret = ResetWriteWatch(base, 0);
    ok(ret != 0 && GetLastError() == ERROR_INVALID_PARAMETER, "reset size 0: error %u",
       GetLastError());
    base[3 * page] = 1; /* an unaligned base inside the region is rounded down */
    n = written(0, base + 3 * page + 5, page, addresses, 16);
    ok(n == 1 && addresses[0] == base + 3 * page, "unaligned base: %ld pages", n);
    ok(VirtualFree(base, 0, MEM_RELEASE), "release failed, error %u", GetLastError());

    /* item 12: written while accessible, still reported after NOACCESS */
    mem = VirtualAlloc(NULL, 16 * page, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                       PAGE_NOACCESS);
    ok(mem != NULL, "NOACCESS region failed, error %u", GetLastError());
    if (mem) {
        ok(VirtualProtect(mem + 2 * page, 6 * page, PAGE_READWRITE, &old), "protect RW");
        mem[4 * page] = 1;
        ok(VirtualProtect(mem + 2 * page, 6 * page, PAGE_NOACCESS, &old), "protect NA");
        n = written(0, mem, 16 * page, addresses, 16);
        ok(n == 1 && addresses[0] == mem + 4 * page, "NOACCESS round trip: %ld", n);
        VirtualFree(mem, 0, MEM_RELEASE);
    }

    /* rule 11's exception (Wine lacks it): VirtualProtect latches the pages
     * written at that moment; a decommit keeps them written, a reset does not */
    mem = VirtualAlloc(NULL, 16 * page, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                       PAGE_READWRITE);
    ok(mem != NULL, "latch region failed, error %u", GetLastError());
    if (mem) {
        mem[3 * page] = 1;
        ok(VirtualProtect(mem, 6 * page, PAGE_READWRITE, &old), "protect RW to RW");
        mem[5 * page] = 1;
        n = written(0, mem, 16 * page, addresses, 16);
        ok(n == 2, "latch: %ld pages before the decommit, not 2", n);
        ok(VirtualFree(mem, 16 * page, MEM_DECOMMIT), "decommit");
        n = written(0, mem, 16 * page, addresses, 16);
        ok(n == 1 && addresses[0] == mem + 3 * page, "latched page 3 lost by decommit: %ld", n);
        ok(VirtualAlloc(mem, 16 * page, MEM_COMMIT, PAGE_READWRITE) == mem, "recommit");
        mem[2 * page] = mem[4 * page] = mem[6 * page] = 1;
        n = written(WRITE_WATCH_FLAG_RESET, mem, 16 * page, addresses, 16);
        ok(n == 4 && addresses[1] == mem + 3 * page, "latch after recommit: %ld pages", n);
        ok(VirtualFree(mem, 16 * page, MEM_DECOMMIT), "decommit");
        n = written(0, mem, 16 * page, addresses, 16);
        ok(n == 0, "a reset clears the latch: %ld pages after decommit", n);
        VirtualFree(mem, 0, MEM_RELEASE);
    }
    mem = VirtualAlloc(NULL, 16 * page, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                       PAGE_NOACCESS);
    if (mem) {
        ok(VirtualProtect(mem, 6 * page, PAGE_READWRITE, &old), "protect NA to RW");
        mem[3 * page] = mem[5 * page] = 1;
        ok(VirtualFree(mem, 16 * page, MEM_DECOMMIT), "decommit");
        n = written(0, mem, 16 * page, addresses, 16);
        ok(n == 0, "writes after VirtualProtect are not latched: %ld pages", n);
        VirtualFree(mem, 0, MEM_RELEASE);
    }

    /* item 13: every other page of 2048 */
    mem = VirtualAlloc(NULL, 2048 * page, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                       PAGE_READWRITE);
    ok(mem != NULL, "2048-page region failed, error %u", GetLastError());
    if (mem) {
        long i, wrong = 0;
        for (i = 0; i < 2048; i += 2)
            mem[i * page] = 1;
        n = written(WRITE_WATCH_FLAG_RESET, mem, 2048 * page, addresses, 1024);
        for (i = 0; i < n; i++)
            wrong += addresses[i] != mem + 2 * i * page;
        ok(n == 1024 && wrong == 0, "every other page: %ld reported, %ld wrong", n, wrong);
        ok(written(0, mem, 2048 * page, addresses, 1024) == 0, "not reset");
        VirtualFree(mem, 0, MEM_RELEASE);
    }
}

/* ---- What a translation layer's ReadFile does (a file descriptor stands for
 * the HANDLE). Windows marks the read's whole buffer written once the handle
 * is valid, however many bytes arrive (docs/semantics.md rule 14), and the
 * system writes the OVERLAPPED structure too. ---- */

/* Memory VirtualAlloc made must be committed read-write (Windows fails the
 * read with ERROR_NOACCESS otherwise); other memory is the kernel's to check. */
static int layer_buffer_writable(char *buffer, SIZE_T size)
{
    char *end = buffer + size;
    while (buffer < end) {
        MEMORY_BASIC_INFORMATION info;
        if (!VirtualQuery(buffer, &info, sizeof info))
            return 1;
        if (info.State != MEM_FREE && (info.State != MEM_COMMIT || info.Protect != PAGE_READWRITE))
            return 0;
        buffer = (char *)info.BaseAddress + info.RegionSize;
    }
    return 1;
}

static BOOL layer_ReadFile(int fd, void *buffer, DWORD size, DWORD *done, OVERLAPPED *overlapped)
{
    if (fcntl(fd, F_GETFL) < 0) { /* 1. the handle: nothing is marked for a bad one */
        SetLastError(ERROR_INVALID_HANDLE);
        return FALSE;
    }
    if (!layer_buffer_writable(buffer, size)) { /* 2. the buffer */
        SetLastError(ERROR_NOACCESS);
        return FALSE;
    }
    PrepareKernelWrite(buffer, size); /* 3. all of it is written, whatever arrives */
    if (overlapped) {
        overlapped->Internal = STATUS_PENDING;
        overlapped->InternalHigh = 0;
    }
    ssize_t n = read(fd, buffer, size);
    if (n < 0 && errno == EAGAIN && overlapped) {
        SetLastError(ERROR_IO_PENDING);
        return FALSE;
    }
    if (n < 0) {
        SetLastError(ERROR_INVALID_PARAMETER);
        return FALSE;
    }
    if (done)
        *done = (DWORD)n;
    if (overlapped) {
        overlapped->Internal = 0;
        overlapped->InternalHigh = (ULONG_PTR)n;
    }
    return TRUE;
}

/* A pending read completes (what GetOverlappedResult waits for): only the
 * bytes that arrive are written now. A reset may have come since ReadFile
 * prepared the buffer, so they are prepared again. */
static BOOL layer_complete_read(int fd, void *buffer, DWORD size, OVERLAPPED *overlapped)
{
    int available = 0;
    if (ioctl(fd, FIONREAD, &available) < 0 || available <= 0)
        return FALSE;
    if ((DWORD)available > size)
        available = (int)size;
    PrepareKernelWrite(buffer, (SIZE_T)available);
    ssize_t n = read(fd, buffer, (size_t)available);
    if (n < 0)
        return FALSE;
    overlapped->Internal = 0;
    overlapped->InternalHigh = (ULONG_PTR)n;
    return TRUE;
}

static void check_reads(void)
{
    PVOID addresses[16];
    OVERLAPPED aside;
    DWORD got = 0;
    long n;
    char *mem = VirtualAlloc(NULL, 16 * page, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                             PAGE_READWRITE);
    char path[] = "/tmp/winshim-read-XXXXXX";
    int fd = mkstemp(path), pipe_ends[2] = {-1, -1};
    ok(mem != NULL && fd >= 0, "read setup failed");
    if (!mem || fd < 0)
        return;
    unlink(path);
    char *contents = calloc(1, 2 * page + 3);
    ok(contents && write(fd, contents, 2 * page + 3) == (ssize_t)(2 * page + 3), "file");
    free(contents);
    lseek(fd, 0, SEEK_SET);

    ok(layer_ReadFile(fd, mem, 16 * page, &got, NULL) && got == 2 * page + 3, "short read");
    n = written(WRITE_WATCH_FLAG_RESET, mem, 16 * page, addresses, 16);
    ok(n == 16, "16-page read of a file of 2 pages + 3 bytes: %ld pages, not 16", n);
    ok(layer_ReadFile(fd, mem, 16 * page, &got, NULL) && got == 0, "read at end of file");
    n = written(WRITE_WATCH_FLAG_RESET, mem, 16 * page, addresses, 16);
    ok(n == 16, "read at end of file: %ld pages, not 16", n);
    close(fd);
    SetLastError(0);
    ok(!layer_ReadFile(fd, mem, 16 * page, &got, NULL) && GetLastError() == ERROR_INVALID_HANDLE,
       "read on an invalid handle: error %u", GetLastError());
    n = written(0, mem, 16 * page, addresses, 16);
    ok(n == 0, "read on an invalid handle: %ld pages, not 0", n);

    ok(pipe(pipe_ends) == 0 && fcntl(pipe_ends[0], F_SETFL, O_NONBLOCK) == 0, "pipe");
    SetLastError(0);
    ok(!layer_ReadFile(pipe_ends[0], mem, 16 * page, NULL, &aside) &&
       GetLastError() == ERROR_IO_PENDING, "pending read: error %u", GetLastError());
    n = written(WRITE_WATCH_FLAG_RESET, mem, 16 * page, addresses, 16);
    ok(n == 16, "pending pipe read, just issued: %ld pages, not 16", n);
    ok(write(pipe_ends[1], "abc", 3) == 3 && layer_complete_read(pipe_ends[0], mem + page + 5,
                                                                 15 * page - 5, &aside) &&
       aside.InternalHigh == 3, "pending read completes");
    n = written(WRITE_WATCH_FLAG_RESET, mem, 16 * page, addresses, 16);
    ok(n == 1 && addresses[0] == mem + page, "completed read: %ld pages, not 1 (page 1)", n);

    OVERLAPPED *inside = (OVERLAPPED *)(mem + 16 * page - sizeof *inside);
    ok(!layer_ReadFile(pipe_ends[0], mem, 1, NULL, inside) && GetLastError() == ERROR_IO_PENDING,
       "pending 1-byte read");
    n = written(0, mem, 16 * page, addresses, 16);
    ok(n == 2 && addresses[0] == mem && addresses[1] == mem + 15 * page,
       "OVERLAPPED in the region's last page: %ld pages, not 2", n);
    close(pipe_ends[0]);
    close(pipe_ends[1]);
    VirtualFree(mem, 0, MEM_RELEASE);
}

/* A small, fast, reproducible generator (the same numbers on every backend). */
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static uint64_t next_random(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static double seconds(LARGE_INTEGER from, LARGE_INTEGER to, LARGE_INTEGER frequency)
{
    return (double)(to.QuadPart - from.QuadPart) / (double)frequency.QuadPart;
}

#define BATCH 512 /* addresses per GetWriteWatch call, as engines size them */

static int save_states(SIZE_T heap_size, int frames, int hot_spots)
{
    static PVOID addresses[BATCH];
    LARGE_INTEGER frequency, t0, t1, t2;
    SIZE_T npages = heap_size / page, copied_pages = 0;
    double watch_seconds = 0, copy_seconds = 0;
    int frame, mismatches = 0;
    char *heap, *snapshot;

    heap = VirtualAlloc(NULL, heap_size, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                        PAGE_READWRITE);
    snapshot = calloc(1, heap_size);
    if (!heap || !snapshot) {
        printf("  cannot allocate the %lu KiB heap (error %u)\n",
               (unsigned long)(heap_size >> 10), GetLastError());
        return 1;
    }
    /* The first save state is a full copy of the loaded level; from then on
     * only what each frame wrote is copied. */
    for (frame = 0; frame < (int)npages; frame++)
        heap[(SIZE_T)frame * page] = (char)frame;
    memcpy(snapshot, heap, heap_size);
    if (ResetWriteWatch(heap, heap_size) != 0) {
        printf("  ResetWriteWatch failed, error %u\n", GetLastError());
        return 1;
    }
    QueryPerformanceFrequency(&frequency);
    for (frame = 0; frame < frames; frame++) {
        ULONG_PTR count;
        ULONG granularity;
        int spot;

        /* The frame's work: objects near a few hot spots change (a player,
         * the physics island it stands on), plus a few scattered writes. */
        for (spot = 0; spot < hot_spots; spot++) {
            SIZE_T centre = next_random() % npages, extent = 1 + next_random() % 8, p;
            for (p = centre; p < centre + extent && p < npages; p++)
                heap[p * page + next_random() % page] = (char)next_random();
        }
        heap[(next_random() % npages) * page + next_random() % page] = (char)frame;

        /* Ship the written pages into the save state, BATCH at a time. */
        do {
            SIZE_T i;
            UINT ret;
            count = BATCH;
            QueryPerformanceCounter(&t0);
            ret = GetWriteWatch(WRITE_WATCH_FLAG_RESET, heap, heap_size, addresses, &count,
                                &granularity);
            QueryPerformanceCounter(&t1);
            if (ret != 0) {
                printf("  GetWriteWatch failed, error %u\n", GetLastError());
                return 1;
            }
            for (i = 0; i < count; i++) {
                SIZE_T offset = (char *)addresses[i] - heap;
                memcpy(snapshot + offset, heap + offset, page);
            }
            QueryPerformanceCounter(&t2);
            watch_seconds += seconds(t0, t1, frequency);
            copy_seconds += seconds(t1, t2, frequency);
            copied_pages += count;
        } while (count == BATCH);

        if (memcmp(snapshot, heap, heap_size) != 0)
            mismatches++;
    }
    printf("  save states: %d frames of a %lu KiB heap (%lu pages), %d hot spots per frame\n",
           frames, (unsigned long)(heap_size >> 10), (unsigned long)npages, hot_spots);
    printf("    pages copied per frame: %.1f of %lu (%.2f%% of a full copy)\n",
           (double)copied_pages / frames, (unsigned long)npages,
           100.0 * (double)copied_pages / ((double)npages * frames));
    printf("    per frame: GetWriteWatch %.1f us, copying the pages %.1f us\n",
           1e6 * watch_seconds / frames, 1e6 * copy_seconds / frames);
    printf("    snapshot equals the heap after every frame: %s\n",
           mismatches ? "NO" : "yes");
    printf("RESULT checks=%d failed=%d frames=%d pages_per_frame=%.1f heap_pages=%lu "
           "watch_us=%.1f copy_us=%.1f mismatches=%d\n",
           checks, failures, frames, (double)copied_pages / frames, (unsigned long)npages,
           1e6 * watch_seconds / frames, 1e6 * copy_seconds / frames, mismatches);
    VirtualFree(heap, 0, MEM_RELEASE);
    free(snapshot);
    return mismatches != 0;
}

int main(int argc, char **argv)
{
    SYSTEM_INFO info;
    int small = argc > 1 && strcmp(argv[1], "--small") == 0;
    int bad_snapshots;

    GetSystemInfo(&info);
    page = info.dwPageSize;
    check_api();
    check_reads();
    printf("  API checks: %d of %d passed\n", checks - failures, checks);
    fflush(stdout);
    bad_snapshots = small ? save_states(1 << 20, 30, 4) : save_states(64 << 20, 300, 16);
    fflush(stdout);
    return failures || bad_snapshots ? 1 : 0;
}
