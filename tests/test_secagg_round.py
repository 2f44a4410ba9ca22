"""A secure-aggregation round as the driver runs it (:mod:`actors.secure_round`), with real
:class:`~actors.edge.EdgeNode` sites as plain objects in this process (no Ray): the unmasked sum
equals the sum of the sites' clipped updates whichever step a site drops at, the cloud's replies
carry no update, too few sites skip the round, and a protocol violation stops it.

The :class:`InProcessFederation` stands in for :class:`actors.federation.Federation` (its two
calls, ``call_sites`` and ``run_round``), so each step's dropout is chosen by the test. The same
rounds on a real multi-node Ray cluster are in ``tests/test_secagg_federated.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import in_process_site_jobs

from actors.contract import RoundReply, SiteJob
from actors.edge import EdgeNode, SecAggClientLost
from actors.federation import RoundOutcome, StepOutcome, raised
from actors.secure_round import run_secure_round
from experiments.config import ExperimentConfig, parse_config
from experiments.dp import CloudPrivacy
from experiments.secagg import CloudSecAgg, masking_bound
from privacy.errors import ProtocolError
from privacy.fixed_point import clip_l2

pytestmark = pytest.mark.usefixtures("heap_given_back")
SITES = ["site-0", "site-1", "site-2"]
CLIP = 0.05


def config(tmp_path: Path, privacy: dict[str, Any] | None = None,
           **secure: Any) -> ExperimentConfig:
    federated: dict[str, Any] = {"topology": {"sites": [{"name": s} for s in SITES]},
                                 "personalize_episodes": 0}
    if privacy is None:
        federated["secure_aggregation"] = {"clip": CLIP, **secure}
    else:
        federated["secure_aggregation"] = secure
        federated["privacy"] = privacy
    return parse_config({
        "name": "secagg-round", "seed": 4, "output_dir": str(tmp_path),
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
        "model": {"name": "sinusoid_mlp", "hidden": 8},
        "algorithm": {"name": "maml", "inner_lr": 0.01},
        "train": {"meta_batch": 6},
        "federated": federated,
    })


class InProcessFederation:
    """:class:`actors.federation.Federation`'s two calls on EdgeNode objects. ``drop[step]``:
    the sites that give nothing at that step (``advertise``, ``share``, ``round``,
    ``unmask``); ``restart``: sites whose actor is rebuilt (losing its keys) before the round
    call; ``misroute``: hand each site another site's shares."""

    def __init__(self, jobs: Mapping[str, SiteJob]) -> None:
        self.jobs = dict(jobs)
        self.edges = {site: EdgeNode(job) for site, job in jobs.items()}
        self.drop: dict[str, set[str]] = {}
        self.restart: set[str] = set()
        self.misroute = False
        self.received: list[Any] = []  # every value a site returned to the cloud

    def call_sites(self, method: str, args: Mapping[str, tuple[Any, ...]], round_idx: int,
                   deadline_s: float | None) -> StepOutcome:
        out = StepOutcome()
        step = method.removeprefix("secagg_")
        for site, site_args in args.items():
            if site in self.drop.get(step, set()):
                out.rows[site] = {"site": site, "status": "late", "error": "dropped (test)"}
                continue
            try:
                out.results[site] = getattr(self.edges[site], method)(*site_args)
            except Exception as err:
                out.errors[site] = raised(err)
                out.rows[site] = {"site": site, "status": "failed", "error": str(err)}
        self.received.extend(out.results.values())
        return out

    def run_round(self, params_ref: Any, round_idx: int, participants: Mapping[str, list[int]],
                  deadline_s: float | None, clip_norm: float | None = None,
                  deliveries: Mapping[str, Any] | None = None) -> RoundOutcome:
        assert deliveries is not None
        out = RoundOutcome()
        for site in self.restart:
            self.edges[site] = EdgeNode(self.jobs[site])
        names = list(participants)
        for i, (site, devices) in enumerate(participants.items()):
            row = {"site": site, "devices": len(devices)}
            if site in self.drop.get("round", set()):
                out.sites.append({**row, "status": "late", "error": "dropped (test)"})
                continue
            delivery = deliveries[names[(i + 1) % len(names)] if self.misroute else site]
            try:
                reply: RoundReply = self.edges[site].round(params_ref, round_idx, devices,
                                                           clip_norm, delivery)
            except Exception as err:
                out.errors[site] = err
                out.sites.append({**row, "status": "failed", "error": str(err)})
                continue
            self.received.append(reply)
            out.sites.append({**row, "status": "ok", "compute_s": reply.timings.compute_s,
                              "num_tasks": reply.num_tasks, "bytes_up": reply.bytes_up})
            assert reply.masked is not None
            out.masked.append(reply.masked)
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The config, the sites' jobs, the flat parameters, and each site's plain update (from a
    twin site without secure aggregation) in rounds 1-8."""
    cfg = config(tmp_path_factory.mktemp("secagg"))
    site_job = in_process_site_jobs(cfg)
    twins = {s: EdgeNode(replace(job, secagg=None)) for s, job in site_job.items()}
    torch.manual_seed(0)
    edge = next(iter(twins.values()))
    flat = edge.layout.pack(edge.algorithm.init_params())
    plain = {(s, r): twins[s].round(flat, r, [0]).update.astype(np.float64)
             for s in SITES for r in range(1, 9)}
    return cfg, {"jobs": site_job, "flat": flat, "plain": plain, "dim": edge.layout.numel}


def secure_round(cfg: ExperimentConfig, fed: InProcessFederation, flat: np.ndarray,
                 round_idx: int, dim: int) -> Any:
    assert cfg.federated is not None
    cloud = CloudSecAgg.start(cfg.federated, dict.fromkeys(SITES, 1), dim)
    assert cloud is not None
    return cloud.round(fed, round_idx, {s: [0] for s in SITES}, flat,  # type: ignore[arg-type]
                       None)


def clipped_sum(plain: Mapping[tuple[str, int], np.ndarray], sites: list[str],
                round_idx: int) -> np.ndarray:
    return np.sum([clip_l2(plain[(s, round_idx)], CLIP) for s in sites], axis=0)


def test_the_unmasked_sum_is_the_sum_of_updates_clipped_at_the_sites(setup) -> None:
    cfg, s = setup
    fed = InProcessFederation(s["jobs"])
    out = secure_round(cfg, fed, s["flat"], 1, s["dim"])
    assert out.abort is None and out.result is not None
    assert out.result.survivors == (1, 2, 3) and out.result.dropped == ()
    norms = [np.linalg.norm(s["plain"][(site, 1)]) for site in SITES]
    assert max(norms) > CLIP  # the clip at the site did something
    expected = clipped_sum(s["plain"], SITES, 1)
    assert np.abs(out.result.total - expected).max() <= out.result.error_bound

    # the cloud received keys, shares and masked ring vectors: no update
    replies = [v for v in fed.received if isinstance(v, RoundReply)]
    assert len(replies) == 3
    for reply in replies:
        assert reply.update.dtype == np.float32 and reply.update.size == 0
        assert reply.masked is not None and reply.masked.vector.dtype == np.uint32
        assert reply.bytes_up == reply.masked.nbytes == 4 + 4 * s["dim"]
    fields = out.fields()
    assert fields["secagg_dropped"] == 0 and fields["secagg_survivors"] == 3
    assert fields["secagg_bytes_up"] > 0 and fields["secagg_bytes_down"] > 0
    assert set(fields) >= {"secagg_advertise_s", "secagg_share_s", "secagg_sum_s",
                           "secagg_unmask_s", "secagg_abort"}
    assert [row["status"] for row in out.outcome.sites] == ["ok"] * 3


@pytest.mark.parametrize(("step", "round_idx", "in_sum", "dropped"), [
    ("advertise", 2, ["site-0", "site-2"], ()),
    ("share", 3, ["site-0", "site-2"], ()),
    ("round", 4, ["site-0", "site-2"], (2,)),  # after sharing: masks rebuilt from shares
    ("restart", 5, ["site-0", "site-2"], (2,)),  # a restarted actor lost its keys
    ("unmask", 6, SITES, ()),  # its masked input arrived: it stays in the sum
])
def test_a_site_dropping_at_any_step(setup, step: str, round_idx: int, in_sum: list[str],
                                     dropped: tuple[int, ...]) -> None:
    cfg, s = setup
    fed = InProcessFederation(s["jobs"])
    if step == "restart":
        fed.restart = {"site-1"}
    else:
        fed.drop[step] = {"site-1"}
    out = secure_round(cfg, fed, s["flat"], round_idx, s["dim"])
    assert out.result is not None, out.abort
    assert out.result.dropped == dropped
    expected = clipped_sum(s["plain"], in_sum, round_idx)
    assert np.abs(out.result.total - expected).max() <= out.result.error_bound
    row = next(r for r in out.outcome.sites if r["site"] == "site-1")
    if step in ("advertise", "share"):
        assert row["status"] == "late" and row["secagg_step"] == step
        assert "secure aggregation" in row["error"]
    elif step == "restart":
        assert row["status"] == "failed"
        assert isinstance(fed.edges["site-1"], EdgeNode)
        with pytest.raises(SecAggClientLost, match="no secure-aggregation keys for round"):
            fed.edges["site-1"].secagg_unmask(round_idx, None)  # type: ignore[arg-type]
    elif step == "unmask":
        assert row["status"] == "ok" and row["secagg_unmask"] == "late"
    assert out.fields()["secagg_dropped"] == len(dropped)


def test_too_few_sites_skip_the_round_and_a_protocol_violation_stops_it(setup) -> None:
    cfg, s = setup
    fed = InProcessFederation(s["jobs"])
    fed.drop["advertise"] = {"site-0", "site-1"}
    out = secure_round(cfg, fed, s["flat"], 7, s["dim"])
    assert out.result is None and "1 site(s) advertised keys" in (out.abort or "")
    assert {r["site"]: r["status"] for r in out.outcome.sites} == {
        "site-0": "late", "site-1": "late", "site-2": "aborted"}
    assert out.fields()["secagg_abort"] == out.abort

    fed = InProcessFederation(s["jobs"])
    fed.drop["round"] = {"site-0"}
    assert cfg.federated is not None
    cloud = CloudSecAgg.start(cfg.federated, dict.fromkeys(SITES, 1), s["dim"])
    assert cloud is not None
    below = run_secure_round(fed, cloud.config, cloud.site_ids, 8,  # type: ignore[arg-type]
                             {site: [0] for site in SITES}, s["flat"], deadline_s=None,
                             step_deadline_s=1.0, clip_norm=None, quorum=3)
    assert below.result is None and below.abort == "2 masked input(s) arrived, quorum 3"

    fed = InProcessFederation(s["jobs"])
    fed.misroute = True  # a cloud that hands a site another's shares
    with pytest.raises(ProtocolError, match="site site-0 refused what the cloud sent"):
        secure_round(cfg, fed, s["flat"], 9, s["dim"])


def test_with_distributed_noise_the_sum_is_of_the_noised_releases(tmp_path: Path) -> None:
    privacy = {"unit": "site", "clip_norm": 0.05, "noise_multiplier": 1.0, "delta": 1e-2,
               "noise": "distributed", "seed": 3}
    cfg = config(tmp_path, privacy=privacy)
    assert cfg.federated is not None
    site_job = in_process_site_jobs(cfg)
    fed = InProcessFederation(site_job)
    edge = fed.edges["site-0"]
    torch.manual_seed(0)
    flat = edge.layout.pack(edge.algorithm.init_params())
    dim = edge.layout.numel
    cloud = CloudSecAgg.start(cfg.federated, dict.fromkeys(SITES, 1), dim)
    assert cloud is not None
    out = cloud.round(fed, 1, {s: [0] for s in SITES}, flat, 0.05)  # type: ignore[arg-type]
    assert out.result is not None
    releases = [EdgeNode(replace(job, secagg=None)).round(flat, 1, [0], 0.05).update
                for job in site_job.values()]
    bound = masking_bound(cfg.federated, dict.fromkeys(SITES, 1), dim, 0.05)
    assert cloud.config.clip == bound
    assert all(np.linalg.norm(r) < bound / 2 for r in releases)  # the clip there is a no-op
    assert all(np.linalg.norm(r) > 0.05 for r in releases)  # noise shares ride on them
    expected = np.sum([r.astype(np.float64) for r in releases], axis=0)
    assert np.abs(out.result.total - expected).max() <= out.result.error_bound

    # the cloud's noised sum from the unmasked total equals the one from the same releases
    fed_cfg = cfg.federated
    devices = dict.fromkeys(SITES, 1)
    a, b = (CloudPrivacy.start(fed_cfg, devices, 5) for _ in range(2))
    assert a is not None and b is not None
    participants = {s: [0] for s in SITES}
    plain = RoundOutcome(
        updates=[_flat_update(r) for r in releases],
        sites=[{"site": s, "status": "ok"} for s in SITES])
    via_list = a.release(plain, participants, 1)
    via_sum = b.release(out.outcome, participants, 1, total=torch.from_numpy(out.result.total))
    assert torch.allclose(via_list.double(), via_sum.double(),
                          atol=out.result.error_bound / 3 + 1e-7)


def _flat_update(vector: np.ndarray) -> Any:
    from metalearn.aggregation import FlatUpdate

    return FlatUpdate("gradient", torch.from_numpy(vector), 2)


def test_the_masking_bound_follows_the_privacy_unit_and_sampling(tmp_path: Path) -> None:
    base = {"clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-3}
    devices = {"site-0": 5, "site-1": 7, "site-2": 5}
    for privacy, want in [({"unit": "site"}, 0.5),
                          ({"unit": "device", "sampling": "poisson"}, 0.5 * 7),
                          ({"unit": "device"}, 0.5 * 2)]:
        cfg = config(tmp_path, privacy={**base, **privacy})
        raw = cfg.federated
        assert raw is not None
        fed = raw.model_copy(update={"devices_per_round": 2})
        assert masking_bound(fed, devices, 100, 0.5) == pytest.approx(want)
    cfg = config(tmp_path, privacy={**base, "unit": "site", "noise": "distributed"})
    assert cfg.federated is not None
    share = 1.0 / np.sqrt(3) * 0.5  # z C / sqrt(expected sites)
    assert masking_bound(cfg.federated, devices, 100, 0.5) == pytest.approx(
        0.5 + share * (10 + 12))
    assert masking_bound(config(tmp_path).federated, devices, 100, None) == CLIP  # type: ignore[arg-type]
