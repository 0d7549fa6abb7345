"""What `info` and the probe say when userfaultfd is denied: by what, and how
to allow it (writewatch/sandbox.py). tools/sandbox-tests runs the whole suite
in each sandbox; these tests also make one themselves with the seccomp
launcher it uses."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from forking import run_forked

import writewatch as ww
from writewatch import sandbox

pytestmark = pytest.mark.any_backend  # about the machine, not a backend

LAUNCHER_SOURCE = Path(__file__).resolve().parent.parent / "tools" / "seccomp_deny_userfaultfd.c"
CC = os.environ.get("CC", "gcc")


def run_info(*args: str, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "WRITEWATCH_BACKEND"}
    return subprocess.run([*wrapper, sys.executable, "-m", "writewatch", "info", *args],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which(CC) is None:
        pytest.skip(f"no C compiler ({CC}) to build tools/seccomp_deny_userfaultfd.c")
    program = tmp_path_factory.mktemp("seccomp") / "seccomp_deny_userfaultfd"
    subprocess.run([CC, "-O2", "-Wall", "-Werror", "-o", str(program), str(LAUNCHER_SOURCE)],
                   check=True, timeout=120)
    return str(program)


@pytest.mark.parametrize("denied_errno", ["EPERM", "ENOSYS"])
def test_info_under_a_seccomp_filter_names_it_and_the_fix(launcher, denied_errno):
    wrapper = (launcher, f"--errno={denied_errno}")
    report = json.loads(run_info("--json", wrapper=wrapper).stdout)
    assert report["backend"] == "mprotect"
    assert not report["userfaultfd"]
    [denial] = report["denied"]
    assert denial["by"] == "seccomp"
    assert "seccomp filter" in denial["detail"] and denied_errno in denial["detail"]
    assert "--security-opt seccomp=" in denial["remedy"]
    for each in report["backends"]:
        if each["name"] != "mprotect":
            assert not each["available"] and "seccomp filter" in each["detail"]

    text = run_info(wrapper=wrapper).stdout
    assert "Using the mprotect backend" in text
    assert f"userfaultfd, by seccomp: {denial['detail']}." in text
    assert f"To allow it: {denial['remedy']}." in text
    assert "fallback" in text and "prepare_kernel_write" in text


def test_info_explains_what_is_denied_here():
    """Whatever this machine (or the sandbox running the suite) denies, info
    names it and the way to allow it; with nothing denied it says nothing."""
    denied = sandbox.current_denials()
    caps = ww.probe()
    result = run_info()
    assert result.returncode == 0, result.stderr
    for denial in denied:
        assert denial.detail in result.stdout
        assert denial.remedy in result.stdout
    if denied:
        assert "Denied here:" in result.stdout
    else:
        assert "Denied here:" not in result.stdout
        assert caps.userfaultfd
    if not caps.userfaultfd:
        assert denied and denied[0].detail == caps.userfaultfd_detail
        if caps.seccomp_mode == 2:
            assert denied[0].by == "seccomp" and "seccomp" in result.stdout


def test_kernel_mode_restriction_is_reported_exactly_when_it_applies():
    """vm.unprivileged_userfaultfd = 0 without CAP_SYS_PTRACE leaves
    userfaultfd for user-mode faults only: reported with the sysctl to change."""
    limited = sandbox.kernel_faults_denial()
    seen = sandbox.facts()
    if not ww.probe().userfaultfd:
        assert limited is None  # denied altogether: userfaultfd_denial says why
    elif seen.unprivileged_userfaultfd == 0 and not seen.cap_sys_ptrace:
        assert limited is not None
        assert "vm.unprivileged_userfaultfd = 0" in limited.detail
        assert "prepare_kernel_write" in limited.detail
        assert "sysctl -w vm.unprivileged_userfaultfd=1" in limited.remedy
        assert "CAP_SYS_PTRACE" in limited.remedy
    else:
        assert limited is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_unprivileged_user_is_told_about_the_sysctl():
    with open(sandbox.SYSCTL) as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd is not 0 here: nothing is restricted")

    def unprivileged() -> dict[str, object] | None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        limited = sandbox.kernel_faults_denial()
        return limited.as_dict() if limited else None

    limited = run_forked(unprivileged)
    assert limited is not None
    assert limited["by"] == "sysctl"
    assert "lacks CAP_SYS_PTRACE" in limited["detail"]


def facts(**overrides: object) -> sandbox.Facts:
    seen: dict[str, object] = {"kernel_version": (6, 18), "seccomp_mode": 0,
                               "unprivileged_userfaultfd": 1, "cap_sys_ptrace": False,
                               "invalid_flag_errno": errno.EINVAL}
    seen.update(overrides)
    return sandbox.Facts(**seen)  # type: ignore[arg-type]


@pytest.mark.parametrize(("err", "seen", "by", "words"), [
    (errno.EPERM, facts(seccomp_mode=2, invalid_flag_errno=errno.EPERM), "seccomp",
     ["seccomp filter", "EPERM"]),
    (errno.ENOSYS, facts(seccomp_mode=2, invalid_flag_errno=errno.ENOSYS), "seccomp",
     ["seccomp filter", "ENOSYS"]),
    (errno.ENOSYS, facts(unprivileged_userfaultfd=None, invalid_flag_errno=errno.ENOSYS),
     "kernel", ["CONFIG_USERFAULTFD"]),
    (errno.EPERM, facts(kernel_version=(5, 10), unprivileged_userfaultfd=0,
                        invalid_flag_errno=errno.EPERM), "sysctl",
     ["vm.unprivileged_userfaultfd = 0", "CAP_SYS_PTRACE", "5.11"]),
    (errno.EACCES, facts(), "lsm", ["security module"]),
    (errno.ENOMEM, facts(), "unknown", [os.strerror(errno.ENOMEM)]),
])
def test_each_denier_is_told_apart(err, seen, by, words):
    denial = sandbox.explain(err, seen)
    assert denial.by == by
    for word in words:
        assert word in denial.detail
    if by == "seccomp":
        assert "--security-opt seccomp=" in denial.remedy
        assert "CAP_SYS_PTRACE does not help" in denial.remedy
    if by == "sysctl":
        assert "sysctl -w vm.unprivileged_userfaultfd=1" in denial.remedy


def test_the_c_library_picks_a_fallback_itself_where_userfaultfd_is_denied(launcher,
                                                                          tmp_path):
    """A C program on a machine without userfaultfd (here a seccomp filter
    denies it) gets process_memwatch from the mprotect mechanism, chosen by the
    library itself (native/mechanism.c), not ENOSYS."""
    from memwatch_selftest import assert_c_cases_passed, build_c_cases, run_c_cases
    env = {key: value for key, value in os.environ.items() if key != "WRITEWATCH_BACKEND"}
    assert_c_cases_passed(run_c_cases(build_c_cases(tmp_path), launcher, "--errno=EPERM",
                                      env=env))
