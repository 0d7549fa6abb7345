"""Incremental checkpoints of a large numpy state: append only the pages each step wrote.

    python examples/incremental_checkpoint.py [--small] [--size-mib N] [--steps N]
                                              [--percent P] [--backend NAME] [--dir DIR]

A simulation keeps its state in one numpy array (1 GiB by default: rows of 512
float32) and each step updates a sparse subset of rows that drifts through the
array (a moving hot spot plus a few rows anywhere). After every step the
checkpointer appends to a file only the pages that changed: a step's record is
its page numbers and those pages. Step 0's record is the whole state.

What changed is found four ways, on the same seeded simulation:
- writewatch: a WatchedBuffer over the state, written(reset=True, unit="page"),
  once per backend available here;
- compare: a full copy of the state, compared page by page (and updated);
- hash: a hashlib digest of every page, recomputed and compared.

Each run then restores chosen steps from its checkpoint file (the base record
and every record up to the step, in order) and checks them bit for bit
against full copies of the state taken at those steps. Printed per method:
the time per step to simulate (on watched memory the first write to a page
costs a fault), to find what changed and to append it, and the bytes appended
per step.

Exits 1 if a restored step ever differs from its copy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: docs/semantics.md K19

import argparse
import hashlib
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import writewatch as ww
from writewatch import backends

P = ww.PAGE_SIZE
ROW = 512  # float32 per row: two rows a page
RECORD = struct.Struct("<4sQQ")  # b"STEP", step, page count; then pages, then their bytes
MiB = 1 << 20


@dataclass(frozen=True)
class Setup:
    size: int  # bytes of state
    steps: int
    percent: float  # of the state's rows updated per step
    seed: int = 11
    checked: tuple[int, ...] = ()  # steps restored and compared; () = first, middle, last

    @property
    def rows(self) -> int:
        return self.size // (ROW * 4)

    def checked_steps(self) -> list[int]:
        chosen = self.checked or (1, (self.steps + 1) // 2, self.steps)
        return sorted({step for step in chosen if 0 <= step <= self.steps})


class Simulation:
    """Deterministic for a seed, whatever memory the state lives in."""

    def __init__(self, setup: Setup, state: np.ndarray) -> None:
        self.setup, self.state = setup, state
        self.rng = np.random.default_rng(setup.seed)
        # A cheap, non-zero start: every page holds data.
        state[:] = np.arange(ROW, dtype=np.float32)
        state[:, 0] = np.arange(setup.rows, dtype=np.float32)
        self.updates = max(1, round(setup.rows * setup.percent / 100))

    def step(self, number: int) -> None:
        rows, rng = self.setup.rows, self.rng
        centre = (number * rows // max(self.setup.steps, 1) // 3) % rows  # the hot spot drifts
        near = centre + rng.normal(0, max(self.updates, 1), self.updates * 9 // 10)
        anywhere = rng.integers(0, rows, self.updates - len(near))
        chosen = np.unique(np.concatenate([near.astype(np.int64) % rows, anywhere]))
        state = self.state
        state[chosen] = state[chosen] * np.float32(0.5) + np.float32(number)
        state[chosen, 0] = number


class Checkpoint:
    """An append-only checkpoint file: one record per step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.appended = 0  # bytes, base record excluded

    def append(self, step: int, state: np.ndarray, pages: np.ndarray) -> None:
        pages = np.asarray(pages, np.uint64)
        by_page = state.reshape(-1).view(np.uint8).reshape(-1, P)
        before = self.file.tell()
        self.file.write(RECORD.pack(b"STEP", step, len(pages)))
        self.file.write(pages.tobytes())
        self.file.write(by_page[pages.astype(np.intp)].tobytes())
        if step:
            self.appended += self.file.tell() - before

    def close(self) -> None:
        self.file.close()

    def restore(self, step: int, into: np.ndarray) -> None:
        """The state at step: the base record, then every record up to step."""
        by_page = into.reshape(-1).view(np.uint8).reshape(-1, P)
        with open(self.path, "rb") as file:
            while True:
                header = file.read(RECORD.size)
                if len(header) < RECORD.size:
                    raise ValueError(f"the checkpoint ends before step {step}")
                magic, number, count = RECORD.unpack(header)
                if magic != b"STEP" or number > step:
                    break
                pages = np.frombuffer(file.read(8 * count), np.uint64).astype(np.intp)
                data = np.frombuffer(file.read(P * count), np.uint8).reshape(count, P)
                by_page[pages] = data
                if number == step:
                    return
        raise ValueError(f"no record for step {step}")


@dataclass
class Figures:
    name: str
    steps: int = 0
    pages: int = 0  # pages of state
    appended_pages: int = 0
    appended_bytes: int = 0
    simulate: float = 0.0
    find: float = 0.0
    append: float = 0.0
    mismatches: list[int] = field(default_factory=list)
    note: str = ""


# Each finder returns the pages written since it was last asked.
Finder = Callable[[], np.ndarray]


def watch_finder(state: np.ndarray, backend: str) -> tuple[Finder, Callable[[], None]]:
    watched = ww.WatchedBuffer(state, backend=backends.checked_name(backend))
    return (lambda: watched.written(reset=True, unit="page")), watched.close


def compare_finder(state: np.ndarray) -> tuple[Finder, Callable[[], None]]:
    """Without write watch: a full copy, compared block by block (a page per
    block, 8 bytes at a time), then brought up to date."""
    copy = state.copy()
    now = state.reshape(-1).view(np.uint64).reshape(-1, P // 8)
    then = copy.reshape(-1).view(np.uint64).reshape(-1, P // 8)
    chunk = 4096  # pages compared per numpy call: no 1 GiB temporary

    def find() -> np.ndarray:
        changed = [start + np.flatnonzero((now[start:start + chunk] !=
                                           then[start:start + chunk]).any(axis=1))
                   for start in range(0, len(now), chunk)]
        pages = np.concatenate(changed)
        then[pages] = now[pages]
        return pages
    return find, lambda: None


def hash_finder(state: np.ndarray) -> tuple[Finder, Callable[[], None]]:
    """Without write watch: a hashlib digest per page, recomputed and compared."""
    by_page = state.reshape(-1).view(np.uint8).reshape(-1, P)

    def digests() -> list[bytes]:
        return [hashlib.sha1(page).digest() for page in by_page]
    known = digests()

    def find() -> np.ndarray:
        now = digests()
        pages = np.fromiter((i for i, (a, b) in enumerate(zip(now, known, strict=True)) if a != b),
                            np.int64)
        known[:] = now
        return pages
    return find, lambda: None


def run(setup: Setup, method: str, workdir: Path, copies: dict[int, Path]) -> Figures:
    """One method over the seeded simulation; takes the full copies if there are none yet."""
    figures = Figures(method, steps=setup.steps, pages=setup.size // P)
    state = ww.aligned_empty((setup.rows, ROW), np.float32)
    simulation = Simulation(setup, state)
    checkpoint = Checkpoint(workdir / f"{method}.ckpt")
    checkpoint.append(0, state, np.arange(figures.pages))
    finder = {"compare": compare_finder, "hash": hash_finder}.get(method)
    find, stop = finder(state) if finder else watch_finder(state, method)
    take_copies = not copies
    try:
        for step in range(1, setup.steps + 1):
            started = time.perf_counter()
            simulation.step(step)
            stepped = time.perf_counter()
            pages = find()
            found = time.perf_counter()
            checkpoint.append(step, state, pages)
            appended = time.perf_counter()
            figures.simulate += stepped - started
            figures.find += found - stepped
            figures.append += appended - found
            figures.appended_pages += len(pages)
            if take_copies and step in setup.checked_steps():
                copies[step] = workdir / f"copy-{step}.bin"
                state.tofile(copies[step])  # the full copy the restore is checked against
    finally:
        stop()
        checkpoint.close()
    figures.appended_bytes = checkpoint.appended
    del state, find, stop
    restored = ww.aligned_empty((setup.rows, ROW), np.float32)
    for step, path in sorted(copies.items()):
        checkpoint.restore(step, restored)
        if not same_bytes(restored, path):
            figures.mismatches.append(step)
    checkpoint.path.unlink()
    return figures


def same_bytes(array: np.ndarray, path: Path) -> bool:
    """Bit for bit (NaN or not), read back in slices."""
    flat = array.reshape(-1).view(np.uint8)
    if path.stat().st_size != flat.nbytes:
        return False
    with open(path, "rb") as file:
        for start in range(0, flat.nbytes, 64 * MiB):
            part = flat[start:start + 64 * MiB]
            if file.read(part.nbytes) != part.tobytes():
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="16 MiB of state (for tests)")
    parser.add_argument("--size-mib", type=int, help="MiB of state (default 1024)")
    parser.add_argument("--steps", type=int, help="steps (default 8)")
    parser.add_argument("--percent", type=float, default=1.0,
                        help="rows updated per step, in percent (default 1)")
    parser.add_argument("--backend", help="this writewatch backend only (default: every one here)")
    parser.add_argument("--check", help="steps to restore and check, e.g. 1,4 "
                                        "(default: first, middle, last)")
    parser.add_argument("--dir", help="where the checkpoint files go (default: a temporary "
                                      "directory)")
    args = parser.parse_args(argv)
    size_mib = args.size_mib or (16 if args.small else 1024)
    setup = Setup(size=size_mib * MiB, steps=args.steps or (6 if args.small else 8),
                  percent=args.percent,
                  checked=tuple(int(s) for s in args.check.split(",")) if args.check else ())
    if setup.rows < 1 or setup.steps < 1 or not 0 < setup.percent <= 100:
        parser.error("the size, the steps and the percent must be positive")
    print(f"State: {size_mib} MiB ({setup.rows} rows of {ROW} float32, {setup.size // P} pages); "
          f"{setup.steps} steps, {setup.percent:g}% of the rows updated per step; restoring "
          f"steps {', '.join(map(str, setup.checked_steps()))}")

    status = backends.backend_status()
    names = [args.backend] if args.backend else backends.backend_names()
    warm_up = np.empty((64, ROW), np.float32)  # numpy's first calls are slow: not in the figures
    Simulation(Setup(size=warm_up.nbytes, steps=2, percent=10), warm_up).step(1)
    runs: list[Figures] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        copies: dict[int, Path] = {}
        for method in ("compare", "hash", *names):
            if method not in ("compare", "hash") and status.get(method, "unknown backend"):
                print(f"  {method}: skipped ({status.get(method, 'unknown backend')})")
                continue
            runs.append(run(setup, method, Path(workdir), copies))

    print(f"{'method':<9} {'pages/step':>10} {'MiB/step':>9} {'simulate':>10} "
          f"{'find changed':>13} {'append':>9}  restored steps")
    for figures in runs:
        per_step = 1e3 / figures.steps
        restored = "equal to their copies" if not figures.mismatches else \
            f"DIFFERED at steps {figures.mismatches}"
        print(f"{figures.name:<9} {figures.appended_pages / figures.steps:>10.1f} "
              f"{figures.appended_bytes / figures.steps / MiB:>9.2f} "
              f"{figures.simulate * per_step:>7.2f} ms {figures.find * per_step:>10.2f} ms "
              f"{figures.append * per_step:>6.2f} ms  {restored}")
    compare = next(f for f in runs if f.name == "compare")
    print("Per step. 'compare' keeps a full copy and compares it page by page; 'hash' keeps a "
          "sha1 per page;\nthe others are writewatch backends (WatchedBuffer.written(reset=True))."
          " A full copy per step\nwould append "
          f"{setup.size / MiB:.0f} MiB.")
    for figures in runs:
        if figures.name not in ("compare", "hash") and figures.find > 0:
            print(f"  {figures.name}: finding what changed took 1/{compare.find / figures.find:.0f}"
                  " of compare's time")

    failed = [f.name for f in runs if f.mismatches]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print(f"OK: every method's checkpoint restored steps "
          f"{', '.join(map(str, setup.checked_steps()))} bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
