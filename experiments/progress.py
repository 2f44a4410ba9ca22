"""The operator's console: the project's own lines, progress bars, and a live table of sites.

One :class:`RunConsole` per command. On a terminal it draws ``rich`` progress bars (count,
rate, time left) under the scrolling lines, and for a federated run a compact table of the
sites (rounds arrived, late, failed, busy, down; the last status). When the output is not a
terminal (CI, ``ray job logs``, a pipe, ``TERM=dumb``) it writes plain lines only: each bar
becomes a line at every tenth of its way and one when it ends, with no cursor movement or
colour, so a log reads top to bottom.

:attr:`RunConsole.echo` is a :data:`cluster.console.Printer`, so everything that already takes
``echo`` writes through it (above the bars, never through them).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

#: Site statuses counted in the live table, in column order (``ok`` shown as "arrived").
SITE_COLUMNS = (("ok", "arrived"), ("late", "late"), ("failed", "failed"), ("busy", "busy"),
                ("down", "down"))


class RateColumn(ProgressColumn):
    """Steps per second in the bar's own unit (``2.31 rounds/s``)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text("" if speed is None else f"{speed:.2f} {unit}/s", style="progress.data.speed")


class _Display(Progress):
    """Progress bars, then the table of sites when there is one."""

    sites: Table | None = None

    def get_renderables(self) -> Iterator[Any]:
        yield self.make_tasks_table(self.tasks)
        if self.sites is not None:
            yield self.sites


class Bar:
    """One progress bar: advance it as the work goes."""

    def __init__(self, owner: RunConsole, task: TaskID, label: str, unit: str,
                 total: int | None, *, completed: int = 0, plain_lines: bool = True) -> None:
        self._owner, self._task, self.label, self.unit, self.total = owner, task, label, unit, total
        self._plain_lines = plain_lines
        self._next_line = self._milestone(completed)

    def _milestone(self, done: int) -> int:
        """The count at which the next plain line is due: the next tenth of the way."""
        if not self.total or not self._plain_lines:
            return sys.maxsize
        step = max(1, math.ceil(self.total / 10))
        return (done // step + 1) * step

    def advance(self, n: int = 1) -> None:
        progress = self._owner.progress
        progress.advance(self._task, n)
        done = int(progress.tasks[self._index()].completed)
        if not self._owner.live and done >= self._next_line and done < (self.total or 0):
            self._next_line = self._milestone(done)
            self._owner.echo(self._plain(done))

    def _index(self) -> int:
        return next(i for i, t in enumerate(self._owner.progress.tasks) if t.id == self._task)

    def _plain(self, done: int) -> str:
        task = self._owner.progress.tasks[self._index()]
        rate = f", {task.speed:.2f} {self.unit}/s" if task.speed else ""
        left = task.time_remaining
        eta = f", ~{_duration(left)} left" if left is not None else ""
        return f"{self.label}: {done}/{self.total} {self.unit}{rate}{eta}"

    def summary(self) -> str:
        task = self._owner.progress.tasks[self._index()]
        took = task.elapsed or 0.0
        done = int(task.completed)
        what = f"{done}/{self.total} {self.unit}" if self.total else "done"
        rate = f" ({done / took:.2f} {self.unit}/s)" if self.total and took > 0 and done else ""
        return f"{self.label}: {what} in {_duration(took)}{rate}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class RunConsole:
    """Where one command's lines, bars and site table go.

    Args:
        live: draw bars in place (default: when stdout is a terminal, not ``TERM=dumb``).
        console: the ``rich`` console to draw on (default: stdout at the time of writing).
    """

    def __init__(self, *, live: bool | None = None, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.live = (self.console.is_terminal and not self.console.is_dumb_terminal
                     if live is None else live)
        self.progress = _Display(
            SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=30), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("left"), console=self.console,
            disable=not self.live, refresh_per_second=4, redirect_stdout=True,
            redirect_stderr=True, transient=True)  # the bars go; their summary lines stay
        self._open = 0
        self._sites: dict[str, Counter[str]] = {}
        self._last: dict[str, str] = {}

    def echo(self, line: str) -> None:
        """One line of the project's own (a :data:`cluster.console.Printer`)."""
        if self.live:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stdout, flush=True)

    @contextmanager
    def bar(self, label: str, total: int | None, unit: str, *, completed: int = 0,
            summary: bool = True, plain_lines: bool = True) -> Iterator[Bar]:
        """A progress bar for the block (``total`` None: an activity without a count); with
        ``summary``, a line says what it took when the block ends without an error. Off a
        terminal, ``plain_lines`` False keeps the tenths' lines out (when the caller's own
        lines already say where it is)."""
        task = self.progress.add_task(label, total=total, completed=completed, unit=unit)
        bar = Bar(self, task, label, unit, total, completed=completed, plain_lines=plain_lines)
        if self._open == 0 and self.live:
            self.progress.start()
        self._open += 1
        failed = False
        try:
            yield bar
        except BaseException:
            failed = True
            raise
        finally:
            self.progress.stop_task(task)
            if summary and not failed:
                self.echo(bar.summary())
            self.progress.remove_task(task)
            self.progress.sites = None  # the table belongs to the loop that just ended
            self._sites.clear()
            self._last.clear()
            self._open -= 1
            if self._open == 0 and self.live:
                self.progress.stop()

    def sites(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Count a round's per-site statuses into the live table (terminal only)."""
        for row in rows:
            site, status = str(row["site"]), str(row["status"])
            self._sites.setdefault(site, Counter())[status] += 1
            self._last[site] = status
        if self.live:
            self.progress.sites = self.site_table()

    def site_table(self) -> Table:
        """Rounds per site by status so far, and each site's last status."""
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("site")
        for _, title in SITE_COLUMNS:
            table.add_column(title, justify="right")
        table.add_column("last")
        for site in sorted(self._sites):
            counts = self._sites[site]
            last = self._last[site]
            style = "green" if last == "ok" else "red"
            table.add_row(site, *(str(counts.get(k, 0)) for k, _ in SITE_COLUMNS),
                          Text("arrived" if last == "ok" else last, style=style))
        return table

