"""What a user's tools see: typed backend names (mypy catches a misspelt one),
readable reprs, and a docstring on every public name."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import writewatch as ww

pytestmark = pytest.mark.any_backend

USER_SCRIPT = """
import writewatch as ww

good = ww.WatchedMemory(4096, backend="mprotect")
bad = ww.WatchedMemory(4096, backend="pagemapp")
base = ww.VirtualAlloc(0, 4096, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH, ww.PAGE_READWRITE,
                       backend="ufd")
pages = good.written(unit="pages")
"""


def test_mypy_catches_a_misspelt_backend_in_a_user_script(tmp_path: Path) -> None:
    """From outside the checkout, as installed (an editable install too: its
    .pth is a plain path mypy follows, not an import hook)."""
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary",
                             "--cache-dir", str(tmp_path / "cache"), str(script)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items()
                                 if k not in ("MYPYPATH", "PYTHONPATH")})
    errors = [line for line in result.stdout.splitlines()
              if line.startswith("user.py:") and ": error:" in line]
    assert {int(line.split(":")[1]) for line in errors} == {5, 7, 8}, result.stdout
    assert "pagemapp" in result.stdout and "ufd" in result.stdout


def test_virtual_query_prints_hex_addresses_and_named_constants() -> None:
    base = ww.VirtualAlloc(0, 4 * ww.PAGE_SIZE, ww.MEM_RESERVE | ww.MEM_WRITE_WATCH,
                           ww.PAGE_READWRITE)
    try:
        ww.VirtualAlloc(base, ww.PAGE_SIZE, ww.MEM_COMMIT, ww.PAGE_READONLY)
        text = repr(ww.VirtualQuery(base))
        assert f"BaseAddress={base:#x}" in text and f"AllocationBase={base:#x}" in text
        assert "AllocationProtect=PAGE_READWRITE" in text and "Protect=PAGE_READONLY" in text
        assert "State=MEM_COMMIT" in text and "Type=MEM_PRIVATE" in text
        assert f"RegionSize={ww.PAGE_SIZE:#x}" in text
        reserved = repr(ww.VirtualQuery(base + ww.PAGE_SIZE))
        assert "State=MEM_RESERVE" in reserved and "Protect=0," in reserved
    finally:
        ww.VirtualFree(base, 0, ww.MEM_RELEASE)
    assert "State=MEM_FREE" in repr(ww.VirtualQuery(base))
    info = ww.VirtualQuery(base)
    assert info is not None and info.State == ww.MEM_FREE  # still the plain tuple


def test_every_public_function_and_class_has_a_docstring() -> None:
    missing = []
    for name in ww.__all__:
        value = getattr(ww, name)
        if typing.get_origin(value) is typing.Literal:
            continue  # a type alias (BackendName)
        if ((inspect.isfunction(value) or inspect.isclass(value))
                and not (value.__doc__ or "").strip()):
            missing.append(name)
        if inspect.isclass(value):
            for attribute, member in vars(value).items():
                if (not attribute.startswith("_") and callable(member)
                        and not (member.__doc__ or "").strip()):
                    missing.append(f"{name}.{attribute}")
    assert not missing
    assert "WatchedMemory" in (ww.__doc__ or "")


def test_constants_read_as_names_and_stay_ints() -> None:
    """IntFlag/IntEnum, as the stdlib and psutil spell theirs: help() and repr
    name them, while numpy, cffi, JSON and f-strings see the plain numbers."""
    import json

    import numpy as np

    from writewatch.kernel import ffi

    assert "PAGE_READWRITE" in repr(inspect.signature(ww.WatchedMemory).parameters["protect"])
    both = ww.MEM_RESERVE | ww.MEM_COMMIT
    assert isinstance(both, ww.AllocationType) and "MEM_RESERVE" in repr(both) \
        and "MEM_COMMIT" in repr(both)
    assert isinstance(ww.PAGE_READWRITE, ww.Protection)
    assert isinstance(ww.ERROR_NOACCESS, ww.ErrorCode) and ww.ERROR_NOACCESS == 998
    assert isinstance(ww.WRITE_WATCH_FLAG_RESET, ww.WriteWatchFlag)
    for constant in (both, ww.PAGE_READWRITE, ww.ERROR_NOACCESS, ww.MEM_FREE):
        assert isinstance(constant, int)
        assert str(constant) == f"{constant}" == str(int(constant))
        assert f"{constant:#x}" == hex(constant)  # 3.10's Enum.__format__ used str()
        assert json.dumps(constant) == str(int(constant))
        assert np.array([constant]).dtype.kind in "iu"
        assert int(ffi.cast("uint32_t", constant)) == int(constant)
    # ~ is the integer's, as C code expects: unknown bits survive a mask.
    assert 7 & ~ww.WRITE_WATCH_FLAG_RESET == 6
    assert (ww.MEM_RESERVE | ww.MEM_COMMIT) & ~ww.MEM_COMMIT == ww.MEM_RESERVE
