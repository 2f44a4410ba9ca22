"""A site that joins after training: its store, its personalized model, served at the site.

``edgemeta site onboard RUN --site NAME --store PATH`` is run at the new site, where its data
is: it checks the site's store (or makes one, ``--shard test``: Omniglot's meta-test split,
classes no training site ever held), plans the site from the store's manifest as a run plans
its sites (the run's held-out fraction, seed and task size; for a centralized run, the
federated defaults), makes the site's model from the
run's latest meta-model exactly as a training site does at the end of training
(:func:`metalearn.site_models.personalize_site`: the run's ``personalize_steps`` meta-steps on
the site's training share, both models scored on its held-out tasks), writes it to the run's
storage as ``adapted/site-NAME.pt``, serves it with the replica pinned to the site's node
(an embedded node that advertises the site, or the site's node of a running cluster with
``--address``), and asks it one question: the first answered request, at the site's own way in
(:func:`serve.launch.site_entry_points`). The time from the command's start to that answer is
printed and returned. Nothing leaves the site but the model and its scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.console import Printer
from cluster.topology import SITE_RESOURCE_QUANTITY, site_resource
from experiments.config import ConfigError, FederatedConfig, load_config
from experiments.site_jobs import tasks_per_site
from metalearn.checkpoint import load_checkpoint
from metalearn.from_config import algorithm_from_config
from metalearn.site_models import personalize_site, save_site_model
from metalearn.sites import SiteTasks, plan_from_manifests
from metalearn.storage import PathLike, location


@dataclass
class Onboarded:
    """What onboarding did: the model's id and file, its scores, and the times (seconds from
    the command's start) at which the model was written and the first request answered."""

    model_id: str
    path: str
    scores: dict[str, float]
    model_s: float
    first_answer_s: float | None = None
    site_url: str | None = None
    served: Any = field(default=None, repr=False)  # serve.launch.Served while serving


def onboard(run_dir: PathLike, site: str, store: str | Path, *, shard: str | None = None,
            steps: int | None = None, episodes: int | None = None, serve: bool = True,
            port: int = 8000, host: str = "127.0.0.1", address: str | None = None,
            ingress: Any = None, echo: Printer = print,
            started: float | None = None) -> Onboarded:
    """Onboard ``site`` onto the run at ``run_dir`` (a folder or a URI); with ``serve`` the
    returned value holds the running Serve instance (``.served.stop()`` ends it)."""
    t0 = time.monotonic() if started is None else started
    run = location(run_dir)
    cfg = load_config(run / "config.yaml")
    if cfg.data.dataset != "omniglot":
        raise ConfigError(f"onboarding reads a site store, which holds omniglot classes; run "
                          f"{run.name} trained on {cfg.data.dataset!r}")
    # a centralized run's model can be a site's start too: the federated defaults then
    fed = cfg.federated or FederatedConfig(topology=1)
    per_task = (tasks_per_site(cfg, len(fed.resolved_topology().sites)) if cfg.federated
                else cfg.train.meta_batch)
    store = Path(store).expanduser().resolve()
    from metalearn.data.store import load_store

    if shard is not None:
        from metalearn.data.shard import shard_split

        status, _ = shard_split(store, shard, cfg.data.path)
        echo(f"{site}: store {status} at {store} (omniglot {shard} split)")
    elif not (store / "manifest.json").is_file():
        raise FileNotFoundError(f"no site store at {store}: make one with `edgemeta data shard "
                                "... --site` or pass --shard test")
    manifest = load_store(store).manifest
    data = cfg.to_dict()["data"]
    plan = plan_from_manifests(data, {site: manifest}, {site: str(store)}, cfg.seed,
                               fed.holdout_fraction)[site]
    tasks = SiteTasks(data, plan, devices=1, seed=cfg.seed)
    checkpoint = load_checkpoint(run)
    round_idx = int(checkpoint["step"])
    algorithm = algorithm_from_config(cfg.to_dict())
    n_steps = fed.site_model_steps if steps is None else int(steps)
    if n_steps < 1:
        raise ConfigError(f"onboarding makes a site model: give --steps >= 1 (the run's "
                          f"federated.personalize_steps is {fed.site_model_steps})")
    made = personalize_site(
        algorithm, checkpoint["params"], tasks, round_idx, n_steps, cfg.train.outer_lr,
        cfg.train.outer_optimizer, per_task,
        fed.personalize_episodes if episodes is None else int(episodes))
    assert made.params is not None
    scores = {**made.global_scores, **{f"site_{k}": v for k, v in made.personal_scores.items()}}
    path = save_site_model(run, site, made.params,
                           {"round": round_idx, "steps": n_steps, "lr": cfg.train.outer_lr,
                            "optimizer": cfg.train.outer_optimizer, "scores": scores,
                            "train_metrics": made.train_metrics, "onboarded": True})
    out = Onboarded(f"{run.name}@site-{site}", str(path), scores, time.monotonic() - t0)
    key = "accuracy" if "after_accuracy" in scores else "mse"
    echo(f"{site}: {manifest.num_classes} classes ({len(plan['holdout'])} held out); site "
         f"model from round {round_idx} in {made.seconds:.1f} s ({n_steps} step(s)) -> {path}")
    if key in {k.split("_", 1)[-1] for k in scores}:
        echo(f"{site}: held-out {key} meta-model {scores[f'after_{key}']:.3f}, site model "
             f"{scores[f'site_after_{key}']:.3f} (after {algorithm.test_steps} step(s))")
    if not serve:
        return out
    out.served = _serve(run, site, port, host, address, ingress)
    out.site_url = out.served.site_urls[0] if out.served.site_urls else out.served.url
    query = tasks.holdout_sampler().sample(1).query_x[0]
    from serve.client import EdgeMetaClient

    with EdgeMetaClient(out.site_url, timeout=60) as client:
        client.predict(out.model_id, query)
    out.first_answer_s = time.monotonic() - t0
    echo(f"{site}: serving {out.model_id} at {out.site_url} (through the head: "
         f"{out.served.url}); first answer {out.first_answer_s:.1f} s after the command started")
    return out


def _serve(run: Any, site: str, port: int, host: str, address: str | None,
           ingress: Any) -> Any:
    from serve.launch import start

    settings = {"run_dirs": [str(run)], "site": site}
    if address:
        return start(settings, host=host, port=port, address=address, ingress=ingress)
    # no cluster: this machine is the site's node, advertising the site as a node of it would
    return start(settings, host=host, port=port, ingress=ingress, num_cpus=2,
                 resources={site_resource(site): SITE_RESOURCE_QUANTITY})
