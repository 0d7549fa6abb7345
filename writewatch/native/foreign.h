/* Shared by foreign.c and foreign_maps.c (not part of the cffi ABI). */
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
