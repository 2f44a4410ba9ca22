"""What a site computes from its tasks in a round, in pure torch (shared exactly by an edge
actor and the single-process reference that tests hold it against).

With one local step a site returns its meta-gradient (the cloud applies it: exactly centralized
MAML over the union of tasks when all sites take part). With ``E > 1`` it takes ``E``
meta-steps of its own and returns the change of the meta-parameters, a *delta* that the cloud
applies as a pseudo-gradient (FedOpt).

With a time budget the work is sized to the site: it takes as many local meta-steps as fit in
the budget (at least one, at most ``E``) and says how many (``MetaUpdate.local_steps``), so a
slow site does less and the cloud can normalise for it (FedNova,
:class:`metalearn.aggregation.FedNova`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np

from metalearn.algorithms.base import MetaAlgorithm, MetaUpdate
from metalearn.outer import OuterOptimizer
from metalearn.params import Params
from metalearn.sites import SampleTasks


def mean_metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in sorted(keys)}


def local_update(algorithm: MetaAlgorithm, params: Params, sample_tasks: SampleTasks,
                 tasks_per_step: int, local_steps: int = 1, local_lr: float = 1e-3,
                 local_optimizer: Literal["sgd", "adam"] = "sgd",
                 time_budget_s: float | None = None,
                 after_step: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> MetaUpdate:
    """A site's update to the meta-parameters ``params``.

    ``local_steps == 1``: the algorithm's own update on ``tasks_per_step`` fresh tasks (a
    meta-gradient for MAML and its kin). ``local_steps > 1``: that many local meta-steps with
    SGD or Adam at ``local_lr``, each on fresh tasks, and the result is the *delta*
    ``new - params``, standing for ``local_steps * tasks_per_step`` tasks. Metrics are means
    over the local steps. The local optimizer starts fresh every round (its state is not sent
    back, so it could not be checkpointed by the cloud anyway).

    ``time_budget_s``: take local meta-steps while the next one is expected to end within the
    budget (expected: as long as the last one), at least one and at most ``local_steps``; the
    result is then always a delta, whatever the count. ``after_step(seconds)``: called after
    each step with its duration, inside the budget's clock (a site's duty cycle idles there).
    """
    if time_budget_s is not None and time_budget_s <= 0:
        raise ValueError(f"time_budget_s must be > 0, got {time_budget_s}")
    if tasks_per_step < 1:
        raise ValueError(f"tasks_per_step must be >= 1, got {tasks_per_step}")
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    if local_steps == 1 and time_budget_s is None:
        t0 = clock()
        update = algorithm.meta_update(params, sample_tasks(tasks_per_step))
        if after_step is not None:
            after_step(clock() - t0)
        return update

    local = OuterOptimizer(params, lr=local_lr, kind=local_optimizer)
    rows = []
    start = clock()
    while len(rows) < local_steps:
        t0 = clock()
        update = algorithm.meta_update(local.params, sample_tasks(tasks_per_step))
        local.step(update.tensors, update.kind)
        rows.append(update.metrics)
        if after_step is not None:
            after_step(clock() - t0)
        now = clock()
        if time_budget_s is not None and (now - start) + (now - t0) > time_budget_s:
            break  # the next step would not fit
    delta = {k: (local.params[k] - params[k]).detach().clone() for k in params}
    return MetaUpdate("delta", delta, tasks_per_step * len(rows), mean_metrics(rows),
                      local_steps=len(rows))
