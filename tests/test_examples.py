"""The examples run at small sizes, check their own results, and fail loudly
when write watch misses a write; `python -m writewatch demo NAME` runs each."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from forking import patience

import writewatch as ww
from writewatch import backends
from writewatch.__main__ import EXAMPLES

pytestmark = pytest.mark.any_backend  # the examples iterate the backends themselves

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"
HERE = [name for name, reason in backends.backend_status().items() if not reason]
needs_a_backend = pytest.mark.skipif(not HERE, reason="no write-watch backend here")
needs_a_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None,
                                      reason="no C compiler")


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *command], capture_output=True, text=True,
                          timeout=patience(120), cwd=ROOT,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  EXAMPLES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def backend_rows(output: str) -> dict[str, str]:
    return {line.split()[0]: line for line in output.splitlines() if line.split()
            and line.split()[0] in {"plain", *backends.backend_names()}}


# -- incremental_gc


@needs_a_backend
def test_incremental_gc_frees_no_live_object():
    result = run("examples/incremental_gc.py", "--small")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: no live object was freed in 3 cycles" in result.stdout
    assert "pages rescanned" in result.stdout and "/128" in result.stdout
    assert "GetWriteWatch:" in result.stdout and "stop-the-world mark took" in result.stdout


@needs_a_backend
def test_incremental_gc_fails_when_write_watch_reports_nothing(monkeypatch, capsys):
    example = load_example("incremental_gc")
    real = ww.GetWriteWatch

    def reports_nothing(flags, base, size, addresses, count=None):
        ret, _, granularity = real(flags, base, size, addresses, count)
        return ret, 0, granularity

    monkeypatch.setattr(ww, "GetWriteWatch", reports_nothing)
    assert example.main(["--small"]) == 1
    assert "FAILED" in capsys.readouterr().out


@needs_a_backend
@pytest.mark.parametrize("backend", HERE)
def test_incremental_gc_on_each_backend(backend, capsys):
    assert load_example("incremental_gc").main(["--small", "--backend", backend,
                                                "--cycles", "2"]) == 0
    assert f"backend {backend}" in capsys.readouterr().out


# -- game_state_sync


@needs_a_backend
def test_game_state_sync_keeps_every_replica_equal_on_every_backend():
    result = run("examples/game_state_sync.py", "--small")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = backend_rows(result.stdout)
    assert set(rows) == {"plain", *HERE}
    assert all("equal every frame" in row for row in rows.values())
    assert "OK: every replica equalled its arena after each of 40 frames" in result.stdout


@needs_a_backend
def test_game_state_sync_notices_a_page_missing_from_the_shipment(monkeypatch, capsys):
    example = load_example("game_state_sync")
    real = ww.GetWriteWatch

    def drops_the_last_page(flags, base, size, addresses, count=None):
        ret, found, granularity = real(flags, base, size, addresses, count)
        return ret, max(found - 1, 0), granularity

    monkeypatch.setattr(ww, "GetWriteWatch", drops_the_last_page)
    assert example.main(["--small", "--backend", HERE[0], "--frames", "5"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERED" in backend_rows(out)[HERE[0]]
    assert "FAILED" in out


def test_game_state_sync_skips_an_unavailable_backend(monkeypatch, capsys):
    example = load_example("game_state_sync")
    reasons = {name: "pretend: not here" for name in backends.backend_names()}
    monkeypatch.setattr(backends, "backend_status", lambda: dict(reasons))
    assert example.main(["--small", "--frames", "3"]) == 0
    out = capsys.readouterr().out
    for name in backends.backend_names():
        assert f"{name}: skipped (pretend: not here)" in out


# -- incremental_checkpoint


@needs_a_backend
def test_incremental_checkpoint_restores_every_checked_step_on_every_backend():
    result = run("examples/incremental_checkpoint.py", "--small")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()
            and line.split()[0] in {"compare", "hash", *backends.backend_names()}}
    assert set(rows) == {"compare", "hash", *HERE}
    assert all("equal to their copies" in row for row in rows.values())
    assert "OK: every method's checkpoint restored steps 1, 3, 6 bit for bit" in result.stdout


@needs_a_backend
def test_incremental_checkpoint_notices_a_page_missing_from_a_record(monkeypatch, capsys):
    example = load_example("incremental_checkpoint")
    real = ww.WatchedBuffer.written

    def drops_the_last_page(self, reset=False, *, out=None, unit="offset"):
        return real(self, reset, out=out, unit=unit)[:-1]

    monkeypatch.setattr(ww.WatchedBuffer, "written", drops_the_last_page)
    assert example.main(["--small", "--backend", HERE[0], "--steps", "3"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERED" in out and "FAILED" in out


@needs_a_backend
def test_incremental_checkpoint_appends_only_what_changed(capsys):
    example = load_example("incremental_checkpoint")
    assert example.main(["--small", "--backend", HERE[0], "--steps", "2", "--check", "2",
                         "--percent", "0.5"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in {"compare", HERE[0]}}
    # The same pages as a full comparison finds, a small share of the 4096.
    assert rows["compare"][1] == rows[HERE[0]][1]
    assert 0 < float(rows[HERE[0]][1]) < 4096 * 0.02


# -- translation_layer


@needs_a_compiler
@needs_a_backend
def test_translation_layer_runs_the_windows_program_on_each_backend():
    result = run("examples/translation_layer/run.py", "--small")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in HERE:
        assert f"== write_watch_port on the {name} backend" in out
    assert out.count("API checks: 68 of 68 passed") == len(HERE)
    assert out.count("snapshot equals the heap after every frame: yes") == len(HERE)
    differential = out.split("== differential test", 1)[1]
    assert differential.count("agrees") == len(HERE)
    assert "translation layer: all checks passed" in out


@needs_a_compiler
@needs_a_backend
def test_translation_layer_hosted_in_python_without_a_program():
    """The route taken where there is no shared libpython to link a program with."""
    result = run("examples/translation_layer/run.py", "--small", "--in-process",
                 "--backend", HERE[-1], "--traces", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "as a library hosted by Python" in result.stdout
    assert "API checks: 68 of 68 passed" in result.stdout


@needs_a_compiler
def test_translation_layer_calls_fail_cleanly_when_python_cannot_start(tmp_path):
    """With writewatch out of reach the shim must not report success (cffi's
    default 0 would read as success from GetWriteWatch): ERROR_NOT_SUPPORTED."""
    spec = importlib.util.spec_from_file_location(
        "translation_layer_build", EXAMPLES_DIR / "translation_layer" / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build
    spec.loader.exec_module(build)
    built = build.build()
    if built.program is None:
        pytest.skip("no shared libpython: the program is only built as a library")
    # A writewatch that cannot be imported, found before any real one.
    (tmp_path / "writewatch.py").write_text("raise ImportError('not today')\n")
    result = subprocess.run([str(built.program), "--small"], capture_output=True, text=True,
                            timeout=patience(60), env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert "writewatch could not be started" in result.stderr
    assert "VirtualAlloc(MEM_WRITE_WATCH) failed, error 50" in result.stdout
    assert "API checks: 0 of" in result.stdout


# -- python -m writewatch demo NAME


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_demo_name_runs_the_example(name):
    if name == "translation_layer" and shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("no C compiler")
    if not HERE:
        pytest.skip("no write-watch backend here")
    result = run("-m", "writewatch", "demo", name, "--small")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


def test_demo_passes_the_examples_exit_status_on():
    result = run("-m", "writewatch", "demo", "conformance", "no_such_module:Nothing")
    assert result.returncode == 2
    assert "cannot load an implementation" in result.stderr


def test_demo_lists_the_examples_and_refuses_others():
    help_text = run("-m", "writewatch", "demo", "--help").stdout
    for name in EXAMPLES:
        assert name in help_text
    result = run("-m", "writewatch", "demo", "tetris")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


# -- your own C program against libwinshim.so

OWN_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <windows.h>

int main(int argc, char **argv)
{
    SIZE_T size = 16 * 4096;
    char *base = VirtualAlloc(NULL, size, MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH,
                              PAGE_READWRITE);
    PVOID addresses[16];
    ULONG_PTR count = 16;
    ULONG granularity;
    if (!base) {
        printf("VirtualAlloc failed, error %u\n", (unsigned)GetLastError());
        return 1;
    }
    base[5 * 4096] = 1;
    if (GetWriteWatch(WRITE_WATCH_FLAG_RESET, base, size, addresses, &count, &granularity))
        return 1;
    printf("%s: %lu page(s), page %ld\n", argc > 1 ? argv[1] : "", (unsigned long)count,
           count ? (long)(((char *)addresses[0] - base) / 4096) : -1L);
    /* What the library set up for the embedded interpreter is not left to
       the program's own children. */
    printf("PYTHONHOME %s, PYTHONPATH %s\n", getenv("PYTHONHOME") ? "set" : "unset",
           getenv("PYTHONPATH") ? "set" : "unset");
    return VirtualFree(base, 0, MEM_RELEASE) ? 0 : 1;
}
"""


@pytest.mark.any_backend
def test_build_py_help_names_its_options():
    result = run(str(EXAMPLES_DIR / "translation_layer" / "build.py"), "--help")
    assert result.returncode == 0, result.stderr
    assert "--flags" in result.stdout and "--run" in result.stdout


@pytest.mark.any_backend
def test_libwinshim_imports_the_writewatch_it_was_built_from():
    """The embedded interpreter is the base one (not a virtual environment's),
    whose site-packages may hold no writewatch or another one."""
    spec = importlib.util.spec_from_file_location(
        "translation_layer_build", EXAMPLES_DIR / "translation_layer" / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    code = build.path_prelude() + "import writewatch, numpy; print(writewatch.__file__)"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    base = getattr(sys, "_base_executable", sys.executable)
    result = subprocess.run([base, "-c", code], capture_output=True, text=True, timeout=60,
                            env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == Path(ww.__file__).resolve()


@needs_a_compiler
@pytest.mark.any_backend
def test_your_own_c_program_runs_without_pythonpath_or_ld_library_path(tmp_path):
    """From any virtual environment: the embedded interpreter is the base one,
    whose site-packages may lack cffi (fails there without the library's
    constructor handing it the import paths; CI runs this on 3.10, 3.12 and
    3.13, whose base interpreters have no cffi)."""
    source = tmp_path / "prog.c"
    source.write_text(OWN_PROGRAM)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    build_py = str(EXAMPLES_DIR / "translation_layer" / "build.py")
    result = subprocess.run([sys.executable, build_py, "-q", "--run", str(source), "hello"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    if "no shared libpython" in result.stderr:
        pytest.skip("no shared libpython: a C program cannot embed Python here")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello: 1 page(s), page 5" in result.stdout
    assert "PYTHONHOME unset, PYTHONPATH unset" in result.stdout
    flags = subprocess.run([sys.executable, build_py, "--flags"], capture_output=True,
                           text=True, timeout=300, env=env, cwd=tmp_path)
    assert flags.returncode == 0 and "-lwinshim" in flags.stdout and "-rpath" in flags.stdout
    program = tmp_path / "prog"
    compile_line = flags.stdout.split()
    compile_line[compile_line.index("prog.c")] = str(source)
    compile_line[compile_line.index("prog")] = str(program)
    assert subprocess.run(compile_line, timeout=300).returncode == 0
    result = subprocess.run([str(program), "again"], capture_output=True, text=True,
                            timeout=60, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "again: 1 page(s), page 5" in result.stdout
