"""Every test file is classified for the kernel matrix (tests/conftest.py):
either its outcome can differ by kernel, and tools/kernel-matrix runs it on
Linux 6.1 (`pytest --kernel-dependent`), or it says why it cannot. A new file
that is in neither list fails here instead of silently never running on 6.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KERNEL_DEPENDENT, SAME_ON_EVERY_KERNEL

TESTS = Path(__file__).resolve().parent


@pytest.mark.any_backend
def test_every_test_file_is_classified_once() -> None:
    files = {path.name for path in TESTS.glob("test_*.py")}
    assert not files - KERNEL_DEPENDENT - set(SAME_ON_EVERY_KERNEL), \
        "classify these in tests/conftest.py (KERNEL_DEPENDENT or SAME_ON_EVERY_KERNEL)"
    assert not KERNEL_DEPENDENT & set(SAME_ON_EVERY_KERNEL), "in both lists"
    assert not (KERNEL_DEPENDENT | set(SAME_ON_EVERY_KERNEL)) - files, "no such test file"


@pytest.mark.any_backend
def test_kernel_dependent_option_collects_exactly_those_files() -> None:
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "--kernel-dependent", "-p", "no:cacheprovider", str(TESTS)],
                            capture_output=True, text=True, cwd=TESTS.parent, check=True)
    collected = {line.split("::")[0].rsplit("/", 1)[-1] for line in listed.stdout.splitlines()
                 if "::" in line}
    assert collected == KERNEL_DEPENDENT
