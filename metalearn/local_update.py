"""What a site computes from its tasks in a round, in pure torch (shared exactly by an edge
actor and the single-process reference that tests hold it against).

With one local step a site returns its meta-gradient (the cloud applies it: exactly centralized
MAML over the union of tasks when all sites take part). With ``E > 1`` it takes ``E``
meta-steps of its own and returns the change of the meta-parameters, a *delta* that the cloud
applies as a pseudo-gradient (FedOpt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
                 local_optimizer: Literal["sgd", "adam"] = "sgd") -> MetaUpdate:
    """A site's update to the meta-parameters ``params``.

    ``local_steps == 1``: the algorithm's own update on ``tasks_per_step`` fresh tasks (a
    meta-gradient for MAML and its kin). ``local_steps > 1``: that many local meta-steps with
    SGD or Adam at ``local_lr``, each on fresh tasks, and the result is the *delta*
    ``new - params``, standing for ``local_steps * tasks_per_step`` tasks. Metrics are means
    over the local steps. The local optimizer starts fresh every round (its state is not sent
    back, so it could not be checkpointed by the cloud anyway).
    """
    if tasks_per_step < 1:
        raise ValueError(f"tasks_per_step must be >= 1, got {tasks_per_step}")
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    if local_steps == 1:
        return algorithm.meta_update(params, sample_tasks(tasks_per_step))

    local = OuterOptimizer(params, lr=local_lr, kind=local_optimizer)
    rows = []
    for _ in range(local_steps):
        update = algorithm.meta_update(local.params, sample_tasks(tasks_per_step))
        local.step(update.tensors, update.kind)
        rows.append(update.metrics)
    delta = {k: (local.params[k] - params[k]).detach().clone() for k in params}
    return MetaUpdate("delta", delta, tasks_per_step * local_steps, mean_metrics(rows))
