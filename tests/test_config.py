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
