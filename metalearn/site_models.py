"""A site's personalized model: the meta-model fine-tuned on the site's own training tasks.

Test-time adaptation (``algorithm.adapt``) turns an initialisation into a model for *one* task
from a handful of labelled examples. A site, though, sees the same distribution of tasks again
and again (its alphabets, its amplitude range), so the best initialisation for it is not the
global meta-model but one moved towards its own tasks. :func:`personalized_init` takes a few
more meta-steps with the algorithm's own outer update (``meta_update``) on tasks the site
samples from its training share; the result is still an initialisation, adapted per request
at serving time exactly like the meta-model (Per-FedAvg's personalised MAML, Fallah et al.
2020, with the site's own steps after training rather than during it).

The model is written to run storage as ``adapted/site-NAME.pt`` (:func:`save_site_model`),
the file that serving resolves for ``RUN@site-NAME`` (:mod:`serve.store`). The driver writes
it from the parameters a site sends back; a site that joins later writes its own the same way
(``edgemeta site onboard``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from metalearn.algorithms.base import MetaAlgorithm
from metalearn.outer import OuterOptimizer
from metalearn.params import Params
from metalearn.sites import SampleTasks, SiteTasks
from metalearn.storage import Location, PathLike, location

SITE_MODELS_DIR = "adapted"  # beside /v1/adapt's models: one folder of servable non-checkpoints
SITE_MODEL_FORMAT = "edgemeta-site-model"


def site_model_path(run_dir: PathLike, site: str) -> Location:
    """Where ``site``'s personalized model of the run lives (``RUN@site-NAME`` when served)."""
    return location(run_dir) / SITE_MODELS_DIR / f"site-{site}.pt"


def personalized_init(algorithm: MetaAlgorithm, params: Params, sample_tasks: SampleTasks,
                      tasks_per_step: int, steps: int, lr: float,
                      optimizer: Literal["sgd", "adam"] = "adam",
                      ) -> tuple[Params, dict[str, float]]:
    """``steps`` meta-steps from ``params`` on the site's tasks, with a fresh outer optimizer
    (``optimizer`` at ``lr``, the run's outer settings); the new initialisation and the mean
    of the steps' metrics. ``params`` is not modified."""
    if steps < 1:
        raise ValueError(f"personalization needs at least one step, got {steps}")
    outer = OuterOptimizer({k: v.detach().clone() for k, v in params.items()}, lr=lr,
                           kind=optimizer)
    sums: dict[str, float] = {}
    for _ in range(steps):
        update = algorithm.meta_update(outer.params, sample_tasks(tasks_per_step))
        outer.step(update.tensors, update.kind)
        for k, v in update.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return ({k: v.detach().clone() for k, v in outer.params.items()},
            {k: v / steps for k, v in sums.items()})


@dataclass
class Personalized:
    """A site's model and its scores: ``params`` None when no step was asked for; the scores
    of the meta-model (``global_scores``) and of the site model (``personal_scores``) on the
    same held-out episodes, ``before_*`` / ``after_*`` test-time adaptation (empty when no
    episode was asked for)."""

    params: Params | None
    global_scores: dict[str, float]
    personal_scores: dict[str, float]
    train_metrics: dict[str, float]
    seconds: float


def personalize_site(algorithm: MetaAlgorithm, params: Params, tasks: SiteTasks, version: int,
                     steps: int, lr: float, optimizer: Literal["sgd", "adam"],
                     tasks_per_step: int, episodes: int) -> Personalized:
    """Make a site's model from ``params`` on its training share (``tasks``, the stream of
    ``version``) and score both on its held-out tasks, paired: what an edge actor does at the
    end of training and what onboarding does for a site that joins later."""
    from metalearn.evaluation import evaluate_by_steps

    t0 = time.perf_counter()
    personal, metrics = None, {}
    if steps > 0:
        personal, metrics = personalized_init(algorithm, params, tasks.personal_sampler(version),
                                              tasks_per_step, steps, lr, optimizer)
    test_steps = algorithm.test_steps

    def scores(model: Params) -> dict[str, float]:
        by_steps = evaluate_by_steps(algorithm, model, tasks.holdout_sampler().sample, episodes,
                                     steps_list=[0, test_steps], batch=min(32, episodes))
        return {f"{when}_{k}": float(v) for when, result in (("before", by_steps[0]),
                                                              ("after", by_steps[test_steps]))
                for k, v in result.items() if k != "episodes"}

    return Personalized(personal, scores(params) if episodes > 0 else {},
                        scores(personal) if episodes > 0 and personal is not None else {},
                        metrics, time.perf_counter() - t0)


def save_site_model(run_dir: PathLike, site: str, params: Mapping[str, torch.Tensor],
                    info: Mapping[str, Any]) -> Location:
    """Write ``site``'s model whole (readers, a serving replica among them, see the old file or
    the new one); ``info`` says how it was made (round, steps, scores)."""
    buf = io.BytesIO()
    torch.save({"format": SITE_MODEL_FORMAT, "site": site,
                "params": {k: v.detach().contiguous() for k, v in params.items()},
                "created_s": time.time(), **dict(info)}, buf)
    path = site_model_path(run_dir, site)
    path.write_bytes(buf.getvalue(), durable=False)  # made again by the next run or onboard
    return path
