"""Few-shot evaluation: adapt on each episode's support set, score its query set.

Results are a mean over episodes with a 95 % confidence interval ``1.96·σ/√n`` (σ the standard
deviation of the per-episode scores, ``ddof=0`` as in the few-shot literature, so that numbers
compare with published ones). Algorithms that can adapt a whole batch of episodes at once
(``adapt_predict_batch``) are evaluated that way; any other goes through ``adapt``/``predict``
one episode at a time — the same maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from metalearn.algorithms.base import MetaAlgorithm
from metalearn.params import Params
from metalearn.tasks import TaskBatch

SampleTasks = Callable[[int], TaskBatch]
#: Told how many more episodes were just scored (a progress bar's ``advance``).
EpisodesDone = Callable[[int], object]


def _episode_scores(algorithm: MetaAlgorithm, params: Params, tasks: TaskBatch,
                    steps: int | None) -> Tensor:
    """Per-episode accuracy (classification) or query MSE (regression), shape [B]."""
    batched = getattr(algorithm, "adapt_predict_batch", None)
    if batched is not None:
        out = batched(params, tasks, steps)
    else:
        rows = []
        for t in tasks:
            adapted = algorithm.adapt(params, t.support_x, t.support_y, steps)
            with torch.no_grad():
                rows.append(algorithm.predict(adapted, t.query_x))
        out = torch.stack(rows)
    y = tasks.query_y
    if algorithm.task_type == "classification":
        return (out.argmax(dim=-1) == y).double().flatten(1).mean(dim=1)
    return (out.double() - y.double()).square().flatten(1).mean(dim=1)


def summarize(scores: Sequence[float] | Tensor, key: str) -> dict[str, float]:
    """``{key: mean, "ci95": 1.96·std/√n, "episodes": n}`` of per-episode scores."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    n = int(s.numel())
    if n == 0:
        raise ValueError("no episodes to summarize")
    std = float(s.std(unbiased=False))
    return {key: float(s.mean()), "ci95": 1.96 * std / math.sqrt(n), "episodes": n}


def _batches(sample_tasks: SampleTasks, episodes: int, batch: int) -> list[TaskBatch]:
    if episodes <= 0:
        raise ValueError(f"episodes must be > 0, got {episodes}")
    if batch <= 0:
        raise ValueError(f"batch must be > 0, got {batch}")
    out, left = [], episodes
    while left > 0:
        tb = sample_tasks(min(batch, left))
        if len(tb) == 0:
            raise ValueError("sample_tasks returned an empty batch")
        tb = tb if len(tb) <= left else TaskBatch.stack([tb[i] for i in range(left)])
        out.append(tb)
        left -= len(tb)
    return out


def _score(algorithm: MetaAlgorithm, params: Params, batches: list[TaskBatch],
           steps: int | None, on_episodes: EpisodesDone | None = None) -> dict[str, float]:
    parts = []
    for tb in batches:
        parts.append(_episode_scores(algorithm, params, tb, steps))
        if on_episodes is not None:
            on_episodes(len(tb))
    scores = torch.cat(parts)
    key = "accuracy" if algorithm.task_type == "classification" else "mse"
    return summarize(scores, key)


def evaluate(algorithm: MetaAlgorithm, params: Params, sample_tasks: SampleTasks, episodes: int,
             steps: int | None = None, batch: int = 32,
             on_episodes: EpisodesDone | None = None) -> dict[str, float]:
    """Mean query accuracy in [0, 1] (classification) or MSE (regression) over ``episodes``
    episodes drawn ``batch`` at a time, adapting ``steps`` steps (default: ``test_steps``).
    ``on_episodes(n)`` is told each time n more episodes are scored (a progress bar)."""
    return _score(algorithm, params, _batches(sample_tasks, episodes, batch), steps, on_episodes)


def evaluate_by_steps(algorithm: MetaAlgorithm, params: Params, sample_tasks: SampleTasks,
                      episodes: int, steps_list: Sequence[int] = (0, 1, 5, 10),
                      batch: int = 32, on_episodes: EpisodesDone | None = None,
                      ) -> dict[int, dict[str, float]]:
    """:func:`evaluate` after each number of steps in ``steps_list``, on the *same* episodes
    (paired, so the curve is not blurred by different draws), e.g. sinusoid MSE after 0/1/5/10
    steps as in the MAML paper. ``on_episodes`` counts ``episodes`` once per entry of
    ``steps_list``."""
    batches = _batches(sample_tasks, episodes, batch)
    return {int(s): _score(algorithm, params, batches, int(s), on_episodes) for s in steps_list}
