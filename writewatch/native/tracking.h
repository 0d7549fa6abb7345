/*
 * tracking.h: what the files of the fallback backends' write tracking share
 * (tracking.c: the range table, its locks and the deferred list, fork;
 * tracking_arming.c: page protections and state changes; tracking_scan.c:
 * collect-and-reset; tracking_faults.c: the SIGSEGV handler and the uffd
 * handler thread). Internal: not read by cffi.
 *
 * Userspace write tracking for the fallback backends, where the kernel keeps
 * no dirty state for us:
 *
 *   mprotect: armed pages are PROT_READ; the SIGSEGV handler records the first
 *             write and gives the page write access back.
 *   uffd:     armed pages are userfaultfd write-protected (synchronous mode);
 *             a handler thread records the fault and removes the protection,
 *             which also wakes the faulting thread.
 *
 * One range per reservation, one state byte per page (DIRTY, ARMED and the
 * page's logical READ/WRITE protection). The state array is mapped
 * MAP_NORESERVE, so only pages whose state is touched cost memory.
 *
 * A per-range lock serialises the fault path with collect-and-reset: a
 * reset arms the pages it reports before it clears their DIRTY bit, and a
 * fault arriving meanwhile waits for the lock, so a write is reported either
 * by this call or by the next, never lost. The lock spins briefly, then sleeps
 * on a futex (async-signal-safe, so SIGSEGV handlers wait the same way): with
 * more threads than CPUs a holder preempted mid-call gets the CPU back instead
 * of waiters yielding to one another.
 *
 * The fault path never waits for a thread that may be waiting for it: a
 * fault on a range whose lock is held by the faulting thread itself (a signal
 * handler storing into watched memory in the middle of a reset), or by a
 * thread stopped in the fault path (track_blocked: two threads whose handlers
 * store into each other's regions), gives the page write access at once and
 * leaves the page in the range's deferred list; the lock holder records it as
 * written when it lets the lock go, after anything it did to the page. The
 * uffd handler thread never waits for a range lock at all: a fault whose
 * range is locked by a running thread waits in its queue, tried again after
 * short naps, while it serves every other fault.
 *
 * The range table is a two-level copy-on-write table by address (ctable.h):
 * read lock-free and without allocating, by the fault path included, in
 * O(log n); updated by attach and detach in O(chunk + n / chunk), never O(n),
 * and with no cap on the number of ranges. A range's handle is its start
 * address (opaque to Python). Every native access to a range, by a call or by
 * a fault, is counted in that range's users, and detach waits for those only:
 * a release never waits for calls on other regions. Table memory an update
 * replaced, and the range itself, are freed after a grace period (ct_grace)
 * that covers only the lookup, so it ends under constant traffic too. A range
 * struct has a mapping of its own (never a heap page process_memwatch might
 * arm: the fault path writes it), unmapped when its grace period ends.
 */
#ifndef WW_TRACKING_H
#define WW_TRACKING_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* ppoll */
#endif
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <linux/futex.h>

#include "abi.h"
#include "ctable.h"

#pragma GCC visibility push(hidden)

#define TRACK_NO_RUN UINT64_MAX
#define TRACK_DEFERRED_MAX 64
/* Lock word: 0 free, 1 held, 2 held and someone may sleep on it. */
#define TRACK_LOCK_SPINS 100        /* brief spin before sleeping */
#define TRACK_LOCK_NAP_NS 200000    /* the uffd handler thread's wait, re-checked */
#define TRACK_HANDLER_LINGER_NS 50000 /* the handler keeps reading after a fault */

struct track_range {
    uint64_t start, end;
    uint8_t *state;
    uint64_t state_size;
    int mode;
    int foreign;                              /* foreign.c's: memory no region holds */
    int users;                                /* counted native accesses (range_enter) */
    int detached;                             /* out of the table: no new access */
    int lock;                                 /* 0 free, 1 held, 2 held, sleepers */
    int owner;                                /* the lock holder's thread id */
    int deferred_pending;                     /* pages below, or an overflow */
    int deferred_overflow;                    /* more than fit: treat all as written */
    uint64_t deferred[TRACK_DEFERRED_MAX];    /* pages written while the lock was held */
};

#define TRACK_BLOCKED_MAX 256 /* threads listed as stopped in the fault path */

extern struct ct_table track_table;   /* ranges by start address */
extern struct ct_grace track_grace;   /* table memory and ranges replaced */
extern int track_sync_uffd;           /* this process's uffd of the uffd backend */
extern int track_blocked[TRACK_BLOCKED_MAX]; /* threads stopped in the fault path */
extern size_t track_waiting_count;    /* uffd faults queued for a lock */
/* The uffd handler thread's stack as one word, so that a reader never pairs
 * one stack's low end with another's high end: the page number of its low
 * end in the low 36 bits, its length in pages above (0: none recorded). */
extern uint64_t track_handler_stack;
#define TRACK_STACK_PAGE_BITS 36

static inline uint64_t handler_stack_word(uint64_t low, uint64_t high)
{
    uint64_t first = low / WW_PAGE_SIZE, last = (high + WW_PAGE_SIZE - 1) / WW_PAGE_SIZE;
    return first | (last - first) << TRACK_STACK_PAGE_BITS;
}

/* The recorded stack's whole pages [*low, *high); empty if none. */
static inline void handler_stack(uint64_t *low, uint64_t *high)
{
    uint64_t word = __atomic_load_n(&track_handler_stack, __ATOMIC_ACQUIRE);
    uint64_t first = word & ((1ULL << TRACK_STACK_PAGE_BITS) - 1);
    *low = first * WW_PAGE_SIZE;
    *high = (first + (word >> TRACK_STACK_PAGE_BITS)) * WW_PAGE_SIZE;
}

/* tracking.c: threads, range locks, the deferred list, counted access */
int this_thread(void);
void cpu_relax(void);
void lock_sleep(int *word, long ns);
int range_trylock(struct track_range *r, int tid);
int range_trylock_contended(struct track_range *r, int tid);
void range_lock(struct track_range *r);
void range_unlock(struct track_range *r);
int held_by(const struct track_range *r, int tid);
void defer_page(struct track_range *r, uint64_t page);
struct track_range *range_enter_at(uint64_t address);
void range_exit(struct track_range *r);
struct track_range *range_enter(uint64_t handle);
struct track_range *range_enter_span(uint64_t handle, uint64_t start, uint64_t length);

/* tracking_arming.c: protections (lock held) */
void drain_deferred(struct track_range *r);
int uffd_protect(uint64_t start, uint64_t length, int protect);
int mprotect_coalescing(struct track_range *r, uint64_t start, uint64_t length, int prot);
int unarm_around(struct track_range *r, uint64_t i);
int set_armed(struct track_range *r, uint64_t first, uint64_t last, int armed);
int needs_arming(const struct track_range *r, uint8_t st);
int read_only_armed(const struct track_range *r, uint8_t st);

/* tracking_faults.c: the fault paths */
void track_faults_before_fork(void);
void track_faults_after_fork_child(void);

#pragma GCC visibility pop

#endif
