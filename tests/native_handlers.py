"""Native signal handlers for the signal tests (a helper, not a test module).

What native libraries do with signals, in C (compiled once with cffi, like
native_writers.py):

- store_on_signal(sig, address): a handler for sig that stores one byte at
  address (a plain store, async-signal-safe), counted by stores_done(sig);
  store_on_signal_spread(sig, address, spread): each store into the next of
  spread pages from address, leaving out every 8th one.
- chain_sigsegv(how): a SIGSEGV handler installed in front of the current one,
  as crash reporters, JITs and language runtimes install theirs, that passes
  every fault on to the handler it replaced: CALL_THROUGH calls it (SA_SIGINFO
  or plain, as it was installed); DECLINE puts it back and returns, so the
  fault repeats into it. chained_faults() counts the faults it saw.
- store_to_null() / store_to_null_in_thread(): a genuine invalid store, on
  this thread or on a new native thread.
- start_signalling(thread1, sig1, thread2, sig2) / stop_signalling(): a native
  thread sending sig1 to thread1 and sig2 to thread2 (pthread_t, as
  threading's ident) without the GIL, a round every SIGNAL_PAUSE_NS or a
  little more, until stopped; the number of rounds sent. Paced, not as fast
  as it can: a thread signalled back to back spends nearly all its time in
  signal handlers, so the run takes as long as the machine's signal delivery
  makes it (6 to 54 s on mprotect here), while a signal every few dozen
  microseconds still lands many times inside every reset.
  stop_signalling_thread(thread) spares one of the two from then on (a thread
  that has finished its work has nothing left to cross).
"""

from __future__ import annotations

from writewatch.testing.cbuild import build_cached

_CDEF = """
int store_on_signal(int sig, uint64_t address);
int store_on_signal_spread(int sig, uint64_t address, uint64_t spread);
int stores_done(int sig);
int chain_sigsegv(int how);
int chained_faults(void);
void store_to_null(void);
int store_to_null_in_thread(void);
int start_signalling(uint64_t thread1, int sig1, uint64_t thread2, int sig2);
uint64_t stop_signalling(void);
void stop_signalling_thread(uint64_t thread);
"""

_SOURCE = r"""
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static volatile uint64_t targets[65], spreads[65];
static int stores[65];

static void on_signal(int sig)
{
    uint64_t page = spreads[sig] > 1 ? (uint64_t)stores[sig] % spreads[sig] : 0;
    if (spreads[sig] > 1 && page % 8 == 0)
        page++;  /* every 8th page is left out */
    *(volatile char *)(uintptr_t)(targets[sig] + page * 4096) = 1;
    __atomic_add_fetch(&stores[sig], 1, __ATOMIC_SEQ_CST);
}

int store_on_signal_spread(int sig, uint64_t address, uint64_t spread)
{
    spreads[sig] = spread;
    return store_on_signal(sig, address);
}

int store_on_signal(int sig, uint64_t address)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    targets[sig] = address;
    return sigaction(sig, &action, NULL);
}

int stores_done(int sig) { return __atomic_load_n(&stores[sig], __ATOMIC_SEQ_CST); }

#define CALL_THROUGH 0
#define DECLINE 1
static struct sigaction replaced;
static int chain_how, faults;

static void chaining_handler(int sig, siginfo_t *info, void *context)
{
    __atomic_add_fetch(&faults, 1, __ATOMIC_SEQ_CST);
    if (chain_how == DECLINE) {
        sigaction(SIGSEGV, &replaced, NULL);
        return;
    }
    if (replaced.sa_flags & SA_SIGINFO)
        replaced.sa_sigaction(sig, info, context);
    else if (replaced.sa_handler != SIG_DFL && replaced.sa_handler != SIG_IGN)
        replaced.sa_handler(sig);
    else
        sigaction(SIGSEGV, &replaced, NULL); /* the default: the fault repeats into it */
}

int chain_sigsegv(int how)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = chaining_handler;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    chain_how = how;
    return sigaction(SIGSEGV, &action, &replaced);
}

int chained_faults(void) { return __atomic_load_n(&faults, __ATOMIC_SEQ_CST); }

void store_to_null(void) { *(volatile int *)(uintptr_t)16 = 1; }

static void *null_store_thread(void *arg) { (void)arg; store_to_null(); return NULL; }

int store_to_null_in_thread(void)
{
    pthread_t thread;
    int result = pthread_create(&thread, NULL, null_store_thread, NULL);
    return result ? result : pthread_join(thread, NULL);
}

static pthread_t signalled[2], signaller;
static int signals[2], stop, spared[2];
static uint64_t rounds;

#define SIGNAL_PAUSE_NS 20000

static void *signal_both(void *arg)
{
    (void)arg;
    struct timespec pause = { 0, SIGNAL_PAUSE_NS };
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        for (int k = 0; k < 2; k++)
            if (!__atomic_load_n(&spared[k], __ATOMIC_ACQUIRE))
                pthread_kill(signalled[k], signals[k]);
        rounds++;
        nanosleep(&pause, NULL);
    }
    return NULL;
}

int start_signalling(uint64_t thread1, int sig1, uint64_t thread2, int sig2)
{
    signalled[0] = (pthread_t)thread1, signalled[1] = (pthread_t)thread2;
    signals[0] = sig1, signals[1] = sig2;
    stop = spared[0] = spared[1] = 0;
    sigset_t all, old;
    sigfillset(&all);   /* the signaller itself takes none of them */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int result = pthread_create(&signaller, NULL, signal_both, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return result;
}

/* Called by the thread itself before it exits: it is never signalled after. */
void stop_signalling_thread(uint64_t thread)
{
    for (int k = 0; k < 2; k++)
        if (pthread_equal(signalled[k], (pthread_t)thread))
            __atomic_store_n(&spared[k], 1, __ATOMIC_RELEASE);
}

uint64_t stop_signalling(void)
{
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    pthread_join(signaller, NULL);
    return rounds;
}
"""

_native = build_cached("native_handlers", _CDEF, _SOURCE,
                       extra_compile_args=["-O1", "-Wall", "-pthread"], libraries=["pthread"])
ffi, lib = _native.ffi, _native.lib
CALL_THROUGH, DECLINE = 0, 1
