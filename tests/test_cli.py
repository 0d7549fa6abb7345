"""The command line, python -m writewatch info / demo: info reports the kernel's
features and each backend's availability as probe() sees them (text and JSON)
and ends quietly into a closed pipe; demo passes, fails loudly on a wrong
report, and refuses too few pages."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
from forking import patience

import writewatch as ww
from writewatch import backends
from writewatch.__main__ import main


def run_cli_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "writewatch", *args], capture_output=True,
                          text=True, timeout=patience(60), env={**os.environ, **env})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli_env({}, *args)


def info_output(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m writewatch info ARGS`, run once per backend under test for the
    tests that only read it (a fresh interpreter costs seconds on an emulated
    CPU)."""
    return _info_output(os.environ.get(backends.BACKEND_ENV, ""), *args)


@functools.cache
def _info_output(backend_env: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("info", *args)  # the environment carries backend_env


def test_info_names_the_mechanism_and_each_feature():
    result = info_output()
    assert result.returncode == 0, result.stderr
    caps = ww.probe()
    assert caps.kernel_release in result.stdout
    for feature in ("userfaultfd", "WP_ASYNC", "PAGEMAP_SCAN", "soft-dirty"):
        assert feature in result.stdout
    assert f"Using the {backends.backend().name} backend" in result.stdout
    for name, reason in backends.backend_status().items():
        mark = "[no ]" if reason else "[yes]"
        assert f"{mark} {name:<9} {reason or ''}" in result.stdout


def test_info_and_probe_name_the_kernel_features_each_backend_relies_on():
    """Each feature a backend requires is present wherever that backend is
    available, and info lists every feature with its role and Linux version."""
    caps = ww.probe()
    status = backends.backend_status()
    names = {feature.name for feature in caps.features}
    assert {"userfaultfd", "UFFD WP_ASYNC", "UFFD WP_UNPOPULATED", "PAGEMAP_SCAN",
            "UFFD write-protect", "MADV_POPULATE_WRITE", "PAGE_IS_SOFT_DIRTY category"} <= names
    for feature in caps.features:
        for backend in feature.required_by:
            if not status[backend]:
                assert feature.present, f"{backend} runs here without {feature.name}"
    by_name = {feature.name: feature for feature in caps.features}
    assert by_name["UFFD WP_ASYNC"].present == caps.wp_async
    assert by_name["UFFD WP_UNPOPULATED"].present == caps.wp_unpopulated
    assert by_name["PAGEMAP_SCAN"].present == caps.pagemap_scan
    with open("/proc/sys/vm/max_map_count") as f:
        assert caps.max_map_count == int(f.read())
    result = info_output()
    for feature in caps.features:
        mark = "[yes]" if feature.present else "[no ]"
        assert f"{mark} {feature.name:<28} Linux {feature.since:<5} {feature.role}" \
            in result.stdout
    reported = json.loads(info_output("--json").stdout)
    assert [each["name"] for each in reported["features"]] == [f.name for f in caps.features]


def test_output_into_a_closed_pipe_ends_quietly():
    """`python -m writewatch info | head -1`: no traceback when the reader leaves."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "writewatch", "info"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=patience(60))
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""


def test_info_says_why_an_explicit_backend_is_refused():
    result = run_cli_env({"WRITEWATCH_BACKEND": "bogus"}, "info")
    assert "No usable backend" in result.stdout
    assert "names no backend" in result.stdout


def test_info_json_matches_probe():
    result = info_output("--json")
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    caps = ww.probe().as_dict()
    assert reported["kernel_release"] == caps["kernel_release"]
    assert reported["pagemap_backend"] == caps["pagemap_backend"]
    assert reported["soft_dirty"] == caps["soft_dirty"]


def test_probe_agrees_with_the_kernel():
    """The probe's answers are what the system itself says."""
    caps = ww.probe()
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        assert caps.unprivileged_userfaultfd == int(f.read())
    assert caps.kernel_release == os.uname().release
    assert caps.kernel_version[:2] == tuple(int(x) for x in
                                            caps.kernel_release.split(".")[:2])
    if caps.pagemap_backend:
        assert caps.userfaultfd and caps.wp_async and caps.wp_unpopulated and caps.pagemap_scan


def test_demo_passes():
    result = run_cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo passed" in result.stdout
    assert "FAIL" not in result.stdout


def test_demo_exits_nonzero_when_a_report_is_wrong(monkeypatch, capsys):
    real = ww.GetWriteWatch

    def drops_the_last_page(flags, base, size, addresses, count=None):
        ret, found, granularity = real(flags, base, size, addresses, count)
        return ret, max(found - 1, 0), granularity

    monkeypatch.setattr(ww, "GetWriteWatch", drops_the_last_page)
    assert main(["demo"]) == 1
    assert "demo FAILED" in capsys.readouterr().out


def test_demo_refuses_too_few_pages():
    result = run_cli("demo", "--pages", "4")
    assert result.returncode == 2
    assert "at least 16" in result.stderr




@pytest.mark.any_backend
def test_info_says_what_each_backend_means_for_kernel_writes():
    result = info_output()
    assert "Kernel writes" in result.stdout
    assert "mprotect: fail with EFAULT unless prepared" in result.stdout
    assert "writewatch.read_into" in result.stdout


@pytest.mark.any_backend
def test_version_and_bare_command():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"writewatch {ww.__version__}"
    result = run_cli()
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "info" in result.stdout and "demo" in result.stdout


@pytest.mark.any_backend
def test_info_with_an_unknown_backend_fails_and_names_the_valid_ones():
    for args in (("info",), ("info", "--json")):
        result = run_cli_env({"WRITEWATCH_BACKEND": "bogus"}, *args)
        assert result.returncode != 0
        for name in ("pagemap", "uffd", "mprotect", "auto"):
            assert name in result.stdout + result.stderr


@pytest.mark.any_backend
def test_demo_summarises_long_page_lists():
    result = run_cli("demo", "--pages", "3000")
    assert result.returncode == 0, result.stderr
    assert "(1000 pages)" in result.stdout and "..." in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) < 200


@pytest.mark.any_backend
def test_the_backend_choice_is_logged_once_without_a_doubled_prefix(tmp_path):
    from forking import run_python

    result = run_python("""
        import logging
        logging.basicConfig(level=logging.INFO)
        import writewatch as ww
        ww.WatchedMemory(4096).close()
        ww.WatchedMemory(4096).close()
    """, env={"WRITEWATCH_BACKEND": "auto"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "backend" in line]
    assert len(lines) == 1 and lines[0].startswith("INFO:writewatch:using the ")
    assert lines[0].count("writewatch") == 1


@pytest.mark.any_backend
def test_the_console_script_names_itself_and_ends_quietly_into_a_closed_pipe():
    script = os.path.join(os.path.dirname(sys.executable), "writewatch")
    if not os.path.exists(script):
        pytest.skip("the writewatch script is not installed beside this interpreter")
    result = subprocess.run([script, "--help"], capture_output=True, text=True,
                            timeout=patience(60))
    assert result.returncode == 0 and result.stdout.startswith("usage: writewatch ")
    # Unbuffered (as in CI and containers), info's second line meets the closed pipe.
    result = subprocess.run(f"'{script}' info | head -1", shell=True, capture_output=True,
                            text=True, timeout=patience(60),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.stdout.startswith("writewatch ") and len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert "usage: python -m writewatch " in run_cli("--help").stdout


@pytest.mark.any_backend
def test_demo_with_an_unknown_backend_answers_like_info():
    result = run_cli_env({"WRITEWATCH_BACKEND": "bogus"}, "demo")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("writewatch: WRITEWATCH_BACKEND='bogus' names no backend")


def test_demo_says_which_backend_it_used():
    assert f"with the {backends.backend().name} backend" in run_cli("demo").stdout


@pytest.mark.any_backend
def test_info_and_the_package_import_no_tooling():
    """The benchmark and the testing tools are imported only when used; the
    benchmark's scenario 6 (scale.py) does not import the runner back."""
    from forking import run_python

    result = run_python("""
        import contextlib, io, sys
        import writewatch
        from writewatch.__main__ import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["info"])
            main(["--help"])
        print(sorted(name for name in sys.modules
                     if name.startswith(("writewatch.bench", "writewatch.testing"))))
        import writewatch.bench.scale
        print("writewatch.bench.runner" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "False"]
