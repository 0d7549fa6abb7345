/*
 * The kernel ABI writewatch uses, declared once.
 *
 * This file is read twice: by the C compiler (included from every .c file here)
 * and by cffi's cdef (see build_native.py at the top of the repository), so it may hold only what both understand:
 * structs of fixed-width fields, integer #defines and prototypes. No include
 * guards, no expressions in #defines.
 *
 * The machine's uapi headers predate Linux 6.7, so PAGEMAP_SCAN and the
 * userfaultfd async write-protect bits are spelled out here (include/uapi/linux/
 * fs.h and userfaultfd.h of Linux 6.7+, x86_64 ioctl numbers).
 */

/* The page size writewatch is built for (x86_64); kernel.py checks it against
 * the running system's at import, and every other definition derives from it. */
#define WW_PAGE_SIZE 4096

/* ---- PAGEMAP_SCAN on /proc/PID/pagemap (Linux 6.7) ---- */
#define PAGEMAP_SCAN 0xC0606610

#define PM_SCAN_WP_MATCHING 0x1
#define PM_SCAN_CHECK_WPASYNC 0x2

#define PAGE_IS_WPALLOWED 0x1
#define PAGE_IS_WRITTEN 0x2
#define PAGE_IS_FILE 0x4
#define PAGE_IS_PRESENT 0x8
#define PAGE_IS_SWAPPED 0x10
#define PAGE_IS_PFNZERO 0x20
#define PAGE_IS_HUGE 0x40
#define PAGE_IS_SOFT_DIRTY 0x80

struct page_region {
    uint64_t start;
    uint64_t end; /* exclusive */
    uint64_t categories;
};

struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

/* ---- PROCMAP_QUERY on /proc/PID/maps (Linux 6.11): one VMA per ioctl ---- */
#define PROCMAP_QUERY 0xC0686611
#define PROCMAP_QUERY_VMA_READABLE 0x1
#define PROCMAP_QUERY_VMA_WRITABLE 0x2
#define PROCMAP_QUERY_VMA_EXECUTABLE 0x4
#define PROCMAP_QUERY_VMA_SHARED 0x8
#define PROCMAP_QUERY_COVERING_OR_NEXT_VMA 0x10

struct procmap_query {
    uint64_t size;
    uint64_t query_flags;
    uint64_t query_addr;
    uint64_t vma_start;
    uint64_t vma_end;
    uint64_t vma_flags;
    uint64_t vma_page_size;
    uint64_t vma_offset;
    uint64_t inode;
    uint32_t dev_major;
    uint32_t dev_minor;
    uint32_t vma_name_size;
    uint32_t build_id_size;
    uint64_t vma_name_addr;
    uint64_t build_id_addr;
};

/* /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst). */
#define WW_PM_PFN_BITS 55
#define WW_PM_UFFD_WP_BIT 57
#define WW_PM_SWAPPED_BIT 62
#define WW_PM_PRESENT_BIT 63

/* ---- userfaultfd (syscall 323 on x86_64) ---- */
#define WW_NR_USERFAULTFD 323
#define WW_MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#define UFFD_USER_MODE_ONLY 1
#define UFFD_API 0xAA

#define UFFDIO_API 0xC018AA3F
#define UFFDIO_REGISTER 0xC020AA00
#define UFFDIO_UNREGISTER 0x8010AA01
#define UFFDIO_WRITEPROTECT 0xC018AA06
#define UFFDIO_WAKE 0x8010AA02

#define UFFDIO_REGISTER_MODE_WP 2
#define UFFDIO_WRITEPROTECT_MODE_WP 1

/* Bit numbers of the ioctls a registration supports (uffdio_register.ioctls). */
#define WW_UFFDIO_WRITEPROTECT_BIT 6

#define UFFD_FEATURE_PAGEFAULT_FLAG_WP 0x1
#define UFFD_FEATURE_THREAD_ID 0x100 /* pagefault_feat holds the faulting thread's id */
#define UFFD_FEATURE_WP_UNPOPULATED 0x2000
#define UFFD_FEATURE_WP_ASYNC 0x8000

struct uffdio_api {
    uint64_t api;
    uint64_t features;
    uint64_t ioctls;
};

struct uffdio_range {
    uint64_t start;
    uint64_t len;
};

struct uffdio_register {
    struct uffdio_range range;
    uint64_t mode;
    uint64_t ioctls;
};

struct uffdio_writeprotect {
    struct uffdio_range range;
    uint64_t mode;
};

#define UFFD_EVENT_PAGEFAULT 0x12
#define UFFD_PAGEFAULT_FLAG_WRITE 0x1
#define UFFD_PAGEFAULT_FLAG_WP 0x2

/* struct uffd_msg (32 bytes); only the page-fault member of its union is
 * spelled out, as the only event writewatch registers for. */
struct uffd_msg {
    uint8_t event;
    uint8_t reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    uint64_t pagefault_flags;
    uint64_t pagefault_address;
    uint64_t pagefault_feat;
};

/* ---- writewatch's native helpers: system calls (syscalls.c), PAGEMAP_SCAN
 * (pagemap.c) ----
 * Every helper returns a non-negative result or -errno: the Python side turns
 * that into an OSError in one place (kernel.check). They run without the GIL.
 */
int64_t ww_mmap(uint64_t addr, uint64_t length, int prot, int flags);
int ww_munmap(uint64_t addr, uint64_t length);
int ww_mprotect(uint64_t addr, uint64_t length, int prot);
int ww_madvise(uint64_t addr, uint64_t length, int advice);

int ww_uffd_open(int flags);
int ww_uffd_open_user_mode_first(int flags);
int ww_uffd_api(int uffd, uint64_t features, struct uffdio_api *out);
int ww_uffd_register_wp(int uffd, uint64_t start, uint64_t length, uint64_t *ioctls);
int ww_uffd_unregister(int uffd, uint64_t start, uint64_t length);
int ww_uffd_writeprotect(int uffd, uint64_t start, uint64_t length, int protect);

/* Which pages a PAGEMAP_SCAN selects: PM_SCAN_* flags and category masks. */
struct ww_scan_filter {
    uint64_t flags;
    uint64_t mask;
    uint64_t inverted;
    uint64_t anyof;
};

int64_t ww_pagemap_select(int pagemap_fd, uint64_t start, uint64_t end,
                          const struct ww_scan_filter *filter, uint64_t *out,
                          uint64_t capacity, uint64_t origin, uint64_t *walk_end);
int64_t ww_pagemap_runs(int pagemap_fd, uint64_t start, uint64_t end,
                        const struct ww_scan_filter *filter, uint64_t *bounds,
                        uint64_t max_runs, uint64_t *walk_end);
int64_t ww_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, int reset,
                           uint64_t *out, uint64_t capacity, uint64_t origin,
                           uint64_t *walk_end);
int64_t ww_pagemap_reset(int pagemap_fd, uint64_t start, uint64_t end);
int64_t ww_pagemap_get_write_watch(int pagemap_fd, const uint64_t *spans, uint64_t nspans,
                                 uint64_t first, uint64_t last, int reset,
                                 uint64_t *out, uint64_t capacity);
int64_t ww_pagemap_reset_write_watch(int pagemap_fd, const uint64_t *spans, uint64_t nspans,
                               uint64_t first, uint64_t last);
int64_t ww_pagemap_check_watched(int pagemap_fd, uint64_t start, uint64_t end);
int64_t ww_pagemap_raw(int pagemap_fd, struct pm_scan_arg *arg);

/* ---- process_memwatch on any memory of the calling process (memwatch.c) ----
 * The proposal's flags (its uapi/linux/memwatch.h). */
#define MEMWATCH_SD_GET 0x1
#define MEMWATCH_SD_CLEAR 0x2
#define MEMWATCH_SD_NO_REUSED_REGIONS 0x4
/* The end of x86_64 user space (4-level paging: TASK_SIZE_MAX); a range past
 * it is EINVAL on every backend. */
#define WW_USER_SPACE_END 0x7ffffffff000
/* Why ww_memwatch_args refused the arguments (EINVAL). */
#define WW_MEMWATCH_BAD_FLAGS 1
#define WW_MEMWATCH_UNALIGNED 2
#define WW_MEMWATCH_NEGATIVE_LENGTH 3
#define WW_MEMWATCH_NO_VEC 4
#define WW_MEMWATCH_PAST_USER_SPACE 5
#define WW_MEMWATCH_BAD_VEC 6  /* vec lies in region memory that cannot be written */
#define WW_MEMWATCH_IN_REGION 7  /* not an error: the range is the regions' (M12) */

/* A mapping process_memwatch refused (EINVAL): its bounds, the kernel's errno
 * (0 for VM_PFNMAP, which the kernel's scans skip) and its name in
 * /proc/self/maps. */
struct ww_memwatch_refusal {
    uint64_t start;
    uint64_t end;
    int64_t err;
    char name[128];
};

int ww_memwatch_args(uint64_t start, int64_t length, unsigned int flags, int64_t vec_len,
                     uint64_t *end);
int64_t ww_memwatch(int uffd, int pagemap_fd, uint64_t start, uint64_t end, unsigned int flags,
                    uint64_t *vec, uint64_t vec_len, struct ww_memwatch_refusal *why);
int64_t ww_memwatch_unwatch(int uffd, int pagemap_fd, uint64_t start, uint64_t end);
int ww_memwatch_open(int *uffd, int *pagemap_fd);

/* Userspace tracking for the fallback backends (tracking.h): one range per
 * reservation, one state byte per page. */
#define WW_MODE_MPROTECT 1
#define WW_MODE_UFFD 2
#define WW_MODE_PAGEMAP 3 /* no tracking state: the kernel keeps it (memwatch.c) */

/* The mechanism, decided in one place for the Python package and for
 * libprocess_memwatch (mechanism.c): the one a WRITEWATCH_BACKEND value names
 * (0 for "auto", unset or empty; -EINVAL for no mechanism), the best one that
 * works here, and the uffd mechanism's start in this process. */
int ww_mechanism_named(const char *name);
int ww_mechanism_best(void);
int ww_uffd_mechanism_start(uint64_t *features, int *kernel_faults);

#define WW_PAGE_DIRTY 0x1
#define WW_PAGE_ARMED 0x2
#define WW_PAGE_READ 0x4
#define WW_PAGE_WRITE 0x8
#define WW_PAGE_WATCHED 0x10 /* committed and tracked */

/* A range's handle is an opaque 64-bit id (non-negative; -errno on failure).
 * mode | WW_TRACK_FOREIGN: memory writewatch did not map (foreign.c); its data
 * and protection are left as they are. */
#define WW_TRACK_FOREIGN 0x100
int64_t ww_track_attach(uint64_t start, uint64_t length, int mode);
int ww_track_detach(uint64_t handle);
int ww_track_watch(uint64_t handle, uint64_t start, uint64_t length, int prot, int clean);
int ww_track_unwatch(uint64_t handle, uint64_t start, uint64_t length);
int ww_track_protect(uint64_t handle, uint64_t start, uint64_t length, int prot);
int64_t ww_track_scan(uint64_t handle, uint64_t start, uint64_t end, int reset,
                      uint64_t *out, uint64_t capacity, uint64_t origin);
int64_t ww_track_get_write_watch(uint64_t handle, const uint64_t *spans, uint64_t nspans,
                                 uint64_t first, uint64_t last, int reset,
                                 uint64_t *out, uint64_t capacity);
int ww_track_prepare_write(uint64_t handle, uint64_t start, uint64_t length);
int ww_track_mode_at(uint64_t address);
int64_t ww_track_memwatch(int mode, uint64_t start, uint64_t end, int get, int clear,
                          uint64_t *out, uint64_t capacity);
int ww_track_state(uint64_t handle, uint64_t address);
int64_t ww_track_retired_waiting(void);
int ww_track_install_fork_handlers(void);
int ww_segv_install(void);
int ww_segv_installed(void);
int ww_uffd_handler_start(int uffd);
int ww_uffd_handler_pause(void);
int ww_uffd_handler_resume(void);
int ww_uffd_forked_alone(void);
int ww_touch_for_write(uint64_t start, uint64_t length);
int ww_populate_for_write(uint64_t start, uint64_t length);
int ww_track_internal_overlaps(uint64_t start, uint64_t end);
int ww_track_states(uint64_t handle, uint64_t address, uint64_t npages, uint8_t *out);

/* process_memwatch over any private anonymous memory of this process on the
 * fallback backends (foreign.c). A refusal (-EINVAL) leaves its reason in
 * ww_memwatch_reason() of the calling thread. */
#define WW_MEMWATCH_GET 0x1
#define WW_MEMWATCH_CLEAR 0x2
#define WW_MEMWATCH_NO_REUSED_REGIONS 0x4
int64_t ww_track_memwatch_any(int mode, uint64_t start, uint64_t end, unsigned flags,
                              uint64_t *vec, uint64_t vec_len);
int ww_track_memwatch_unwatch(int mode, uint64_t start, uint64_t end);
const char *ww_memwatch_reason(void);
void ww_memwatch_use_uffd(int uffd, uint64_t features);
int ww_memwatch_maps_method(int force_maps);
void ww_memwatch_evict(uint64_t start, uint64_t end);
/* Spans of memory process_memwatch watches on the fallbacks (foreign.c). */
size_t ww_memwatch_span_count(void);

/* The native index of write-watch regions (index.c): GetWriteWatch and
 * ResetWriteWatch in one call each, Windows' checks included. A call the index
 * refuses returns -(WW_REFUSED_BASE + reason); regions.py words each reason. */
#define WW_INDEX_PLAIN 0
#define WW_INDEX_PAGEMAP 1
#define WW_INDEX_TRACKED 2
#define WW_REFUSED_BASE 1000
#define WW_REFUSED_FLAGS 1          /* flags other than 0 or WRITE_WATCH_FLAG_RESET */
#define WW_REFUSED_SIZE 2           /* size 0, or a range that wraps the address space */
#define WW_REFUSED_NOT_WATCHED 3    /* base is not in a write-watch region */
#define WW_REFUSED_LEAVES_REGION 4  /* the range, rounded out to pages, leaves it */
#define WW_REFUSED_OUTPUT 5         /* the output array lies in memory that cannot be written */
#define WW_REFUSED_STALE 6          /* a forked child must refresh the region first */
#define WW_REFUSED_LATCHED 7        /* the region has latched pages: regions.py walks it */
#define WW_INDEX_ERRNO_BASE 100000

/* A region's page state, as the index keeps it (one value per run of pages):
 * the Windows protection of a committed page in the low byte (0: reserved;
 * the index never reads it), and flags the index does read. */
#define WW_PAGES_PROTECTION 0xff
#define WW_PAGES_WRITABLE 0x100 /* committed read-write: an output array may lie there */
#define WW_PAGES_LATCHED 0x200  /* written when a VirtualProtect latched it (rule 11) */
#define WW_PAGES_CHANGING 0x400 /* a change under way may make it unwritable: no output */
/* handle: the backend's (a pagemap descriptor, a tracking handle; -1 for none). */
int ww_index_add(uint64_t base, uint64_t length, int kind, int64_t handle);
int ww_index_remove(uint64_t base);
int ww_index_set_pages(uint64_t base, uint64_t first, uint64_t last, uint64_t mask,
                       uint64_t bits);
int64_t ww_index_pages(uint64_t base, uint64_t first, uint64_t last, uint64_t mask,
                       uint64_t *runs, uint64_t capacity);
int ww_index_refresh(uint64_t base, int64_t handle);
int ww_index_current(uint64_t base);
int64_t ww_index_get_write_watch(uint64_t flags, uint64_t base, uint64_t size,
                                 uint64_t *out, uint64_t capacity);
int64_t ww_index_get_write_watch_as(uint64_t flags, uint64_t base, uint64_t size,
                                    uint64_t *out, uint64_t capacity, uint64_t origin,
                                    unsigned shift);
int64_t ww_index_reset_write_watch(uint64_t base, uint64_t size);
int ww_index_set_latching(uint64_t base, int latching);
int ww_index_quiesce(uint64_t base);
int ww_output_check(const void *out, uint64_t size);
/* python_calls.c: set writewatch._native.get_write_watch and
 * .process_memwatch, the common calls as CPython functions; 0, or -1. */
int ww_install_python_calls(void);
int64_t ww_memwatch_checked(uint64_t start, int64_t length, unsigned int flags,
                            int64_t vec_len, const void *vec);
/* ww_memwatch_call's answer for a refusal of ww_memwatch_checked: -(base + reason). */
#define WW_MEMWATCH_REFUSED_BASE 2000
int64_t ww_memwatch_call(int kind, int64_t uffd, int64_t pagemap_fd, uint64_t start,
                         int64_t length, unsigned int flags, int64_t vec_len, uint64_t *vec,
                         struct ww_memwatch_refusal *why);
void ww_index_after_fork_child(void);
