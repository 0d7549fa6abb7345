"""Every Python block in README.md runs as written.

Each block runs in a fresh interpreter from an empty temporary directory (so
that it cannot lean on the checkout's files or on another block's names);
blocks that need a file or a socket make their own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from forking import run_python

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, match.start()) + 1, match.group(1))
            for match in BLOCK.finditer(text)]


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("line, code", python_blocks(),
                         ids=[f"line{line}" for line, _ in python_blocks()])
def test_readme_block_runs_as_written(line: int, code: str, tmp_path: Path,
                                      write_watch_backend: str | None) -> None:
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, f"README.md line {line}:\n{code}\n{result.stderr}"
