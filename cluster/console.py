"""One name for "where a command's lines go": every layer that talks to a person takes a
:data:`Printer` (``print`` by default), so a test, the demo or a job can redirect it."""

from __future__ import annotations

from collections.abc import Callable

Printer = Callable[[str], None]
