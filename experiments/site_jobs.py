"""From the config to the sites: what each site is told when it starts (:class:`SiteJob`),
where its store is and how it is sharded, how many tasks it draws, and who takes part in each
round.

This is the one place that turns ``federated`` config values into the cloud-edge contract
(:mod:`actors.contract`), so a default lives in the config alone and the driver
(:mod:`experiments.federated`) reads as a loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.contract import Attack, Compression, LocalWork, SiteConditions, SiteJob
from cluster.topology import Site, Topology
from experiments import dp, secagg
from experiments.config import ConfigError, ExperimentConfig, FederatedConfig
from metalearn.data.shard import ShardSpec
from metalearn.from_config import algorithm_from_config
from metalearn.params import FlatLayout


def federated_section(cfg: ExperimentConfig) -> FederatedConfig:
    if cfg.federated is None:
        raise ConfigError(f"config {cfg.name!r} has no federated section; add one (see "
                          "experiments/configs/federated_sinusoid.yaml)")
    return cfg.federated


def site_stores(cfg: ExperimentConfig, topology: Topology) -> dict[str, str]:
    """Each site's store, an absolute path on its node: the topology's ``store`` (relative
    paths against the stores root), else ``<root>/<site>``; the root is
    ``federated.data.stores``, else the run folder's ``stores/``."""
    fed = federated_section(cfg)
    if fed.data.stores:
        root = Path(fed.data.stores).expanduser()
    elif cfg.run_dir.is_local:
        root = cfg.run_dir.path / "stores"
    else:
        raise ConfigError(f"the run is in object storage ({cfg.run_dir}), and a site's store "
                          "is a folder on its node: set federated.data.stores to a local path")
    out = {}
    for site in topology.sites:
        path = Path(site.store).expanduser() if site.store else Path(site.name)
        out[site.name] = str((path if path.is_absolute() else root / path).absolute())
    paths = list(out.values())
    shared = sorted({p for p in paths if paths.count(p) > 1})
    if shared:
        raise ConfigError(f"each site needs a store of its own; these resolve to one: {shared} "
                          "(a site's store, relative to federated.data.stores, names another "
                          "site's default)")
    return out


def shard_spec(cfg: ExperimentConfig, topology: Topology) -> ShardSpec:
    """How the sites' stores are made from the source data set (``federated.data``)."""
    fed = federated_section(cfg)
    if cfg.data.dataset != "omniglot":
        raise ConfigError(f"site stores hold omniglot characters; dataset {cfg.data.dataset!r} "
                          "has no examples to shard")
    data = fed.data
    return ShardSpec(sites=tuple(topology.site_names), partitioner=data.partitioner.model_dump(),
                     seed=cfg.seed if data.seed is None else data.seed,
                     min_classes=data.min_classes or 2 * cfg.data.ways, source=cfg.data.path)


def auto_shard(cfg: ExperimentConfig, topology: Topology) -> ShardSpec | None:
    """The spec a run shards with before its sites start (``federated.data.stores`` unset:
    the stores live in the run folder), or None (the stores were made beforehand)."""
    fed = federated_section(cfg)
    if cfg.data.dataset != "omniglot" or fed.data.stores is not None:
        return None
    return shard_spec(cfg, topology)


def tasks_per_site(cfg: ExperimentConfig, sites: int) -> int:
    fed = federated_section(cfg)
    return fed.tasks_per_site or math.ceil(cfg.train.meta_batch / sites)


def site_jobs(cfg: ExperimentConfig, topology: Topology, plans: Mapping[str, Mapping[str, Any]],
              devices: Mapping[str, int], per_site: int,
              dim: int | None = None) -> dict[str, SiteJob]:
    """What each site is told when its actor starts (the config's values, nothing else).
    ``dim``: the parameter count (default: built from the config when secure aggregation
    needs it)."""
    fed = federated_section(cfg)
    config = cfg.to_dict()
    learner = {k: config[k] for k in ("data", "model", "algorithm")}
    work = LocalWork(steps=fed.local_steps, lr=fed.local_lr, optimizer=fed.local_optimizer,
                     tasks_per_step=per_site, time_budget_s=fed.local_time_budget_s)
    privacy = dp.site_privacy(fed, devices)
    if dim is None and fed.secure_aggregation is not None:
        dim = FlatLayout.of(algorithm_from_config(config).init_params()).numel
    masking = secagg.site_jobs(fed, devices, dim or 0)
    return {s.name: SiteJob(site=s.name, learner=learner, data_plan=plans[s.name], local=work,
                            devices=devices[s.name], seed=cfg.seed,
                            compute_nice=s.compute_nice, delay_s=s.delay_s,
                            fail=s.name in fed.fail_sites, attack=site_attack(s, fed, topology),
                            privacy=privacy, secagg=masking[s.name],
                            compression=site_compression(fed), conditions=site_conditions(s))
            for s in topology.sites}


def site_conditions(site: Site) -> SiteConditions:
    """The topology's speed, bandwidth and availability of ``site`` as the site is told them."""
    on_off = site.availability
    return SiteConditions(
        speed=site.speed,
        bandwidth_bytes_s=None if site.bandwidth_mbps is None else site.bandwidth_mbps * 1e6 / 8,
        mean_on_s=0.0 if on_off is None else on_off.mean_on_s or 0.0,
        mean_off_s=0.0 if on_off is None else on_off.mean_off_s or 0.0,
        on_periods=() if on_off is None else on_off.on_periods(site.name),
        repeat_s=None if on_off is None else on_off.repeat_s,
        traced=on_off is not None and on_off.trace is not None)


def site_compression(fed: FederatedConfig) -> Compression | None:
    """``federated.compression`` as a site is told it: every value resolved."""
    comp = fed.compression
    if comp is None:
        return None
    values = comp.model_dump()
    return Compression(codec=comp.codec, block=int(values.get("block", 0)),
                       fraction=float(values.get("fraction", 0.0)),
                       error_feedback=bool(values.get("error_feedback", False)))


def site_attack(site: Site, fed: FederatedConfig, topology: Topology) -> Attack | None:
    """The topology's attack of ``site`` as the site is told it: every value resolved (an
    ``alie`` without ``z`` gets Baruch et al.'s ``z_max`` for this federation)."""
    configured = site.attack
    if configured is None:
        return None
    values = configured.model_dump()
    if configured.name == "alie" and values["z"] is None:
        values["z"] = fed.alie_z(topology)
    return Attack(name=configured.name, factor=float(values.get("factor", 0.0)),
                  sigma=float(values.get("sigma", 0.0)), z=float(values.get("z", 0.0)),
                  samples=int(values.get("samples", 0)))


def choose_participants(sites: Sequence[str], devices: Mapping[str, int], fed: FederatedConfig,
                        seed: int, round_idx: int) -> dict[str, list[int]]:
    """Sites called in ``round_idx`` and the devices each uses, seeded by ``(seed, round)``
    (under privacy: :func:`experiments.dp.choose`, secret, and Poisson if asked)."""
    if fed.privacy is not None:
        return dp.choose(sites, devices, fed, round_idx)
    rng = np.random.default_rng([seed, round_idx])
    k = fed.sites_per_round(len(sites))
    chosen = sorted(rng.choice(len(sites), size=k, replace=False).tolist())
    out = {}
    for i in chosen:
        site, n = sites[i], devices[sites[i]]
        per_round = min(fed.devices_per_round or n, n)
        ids = range(n) if per_round == n else rng.choice(n, size=per_round, replace=False)
        out[site] = sorted(int(d) for d in ids)
    return out
