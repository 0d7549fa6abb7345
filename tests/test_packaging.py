"""What a user installing writewatch sees: a licence, project links, and a
documented command for a wheel that installs without a compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.any_backend


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_licence_is_an_spdx_expression_with_its_file():
    project = pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the writewatch authors" in text
    # setuptools reads SPDX expressions from 77 on
    assert any(req.replace(" ", "").startswith("setuptools>=77")
               for req in pyproject()["build-system"]["requires"])


def test_the_project_links_are_given():
    urls = pyproject()["project"]["urls"]
    assert {"Homepage", "Source", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def test_the_wheel_command_is_executable_documented_and_named_in_the_readme():
    script = ROOT / "tools" / "build-wheel"
    assert os.access(script, os.X_OK)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for step in ("pip wheel", "auditwheel repair", "no compiler", "cp310-abi3",
                 "manylinux_2_17", "ziglang"):
        assert step in result.stdout
    assert subprocess.run([str(script), "--bogus"], capture_output=True,
                          timeout=60).returncode == 2
    assert "tools/build-wheel" in (ROOT / "README.md").read_text()


def test_classifiers_name_each_supported_python_and_typing():
    project = pyproject()["project"]
    assert project["requires-python"] == ">=3.10"
    classifiers = project["classifiers"]
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Typing :: Typed" in classifiers
    assert (ROOT / "writewatch" / "py.typed").exists()


def test_the_version_is_written_once():
    """pyproject.toml takes it from writewatch.__version__; the installed
    metadata agrees."""
    from importlib import metadata

    import writewatch

    project = pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "writewatch.__version__"}
    assert metadata.version("writewatch") == writewatch.__version__


def test_the_sdist_manifest_carries_the_build_script_sources_and_tests():
    """pip builds an sdist from what MANIFEST.in and the package data list:
    without build_native.py it cannot build at all, and the tests need their
    conftest.py and helper modules (CI builds, installs and runs one)."""
    manifest = (ROOT / "MANIFEST.in").read_text().split("\n")
    for line in ("include build_native.py LICENSE README.md", "graft writewatch",
                 "graft tests", "graft examples", "graft docs"):
        assert line in manifest
    assert (ROOT / "tests" / "conftest.py").exists()


NO_SETUPTOOLS = """
import os, sys
sys.modules["setuptools"] = sys.modules["distutils"] = None   # as in a 3.12+ venv
from pathlib import Path
from writewatch.bench import model
from writewatch.testing import cbuild

assert model.reference().lib.wwb_segv_first is not None      # compiled at install time
cache = Path(sys.argv[1])
add = cbuild.build_cached("add", "int add(int, int);", "int add(int a, int b) { return a + b; }",
                          cache=cache)
assert add.lib.add(2, 3) == 5
os.environ["PATH"] = ""
os.environ.pop("CC", None)
try:
    cbuild.build_cached("sub", "int sub(int, int);", "int sub(int a, int b) { return a - b; }",
                        cache=cache)
except cbuild.CompilerMissingError as exc:
    print(exc)
"""


def test_nothing_at_run_time_needs_setuptools(tmp_path):
    """Virtual environments on Python 3.12+ have no setuptools: the bench's
    reference is compiled at install time, the tests' C helpers are compiled
    by calling the compiler directly, and without one the error says what to
    install."""
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("no C compiler")
    result = subprocess.run([sys.executable, "-c", NO_SETUPTOOLS, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs a C compiler: install gcc" in result.stdout
