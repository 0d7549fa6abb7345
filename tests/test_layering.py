"""The package's shape, as the project's rules state it: every -errno has one
decoder (kernel.check / kernel.oserror)."""

from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import pytest

from writewatch import index, kernel, memwatch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "writewatch"

pytestmark = pytest.mark.any_backend


def product_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


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
    assert memwatch._memwatch_check(3) == 3
    for err, kind in ((errno.EINVAL, OSError), (errno.ESRCH, ProcessLookupError)):
        with pytest.raises(kind) as caught:
            memwatch._memwatch_check(-err)
        assert caught.value.errno == err
        assert caught.value.strerror == f"process_memwatch: {os.strerror(err)}"
    with pytest.raises(OSError) as caught:
        memwatch._memwatch_check(-errno.EFAULT)
    assert caught.value.errno == errno.EIO
    assert caught.value.strerror == "PAGEMAP_SCAN failed: Bad address"


def test_the_index_shifts_its_kernel_failures_back_to_errno():
    with pytest.raises(PermissionError) as caught:
        index._verdict(-(kernel.lib.WW_INDEX_ERRNO_BASE + errno.EPERM), "GetWriteWatch scan")
    assert caught.value.errno == errno.EPERM
    assert caught.value.strerror == "GetWriteWatch scan: Operation not permitted"
    with pytest.raises(index.RefusedError) as refused:
        index._verdict(-(kernel.lib.WW_REFUSED_BASE + index.REFUSED_SIZE), "GetWriteWatch")
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
