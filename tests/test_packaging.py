"""What a user installing writewatch sees: a licence, project links, and a
documented command for a wheel that installs without a compiler."""

from __future__ import annotations

import os
import subprocess
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
    for step in ("pip wheel", "auditwheel repair", "no compiler"):
        assert step in result.stdout
    assert subprocess.run([str(script), "--bogus"], capture_output=True,
                          timeout=60).returncode == 2
    assert "tools/build-wheel" in (ROOT / "README.md").read_text()
