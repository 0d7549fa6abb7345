"""The write-watch backends, one module each, and the choice between them.

Best first:
- ``pagemap`` (pagemap.py): userfaultfd async write-protect + PAGEMAP_SCAN,
  Linux 6.7+;
- ``uffd`` (uffd.py): synchronous userfaultfd write-protect with a native
  handler thread, Linux 5.7+;
- ``mprotect`` (mprotect.py): read-only pages and a native SIGSEGV handler,
  any Linux, any sandbox.
Each implements kernel.Backend. "auto" picks the best one this machine runs:
native/mechanism.c decides, for this package and for libprocess_memwatch alike.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any, Literal, cast

from writewatch import kernel
from writewatch.backends import uffd
from writewatch.backends.mprotect import MprotectBackend
from writewatch.backends.pagemap import PagemapBackend
from writewatch.backends.uffd import UffdBackend
from writewatch.kernel import lib
from writewatch.probe import probe

BackendName = Literal["auto", "pagemap", "uffd", "mprotect"]
BACKEND_ENV = "WRITEWATCH_BACKEND"

log = logging.getLogger("writewatch")


def _release_from_pagemap(start: int, end: int) -> bool:
    """Have the pagemap backend stop watching [start, end) if it runs here (the
    uffd backend met its registration: EBUSY)."""
    if backend_status().get("pagemap"):
        return False
    try:
        _backends["pagemap"].memwatch_unwatch(start, end)
    except OSError:
        return False
    return True


_backends: dict[str, kernel.Backend] = {
    each.name: each for each in (PagemapBackend(), UffdBackend(_release_from_pagemap),
                                 MprotectBackend())
}
_by_mode = {lib.WW_MODE_PAGEMAP: "pagemap", lib.WW_MODE_UFFD: "uffd",
            lib.WW_MODE_MPROTECT: "mprotect"}
_lock = threading.Lock()
_unavailable: dict[str, str] | None = None
_auto_choice: str | None = None


class BackendUnavailableError(OSError):
    """The requested write-watch backend does not work on this machine."""


def backend_names() -> list[str]:
    """Every backend writewatch knows, available here or not, best first."""
    return sorted(_backends, key=lambda name: -_backends[name].preference)


def all_backends() -> list[kernel.Backend]:
    """Every backend object, best first."""
    return [_backends[name] for name in backend_names()]


def backend_status() -> dict[str, str]:
    """Each backend's name -> "" if it works here, else why not (probed once)."""
    global _unavailable
    with _lock:
        if _unavailable is None:
            caps = probe()
            _unavailable = {name: _backends[name].unavailable_reason(caps)
                            for name in backend_names()}
        return dict(_unavailable)


def available_backends() -> list[kernel.Backend]:
    """The backends this machine runs, best first."""
    status = backend_status()
    return [each for each in all_backends() if not status[each.name]]


def backend_report() -> list[dict[str, Any]]:
    """Each backend, best first: name, available, and what it is or why not."""
    status = backend_status()
    return [{"name": name, "available": not status[name],
             "detail": status[name] or _backends[name].summary} for name in backend_names()]


def _unknown(name: str, where: str) -> ValueError:
    return ValueError(f"{where}{name!r} names no backend; choose one of "
                      f"{', '.join(backend_names())} or auto")


def checked_name(name: str) -> BackendName:
    """name as a BackendName, for names read at run time (ValueError if it
    names no backend)."""
    if name != "auto" and name not in _backends:
        raise _unknown(name, "")
    return cast(BackendName, name)


def requested_backend() -> str:
    """The backend WRITEWATCH_BACKEND asks for ("auto" when unset), read as
    libprocess_memwatch reads it (native/mechanism.c)."""
    value = os.environ.get(BACKEND_ENV, "")
    mode = lib.ww_mechanism_named(os.fsencode(value))
    if mode < 0:
        raise _unknown(value.strip(), f"{BACKEND_ENV}=")
    return _by_mode[mode] if mode else "auto"


def backend(name: str = "auto") -> kernel.Backend:
    """The backend to watch new memory with.

    "auto" means what WRITEWATCH_BACKEND says, or else the best backend that
    works here (chosen once per process and logged). An explicit request for a
    backend this machine cannot run raises BackendUnavailableError saying why;
    it never switches silently."""
    global _auto_choice
    if name == "auto":
        name = requested_backend()
    if name == "auto":
        if _auto_choice is None:
            _auto_choice = _by_mode[lib.ww_mechanism_best()]
            log.info("using the %s backend", _auto_choice)
        name = _auto_choice
    if name not in _backends:
        raise _unknown(name, "")
    reason = backend_status()[name]
    if reason:
        raise BackendUnavailableError(errno.ENOSYS, f"{name} backend unavailable: {reason}")
    return _backends[name]


def _forget_process_state() -> None:
    for each in _backends.values():
        each.forget_process_state()


kernel.on_fork("backends", before=uffd.pause_handler, parent=uffd.resume_handler,
               child=_forget_process_state)
