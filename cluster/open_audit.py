"""Which files a process opens: the evidence that a site's data stays at its site (off by
default).

With ``EDGEMETA_AUDIT_OPENS`` set to a folder in a process's environment (Ray workers inherit
their raylet's), :func:`install` adds a Python audit hook (PEP 578, ``sys.addaudithook``) that
records the path of every ``open`` event (``open``, ``io.open_code``, ``os.open``): each new
path once, in memory (:func:`opened`) and appended to ``<folder>/<role>-<pid>.log``, so that a
one-shot task's record outlives its worker. Unset, nothing is installed and nothing is paid.
An audit hook cannot be removed; :func:`recording` switches one off again in a process that
lives on (a test's driver).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "EDGEMETA_AUDIT_OPENS"

_lock = threading.Lock()
_seen: set[str] = set()
_state: dict[str, int | bool | None] = {"fd": None, "on": False, "hooked": False}


def _hook(event: str, args: tuple) -> None:
    if event != "open" or not _state["on"]:
        return
    path = args[0] if args else None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str):
        return  # a file descriptor: its path was recorded when it was opened
    path = os.path.abspath(path)
    if path in _seen:
        return
    _seen.add(path)
    fd = _state["fd"]
    if isinstance(fd, int):
        os.write(fd, (path + "\n").encode(errors="surrogateescape"))


def install(role: str, folder: str | Path | None = None) -> bool:
    """Record this process's opens from now on, as ``role`` (``edge.site-0``, ``cloud``), if
    ``folder`` or ``$EDGEMETA_AUDIT_OPENS`` names a folder; True if recording."""
    where = folder if folder is not None else os.environ.get(ENV)
    if not where:
        return False
    with _lock:
        if _state["fd"] is None:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", role)
            Path(where).mkdir(parents=True, exist_ok=True)
            _state["fd"] = os.open(Path(where) / f"{name}-{os.getpid()}.log",
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _state["on"] = True
        if not _state["hooked"]:
            sys.addaudithook(_hook)
            _state["hooked"] = True
    return True


def opened() -> list[str]:
    """Every path this process opened while recording, sorted."""
    return sorted(_seen)


@contextmanager
def recording(role: str, folder: str | Path) -> Iterator[None]:
    """Record this process's opens inside the block only (the hook stays, switched off)."""
    _seen.clear()
    install(role, folder)
    try:
        yield
    finally:
        with _lock:
            _state["on"] = False
            fd = _state["fd"]
            _state["fd"] = None
        if isinstance(fd, int):
            os.close(fd)


def read_records(folder: str | Path) -> dict[str, set[str]]:
    """``{role-pid: paths}`` of every log in ``folder``."""
    return {p.stem: set(p.read_text().splitlines()) for p in Path(folder).glob("*.log")}
