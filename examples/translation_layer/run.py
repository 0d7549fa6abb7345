"""A Windows program, unchanged, on writewatch: what a Wine-like translation
layer does with a reference implementation of write watch.

    python examples/translation_layer/run.py [--small] [--backend NAME] [--traces N]

1. Compiles libwinshim.so (VirtualAlloc, VirtualFree, VirtualProtect,
   GetWriteWatch, ResetWriteWatch, GetLastError with the Windows signatures,
   implemented by calling into writewatch) and write_watch_port.c, a C
   program written against those signatures (build.py).
2. Runs the program once per writewatch backend available here: it checks the
   API the way Wine's conformance tests do, then keeps incremental save states
   of a heap with GetWriteWatch and checks them every frame.
3. Runs the differential tester on the shared library itself, once per
   backend (python -m writewatch.testing.conformance model lib:libwinshim.so): the C
   entry points must behave like the reference model, call for call.

Exits nonzero if any check fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: docs/semantics.md K19

import argparse
import ctypes
import subprocess
import sys
from pathlib import Path

import writewatch
from writewatch import backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import Built, build  # the sibling module, found once the path is set


def _python_path() -> str:
    """Where the Python inside the C program finds writewatch and numpy: this
    interpreter's path, plus writewatch's own directory (an editable install
    is found through an import hook the embedded interpreter does not run)."""
    package_parent = str(Path(writewatch.__file__).resolve().parent.parent)
    entries = [package_parent, *(entry for entry in sys.path if entry)]
    return os.pathsep.join(dict.fromkeys(entries))


def _run_port(built: Built, backend: str, small: bool, in_process: bool) -> tuple[int, str]:
    """Run the ported program in a fresh process with the backend chosen."""
    env = {**os.environ, "WRITEWATCH_BACKEND": backend, "PYTHONPATH": _python_path(),
           "OPENBLAS_NUM_THREADS": "1"}
    args = ["--small"] if small else []
    if built.program is not None and not in_process:
        command = [str(built.program), *args]
    else:  # no shared libpython: host the program in a Python process instead
        command = [sys.executable, __file__, "--host", str(built.program_library), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return result.returncode, result.stdout + result.stderr


def _host(program_library: str, args: list[str]) -> int:
    """Call the program's main() (compiled as port_main) inside this process."""
    port = ctypes.CDLL(program_library)
    port.port_main.restype = ctypes.c_int
    port.port_main.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    argv = [b"write_watch_port", *(arg.encode() for arg in args)]
    result = int(port.port_main(len(argv), (ctypes.c_char_p * len(argv))(*argv)))
    sys.stdout.flush()
    return result


def _summary(output: str) -> dict[str, str]:
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return dict(item.split("=", 1) for item in line.split()[1:])
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small sizes (for tests)")
    parser.add_argument("--backend", help="run on this backend only (default: every one here)")
    parser.add_argument("--traces", type=int, default=None,
                        help="differential-test traces on the library (default 100, 20 small)")
    parser.add_argument("--in-process", action="store_true",
                        help="host the program in Python even if it could run on its own")
    parser.add_argument("--host", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host:
        return _host(args.host, ["--small"] if args.small else [])

    try:
        built = build()
    except (RuntimeError, OSError) as exc:
        print(f"cannot compile the translation layer (needs a C compiler and the Python "
              f"headers): {exc}", file=sys.stderr)
        return 2
    if built.program and not args.in_process:
        form = "a C program"
    else:
        form = "a library hosted by Python" + ("" if args.in_process
                                              else " (there is no shared libpython here)")
    print(f"Built {built.library.name} and write_watch_port.c as {form} in {built.library.parent}")

    status = backends.backend_status()
    names = [args.backend] if args.backend else backends.backend_names()
    failed = 0
    rows = []
    for name in names:
        if status.get(name, "unknown backend"):
            print(f"\n== {name}: skipped ({status.get(name, 'unknown backend')})")
            continue
        print(f"\n== write_watch_port on the {name} backend")
        code, output = _run_port(built, name, args.small, args.in_process)
        print("\n".join(line for line in output.splitlines() if not line.startswith("RESULT")))
        summary = _summary(output)
        if code != 0 or not summary:
            failed += 1
            print(f"   FAILED (exit status {code})")
        rows.append((name, summary))

    print("\nper frame  API checks  pages copied   GetWriteWatch    copying")
    for name, summary in rows:
        if summary:
            checks = int(summary["checks"])
            passed = checks - int(summary["failed"])
            print(f"{name:<10} {passed:>4}/{checks:<4}   {summary['pages_per_frame']:>6}/"
                  f"{summary['heap_pages']:<6} {summary['watch_us']:>10} us "
                  f"{summary['copy_us']:>7} us")
    print("(GetWriteWatch includes the trip from C into Python and writewatch: the shim's "
          "cost per call)")

    traces = args.traces if args.traces is not None else (20 if args.small else 100)
    print(f"\n== differential test: libwinshim.so against the reference model, {traces} "
          "random traces per backend")
    for name, _ in rows:
        tester = subprocess.run(
            [sys.executable, "-m", "writewatch.testing.conformance", "model",
             f"lib:{built.library}", "--traces", str(traces)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "WRITEWATCH_BACKEND": name})
        verdict = [line.split(None, 1)[1] for line in tester.stdout.splitlines()
                   if line.startswith(f"  lib:{built.library}  ")]
        print(f"{name:<10} {verdict[0] if verdict else 'no verdict'}")
        if tester.returncode != 0:
            failed += 1
            report = tester.stdout.split("\n\n", 1)[-1]
            print(report.replace(f"lib:{built.library}", "libwinshim.so").rstrip())
            print(tester.stderr.rstrip())
    print("\ntranslation layer: " + ("all checks passed" if not failed
                                     else f"FAILED ({failed} part(s))"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
