"""Running test code in a child, safely.

run_forked: in an os.fork() child that always leaves through os._exit, so a
failure in it never goes on to run the rest of the test session; its result or
traceback comes back over a pipe.

run_python: in a fresh interpreter, for code that may crash, hang or deadlock
the process running it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _slowdown() -> float:
    try:
        return max(1.0, float(os.environ.get("WRITEWATCH_SLOWDOWN", "1")))
    except ValueError:
        return 1.0


# How many times slower than a native CPU the tests run here: set by
# tools/kernel-matrix under QEMU's software emulation, 1 otherwise. Hang guards
# and waits for a run to be exercised scale up by it (patience); the amount of
# random work a test does (race cycles, generated examples, objects made) may
# scale down by it (scaled_work). No test asserts on time, and none expects
# less of each run on a slow CPU.
SLOWDOWN = _slowdown()


def patience(seconds: float) -> float:
    """A hang guard or settle limit of `seconds` on a native CPU, scaled to this one."""
    return seconds * SLOWDOWN


def scaled_work(count: int, at_least: int) -> int:
    """`count` repetitions on a native CPU, fewer on a slow (emulated) one, never
    fewer than `at_least`, the least that still exercises what the test checks."""
    return max(at_least, int(count / SLOWDOWN))


CHILD_TIMEOUT = patience(60)  # seconds; only a hung child ever gets near it
TESTS = Path(__file__).resolve().parent


def run_python(code: str, timeout: float = CHILD_TIMEOUT, env: dict[str, str] | None = None,
               report_hang: bool = False,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run code (dedented) in a fresh interpreter, with tests/ importable and the
    checkout (or cwd) as its directory; env adds to this process's environment. With
    report_hang, faulthandler prints every thread's traceback and exits 10 s
    before the timeout, so a deadlock fails with its tracebacks instead of
    only timing out."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
    if report_hang:
        prelude += f"import faulthandler; faulthandler.dump_traceback_later({timeout - 10}, " \
                   "exit=True)\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=TESTS.parent if cwd is None else cwd,
                          env={**os.environ, **(env or {})})


def run_forked(body: Callable[[], Any],
               while_child_runs: Callable[[], None] | None = None) -> Any:
    """Run body() in an os.fork() child and return its JSON-able result; the
    child's exception (with traceback) fails the test here. The child always
    leaves through os._exit. while_child_runs, if given, runs in the parent
    right after the fork."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 70
        try:
            os.close(read_end)
            try:
                report = {"result": body()}
                status = 0
            except BaseException:
                report = {"error": traceback.format_exc()}
                status = 1
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(write_end, data):]
        finally:
            os._exit(status)
    os.close(write_end)
    if while_child_runs is not None:
        while_child_runs()
    chunks = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    while select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    else:  # timed out: never leave a stuck child behind
        os.kill(pid, signal.SIGKILL)
    os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    assert chunks, f"child died without a report (wait status {wait_status:#x})"
    report = json.loads(b"".join(chunks))
    if "error" in report:
        pytest.fail("in the forked child:\n" + report["error"])
    assert os.waitstatus_to_exitcode(wait_status) == 0
    return report["result"]
