"""Where Ray's own log lines go: to a file, never between the project's lines (unless verbose).

Left alone, a driver prints every Ray process's stdout and stderr (``log_to_driver``: Serve's
controller, proxies and replicas log each HAProxy spawn and port allocation), plus the INFO
lines of the ``ray`` and ``ray.serve`` loggers in the driver itself. edgemeta keeps the console
for its own lines and progress bars:

* :func:`init_kwargs` is what every ``ray.init`` of the project adds: ``log_to_driver`` off and
  the ``ray`` logger at WARNING, unless verbose. Ray's processes still write their own log
  files in the session's ``logs`` folder (``<temp dir>/session_latest/logs``; for the local
  launcher's cluster, under its state folder).
* :func:`route_driver_logs` moves the driver's Ray loggers off the console: every record to a
  log file (the run folder's ``logs/ray-driver.log``), and a WARNING or worse also as one line
  of the project's own (``ray warning: <first line> (details: <file>)``).

Verbose (``--verbose`` on the command line, or ``EDGEMETA_VERBOSE=1``, which a command sets so
that everything it calls sees it) leaves Ray as it is: every line on the console.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cluster.console import Printer

VERBOSE_ENV = "EDGEMETA_VERBOSE"
#: The driver-side loggers of the Ray libraries the project uses.
RAY_LOGGERS = ("ray", "ray.serve", "ray.tune", "ray.train", "ray.data")
DRIVER_LOG = "ray-driver.log"
_MARK = "_edgemeta_route"


def verbose() -> bool:
    """Whether Ray's lines should reach the console (``EDGEMETA_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Set verbosity for this process and the Ray processes it starts (an environment variable,
    so a job driver or a Tune trial inherits it)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def init_kwargs() -> dict[str, Any]:
    """Arguments of ``ray.init`` that keep Ray's processes' output off the driver's console."""
    on = verbose()
    return {"log_to_driver": on, "logging_level": logging.INFO if on else logging.WARNING}


class OneLine(logging.Handler):
    """A Ray WARNING (or worse) as one line of the project's own, pointing at the full text."""

    def __init__(self, echo: Printer, details: Path | None) -> None:
        super().__init__(logging.WARNING)
        self.echo = echo
        self.details = details

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first = record.getMessage().strip().splitlines()[0] if record.msg else ""
        except Exception:  # a malformed record must not break the run
            first = str(record.msg)
        if len(first) > 160:
            first = first[:157] + "..."
        where = f" (details: {self.details})" if self.details else ""
        self.echo(f"ray {record.levelname.lower()}: {first}{where}")


def route_driver_logs(log_dir: str | Path | None, echo: Printer,
                      names: Iterable[str] = RAY_LOGGERS) -> Path | None:
    """Send the driver's Ray loggers to ``log_dir/ray-driver.log`` (INFO and up) and their
    warnings to ``echo`` as one line each; returns the file. Does nothing when verbose.

    Call it after importing the Ray libraries in use (``ray.serve`` installs its console
    handler when imported) and again after ``ray.init`` (which sets the ``ray`` logger up).
    Idempotent: handlers it added before are replaced, not doubled.
    """
    if verbose():
        return None
    path = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(log_dir) / DRIVER_LOG
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if getattr(handler, _MARK, False) or _is_console(handler):
                logger.removeHandler(handler)
                if getattr(handler, _MARK, False):
                    handler.close()
        added: list[logging.Handler] = [OneLine(echo, path)]
        if path is not None:
            file_handler = logging.FileHandler(path, encoding="utf-8")
            file_handler.setLevel(logging.INFO)
            file_handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s -- %(message)s"))
            added.append(file_handler)
        for handler in added:
            setattr(handler, _MARK, True)
            logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    return path


def log_dir_for(run_dir: str | os.PathLike[str]) -> Path:
    """Where this process writes a run's log files: ``RUN/logs`` for a local run folder; for a
    run in object storage (``s3://...``), a local folder named after it (a log handler needs a
    local file)."""
    where = str(run_dir)  # a run-storage Location prints its URI; it is no local path
    scheme, sep, rest = where.partition("://")
    if sep and scheme.lower() != "file":
        name = rest.rstrip("/").rsplit("/", 1)[-1] or "run"
        return Path(tempfile.gettempdir()) / "edgemeta-logs" / name
    return Path(rest if sep else where) / "logs"


def _is_console(handler: logging.Handler) -> bool:
    import sys

    return (isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stderr, sys.stdout,
                                                     sys.__stderr__, sys.__stdout__))

