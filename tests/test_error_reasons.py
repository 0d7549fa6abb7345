"""Failures keep their reason: last_error_reason() words the calling thread's
last failure (docs/semantics.md rule 15 lists them), the writewatch logger
says it at DEBUG, and every flag a porter may pass and be refused is exported
and named in the reason."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

import writewatch as ww

P = ww.PAGE_SIZE
RW = ww.MEM_RESERVE | ww.MEM_COMMIT


def test_get_write_watch_keeps_its_reason(watched):
    region = watched()
    out = np.zeros(16, np.uintp)
    assert ww.GetWriteWatch(0, region.base, 0, out)[0] == ww.WRITE_WATCH_FAILED
    assert ww.GetLastError() == ww.ERROR_INVALID_PARAMETER
    assert ww.last_error_reason() == "size is 0"
    assert ww.GetWriteWatch(2, region.base, P, out)[0] == ww.WRITE_WATCH_FAILED
    assert "flags" in ww.last_error_reason()
    assert ww.GetWriteWatch(0, 0, P, out)[0] == ww.WRITE_WATCH_FAILED
    assert ww.last_error_reason() == "0x0 is not in a write-watch region"
    assert ww.ResetWriteWatch(region.base, 0) == ww.WRITE_WATCH_FAILED
    assert ww.last_error_reason() == "size is 0"


def test_success_keeps_the_last_failure_and_set_last_error_clears_it(watched):
    region = watched()
    assert ww.ResetWriteWatch(region.base, 0) == ww.WRITE_WATCH_FAILED
    assert ww.ResetWriteWatch(region.base, P) == 0  # Windows leaves the last error alone
    assert (ww.GetLastError(), ww.last_error_reason()) == (ww.ERROR_INVALID_PARAMETER,
                                                           "size is 0")
    ww.SetLastError(ww.ERROR_INVALID_ADDRESS)
    assert (ww.GetLastError(), ww.last_error_reason()) == (ww.ERROR_INVALID_ADDRESS, "")


@pytest.mark.parametrize(("allocation_type", "name"), [
    (RW | ww.MEM_TOP_DOWN, "MEM_TOP_DOWN"),
    (RW | ww.MEM_LARGE_PAGES, "MEM_LARGE_PAGES"),
    (RW | ww.MEM_PHYSICAL, "MEM_PHYSICAL"),
    (ww.MEM_RESET, "MEM_RESET"),
    (RW | ww.MEM_RESET_UNDO, "MEM_RESET_UNDO"),
    (RW | ww.MEM_RESERVE_PLACEHOLDER, "MEM_RESERVE_PLACEHOLDER"),
    (RW | ww.MEM_TOP_DOWN | 0x8000000, "MEM_TOP_DOWN|0x8000000"),
])
def test_refused_allocation_type_is_named(allocation_type, name):
    assert ww.VirtualAlloc(0, 16 * P, allocation_type, ww.PAGE_READWRITE) == 0
    assert ww.GetLastError() == ww.ERROR_INVALID_PARAMETER
    assert ww.last_error_reason() == f"allocation type {name} is not supported"


@pytest.mark.parametrize(("protect", "name"), [
    (ww.PAGE_EXECUTE, "PAGE_EXECUTE"),
    (ww.PAGE_EXECUTE_READ, "PAGE_EXECUTE_READ"),
    (ww.PAGE_EXECUTE_READWRITE, "PAGE_EXECUTE_READWRITE"),
    (ww.PAGE_EXECUTE_WRITECOPY, "PAGE_EXECUTE_WRITECOPY"),
    (ww.PAGE_WRITECOPY, "PAGE_WRITECOPY"),
    (ww.PAGE_READWRITE | ww.PAGE_GUARD, "PAGE_READWRITE|PAGE_GUARD"),
    (ww.PAGE_READWRITE | ww.PAGE_NOCACHE, "PAGE_READWRITE|PAGE_NOCACHE"),
    (ww.PAGE_READWRITE | ww.PAGE_WRITECOMBINE, "PAGE_READWRITE|PAGE_WRITECOMBINE"),
])
def test_refused_protection_is_named(watched, protect, name):
    assert ww.VirtualAlloc(0, 16 * P, RW | ww.MEM_WRITE_WATCH, protect) == 0
    assert ww.GetLastError() == ww.ERROR_INVALID_PARAMETER
    assert ww.last_error_reason().startswith(f"protection {name} is not supported")
    region = watched()
    assert ww.VirtualProtect(region.base, P, protect) == (False, 0)
    assert ww.last_error_reason().startswith(f"protection {name} is not supported")


def test_sdk_values():
    # winnt.h
    assert (ww.MEM_RESERVE_PLACEHOLDER, ww.MEM_RESET, ww.MEM_TOP_DOWN, ww.MEM_PHYSICAL,
            ww.MEM_RESET_UNDO, ww.MEM_LARGE_PAGES) == (
        0x40000, 0x80000, 0x100000, 0x400000, 0x1000000, 0x20000000)
    assert (ww.PAGE_WRITECOPY, ww.PAGE_EXECUTE, ww.PAGE_EXECUTE_READ,
            ww.PAGE_EXECUTE_READWRITE, ww.PAGE_EXECUTE_WRITECOPY, ww.PAGE_GUARD,
            ww.PAGE_NOCACHE, ww.PAGE_WRITECOMBINE) == (
        0x08, 0x10, 0x20, 0x40, 0x80, 0x100, 0x200, 0x400)


def test_free_type_is_named(watched):
    region = watched()
    assert ww.VirtualFree(region.base, 0, ww.MEM_RELEASE | ww.MEM_DECOMMIT) is False
    assert ww.last_error_reason() == ("free type MEM_DECOMMIT|MEM_RELEASE is not "
                                      "MEM_DECOMMIT or MEM_RELEASE")


def test_reason_is_per_thread(watched):
    region = watched()
    assert ww.ResetWriteWatch(region.base, 0) == ww.WRITE_WATCH_FAILED
    seen: list[str] = []

    def other() -> None:
        seen.append(ww.last_error_reason())
        ww.VirtualAlloc(0, P, RW | ww.MEM_TOP_DOWN, ww.PAGE_READWRITE)
        seen.append(ww.last_error_reason())

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == ["", "allocation type MEM_TOP_DOWN is not supported"]
    assert ww.last_error_reason() == "size is 0"


def test_reason_is_logged_at_debug(watched, caplog):
    region = watched()
    with caplog.at_level(logging.DEBUG, logger="writewatch"):
        out = np.zeros(4, np.uintp)
        ww.GetWriteWatch(0, region.base, 0, out)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("writewatch", logging.DEBUG, "GetWriteWatch failed with 87: size is 0")]
