"""Command line: ``python -m writewatch info | demo [NAME] | bench``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import writewatch as ww
from writewatch import backends, sandbox
from writewatch.probe import Capabilities


def _yes(flag: bool) -> str:
    return "yes" if flag else "no "


def _advice(caps: Capabilities) -> list[str]:
    """What a user can do about each missing piece."""
    advice = []
    if caps.kernel_version and caps.kernel_version < (6, 7):
        advice.append(f"Linux {caps.kernel_release} predates 6.7: PAGEMAP_SCAN and "
                      "userfaultfd WP_ASYNC need Linux 6.7 or newer (upgrade the kernel).")
    return advice


def _chosen_backend() -> tuple[str | None, str]:
    """The backend auto would use here, and why (or None and the error)."""
    try:
        requested = backends.requested_backend()
        name = backends.backend().name
    except (ValueError, OSError) as exc:
        return None, str(exc)
    if requested != "auto":
        return name, f"requested by {backends.BACKEND_ENV}={requested}"
    return name, "the best one available here"


def _kernel_writes_note(report: list[dict[str, object]]) -> str:
    """What each available backend means for writes the kernel makes into
    watched memory (read(2), readinto, recv_into)."""
    plain: list[str] = []
    prepared: list[str] = []
    for each in report:
        if each["available"]:
            name = str(each["name"])
            (prepared if backends.backend(name).kernel_writes_fault() else plain).append(name)
    lines = ["Kernel writes (os.readv, readinto, recv_into into watched memory):"]
    if plain:
        lines.append(f"  {', '.join(plain)}: just work.")
    if prepared:
        lines.append(f"  {', '.join(prepared)}: fail with EFAULT unless prepared: use "
                     "writewatch.read_into / recv_into (or WatchedMemory.read_into), or call "
                     "prepare_kernel_write(address, size) first.")
    fallbacks = [name for name in ("uffd", "mprotect") if name in prepared]
    if fallbacks:
        lines.append(f"  process_memwatch on memory writewatch did not allocate, on "
                     f"{', '.join(fallbacks)}: the kernel's writes into its armed pages fail "
                     "with EFAULT until memwatch_unwatch.")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    caps = ww.probe()
    report = backends.backend_report()
    chosen, why = _chosen_backend()
    denied = sandbox.current_denials()
    if args.json:
        print(json.dumps({**caps.as_dict(), "backends": report, "backend": chosen,
                          "backend_reason": why,
                          "denied": [each.as_dict() for each in denied]}, indent=2))
        return 0 if chosen else 1
    print(f"writewatch {ww.__version__} on Linux {caps.kernel_release}")
    print()
    if chosen:
        print(f"Using the {chosen} backend: {why}.")
    else:
        print(f"No usable backend: {why}")
    print("Backends (best first; choose with WRITEWATCH_BACKEND=pagemap|uffd|mprotect|auto):")
    for each in report:
        mark = "yes" if each["available"] else "no "
        print(f"  [{mark}] {each['name']:<9} {each['detail']}")
    if denied:
        print()
        print("Denied here:")
        for denial in denied:
            print(f"  - {denial.what}, by {denial.by}: {denial.detail}.")
            if denial.remedy:
                print(f"    To allow it: {denial.remedy}.")
    if chosen in sandbox.FALLBACK_MEANS:
        print(f"  The {chosen} backend is a fallback: {sandbox.FALLBACK_MEANS[chosen]}.")
    print()
    print(_kernel_writes_note(report))
    print()
    print("Kernel features each backend relies on:")
    for feature in caps.features:
        print(f"  [{_yes(feature.present)}] {feature.name:<28} Linux {feature.since:<5} "
              f"{feature.role}: {feature.purpose}")
    print(f"  [{_yes(caps.soft_dirty)}] soft-dirty bits              "
          f"{caps.soft_dirty_detail}; not used: it clears only whole processes, with no "
          "atomic get-and-clear")
    print(f"  vm.unprivileged_userfaultfd = {caps.unprivileged_userfaultfd}, "
          f"seccomp mode = {caps.seccomp_mode}, vm.max_map_count = {caps.max_map_count} "
          "(the mprotect backend splits a mapping at each armed/unarmed boundary)")
    advice = _advice(caps)
    if advice:
        print()
        print("To get what is missing:")
        for line in advice:
            print(f"  - {line}")
    if chosen is None:
        print(f"\nwritewatch: {why}", file=sys.stderr)
        return 1
    return 0


def _pages(addresses: np.ndarray, base: int) -> list[int]:
    return [int(a - base) // ww.PAGE_SIZE for a in addresses]


def _summary(pages: list[int] | None, shown: int = 8) -> str:
    """A page list as the demo prints it: whole when short, else its ends and count."""
    if pages is None or len(pages) <= 2 * shown:
        return str(pages)
    head = ", ".join(map(str, pages[:shown]))
    tail = ", ".join(map(str, pages[-shown:]))
    return f"[{head}, ..., {tail}] ({len(pages)} pages)"


def cmd_demo(args: argparse.Namespace) -> int:
    """Allocate a watched region, write patterns, and check every report."""
    backend, why = _chosen_backend()
    if backend is None:
        print(f"writewatch: {why}", file=sys.stderr)
        return 2
    npages = args.pages
    page = ww.PAGE_SIZE
    base = ww.VirtualAlloc(0, npages * page,
                           ww.MEM_RESERVE | ww.MEM_COMMIT | ww.MEM_WRITE_WATCH,
                           ww.PAGE_READWRITE)
    if not base:
        print(f"VirtualAlloc(MEM_WRITE_WATCH) failed with error {ww.GetLastError()}; "
              "run 'python -m writewatch info' to see why.", file=sys.stderr)
        return 2
    memory = ww.as_array(base, npages * page)
    addresses = np.zeros(npages, np.uintp)
    failures = 0
    print(f"Watching {npages} pages at {base:#x} (page size {page}) with the {backend} backend "
          f"({why}).")

    def report(title: str, expected: list[int], flags: int = 0, count: int | None = None) -> None:
        nonlocal failures
        ret, found, granularity = ww.GetWriteWatch(flags, base, npages * page, addresses, count)
        got = _pages(addresses[:found], base) if ret == 0 else None
        ok = ret == 0 and granularity == page and got == expected
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {title}: {_summary(got)}" +
              ("" if ok else f"  (expected {_summary(expected)}, ret {ret:#x})"))

    report("fresh region reports", [])
    pattern = list(range(0, npages, 3))
    for p in pattern:
        memory[p * page + 7] = 0xAB
    report("after writing every 3rd page, GetWriteWatch", pattern)
    report("again, with WRITE_WATCH_FLAG_RESET", pattern, ww.WRITE_WATCH_FLAG_RESET)
    report("after the reset", [])
    memory[5 * page - 2:5 * page + 2] = 1  # straddles pages 4 and 5
    memory[9 * page] = 1
    report("a 4-byte write across pages 4|5 and a write to page 9", [4, 5, 9])
    report("capped at 1 with RESET", [4], ww.WRITE_WATCH_FLAG_RESET, 1)
    report("the pages not returned stay written", [5, 9])
    if ww.ResetWriteWatch(base, npages * page) != 0:
        failures += 1
    report("after ResetWriteWatch", [])
    ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    print("demo passed" if not failures else f"demo FAILED: {failures} wrong report(s)")
    return 1 if failures else 0


# demo NAME: the examples. Scripts live in the source checkout's examples/;
# the differential tester ships in the package.
EXAMPLES = {
    "incremental_gc": ("examples/incremental_gc.py",
                       "incremental mark-and-sweep collector re-scanning written pages"),
    "game_state_sync": ("examples/game_state_sync.py",
                        "ship only the pages each frame wrote to a replica, per backend"),
    "incremental_checkpoint": ("examples/incremental_checkpoint.py",
                               "append only the pages each step of a numpy simulation wrote"),
    "translation_layer": ("examples/translation_layer/run.py",
                          "a Windows C program, unchanged, on a libwinshim.so over writewatch"),
    "conformance": ("-m writewatch.testing.conformance",
                    "differential tester: backends and the reference model, call for call"),
}


def run_example(name: str, example_args: Sequence[str]) -> int:
    """Run one example in a fresh interpreter (so that it can set up the
    environment before numpy loads); its exit status is the demo's."""
    target, _ = EXAMPLES[name]
    if target.startswith("-m "):
        command = [sys.executable, *target.split(), *example_args]
    else:
        script = Path(__file__).resolve().parent.parent / target
        if not script.exists():
            print(f"{target} is not here: the examples ship with the source checkout of "
                  "writewatch, not with an installed package.", file=sys.stderr)
            return 2
        command = [sys.executable, str(script), *example_args]
    env = {**os.environ}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return subprocess.call(command, env=env)


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks against the raw kernel and the slow methods (writewatch/bench/)."""
    from writewatch.bench import runner

    return runner.main(args)


def _program_name() -> str:
    """How the user called us: `python -m writewatch` or the `writewatch` script."""
    return "python -m writewatch" if Path(sys.argv[0]).name == "__main__.py" else "writewatch"


def cmd_cflags(args: argparse.Namespace) -> int:
    from writewatch import clib

    if not clib.library_path().exists():
        print(f"{clib.library_path()} is missing: reinstall writewatch with a C compiler",
              file=sys.stderr)
        return 1
    print(clib.cflags())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status. A reader that goes away
    (`writewatch info | head -1`) ends it quietly, as Unix tools do."""
    try:
        status = _main(argv)
        # With stdout buffered (not a terminal, no PYTHONUNBUFFERED), a short
        # output meets a closed pipe only here: flush while the handler below
        # can still catch it, not at interpreter exit.
        sys.stdout.flush()
    except BrokenPipeError:
        # Keep Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


def _main(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["demo"] and len(arguments) > 1 and arguments[1] in EXAMPLES:
        # Everything after the name is the example's own (--small, --help, ...).
        return run_example(arguments[1], arguments[2:])
    parser = argparse.ArgumentParser(prog=_program_name(),
                                     description="Windows write watch on Linux.")
    parser.add_argument("--version", action="version", version=f"writewatch {ww.__version__}")
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="which backend is used here, and why")
    info.add_argument("--json", action="store_true", help="print the probe as JSON")
    info.set_defaults(run=cmd_info)
    demo = sub.add_parser(
        "demo", help="watch a region, write patterns, check the reports; or run an example",
        description="With no NAME: watch a region, write patterns, check every report. "
                    "With a NAME: run that example (arguments after NAME go to it; "
                    "--small for a quick run).",
        epilog="examples: " + "; ".join(f"{name}: {what}" for name, (_, what) in
                                         EXAMPLES.items()))
    demo.add_argument("name", nargs="?", choices=list(EXAMPLES), metavar="NAME",
                      help="example to run: " + ", ".join(EXAMPLES))
    demo.add_argument("--pages", type=int, default=32, help="region size in pages (>= 16)")
    demo.set_defaults(run=cmd_demo)
    bench = sub.add_parser(
        "bench", help="benchmarks against a raw C reference and the slow methods",
        description="Time writewatch's backends against a raw C reference making the same "
                    "kernel calls: one table per scenario, medians and ratios to raw C. "
                    "Runs with OPENBLAS_NUM_THREADS=1 (restarting itself to set it).")
    if arguments[:1] == ["bench"]:
        # The benchmark is tooling: imported only when asked for, never by info or demo.
        from writewatch.bench import runner

        runner.add_arguments(bench)
    bench.set_defaults(run=cmd_bench)
    cflags = sub.add_parser(
        "cflags", help="compiler flags for C code calling process_memwatch()",
        description="Print the flags that build a C program written for the proposed "
                    "process_memwatch system call against libprocess_memwatch: "
                    "cc prog.c $(python -m writewatch cflags)")
    cflags.set_defaults(run=cmd_cflags)
    args = parser.parse_args(arguments)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo" and args.name:
        return run_example(args.name, [])
    if args.command == "demo" and args.pages < 16:
        parser.error("--pages must be at least 16")
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
