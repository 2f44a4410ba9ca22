"""Config validation: unknown keys and bad values are errors that say where and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.config import CONFIG_DIR, ConfigError, apply_overrides, load_config, parse_config


def test_every_bundled_config_validates() -> None:
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        cfg = load_config(path)
        assert cfg.name == path.stem or path.stem.startswith("federated_") or cfg.name


def test_defaults_are_the_maml_omniglot_protocol() -> None:
    cfg = parse_config({})
    assert (cfg.data.ways, cfg.data.shots, cfg.algorithm.inner_lr) == (5, 1, 0.4)
    assert cfg.train.meta_batch == 32


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"algorithm": {"inner_rl": 0.1}}, "algorithm.inner_rl: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"train": {"steps": -1}}, "train.steps"),
        ({"algorithm": {"inner_lr": 0}}, "algorithm.inner_lr"),
        ({"algorithm": {"name": "nope"}}, "algorithm.name"),
        ({"data": {"shots": 10, "queries": 15}}, "exceeds the 20 drawings"),
        ({"data": {"dataset": "sinusoid"}}, "does not fit dataset"),
        ({"data": {"dataset": "sinusoid", "amplitude": [5, 1]},
          "model": {"name": "sinusoid_mlp"}}, "amplitude: low 5.0 is above high 1.0"),
        ({"name": "has space"}, "name"),
    ],
)
def test_bad_configs_name_the_problem(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="invalid config") as err:
        parse_config(raw)
    assert message in str(err.value)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain: {steps: 5}\n")
    cfg = load_config(path, ["train.steps=7", "algorithm.options={impl: higher}"])
    assert cfg.train.steps == 7
    assert cfg.algorithm.options == {"impl": "higher"}
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["train.steps"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


# --------------------------------------------------------------------------- robust rules, attacks

def federated(**section: object) -> dict:
    return {"federated": section}


def sites(n: int, **attacks: dict) -> dict:
    """An inline topology of ``n`` sites ``s0``..; ``attacks`` maps a site to its attack."""
    return {"sites": [{"name": f"s{i}", **({"attack": attacks[f"s{i}"]}
                                          if f"s{i}" in attacks else {})} for i in range(n)]}


def test_robust_rules_and_attacks_parse() -> None:
    cfg = parse_config(federated(topology=sites(5, s4={"name": "sign_flip", "factor": 4}),
                                 quorum=5, aggregator={"name": "krum", "f": 1}))
    assert cfg.federated is not None
    topology = cfg.federated.resolved_topology()
    assert topology.attackers == ["s4"]
    attack = topology.site("s4").attack
    assert attack is not None and attack.name == "sign_flip" and attack.factor == 4.0
    # defaults of each attack live here, in the config
    for raw, field, value in [({"name": "sign_flip"}, "factor", 1.0),
                              ({"name": "scale"}, "factor", 10.0),
                              ({"name": "gaussian"}, "sigma", 1.0),
                              ({"name": "alie", "z": 1.0}, "samples", 4)]:
        got = parse_config(federated(topology=sites(2, s1=raw))).federated
        assert got is not None
        assert getattr(got.resolved_topology().site("s1").attack, field) == value
    # rules at their least federation: Bulyan f=1 on 7 of 8 sites, quorum 7
    parse_config(federated(topology=8, site_fraction=0.875, quorum=7,
                           aggregator={"name": "bulyan", "f": 1}))
    parse_config(federated(topology=6, quorum=6, aggregator={"name": "multi_krum", "m": 5}))
    parse_config(federated(topology=3, quorum=3, aggregator={
        "name": "norm_bound", "max_norm": 0.5, "inner": {"name": "krum", "f": 0}}))
    parse_config(federated(aggregator={"name": "norm_bound", "max_norm": 0.5}))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # Krum needs n > 2f+2 in every aggregated round: quorum is the fewest aggregated
        (federated(topology=4, aggregator={"name": "krum"}),
         "aggregator krum needs more than 2f+2 = 4 updates (f=1) in every round it aggregates, "
         "but quorum 1 lets rounds with as few as 1 be aggregated: set quorum >= 5, and call at "
         "least 5 sites per round (now 4: 4 sites x site_fraction 1.0)"),
        (federated(topology=6, quorum=4, aggregator={"name": "krum"}), "set quorum >= 5"),
        (federated(topology=8, site_fraction=0.5, quorum=4, aggregator={"name": "bulyan"}),
         "bulyan needs at least 4f+3 = 7 updates (f=1)"),
        (federated(topology=6, quorum=5, aggregator={"name": "multi_krum", "m": 5}),
         "at least m+f = 6 (m=5)"),
        (federated(topology=5, quorum=5, aggregator={"name": "norm_bound", "max_norm": 1,
                                                     "inner": {"name": "bulyan"}}),
         "norm_bound wraps bulyan, which needs at least 4f+3 = 7"),
        (federated(topology=5, quorum=5, aggregator={"name": "clip_noise", "clip_norm": 1,
                                                     "inner": {"name": "krum", "f": 2}}),
         "clip_noise wraps krum, which needs more than 2f+2 = 6"),
        (federated(aggregator={"name": "krum", "m": 3}), "aggregator.krum.m: unknown key"),
        # an attack parameter that does not belong to the attack, or is out of range
        (federated(topology=sites(2, s1={"name": "sign_flip", "sigma": 2})),
         "sites.1.attack.sign_flip.sigma: unknown key"),
        (federated(topology=sites(2, s1={"name": "label_flip", "factor": 2})),
         "sites.1.attack.label_flip.factor: unknown key"),
        (federated(topology=sites(2, s1={"name": "scale", "factor": 1})),
         "factor 1 sends the honest update"),
        (federated(topology=sites(2, s1={"name": "gaussian", "sigma": 0})),
         "sites.1.attack.gaussian.sigma"),
        (federated(topology=sites(2, s1={"name": "alie", "samples": 1, "z": 1})),
         "sites.1.attack.alie.samples"),
        (federated(topology=sites(2, s1={"name": "backdoor"})),
         "attack name 'backdoor' is not one of sign_flip, scale, gaussian, alie, label_flip"),
        # alie's default z is 0 for 4 sites and 1 attacker: the attack would do nothing
        (federated(topology=sites(4, s3={"name": "alie"})),
         "alie's z from Baruch et al. for 4 sites per round and 1 attacker(s) is 0"),
        (federated(topology=sites(3, s2={"name": "scale"}), fail_sites=["s2"]),
         "site s2 is in fail_sites and has an attack"),
    ],
)
def test_combinations_that_cannot_work_are_rejected(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


# --------------------------------------------------------------------------- secure aggregation

SECURE = {"clip": 1.0}


def test_secure_aggregation_composes_with_the_mean_privacy_attackers_and_failing_sites() -> None:
    cfg = parse_config(federated(topology=4, secure_aggregation=SECURE))
    assert cfg.federated is not None and cfg.federated.secure_aggregation is not None
    sa = cfg.federated.secure_aggregation
    assert (sa.clip, sa.bits, sa.threshold, sa.neighbours) == (1.0, 32, None, None)
    # the noised sum of DP composes; the masking bound then comes from clip_norm
    parse_config(federated(topology=4, secure_aggregation={}, privacy={
        "unit": "site", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3,
        "noise": "distributed"}, personalize_episodes=0))
    # an attacker is masked like any other site; a failing site drops after sharing its keys
    parse_config(federated(topology=sites(4, s3={"name": "sign_flip"}),
                           secure_aggregation=SECURE))
    parse_config(federated(topology=4, fail_sites=["site-1"], secure_aggregation=SECURE))
    parse_config(federated(topology=20, secure_aggregation={**SECURE, "neighbours": 6}))


ROBUST_RULES = [
    {"name": "median"}, {"name": "trimmed_mean"}, {"name": "krum", "f": 0},
    {"name": "multi_krum", "f": 0}, {"name": "bulyan", "f": 0},
]


@pytest.mark.parametrize("rule", ROBUST_RULES, ids=lambda r: r["name"])
def test_robust_rules_are_refused_with_secure_aggregation(rule: dict) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(federated(topology=4, quorum=4, aggregator=rule, secure_aggregation=SECURE))
    assert (f"federated.secure_aggregation leaves the cloud only the sum of the updates, but "
            f"aggregator {rule['name']} needs each update on its own") in str(err.value)
    assert "robust aggregation and secure aggregation do not compose" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (federated(topology=4, aggregator={"name": "norm_bound", "max_norm": 1.0},
                   secure_aggregation=SECURE),
         "(norm_bound with weighted_mean is secure_aggregation.clip)"),
        (federated(topology=4, aggregator={"name": "clip_noise", "clip_norm": 1.0},
                   secure_aggregation=SECURE),
         "aggregator clip_noise needs each update on its own (it clips every update at the "
         "cloud)"),
        (federated(topology=4, secure_aggregation={}), "secure_aggregation.clip is required"),
        (federated(topology=4, secure_aggregation=SECURE, privacy={
            "unit": "site", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}),
         "secure_aggregation.clip must be left out with federated.privacy"),
        (federated(topology=4, secure_aggregation={**SECURE, "threshold": 5}),
         "threshold 5 exceeds the 4 sites called per round: every round would abort"),
        (federated(topology=4, site_fraction=0.5,
                   secure_aggregation={**SECURE, "threshold": 3}),
         "threshold 3 exceeds the 2 sites called per round"),
        (federated(topology=20, secure_aggregation={**SECURE, "neighbours": 4,
                                                    "threshold": 6}),
         "threshold 6 exceeds the 5 holders of a site's shares (neighbours 4 + 1"),
        (federated(topology=4, site_fraction=0.25, secure_aggregation=SECURE),
         "needs at least 2 sites per round (now 1"),
        (federated(topology=4, secure_aggregation={**SECURE, "neighbours": 3}),
         "neighbours must be even"),
        (federated(topology=4, secure_aggregation={**SECURE, "threshold": 1}),
         "secure_aggregation.threshold"),
        (federated(topology=200, secure_aggregation={**SECURE, "bits": 12}),
         "a 12-bit ring leaves 200 participants fewer than 8 bits of resolution"),
        (federated(topology=4, secure_aggregation={**SECURE, "masks": 1}),
         "secure_aggregation.masks: unknown key"),
    ],
)
def test_secure_aggregation_refuses_what_cannot_work(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)
