/* The fallbacks' fault paths: the mprotect backend's SIGSEGV handler and
 * the uffd backend's handler thread (tracking.h). */
#include "tracking.h"

#include <dirent.h>
#include <stdio.h>
#include <sys/eventfd.h>

/* ---- who is stopped in the fault path ---- */

/*
 * Threads stopped in our fault path: in the SIGSEGV handler trying to take a
 * range lock, or stopped in a uffd write fault the handler thread has read
 * and not let go yet. A fault on a range whose lock holder is listed here
 * never waits for it: the holder may be stopped until this very fault is
 * resolved (its signal handler stored into watched memory while it held the
 * lock). Each waiter lists itself before it looks at the holder, so of two
 * threads that would wait for each other the later one sees the earlier and
 * does not wait. Lock-free and signal-safe.
 */
int track_blocked[TRACK_BLOCKED_MAX];

/* List tid; the slot, or -1 if the list is full (then the caller must not wait). */
static int blocked_add(int tid)
{
    for (int i = 0; tid && i < TRACK_BLOCKED_MAX; i++) {
        int free = 0;
        if (__atomic_compare_exchange_n(&track_blocked[i], &free, tid, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
            return i;
    }
    return -1;
}

static void blocked_remove(int slot)
{
    if (slot >= 0)
        __atomic_store_n(&track_blocked[slot], 0, __ATOMIC_SEQ_CST);
}

static int is_blocked(int tid)
{
    for (int i = 0; tid && i < TRACK_BLOCKED_MAX; i++)
        if (__atomic_load_n(&track_blocked[i], __ATOMIC_SEQ_CST) == tid)
            return 1;
    return 0;
}

/* Is r's lock held by a thread stopped in the fault path (itself included)? */
static int holder_blocked(const struct track_range *r)
{
    return __atomic_load_n(&r->lock, __ATOMIC_ACQUIRE) &&
           is_blocked(__atomic_load_n(&r->owner, __ATOMIC_RELAXED));
}

/* ---- the mprotect backend's SIGSEGV handler ---- */

/*
 * Where our handler stands in a chain of handlers. Each time it takes first
 * place from a foreign handler it is installed through another entry point
 * (a level), and that level remembers the handler it displaced. A foreign
 * handler that chains to the one it replaced (crash reporters, JITs,
 * language runtimes do) reaches us again through the older level, which
 * passes the fault on to what that level displaced, down to the first
 * handler we replaced. One that declines a fault by putting back the handler
 * it replaced and returning puts back the older level, so the repeated fault
 * goes down the same way. A fault that is not ours thus ends in the default
 * action at the bottom of the chain instead of going round it forever.
 */
#define TRACK_SEGV_LEVELS 8
static struct sigaction track_displaced[TRACK_SEGV_LEVELS]; /* what level k replaced */
static int track_segv_front = -1; /* the level last seen in front */

/* 1 + the level this thread is passing a fault down from (0: none). A fault
 * reaching a level at or above it again has gone round a cycle. Initial-exec
 * TLS: a signal handler must not allocate it lazily. */
static __thread int track_chaining __attribute__((tls_model("initial-exec")));

/* A real fault repeats on return and kills the process with SIGSEGV as if we
 * had never been here; a sent signal is raised again. */
static void default_action(int sig, const siginfo_t *info)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (info->si_code <= 0)
        raise(sig);
}

static void chain_segv(int level, int sig, siginfo_t *info, void *context)
{
    const struct sigaction *prev = &track_displaced[level];
    int chaining = track_chaining - 1;
    /* A sent (or re-raised) SIGSEGV means "die": a handler like faulthandler
     * reports a fault, restores the handler it replaced (possibly this one) and
     * raises the signal again; passing that on again would loop. */
    int callable = info->si_code > 0 && (chaining < 0 || level < chaining) &&
        ((prev->sa_flags & SA_SIGINFO) ||
         (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN));
    if (!callable) {
        default_action(sig, info);
        return;
    }
    track_chaining = level + 1;
    if (prev->sa_flags & SA_SIGINFO)
        prev->sa_sigaction(sig, info, context);
    else
        prev->sa_handler(sig);
    track_chaining = chaining + 1;
}

/* The last write fault this thread could not claim: retried once, since a
 * release or decommit racing the write may have given the page its access
 * back (and forgotten it) between the fault and this handler. Initial-exec
 * TLS: a signal handler must not allocate it lazily. */
static __thread uint64_t track_unclaimed_fault __attribute__((tls_model("initial-exec")));

/*
 * The lock holder cannot settle this write now (it is this thread, which a
 * signal handler interrupted inside a call, or it is stopped in the fault
 * path itself): give the page write access at once and leave it in the
 * deferred list, which the holder drains when it unlocks, after anything it
 * did to the page (or the next holder, when it took the lock). 1 if the
 * write may go on.
 */
static int defer_write(struct track_range *r, uint64_t page)
{
    uint8_t st = __atomic_load_n(&r->state[(page - r->start) / WW_PAGE_SIZE], __ATOMIC_RELAXED);
    if (!(st & WW_PAGE_WRITE))
        return 0; /* not writable: a real access violation */
    /* Read-only here whether or not it is marked armed yet (a reset makes
     * pages read-only before it marks them armed). */
    if (mprotect((void *)(uintptr_t)page, WW_PAGE_SIZE, PROT_READ | PROT_WRITE))
        return 0;
    defer_page(r, page);
    return 1;
}

/* Take r's lock, unless its holder is stopped in the fault path: 0 then. */
static int lock_unless_holder_blocked(struct track_range *r, int tid, int listed)
{
    for (int spin = 0;; spin++) {
        if (spin < TRACK_LOCK_SPINS ? range_trylock(r, tid) : range_trylock_contended(r, tid))
            return 1;
        if (!listed || holder_blocked(r))
            return 0;
        if (spin < TRACK_LOCK_SPINS)
            cpu_relax();
        else /* re-checked after each nap: the holder may stop in the fault path later */
            lock_sleep(&r->lock, TRACK_LOCK_NAP_NS);
    }
}

/* Record a write fault on page of r (mprotect) and give the page write access
 * back; 1 if the write may go on. */
static int claim_write_fault(struct track_range *r, uint64_t page)
{
    uint64_t i = (page - r->start) / WW_PAGE_SIZE;
    int tid = this_thread();
    if (held_by(r, tid))
        return defer_write(r, page); /* never wait for ourselves */
    int slot = blocked_add(tid);
    int locked = lock_unless_holder_blocked(r, tid, slot >= 0);
    blocked_remove(slot);
    if (!locked)
        return defer_write(r, page);
    int handled = 0;
    uint8_t st = r->state[i];
    if (st & WW_PAGE_WRITE) {
        /* Not armed: another thread disarmed it first (then this mprotect
         * changes nothing), or a failed coalesce left it read-only. */
        int err = mprotect_coalescing(r, page, WW_PAGE_SIZE, PROT_READ | PROT_WRITE);
        if (!err) {
            r->state[i] = (st & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
            handled = 1;
        } else if (err == -ENOMEM && !unarm_around(r, i)) {
            handled = 1; /* the write proceeds, over-reported */
        }
    }
    range_unlock(r);
    return handled;
}

static void segv_handler(int level, int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    int handled = 0;
    if (info->si_code == SEGV_ACCERR) {
        uint64_t page = (uint64_t)(uintptr_t)info->si_addr & ~(uint64_t)(WW_PAGE_SIZE - 1);
        struct track_range *r = range_enter_at(page);
        if (r) {
            if (r->mode == WW_MODE_MPROTECT)
                handled = claim_write_fault(r, page);
            range_exit(r);
        }
        if (handled) {
            track_unclaimed_fault = 0;
        } else if (!track_chaining && track_unclaimed_fault != page) {
            track_unclaimed_fault = page; /* retry once; a real fault comes back */
            handled = 1;
        } else {
            track_unclaimed_fault = 0;
        }
    }
    errno = saved_errno;
    if (!handled)
        chain_segv(level, sig, info, context);
}

#define TRACK_SEGV_ENTRY(k) \
    static void segv_entry_##k(int sig, siginfo_t *info, void *context) \
    { segv_handler(k, sig, info, context); }
TRACK_SEGV_ENTRY(0) TRACK_SEGV_ENTRY(1) TRACK_SEGV_ENTRY(2) TRACK_SEGV_ENTRY(3)
TRACK_SEGV_ENTRY(4) TRACK_SEGV_ENTRY(5) TRACK_SEGV_ENTRY(6) TRACK_SEGV_ENTRY(7)
static void (*const track_segv_entries[TRACK_SEGV_LEVELS])(int, siginfo_t *, void *) = {
    segv_entry_0, segv_entry_1, segv_entry_2, segv_entry_3,
    segv_entry_4, segv_entry_5, segv_entry_6, segv_entry_7,
};

/* The level of our entry point installed in front, or -1. */
static int segv_level_in_front(const struct sigaction *current)
{
    if (!(current->sa_flags & SA_SIGINFO))
        return -1;
    for (int k = 0; k < TRACK_SEGV_LEVELS; k++)
        if (current->sa_sigaction == track_segv_entries[k])
            return k;
    return -1;
}

static pthread_mutex_t track_segv_mutex = PTHREAD_MUTEX_INITIALIZER;
static const int track_sync_signals[] = { SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS };

/* Put the handler first, in front of whatever handler is there now (one
 * installed after ours, like a late faulthandler.enable(), included), at the
 * level above the one that handler most likely displaced: the last one seen
 * in front. */
int ww_segv_install(void)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current))
        return -errno;
    int level = segv_level_in_front(&current);
    if (level >= 0) {
        __atomic_store_n(&track_segv_front, level, __ATOMIC_RELAXED);
        return 0;
    }
    pthread_mutex_lock(&track_segv_mutex);
    int result = 0;
    if (sigaction(SIGSEGV, NULL, &current)) {
        result = -errno;
    } else if (segv_level_in_front(&current) < 0) {
        /* Past the last level the top one is reused: a chain through it
         * still ends, by the cycle check, in the default action. */
        level = track_segv_front + 1 < TRACK_SEGV_LEVELS ? track_segv_front + 1
                                                         : TRACK_SEGV_LEVELS - 1;
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = track_segv_entries[level];
        action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
        /* Other signals wait until the handler returns: one whose handler
         * stores into watched memory would otherwise fault while SIGSEGV is
         * blocked, and the kernel kills a thread that does. Faults stay
         * deliverable. */
        sigfillset(&action.sa_mask);
        for (int k = 0; k < (int)(sizeof track_sync_signals / sizeof *track_sync_signals); k++)
            sigdelset(&action.sa_mask, track_sync_signals[k]);
        track_displaced[level] = current;
        if (sigaction(SIGSEGV, &action, NULL))
            result = -errno;
        else
            __atomic_store_n(&track_segv_front, level, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&track_segv_mutex);
    return result;
}

int ww_segv_installed(void)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current))
        return -errno;
    return segv_level_in_front(&current) >= 0;
}

/* ---- the uffd backend's handler thread ---- */

/* Let the faulting thread go: remove the write-protection, which wakes it, or,
 * where the range was unregistered meanwhile, wake it directly. */
static void release_writer(uint64_t page)
{
    if (uffd_protect(page, WW_PAGE_SIZE, 0)) {
        struct uffdio_range range = { .start = page, .len = WW_PAGE_SIZE };
        ioctl(track_sync_uffd, UFFDIO_WAKE, &range);
    }
}

/* A write fault read from the uffd and not resolved yet; its thread is stopped
 * until it is (listed in track_blocked at slot). */
struct track_fault {
    uint64_t page;
    int slot;
};

/* Faults waiting for a range lock: the handler thread's own, never shared
 * (reset in a forked child, which has no handler thread). */
static struct track_fault *track_waiting;
size_t track_waiting_count;
static size_t track_waiting_room;

/*
 * Try to resolve a write fault: record the page as written and let its thread
 * go. The handler thread never waits for a range lock: it could be held by a
 * thread stopped in a fault only this thread resolves. If the lock is held
 * by a thread stopped in the fault path, the page is deferred to it (released
 * now, recorded when it unlocks); if it is held by a running thread, the
 * fault waits in the queue and is tried again (0). 1 once resolved.
 */
static int resolve_write_fault(uint64_t page)
{
    struct track_range *r = range_enter_at(page);
    if (!r || r->mode != WW_MODE_UFFD) {
        if (r)
            range_exit(r);
        release_writer(page); /* unknown page: the faulting thread must not hang */
        return 1;
    }
    int resolved = 1;
    if (range_trylock(r, this_thread())) {
        uint64_t i = (page - r->start) / WW_PAGE_SIZE;
        if (r->state[i] & WW_PAGE_WATCHED)
            r->state[i] = (r->state[i] & ~WW_PAGE_ARMED) | WW_PAGE_DIRTY;
        release_writer(page);
        range_unlock(r);
    } else if (holder_blocked(r)) {
        release_writer(page);
        defer_page(r, page);
    } else {
        resolved = 0;
    }
    range_exit(r);
    return resolved;
}

/* Queue a fault read from the uffd (listing its thread); resolve it at once
 * if it cannot be queued. */
static void queue_write_fault(uint64_t page, int tid)
{
    if (track_waiting_count == track_waiting_room) {
        size_t room = track_waiting_room ? 2 * track_waiting_room : 64;
        struct track_fault *grown = realloc(track_waiting, room * sizeof *grown);
        if (grown) {
            track_waiting = grown;
            track_waiting_room = room;
        }
    }
    int slot = track_waiting_count < track_waiting_room ? blocked_add(tid) : -1;
    if (slot < 0) {
        /* Not listed, it must not wait behind a lock it may hold: defer. */
        struct track_range *r = range_enter_at(page);
        release_writer(page);
        if (r) {
            if (r->mode == WW_MODE_UFFD)
                defer_page(r, page);
            range_exit(r);
        }
        return;
    }
    track_waiting[track_waiting_count++] = (struct track_fault){ .page = page, .slot = slot };
}

/* Resolve what can be resolved; repeated while it makes progress, since a
 * fault resolved may let a lock holder go on. */
static void resolve_waiting(void)
{
    for (int progress = 1; progress;) {
        progress = 0;
        size_t kept = 0;
        for (size_t k = 0; k < track_waiting_count; k++) {
            struct track_fault fault = track_waiting[k];
            if (resolve_write_fault(fault.page)) {
                blocked_remove(fault.slot);
                progress = 1;
            } else {
                track_waiting[kept++] = fault;
            }
        }
        track_waiting_count = kept;
    }
}

/*
 * The handler thread is stopped around os.fork() (ww_uffd_handler_pause from
 * the fork hook's before step, ww_uffd_handler_resume after it in the parent),
 * so that the process forks with no thread of ours: Python 3.12 warns about
 * (and counts, through /proc) every thread alive at a fork. Faults arriving
 * meanwhile wait in the userfaultfd, and faults queued for a lock in
 * track_waiting, for the restarted thread.
 */
static pthread_t uffd_handler_thread;
static int uffd_handler_running;
static int uffd_handler_paused;   /* stopped by ww_uffd_handler_pause, not yet resumed */
static int uffd_forked_alone;     /* the last fork ran with the handler paused, one thread */
static int uffd_handler_stop_fd = -1; /* eventfd: ends the handler's poll */
static pid_t uffd_handler_tid;
uint64_t track_handler_stack; /* tracking.h: handler_stack() reads it */

/* Record this thread's stack: process_memwatch must not arm it (the handler
 * would fault on its own stack, with no one left to resolve the fault). */
static void record_handler_stack(void)
{
    pthread_attr_t self;
    void *stack;
    size_t stack_size;
    if (pthread_getattr_np(pthread_self(), &self))
        return;
    if (!pthread_attr_getstack(&self, &stack, &stack_size)) {
        uint64_t low = (uint64_t)(uintptr_t)stack;
        __atomic_store_n(&track_handler_stack, handler_stack_word(low, low + stack_size),
                         __ATOMIC_RELEASE);
    }
    pthread_attr_destroy(&self);
}

static uint64_t monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/*
 * Read and queue the faults waiting in the uffd; with linger, keep reading
 * for TRACK_HANDLER_LINGER_NS after the last one. A thread interrupted by a
 * signal while it waits in a fault leaves the kernel's queue and faults again
 * after its signal handler. A handler thread that slept between faults, woken
 * each time a few microseconds too late, found such a fault gone again and
 * again: a thread taking signals back to back crawled (tens of seconds for a
 * second's work). Staying awake a moment serves the repeated fault at once,
 * and the bursts of faults after a reset faster too (about 1.7 times the
 * faults a second on two CPUs). With one CPU to run on, the spin would only
 * delay the faulting thread: no linger. The stop request waits at most one
 * linger: a pause happens only with no other thread left to fault. -1 once
 * the uffd fails, else 0.
 */
static int read_faults(int uffd, int linger)
{
    struct uffd_msg messages[64];
    uint64_t until = 0;
    for (;;) {
        ssize_t got = read(uffd, messages, sizeof messages);
        if (got < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        for (ssize_t i = 0; got > 0 && i < got / (ssize_t)sizeof messages[0]; i++)
            if (messages[i].event == UFFD_EVENT_PAGEFAULT)
                queue_write_fault(messages[i].pagefault_address & ~(uint64_t)(WW_PAGE_SIZE - 1),
                                  (int)(uint32_t)messages[i].pagefault_feat);
        if (!linger)
            return 0;
        if (got > 0) {
            resolve_waiting();
            until = monotonic_ns() + TRACK_HANDLER_LINGER_NS;
        } else if (monotonic_ns() >= until) {
            return 0;
        } else {
            cpu_relax();
        }
    }
}

/* Can this thread run on more than one CPU? */
static int several_cpus(void)
{
    cpu_set_t allowed;
    return !sched_getaffinity(0, sizeof allowed, &allowed) && CPU_COUNT(&allowed) > 1;
}

static void *uffd_handler_main(void *arg)
{
    int uffd = (int)(intptr_t)arg;
    __atomic_store_n(&uffd_handler_tid, (pid_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
    record_handler_stack();
    int linger = several_cpus();
    for (;;) {
        /* Faults waiting for a lock are tried again after a short nap. */
        struct timespec nap = { .tv_sec = 0, .tv_nsec = TRACK_LOCK_NAP_NS };
        struct pollfd ready[2] = { { .fd = uffd, .events = POLLIN },
                                   { .fd = uffd_handler_stop_fd, .events = POLLIN } };
        int polled = ppoll(ready, 2, track_waiting_count ? &nap : NULL, NULL);
        if (polled < 0 && errno != EINTR)
            break;
        if (polled > 0 && ready[1].revents)
            break; /* asked to stop: queued faults go to the next thread */
        if (polled > 0 && (ready[0].revents & (POLLERR | POLLHUP | POLLNVAL)))
            break;
        if (polled > 0 && ready[0].revents && read_faults(uffd, linger) < 0)
            break;
        resolve_waiting();
    }
    return NULL;
}

int ww_uffd_handler_start(int uffd)
{
    pthread_attr_t attr;
    sigset_t all, old;
    if (uffd_handler_running)
        return 0;
    if (uffd_handler_stop_fd < 0) {
        uffd_handler_stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (uffd_handler_stop_fd < 0)
            return -errno;
    }
    track_sync_uffd = uffd;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    /* Signals stay with Python's threads: the handler thread blocks them all. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int result = pthread_create(&uffd_handler_thread, &attr, uffd_handler_main,
                                (void *)(intptr_t)uffd);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (!result) {
        uffd_handler_running = 1;
        uffd_handler_paused = 0;
    }
    return -result;
}

static int thread_count(void)
{
    DIR *tasks = opendir("/proc/self/task");
    int count = 0;
    if (!tasks)
        return -1;
    for (struct dirent *entry; (entry = readdir(tasks)) != NULL;)
        count += entry->d_name[0] != '.';
    closedir(tasks);
    return count;
}

/* Stop the handler thread and wait until the kernel has let it go: the thread
 * count drops a moment after pthread_join returns. Only when it is the one
 * thread besides the caller: another thread could fault on watched memory
 * while holding the GIL the caller waits for, with no handler to release it
 * (and with another thread alive, the fork is multi-threaded anyway).
 * Returns 0 or -errno. */
int ww_uffd_handler_pause(void)
{
    uint64_t one = 1;
    char task[64];
    if (!uffd_handler_running || thread_count() != 2)
        return 0;
    if (write(uffd_handler_stop_fd, &one, sizeof one) != (ssize_t)sizeof one)
        return -errno;
    int result = pthread_join(uffd_handler_thread, NULL);
    if (result)
        return -result;
    uffd_handler_running = 0;
    uffd_handler_paused = 1;
    uint64_t ignored;
    while (read(uffd_handler_stop_fd, &ignored, sizeof ignored) < 0 && errno == EINTR)
        ;
    snprintf(task, sizeof task, "/proc/self/task/%d",
             (int)__atomic_load_n(&uffd_handler_tid, __ATOMIC_ACQUIRE));
    for (int i = 0; i < 100000 && access(task, F_OK) == 0; i++)
        sched_yield();
    return 0;
}

/* Start the handler thread again after a pause (a no-op if it runs, or if
 * this process has no uffd of the uffd backend: a forked child). */
int ww_uffd_handler_resume(void)
{
    return track_sync_uffd < 0 ? 0 : ww_uffd_handler_start(track_sync_uffd);
}

/* Inside fork(), before it (pthread_atfork, after every Python before-fork
 * hook): did the handler's pause leave this thread alone? Then the child is
 * forked from a single-threaded process, whatever Python counts later. */
void track_faults_before_fork(void)
{
    uffd_forked_alone = uffd_handler_paused && thread_count() == 1;
}

/* 1 if the last fork in this process ran with the handler thread paused and
 * no other thread alive (Python 3.13 counts the threads after the after-fork
 * hooks, when the handler runs again: backends/uffd.py). */
int ww_uffd_forked_alone(void)
{
    return uffd_forked_alone;
}

/* In a forked child: no handler thread exists (threads do not survive fork). */
void track_faults_after_fork_child(void)
{
    uffd_handler_running = 0;
    uffd_handler_paused = 0;
    uffd_forked_alone = 0;
    if (uffd_handler_stop_fd >= 0)
        close(uffd_handler_stop_fd);
    uffd_handler_stop_fd = -1;
}

