"""python -m writewatch info / demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from forking import patience

import writewatch as ww
from writewatch import kernel
from writewatch.__main__ import main


def run_cli_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "writewatch", *args], capture_output=True,
                          text=True, timeout=patience(60), env={**os.environ, **env})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli_env({}, *args)


def test_info_names_the_mechanism_and_each_feature():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    caps = ww.probe()
    assert caps.kernel_release in result.stdout
    for feature in ("userfaultfd", "WP_ASYNC", "PAGEMAP_SCAN", "soft-dirty"):
        assert feature in result.stdout
    assert f"Using the {kernel.backend().name} backend" in result.stdout
    for name, reason in kernel.backend_status().items():
        mark = "[no ]" if reason else "[yes]"
        assert f"{mark} {name:<9} {reason or ''}" in result.stdout


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
    result = run_cli("info", "--json")
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


