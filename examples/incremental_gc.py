"""An incremental mark-and-sweep garbage collector driven by write watch.

    python examples/incremental_gc.py [--small] [--backend NAME] [--cycles N]

The heap is an array of objects in a MEM_WRITE_WATCH region: each object is 8
int32 fields, 6 references (-1 is null) and 2 scalars, 128 objects per page.
A mutator keeps loading references into its registers, storing them into
objects, allocating and dropping structures, while the collector marks in
small increments between its steps, the way .NET's background GC and Boehm
GC's GetWriteWatch mode work:

1. At the start of a cycle the heap's write watch is reset; marking starts
   from the roots and the mutator's registers.
2. The mutator may store a reference to an unmarked object into an object the
   collector already scanned. The write dirties that object's page, so after
   marking runs dry, GetWriteWatch(WRITE_WATCH_FLAG_RESET) names the pages to
   look at again: only the marked objects on those pages are re-scanned.
   This repeats concurrently while many pages come back.
3. A short final pause stops the mutator, re-scans the last dirty pages, the
   roots and the registers, and finishes marking. Sweep frees the rest.

The collector checks itself against a stop-the-world collector on the same
heap at every final pause: every object reachable from the roots must be
marked (no live object is ever freed). It prints how many pages it re-scanned
out of the heap's pages, its pause times next to the stop-the-world mark's,
and the time spent in GetWriteWatch.

Exits 1 if a live object would have been freed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: docs/semantics.md K19

import argparse
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import writewatch as ww

FIELDS = 8
POINTER_FIELDS = 6  # fields 0-5 hold references, 6-7 scalars
PAYLOAD = 6
NULL = -1
OBJECT_BYTES = FIELDS * 4
OBJECTS_PER_PAGE = ww.PAGE_SIZE // OBJECT_BYTES


@dataclass
class Sizes:
    objects: int  # heap capacity
    cycles: int
    mark_budget: int  # objects scanned per marking increment
    mutator_steps: int  # mutator steps between increments
    registers: int = 8
    max_concurrent_rounds: int = 3


REALISTIC = Sizes(objects=1 << 20, cycles=4, mark_budget=20_000, mutator_steps=600)
SMALL = Sizes(objects=1 << 14, cycles=3, mark_budget=100, mutator_steps=400)


class UseAfterFreeError(Exception):
    """The program followed a reference to an object the collector freed."""


class GrayStack:
    """Objects marked but not yet scanned, kept as numpy arrays."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def push(self, objects: np.ndarray) -> None:
        if objects.size:
            self.chunks.append(objects)

    def pop(self, budget: int) -> np.ndarray:
        """Up to budget objects, newest first: marking goes depth first, as
        with a mark stack."""
        taken, count = [], 0
        while self.chunks and count < budget:
            chunk = self.chunks.pop()
            if count + chunk.size > budget:
                split = chunk.size - (budget - count)
                self.chunks.append(chunk[:split])
                chunk = chunk[split:]
            taken.append(chunk)
            count += chunk.size
        return np.concatenate(taken) if taken else np.empty(0, np.int32)

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclass
class CycleReport:
    live: int = 0
    freed: int = 0
    floating_garbage: int = 0
    concurrent_rounds: int = 0
    pages_rescanned: int = 0
    objects_rescanned: int = 0
    watch_seconds: float = 0.0
    final_pause: float = 0.0
    longest_increment: float = 0.0
    stop_the_world_mark: float = 0.0
    unsafe_without_rescan: int = 0  # live objects a collector without write watch would free
    lost: int = 0  # live objects this collector failed to mark (must be 0)
    increments: list[float] = field(default_factory=list)


class Heap:
    """The objects, in watched memory, and what the runtime keeps beside them."""

    def __init__(self, sizes: Sizes, backend: str, seed: int) -> None:
        self.sizes = sizes
        self.memory = ww.WatchedMemory(sizes.objects * OBJECT_BYTES, backend=backend)
        self.objects = self.memory.view(dtype=np.int32).reshape(sizes.objects, FIELDS)
        self.pages = self.memory.size // ww.PAGE_SIZE
        self.addresses = np.zeros(self.pages, np.uintp)  # GetWriteWatch's output array
        self.allocated = np.zeros(sizes.objects, bool)
        self.marked = np.zeros(sizes.objects, bool)
        self.marking = False
        self.free_list = np.empty(0, np.int64)
        self.next_free = 0
        self.rng = random.Random(seed)
        self.roots = self._build_initial_graph(np.random.default_rng(seed))
        self.hot_roots = max(len(self.roots) // 20, 1)  # where the mutator mostly works
        self.registers = [NULL] * sizes.registers
        self.allocation_failures = 0

    def _build_initial_graph(self, rng: np.random.Generator) -> list[int]:
        """Fill 60% of the heap with structures of ~150 objects, each a binary
        tree hanging off a root plus cross-links, mostly within the structure."""
        used = int(self.sizes.objects * 0.6)
        structure = 150
        objects = self.objects
        objects[:] = NULL
        index = np.arange(used)
        start = index - index % structure
        local = index % structure
        for child, column in ((2 * local + 1, 0), (2 * local + 2, 1)):
            inside = child < np.minimum(structure, used - start)
            objects[index[inside], column] = (start + child)[inside]
        for column in range(2, POINTER_FIELDS):
            linked = rng.random(used) < 0.1
            near = np.clip(index + rng.integers(-structure, structure, used), 0, used - 1)
            far = rng.integers(0, used, used)
            target = np.where(rng.random(used) < 0.05, far, near)
            objects[index[linked], column] = target[linked]
        objects[:used, PAYLOAD:] = 0
        self.allocated[:used] = True
        self._refill_free_list()
        return list(range(0, used, structure))

    def _refill_free_list(self) -> None:
        # Allocation in address order keeps new objects together, as a
        # bump-pointer-over-free-space allocator does.
        self.free_list = np.flatnonzero(~self.allocated)
        self.next_free = 0

    def allocate(self) -> int:
        if self.next_free >= self.free_list.size:
            self.allocation_failures += 1
            return NULL
        obj = int(self.free_list[self.next_free])
        self.next_free += 1
        self.objects[obj, :POINTER_FIELDS] = NULL
        self.objects[obj, PAYLOAD:] = 0
        self.allocated[obj] = True
        self.marked[obj] = self.marking  # allocated black while a cycle runs
        return obj

    # -- the mutator

    def mutate(self, steps: int) -> None:
        rng, objects, registers, roots = self.rng, self.objects, self.registers, self.roots
        nregs = len(registers)
        for _ in range(steps):
            roll = rng.random()
            target = rng.randrange(nregs)
            source = registers[rng.randrange(nregs)]
            if roll < 0.45:  # load: follow a reference, or start again from a root
                if source != NULL and rng.random() < 0.85:
                    loaded = int(objects[source, rng.randrange(POINTER_FIELDS)])
                    if loaded != NULL and not self.allocated[loaded]:
                        raise UseAfterFreeError(f"the mutator reached freed object {loaded}")
                    registers[target] = loaded if loaded != NULL else source
                else:
                    hot = rng.random() < 0.9
                    root = rng.randrange(self.hot_roots if hot else len(roots))
                    registers[target] = roots[root]
            elif roll < 0.55:  # move a reference: re-parent a subtree, unlink the old edge
                holder, from_field = registers[target], rng.randrange(POINTER_FIELDS)
                if holder != NULL and source != NULL:
                    moved = int(objects[holder, from_field])
                    objects[source, rng.randrange(POINTER_FIELDS)] = moved
                    objects[holder, from_field] = NULL
            elif roll < 0.75:  # store a reference (sometimes null) into an object
                holder = registers[target]
                if holder != NULL:
                    value = NULL if rng.random() < 0.25 else source
                    objects[holder, rng.randrange(POINTER_FIELDS)] = value
            elif roll < 0.92:  # a scalar update: dirties the page, adds no reference
                holder = registers[target]
                if holder != NULL:
                    objects[holder, PAYLOAD] += 1
            elif roll < 0.99:  # allocate, linked from the object in hand
                new = self.allocate()
                if new != NULL:
                    if source != NULL:
                        objects[new, 0] = source
                    registers[target] = new
            else:  # replace a root: what it held may become garbage
                roots[rng.randrange(self.hot_roots)] = registers[target] if \
                    registers[target] != NULL else roots[0]

    # -- the collector

    def root_set(self) -> np.ndarray:
        everything = np.array(self.roots + self.registers, np.int64)
        return np.unique(everything[everything != NULL])

    def shade(self, objects: np.ndarray, gray: GrayStack) -> None:
        """Mark the unmarked among objects and queue them for scanning."""
        objects = objects[~self.marked[objects]]
        if objects.size:
            objects = np.unique(objects)
            self.marked[objects] = True
            gray.push(objects)

    def scan(self, objects: np.ndarray, gray: GrayStack) -> None:
        children = self.objects[objects, :POINTER_FIELDS].ravel()
        self.shade(children[children != NULL].astype(np.int64), gray)

    def written_pages(self, report: CycleReport) -> np.ndarray:
        """GetWriteWatch with RESET: the heap pages written since the last call."""
        started = time.perf_counter()
        ret, count, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, self.memory.address,
                                         self.memory.size, self.addresses)
        report.watch_seconds += time.perf_counter() - started
        if ret != 0:
            raise OSError(f"GetWriteWatch failed with error {ww.GetLastError()}")
        return ((self.addresses[:count] - self.memory.address) // ww.PAGE_SIZE).astype(np.int64)

    def rescan(self, pages: np.ndarray, gray: GrayStack, report: CycleReport) -> None:
        """Re-scan the marked objects on written pages: a reference stored into
        an already scanned object since the last reset is found here."""
        report.pages_rescanned += pages.size
        on_pages = (pages[:, None] * OBJECTS_PER_PAGE + np.arange(OBJECTS_PER_PAGE)).ravel()
        on_pages = on_pages[self.marked[on_pages]]
        report.objects_rescanned += on_pages.size
        self.scan(on_pages, gray)

    def mark_increment(self, gray: GrayStack, report: CycleReport) -> None:
        started = time.perf_counter()
        self.scan(gray.pop(self.sizes.mark_budget), gray)
        report.increments.append(time.perf_counter() - started)

    def mark_while_mutating(self, gray: GrayStack, report: CycleReport) -> None:
        while gray:
            self.mark_increment(gray, report)
            self.mutate(self.sizes.mutator_steps)

    def reachable(self) -> np.ndarray:
        """What a stop-the-world collector marks: everything reachable now."""
        seen = np.zeros(self.sizes.objects, bool)
        frontier = self.root_set()
        seen[frontier] = True
        while frontier.size:
            children = self.objects[frontier, :POINTER_FIELDS].ravel()
            children = children[children != NULL]
            fresh = np.unique(children[~seen[children]])
            seen[fresh] = True
            frontier = fresh
        return seen

    def collect(self) -> CycleReport:
        report = CycleReport()
        gray = GrayStack()
        self.marked[:] = False
        self.marking = True
        # Everything written from here on is seen by a later GetWriteWatch.
        if ww.ResetWriteWatch(self.memory.address, self.memory.size) != 0:
            raise OSError(f"ResetWriteWatch failed with error {ww.GetLastError()}")
        self.shade(self.root_set(), gray)
        self.mark_while_mutating(gray, report)
        # Not part of the collector: what sweeping now, with no write watch to
        # say what changed during marking, would free although it is live.
        report.unsafe_without_rescan = int(np.count_nonzero(self.reachable() & ~self.marked))

        # Concurrent re-scan rounds, while the mutator keeps writing many pages.
        while report.concurrent_rounds < self.sizes.max_concurrent_rounds:
            pages = self.written_pages(report)
            report.concurrent_rounds += 1
            self.rescan(pages, gray, report)
            self.mark_while_mutating(gray, report)
            if pages.size <= max(self.pages // 256, 4):
                break

        # Final pause: the mutator is stopped from here to the sweep.
        started = time.perf_counter()
        pages = self.written_pages(report)
        pause_without_check = time.perf_counter() - started
        live = self._stop_the_world_check(report)
        started = time.perf_counter()
        self.rescan(pages, gray, report)
        self.shade(self.root_set(), gray)
        while gray:
            self.scan(gray.pop(self.sizes.mark_budget), gray)
        report.final_pause = pause_without_check + time.perf_counter() - started
        self.marking = False

        report.lost = int(np.count_nonzero(live & ~self.marked))
        garbage = self.allocated & ~self.marked
        report.freed = int(np.count_nonzero(garbage))
        report.floating_garbage = int(np.count_nonzero(self.marked & ~live))
        report.live = int(np.count_nonzero(live))
        self.objects[garbage] = NULL  # sweep
        self.allocated &= ~garbage
        self._refill_free_list()
        report.longest_increment = max(report.increments, default=0.0)
        return report

    def _stop_the_world_check(self, report: CycleReport) -> np.ndarray:
        """The reference: a full mark from the roots, timed as the pause an
        incremental collector avoids."""
        started = time.perf_counter()
        live = self.reachable()
        report.stop_the_world_mark = time.perf_counter() - started
        return live

    def close(self) -> None:
        self.memory.close()


def run(sizes: Sizes, backend: str, seed: int) -> int:
    heap = Heap(sizes, backend, seed)
    try:
        print(f"Heap: {sizes.objects} objects of {OBJECT_BYTES} bytes in a "
              f"{heap.memory.size / 2**20:.2f} MiB write-watch "
              f"region ({heap.pages} pages), {len(heap.roots)} roots, backend "
              f"{backend if backend != 'auto' else ww.backends.backend().name}")
        print(f"{'cycle':>5} {'live':>8} {'freed':>7} {'float':>6} {'rounds':>6} "
              f"{'pages rescanned':>16} {'GetWriteWatch':>13} {'final pause':>11} "
              f"{'max incr.':>9} {'STW mark':>9} {'unsafe':>7}")
        reports = []
        for cycle in range(1, sizes.cycles + 1):
            try:
                heap.mutate(sizes.mutator_steps * 4)  # the program runs between cycles too
                report = heap.collect()
            except UseAfterFreeError as exc:
                print(f"FAILED: {exc}")
                return 1
            reports.append(report)
            print(f"{cycle:>5} {report.live:>8} {report.freed:>7} {report.floating_garbage:>6} "
                  f"{report.concurrent_rounds:>6} "
                  f"{f'{report.pages_rescanned}/{heap.pages}':>16} "
                  f"{report.watch_seconds * 1e6:>10.0f} us {report.final_pause * 1e3:>8.2f} ms "
                  f"{report.longest_increment * 1e3:>6.2f} ms "
                  f"{report.stop_the_world_mark * 1e3:>6.1f} ms {report.unsafe_without_rescan:>7}")
            if report.lost:
                print(f"FAILED: {report.lost} live objects were not marked and got freed")
                return 1
        print("(float: unreachable objects kept until the next cycle; rounds: concurrent "
              "re-scan rounds;\n unsafe: live objects a sweep as marking first ran dry, "
              "with no re-scan, would free)")
        rescanned = sum(r.pages_rescanned for r in reports)
        rescan_points = sum(r.concurrent_rounds + 1 for r in reports)
        print(f"Pages re-scanned: {rescanned}, where a collector without write watch re-scans "
              f"all {heap.pages} heap pages at each of the {rescan_points} re-scan points "
              f"({rescan_points * heap.pages}).")
        print(f"Final pauses {max(r.final_pause for r in reports) * 1e3:.2f} ms at most; a "
              f"stop-the-world mark took {max(r.stop_the_world_mark for r in reports) * 1e3:.1f} "
              f"ms. GetWriteWatch: {sum(r.watch_seconds for r in reports) * 1e3:.2f} ms in all.")
        if heap.allocation_failures:
            print(f"({heap.allocation_failures} allocations found the heap full)")
        print(f"OK: no live object was freed in {sizes.cycles} cycles "
              f"(checked against a stop-the-world mark at every final pause)")
        return 0
    finally:
        heap.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small heap (for tests)")
    parser.add_argument("--backend", default="auto",
                        help="write-watch backend (default: the best one here)")
    parser.add_argument("--cycles", type=int, help="collection cycles")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else REALISTIC
    if args.cycles:
        sizes = Sizes(**{**sizes.__dict__, "cycles": args.cycles})
    try:
        return run(sizes, args.backend, args.seed)
    except ww.WriteWatchError as exc:
        print(f"cannot run: {exc} (see python -m writewatch info)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
