"""Stop a long run between steps, not in the middle of one.

Why: a training run that is stopped with Ctrl-C or ``kill`` (a scheduler's SIGTERM, a
``ray job stop``) should lose nothing. Inside :class:`StopRequests` the first SIGINT or SIGTERM
only sets a flag; the loop checks it after each step, saves a checkpoint and returns, so the
same command resumes exactly there. A second signal acts at once, as if nothing were installed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager: ``.signal`` is the first SIGINT/SIGTERM received inside it, or None.

    Outside the main thread (where Python cannot install handlers) it does nothing, and the
    signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # second signal: do what it would have done
            self._restore()
            signal.raise_signal(signum)
            return
        self.signal = signal.Signals(signum)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()


def exit_code(summary: dict[str, Any]) -> int:
    """A command's exit status for a run's summary: 128 + the signal's number when a signal
    stopped it (the shell's convention: 130 for Ctrl-C, 143 for SIGTERM), else 0."""
    stopped = summary.get("stopped_by")
    return 128 + signal.Signals[stopped].value if stopped else 0
