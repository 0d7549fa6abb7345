"""The package's shape, as the project's rules state it: imports run one way,
down the layers pyproject.toml's import-linter contracts name (also checked
by .ci/run); no product file is over about 600 lines; every -errno has one
decoder (kernel.check / kernel.oserror); /proc is read in one place (kernel.py),
and the probe and the sandbox diagnosis see the same facts; the benchmark and
the testing tools stay out of what the API and `info` import."""

from __future__ import annotations

import ast
import errno
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from writewatch import index, kernel, memwatch, sandbox

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "writewatch"

pytestmark = pytest.mark.any_backend


MAX_LINES = 600


def product_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's contracts from pyproject.toml, checked against the
    writewatch package found in package_parent."""
    command = Path(sys.executable).with_name("lint-imports")
    assert command.exists(), "lint-imports is missing: install the test extra (README)"
    return subprocess.run(
        [str(command), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        capture_output=True, text=True, timeout=120, cwd=package_parent,
        env={**os.environ, "PYTHONPATH": str(package_parent)})


def test_imports_keep_to_the_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


AGAINST_THE_DESIGN = [
    ("kernel", "probe"),                    # the kernel layer reaching up
    ("regions", "latch"),                   # the latch sits on the region table
    ("memwatch", "errors"),                 # the process_memwatch core knows no Windows
    ("backends.pagemap", "backends.uffd"),  # each backend stands alone
    ("watch", "testing.winmodel"),          # the product imports no tooling
    ("api", "bench.scale"),
]


def test_the_contracts_catch_imports_against_them(tmp_path):
    """So that a green run above means something: in a copy of the package,
    each import against the design breaks a contract and is named in the
    report (one run for all of them: a child interpreter is slow on an
    emulated CPU)."""
    shutil.copytree(PACKAGE, tmp_path / "writewatch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c", "*.h"))
    for importer, imported in AGAINST_THE_DESIGN:
        module = tmp_path / "writewatch" / (importer.replace(".", "/") + ".py")
        with module.open("a") as f:
            f.write(f"\nimport writewatch.{imported}  # against the design\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    for importer, imported in AGAINST_THE_DESIGN:
        assert f"writewatch.{importer} -> writewatch.{imported}" in result.stdout, result.stdout


def test_the_decoder_picks_the_subclass_and_keeps_the_calls_wording():
    exc = kernel.oserror(errno.ESRCH, "process_memwatch")
    assert isinstance(exc, ProcessLookupError)
    assert exc.errno == errno.ESRCH and exc.strerror == "process_memwatch: No such process"
    with pytest.raises(PermissionError, match=r"^\[Errno 1\] mprotect: "):
        kernel.check(-errno.EPERM, "mprotect")
    assert kernel.check(7, "mprotect") == 7
    # Reported under another errno, the kernel's own meaning stays in the message.
    exc = kernel.oserror(errno.EIO, "PAGEMAP_SCAN failed", cause=errno.EFAULT)
    assert exc.errno == errno.EIO and exc.strerror == "PAGEMAP_SCAN failed: Bad address"


def test_process_memwatch_reports_the_proposals_errors_through_the_decoder():
    assert memwatch._memwatch_check(3, "PAGEMAP_SCAN") == 3
    for err, kind in ((errno.EINVAL, OSError), (errno.ESRCH, ProcessLookupError)):
        with pytest.raises(kind) as caught:
            memwatch._memwatch_check(-err, "PAGEMAP_SCAN")
        assert caught.value.errno == err
        assert caught.value.strerror == f"process_memwatch: {os.strerror(err)}"
    with pytest.raises(OSError) as caught:
        memwatch._memwatch_check(-errno.EFAULT, "PAGEMAP_SCAN")
    assert caught.value.errno == errno.EIO
    assert caught.value.strerror == "PAGEMAP_SCAN failed: Bad address"


def test_a_failure_is_worded_by_the_mechanism_that_failed(monkeypatch):
    """EIO names the operation of the backend in use, not PAGEMAP_SCAN on the fallbacks."""
    from writewatch import backends
    # The native calls hand every call to the backend's Python side.
    monkeypatch.setattr(memwatch, "_common", lambda *args: -errno.EOPNOTSUPP)
    monkeypatch.setattr(memwatch, "_call", lambda *args: -errno.EOPNOTSUPP)
    for backend in backends.available_backends():
        monkeypatch.setenv(backends.BACKEND_ENV, backend.name)
        monkeypatch.setattr(type(backend), "process_memwatch",
                            lambda self, *args: -errno.EFAULT)
        with pytest.raises(OSError) as caught:
            memwatch.process_memwatch(0, 0x10000, 4096, memwatch.MEMWATCH_SD_CLEAR)
        assert caught.value.errno == errno.EIO
        assert caught.value.strerror == f"{backend.operation} failed: Bad address"
        assert ("PAGEMAP_SCAN" in backend.operation) == (backend.name == "pagemap")


def test_the_index_shifts_its_kernel_failures_back_to_errno():
    with pytest.raises(PermissionError) as caught:
        index.verdict(-(kernel.lib.WW_INDEX_ERRNO_BASE + errno.EPERM), "GetWriteWatch scan")
    assert caught.value.errno == errno.EPERM
    assert caught.value.strerror == "GetWriteWatch scan: Operation not permitted"
    with pytest.raises(index.RefusedError) as refused:
        index.verdict(-(kernel.lib.WW_REFUSED_BASE + index.REFUSED_SIZE), "GetWriteWatch")
    assert refused.value.reason == index.REFUSED_SIZE


def test_only_the_kernel_layer_words_errno_values():
    """os.strerror anywhere else is a second decoder, with its own wording."""
    offenders = []
    for path in product_sources():
        if path == PACKAGE / "kernel.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "strerror"
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"decode errno with kernel.check / kernel.oserror: {offenders}"


def test_the_proc_readers_read_this_process():
    assert kernel.proc_status_field("Pid") == str(os.getpid())
    assert kernel.proc_status_field("NoSuchField") is None
    with open("/proc/sys/vm/max_map_count") as f:
        assert kernel.read_proc_int("/proc/sys/vm/max_map_count") == int(f.read())
    assert kernel.read_proc_int("/proc/sys/vm/no_such_sysctl") is None
    assert kernel.kernel_version()[:2] == tuple(
        int(part) for part in os.uname().release.split(".")[:2])


def test_the_probe_reports_the_facts_the_sandbox_diagnosis_sees(monkeypatch):
    """One reading of the kernel version, the seccomp mode and the sysctl:
    what `info` shows is what its denials were worked out from."""
    seen = sandbox.Facts(kernel_version=(5, 10, 7), seccomp_mode=2,
                         unprivileged_userfaultfd=0, cap_sys_ptrace=False,
                         invalid_flag_errno=errno.EPERM)
    monkeypatch.setattr(sandbox, "facts", lambda: seen)
    # writewatch.probe names the function too (the package exports it).
    caps = importlib.import_module("writewatch.probe").probe()
    assert caps.kernel_version == (5, 10, 7)
    assert caps.seccomp_mode == 2
    assert caps.unprivileged_userfaultfd == 0


def test_the_api_and_info_import_no_tooling():
    """writewatch.bench and writewatch.testing are loaded by the bench command
    and the tests only: `import writewatch` and `python -m writewatch info`
    pay for neither (and need neither a compiler nor setuptools)."""
    script = (
        "import contextlib, io, sys\n"
        "import writewatch\n"
        "import writewatch.__main__ as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['info'])\n"
        "print(sorted(name for name in sys.modules\n"
        "             if name.startswith(('writewatch.bench', 'writewatch.testing'))))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_python_file_of_the_package_is_over_600_lines():
    """A file that long holds more than one job: split it by job."""
    too_long = {str(path.relative_to(ROOT)): lines for path in product_sources()
                if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, too_long
