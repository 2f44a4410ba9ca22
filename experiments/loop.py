"""What every training loop of the project does around its steps, written once.

The centralized trainer counts steps and the federated driver counts rounds, but both resume
from the latest checkpoint of their run folder, stop on SIGINT/SIGTERM after the step at hand
(with a checkpoint, so the same command resumes), stop when the time budget is spent, and
checkpoint every ``checkpoint_every`` steps and at the end. A loop reads::

    with RunLoop(run_dir, unit="step", total=..., checkpoint_every=..., ...) as loop:
        state = loop.resume(outer) if resume else None  # restore what else the body needs
        for step in loop.steps(save=checkpoint):
            ...                                          # one step; loop.count(its seconds)
    if loop.stopped_by:                                  # a signal ended it: no meta-test
        return loop.stopped_summary(name)

Inside the ``with`` block the first SIGINT/SIGTERM only asks the loop to stop after the step
at hand (:class:`~experiments.stopping.StopRequests`); outside it, signals act as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from cluster.console import Printer
from experiments.stopping import StopRequests
from metalearn.checkpoint import resume_from_latest
from metalearn.outer import OuterOptimizer
from metalearn.storage import PathLike, location

if TYPE_CHECKING:
    from experiments.progress import RunConsole


class RunLoop:
    """Step counting, resume, signals, time budget and checkpoint cadence of one run.

    Args:
        run_dir: the run folder in run storage (checkpoints under it).
        unit: what a step is called in messages and summaries (``step`` or ``round``).
        total: steps to reach.
        checkpoint_every: save after every this many steps (and always at the end).
        time_budget_s: stop once this much counted time is spent (None: no budget).
        stop_after: testing aid: save and stop after this step, as if stopped.
        echo: where the loop's own lines go.
        progress: draws the steps as a progress bar (count, rate, time left), if given.
    """

    def __init__(self, run_dir: PathLike, *, unit: str, total: int, checkpoint_every: int,
                 time_budget_s: float | None, stop_after: int | None = None,
                 echo: Printer = print, progress: RunConsole | None = None) -> None:
        self.run_dir = location(run_dir)
        self.unit = unit
        self.total = total
        self.checkpoint_every = checkpoint_every
        self.time_budget_s = time_budget_s
        self.stop_after = stop_after
        self.echo = echo
        self.progress = progress
        self.step = 0
        self.elapsed_s = 0.0
        self.stopped_by: str | None = None  # a signal's name, or "stop_after"
        self._stop = StopRequests()

    def __enter__(self) -> RunLoop:
        self._stop.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.__exit__(None, None, None)

    def resume(self, outer: OuterOptimizer) -> dict[str, Any] | None:
        """Load the latest checkpoint into ``outer``; the rest of its state is returned."""
        state = resume_from_latest(self.run_dir, outer)
        if state is not None:
            self.step, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])
            self.echo(f"resuming {self.run_dir} from {self.unit} {self.step}")
        return state

    def count(self, seconds: float) -> float:
        """Add a step's training time (not its evaluation); the total so far."""
        self.elapsed_s += seconds
        return self.elapsed_s

    def _running(self) -> bool:
        return (self.step < self.total and not self._stop.requested
                and (self.time_budget_s is None or self.elapsed_s < self.time_budget_s))

    def steps(self, save: Callable[[], None]) -> Iterator[int]:
        """Yield step numbers until done, budget spent or a signal came (use inside ``with``);
        ``save`` checkpoints on the cadence and once at the end (not after an exception inside
        the body)."""
        bar = (nullcontext(None) if self.progress is None else
               self.progress.bar("training", self.total, f"{self.unit}s", completed=self.step))
        with bar as shown:
            while self._running():
                self.step += 1
                yield self.step
                if shown is not None:
                    shown.advance()
                if self.step % self.checkpoint_every == 0:
                    save()
                if self.stop_after is not None and self.step >= self.stop_after:
                    self.stopped_by = "stop_after"
                    save()
                    self.echo(f"stopping after {self.unit} {self.step} (stop_after_rounds)")
                    return
        save()
        signal = self._stop.signal
        if signal is not None:
            self.stopped_by = signal.name
            self.echo(f"stopped by {signal.name} after {self.unit} {self.step}; checkpoint "
                      f"saved in {self.run_dir}: run the same command to resume")

    def stopped_summary(self, name: str) -> dict[str, Any]:
        """The summary of a run that a signal (or ``stop_after``) ended before its end."""
        out: dict[str, Any] = {"name": name, f"stopped_after_{self.unit}": self.step}
        if self.stopped_by != "stop_after":
            out["stopped_by"] = self.stopped_by
        return out
