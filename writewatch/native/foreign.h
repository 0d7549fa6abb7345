/* Shared by foreign.c, foreign_spans.c and foreign_maps.c (not part of the
 * cffi ABI; hidden in libprocess_memwatch). */
#pragma GCC visibility push(hidden)

#define WW_FOREIGN_PAGE WW_PAGE_SIZE
#define WW_FOREIGN_CHUNK_PAGES 512 /* pagemap entries read at once */
#define WW_FOREIGN_NAME_SIZE 256

struct vma {
    uint64_t start, end;
    int prot, shared, file, shmem; /* shmem: shared, of an in-memory file system */
    char name[WW_FOREIGN_NAME_SIZE];
};

struct vmas {
    struct vma *at;
    size_t count, capacity;
};

/* The VMAs overlapping [start, end), ascending, unclipped. */
int walk_vmas(uint64_t start, uint64_t end, struct vmas *list);
/* Is the process at vm.max_map_count? Then an ENOMEM from mprotect means the
 * kernel could not split a mapping, not that the mapping changed. */
int at_map_count_limit(void);
/* pages pagemap entries from address. */
int read_pagemap(uint64_t address, uint64_t pages, uint64_t *entries);
/* Was the page of this pagemap entry written since mapped? (as written_pages) */
int entry_written(uint64_t entry);
/* One bit per page of [a, b): written since mapped (present, or swapped where
 * with_swapped, and not the zero page), added to bits if given. */
uint8_t *written_pages(uint64_t a, uint64_t b, int with_swapped, uint8_t *bits, int *error);
/* A refusal: its reason kept for ww_memwatch_reason() of this thread; -EINVAL. */
int refuse(const char *format, ...) __attribute__((format(printf, 1, 2)));
void refuse_clear(void);
/* Why [a, b) of vma cannot be watched in mode, as a refusal (0 if it can). */
int refusal(const struct vma *vma, uint64_t a, uint64_t b, int mode);

/* tracking.c's: every mapping the fault path writes, as [start, end) pairs
 * in a malloc'd array (*out, unsorted); the count, or -ENOMEM. */
int64_t ww_track_internal_mappings(uint64_t **out);

/* ---- foreign_spans.c: the watched spans, one tracking range each, sorted by
 * address; the call mutex held ---- */
struct span {
    uint64_t start, end;
    int mode;
};

extern struct span *spans;
extern size_t span_count;
extern int foreign_uffd;               /* the uffd mechanism's descriptor (foreign.c) */
extern uint64_t foreign_uffd_features; /* and the features it enabled */

int span_insert(uint64_t start, uint64_t end, int mode);
void span_remove(size_t at);
/* The first span that ends after address. */
size_t span_from(uint64_t address);
/* Register [a, b) with the uffd mechanism's userfaultfd for write-protect;
 * -EBUSY if another userfaultfd of this process holds it (a refusal). */
int uffd_register(uint64_t a, uint64_t b);

struct snapshot {
    uint64_t start, end; /* of this part of a span */
    uint8_t *state;
};

struct snapshots {
    struct snapshot *at;
    size_t count;
};

void snapshots_free(struct snapshots *list);
int take_snapshots(uint64_t start, uint64_t end, struct snapshots *list);
/* A page's state in the snapshot; 0 (never watched) for one it does not hold. */
int snapshot_state(const struct snapshots *list, uint64_t page);
/* How a page whose mapping is new is watched afresh: read as all written,
 * exactly (NO_REUSED_REGIONS), or only so that its watch can be stopped. */
enum renewal { RENEW_WRITTEN, RENEW_EXACT, RENEW_TO_STOP };
/* Bring [a, b) of the span with this handle, inside one VMA of protection
 * prot, up to date, pages of a new mapping watched afresh as how says. */
int refresh(int mode, uint64_t handle, uint64_t a, uint64_t b, int prot, enum renewal how,
            const struct snapshots *before);

#pragma GCC visibility pop
