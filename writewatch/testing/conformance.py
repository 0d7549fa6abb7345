"""Differential tester: drive implementations of the Windows write-watch API
through the same random traces and report the first call where they disagree,
with the trace shrunk to the few calls that still show it.

    python -m writewatch.testing.conformance                  # the model and every backend here
    python -m writewatch.testing.conformance model mprotect   # two of them
    python -m writewatch.testing.conformance model mymod:MyApi          # your Python object
    python -m writewatch.testing.conformance model lib:./libmyshim.so   # your shared library

An implementation is named by:

- ``model``: the pure-Python reference implementation of Windows' semantics
  (docs/semantics.md rules 1-17): ReferenceModel, an adapter over writewatch.testing.winmodel,
  the model the test suite holds writewatch to. It needs no kernel support, so
  a divergence is found even on a machine with a single backend.
- a writewatch backend name (``backends.backend_names()``: pagemap, uffd,
  mprotect, ...). One this machine cannot run is skipped, saying why.
- ``module:attribute`` or ``path/to/file.py:attribute``: a Python object with
  the methods VirtualAlloc, VirtualFree, GetWriteWatch, ResetWriteWatch,
  GetLastError (and optionally VirtualProtect) taking what writewatch's
  functions take (GetWriteWatch(flags, base, size, addresses, count) returns
  (ret, count, granularity); addresses is a numpy uintp array or None). A class
  or other callable without those methods is called to make a fresh instance
  per trace. Memory is written and read at the returned addresses with ctypes,
  unless the object has write(address, data), read(address, length) and
  kernel_write(address, data, size) methods (a simulation without real memory).
- ``lib:PATH`` (or a path ending in .so): a shared library exporting the
  Windows signatures: ``LPVOID VirtualAlloc(LPVOID, SIZE_T, DWORD, DWORD)``,
  ``BOOL VirtualFree(LPVOID, SIZE_T, DWORD)``, ``UINT GetWriteWatch(DWORD,
  PVOID, SIZE_T, PVOID*, ULONG_PTR*, ULONG*)``, ``UINT ResetWriteWatch(LPVOID,
  SIZE_T)``, ``DWORD GetLastError(void)`` and optionally ``BOOL
  VirtualProtect(LPVOID, SIZE_T, DWORD, PDWORD)`` and ``void
  PrepareKernelWrite(PVOID, SIZE_T)``. The tester makes the kernel write into
  watched memory itself (read(2) from a pipe into a buffer, which may deliver
  fewer bytes than the buffer holds, or none: docs/semantics.md rule 14 says
  the whole buffer is marked written all the same); an implementation whose
  pages are read-only while armed (mprotect) makes such a write fail with
  EFAULT unless it is told first, as a layer does inside its own ReadFile:
  PrepareKernelWrite (or a Python object's prepare_kernel_write method) is
  called over the whole buffer before each such read when it exists.

The first implementation named is the reference the others are compared with
(``model`` when none is named). Every call's outcome is compared: return value,
last error on failure, count, granularity, the reported pages (as offsets from
their region, since each implementation places regions differently), bytes read
back, and that nothing was written past the addresses array's capacity.

Which memory a trace may touch is decided by a private copy of the model: a
write happens only where the model says the pages are committed read-write, and
if an implementation disagrees with the model about what is allocated or
committed the trace stops there (touching memory it does not have would crash
the tester) and that is the divergence reported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from writewatch import backends
from writewatch.constants import WRITE_WATCH_FLAG_RESET
from writewatch.kernel import PAGE_SIZE
from writewatch.testing.implementations import (
    Implementation,
    PythonObjectApi,
    ReferenceModel,
    SharedLibraryApi,
    WindowsApi,
    WritewatchApi,
    resolve,
)
from writewatch.testing.traces import (
    LAYOUT_OPS,
    Alloc,
    Commit,
    Free,
    GetWatch,
    Op,
    Protect,
    Read,
    ResetWatch,
    Session,
    TraceGenerator,
    Write,
)
from writewatch.testing.winmodel import page_ceil, page_floor

# What this module offered before its implementations and traces had their own
# modules (README, tests, users' layers import them from here).
__all__ = [
    "Alloc", "Commit", "Divergence", "Free", "GetWatch", "Implementation", "Op", "Protect",
    "PythonObjectApi", "Read", "ReferenceModel", "ResetWatch", "Session", "SharedLibraryApi",
    "TraceGenerator", "Verdict", "WindowsApi", "Write", "WritewatchApi", "compare",
    "default_implementations", "main", "resolve", "run_trace", "shrink",
]

P = PAGE_SIZE


# ---------------------------------------------------------------------------
# Running, comparing, shrinking


@dataclass
class Divergence:
    """The first call whose outcome differs between two implementations."""

    reference: str
    candidate: str
    trace: list[Op]
    step: int  # index into trace of the diverging call
    reference_outcome: str
    candidate_outcome: str
    original_length: int = 0
    trace_number: int = 0
    seed: int = 0

    def report(self, indent: str = "    ") -> str:
        width = max(len(self.reference), len(self.candidate)) + 1
        lines = [f"{indent}{op.describe()}" for op in self.trace[:self.step + 1]]
        lines[-1] += "   <- here"
        shrunk = (f"shrunk from {self.original_length} to {self.step + 1} calls"
                  if self.original_length else f"{self.step + 1} calls")
        return "\n".join([
            f"{self.candidate} diverges from {self.reference} (trace {self.trace_number}, "
            f"seed {self.seed}; {shrunk}; P = {P}):",
            *lines,
            f"{indent}{self.reference + ':':<{width}} {_clip(self.reference_outcome)}",
            f"{indent}{self.candidate + ':':<{width}} {_clip(self.candidate_outcome)}",
        ])


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def run_trace(trace: Sequence[Op], reference: Implementation,
              candidates: Sequence[Implementation]) -> tuple[list[Divergence], dict[str, int]]:
    """Run trace on the reference and each candidate in lockstep.

    Returns the first divergence of each candidate (a candidate stops being run
    at its first one) and how many calls were compared for each."""
    oracle = Session(ReferenceModel())
    ref = Session(reference.factory())
    running = {impl.name: Session(impl.factory()) for impl in candidates}
    divergences: list[Divergence] = []
    compared = dict.fromkeys(running, 0)
    try:
        for step, op in enumerate(trace):
            if not running or not oracle.applicable(op):
                continue
            expected_layout = oracle.perform(op)
            expected = ref.perform(op)
            if isinstance(op, LAYOUT_OPS) and expected != expected_layout:
                # The reference disagrees with the model about which memory
                # exists: nothing after this is safe to run.
                divergences.append(Divergence("model", reference.name, list(trace), step,
                                              expected_layout, expected))
                break
            for name, session in list(running.items()):
                got = session.perform(op)
                compared[name] += 1
                if got != expected:
                    divergences.append(Divergence(reference.name, name, list(trace), step,
                                                  expected, got))
                    running.pop(name).close()
    finally:
        for session in (ref, *running.values()):
            session.close()
    return divergences, compared


def _diverges(trace: list[Op], reference: Implementation,
              candidate: Implementation) -> Divergence | None:
    divergences, _ = run_trace(trace, reference, [candidate])
    return divergences[0] if divergences else None


def _simpler(op: Op) -> Iterator[Op]:
    """Variants of op that are easier to read, to try while shrinking."""
    if isinstance(op, Write):
        if op.by_kernel:
            if op.delivered is None:
                yield replace(op, by_kernel=False)
            else:
                yield replace(op, delivered=None)
        if op.length > 1:
            for offset, length in ((op.offset, 1), (op.offset + op.length - 1, 1),
                                   (op.offset, op.length // 2)):
                delivered = None if op.delivered is None else min(op.delivered, length)
                yield replace(op, offset=offset, length=length, delivered=delivered)
    if isinstance(op, (Commit, Free, Protect, ResetWatch, GetWatch)) and op.size % P:
        yield replace(op, size=page_ceil(op.size))
        if op.size > P:
            yield replace(op, size=page_floor(op.size))
    if isinstance(op, GetWatch) and op.slot is not None:
        if op.flags not in (0, WRITE_WATCH_FLAG_RESET):
            yield replace(op, flags=0)
        if op.offset and op.offset % P:
            yield replace(op, offset=page_floor(op.offset), size=op.size + op.offset % P)
    if isinstance(op, Alloc) and op.pages > 1:
        for pages in (1, 2, 4, 8, 16):
            if pages < op.pages:
                yield replace(op, pages=pages)


def _renumber_slots(trace: list[Op]) -> list[Op]:
    """Name regions r0, r1, ... in the order the trace allocates them."""
    names: dict[int, int] = {}
    for op in trace:
        if isinstance(op, Alloc):
            names.setdefault(op.slot, len(names))
    return [op if op.slot is None or op.slot not in names else replace(op, slot=names[op.slot])
            for op in trace]


def shrink(found: Divergence, reference: Implementation,
           candidate: Implementation) -> Divergence:
    """The shortest trace we can find that still makes candidate diverge:
    delta debugging over the calls, then simpler arguments for each call."""
    trace = found.trace[:found.step + 1]
    best = found
    chunk = max(len(trace) // 2, 1)
    while chunk >= 1:
        removed = False
        start = 0
        while start < len(trace):
            attempt = trace[:start] + trace[start + chunk:]
            result = _diverges(attempt, reference, candidate) if attempt else None
            if result is not None:
                trace, best, removed = attempt[:result.step + 1], result, True
            else:
                start += chunk
        if not removed:
            chunk //= 2
    for index in range(len(trace)):
        for variant in _simpler(trace[index]):
            attempt = [*trace[:index], variant, *trace[index + 1:]]
            result = _diverges(attempt, reference, candidate)
            if result is not None:
                trace, best = attempt[:result.step + 1], result
                break
    renamed = _renumber_slots(trace)
    best = _diverges(renamed, reference, candidate) or best
    best.trace = renamed if best.trace == renamed else trace
    best.original_length = found.step + 1
    best.trace_number, best.seed = found.trace_number, found.seed
    return best


@dataclass
class Verdict:
    implementation: str
    divergence: Divergence | None = None
    compared: int = 0
    skipped: str = ""  # why it did not run


def compare(implementations: Sequence[Implementation], traces: int = 200, length: int = 60,
            seed: int = 1, log: Callable[[str], None] | None = None) -> list[Verdict]:
    """Compare implementations[1:] with implementations[0] on random traces;
    one verdict per candidate, with its first divergence shrunk."""
    reference, *others = implementations
    if reference.unavailable:
        raise ValueError(f"the reference {reference.name} cannot run here: "
                         f"{reference.unavailable}")
    verdicts = {impl.name: Verdict(impl.name, skipped=impl.unavailable) for impl in others}
    candidates = [impl for impl in others if not impl.unavailable]
    with_protect = all(impl.supports_protect for impl in [reference, *candidates])
    for number in range(traces):
        if not candidates:
            break
        trace_seed = seed * 1_000_003 + number
        trace = TraceGenerator(trace_seed, with_protect=with_protect).trace(length)
        divergences, compared = run_trace(trace, reference, candidates)
        for name, calls in compared.items():
            verdicts[name].compared += calls
        for divergence in divergences:
            divergence.trace_number, divergence.seed = number, trace_seed
            by_name = {impl.name: impl for impl in [reference, *candidates]}
            if divergence.reference == "model" and "model" not in by_name:
                by_name["model"] = Implementation("model", ReferenceModel)
            pair = (by_name[divergence.reference], by_name[divergence.candidate])
            if log:
                log(f"  {divergence.candidate}: diverges in trace {number}, shrinking ...")
            shrunk = shrink(divergence, *pair)
            if divergence.candidate == reference.name:
                # The reference itself disagrees with the model about memory
                # layout: no comparison with it can go on safely.
                return [Verdict(reference.name, shrunk), *verdicts.values()]
            verdicts[divergence.candidate].divergence = shrunk
            candidates = [impl for impl in candidates if impl.name != divergence.candidate]
    return list(verdicts.values())


def default_implementations() -> list[str]:
    """The model and every writewatch backend."""
    return ["model", *backends.backend_names()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m writewatch.testing.conformance",
        description="Run implementations of the Windows write-watch API through the same "
                    "random traces and report the first divergence, shrunk. The first one "
                    "named is the reference.")
    parser.add_argument("implementations", nargs="*", metavar="IMPL",
                        help="model | a backend (" + ", ".join(backends.backend_names()) +
                             ") | module:attribute | file.py:attribute | lib:path.so "
                             "(default: model and every backend)")
    parser.add_argument("--traces", type=int, help="random traces (default 200; 30 small)")
    parser.add_argument("--length", type=int, help="calls per trace (default 60; 40 small)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--small", action="store_true", help="a quick run")
    args = parser.parse_args(argv)
    if args.traces is None:
        args.traces = 30 if args.small else 200
    if args.length is None:
        args.length = 40 if args.small else 60
    names = args.implementations or default_implementations()
    if len(names) == 1 and names[0] != "model":
        names = ["model", *names]  # one implementation: compare it with the model
    if len(set(names)) != len(names):
        parser.error("each implementation may be named once")
    try:
        implementations = [resolve(name) for name in names]
    except (ValueError, TypeError, ImportError, AttributeError, OSError) as exc:
        print(f"cannot load an implementation: {exc}", file=sys.stderr)
        return 2
    reference = implementations[0]
    print(f"writewatch conformance: {args.traces} random traces of {args.length} calls "
          f"(seed {args.seed}); reference: {reference.name}")
    try:
        verdicts = compare(implementations, args.traces, args.length, args.seed,
                           log=lambda line: print(line, flush=True))
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    width = max(len(v.implementation) for v in verdicts) if verdicts else 0
    diverged = 0
    for verdict in verdicts:
        if verdict.skipped:
            print(f"  {verdict.implementation:<{width}}  skipped: {verdict.skipped}")
        elif verdict.divergence is None:
            print(f"  {verdict.implementation:<{width}}  agrees "
                  f"({verdict.compared} calls compared)")
        else:
            diverged += 1
            print(f"  {verdict.implementation:<{width}}  DIVERGES")
    for verdict in verdicts:
        if verdict.divergence is not None:
            print()
            print(verdict.divergence.report())
    ran = [v for v in verdicts if not v.skipped]
    if not ran:
        print("nothing to compare: no other implementation can run here")
        return 2
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
