"""Where a run goes (flag, config, the cluster's setting) and where a job's config comes from.

The Ray job itself is in tests/test_cluster_local.py (a real job on a multi-node cluster); here
the choice of place is driven with the environment a job's driver gets, written out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from experiments.cli import main as cli_main
from experiments.config import ConfigError, parse_config
from experiments.entry import add_run_arguments, config_from_args, encode_config
from experiments.run_storage import RAY_JOB_CONFIG_ENV, STORAGE_ENV, place_run, where_line
from experiments.submit import job_config_text, job_entrypoint, storage_for_job

RAW = {"name": "r", "data": {"dataset": "sinusoid"}, "model": {"name": "sinusoid_mlp"},
       "federated": {"topology": {"sites": 2}}}
JOB_ENV = {RAY_JOB_CONFIG_ENV: json.dumps(
    {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}})}


def _cfg(**changes: object):
    return parse_config({**RAW, **changes})


def test_precedence_flag_then_config_then_environment(tmp_path: Path) -> None:
    env = {STORAGE_ENV: "s3://bucket/cluster"}
    assert str(place_run(_cfg(), "s3://bucket/flag", env, tmp_path).run_dir) == "s3://bucket/flag/r"
    absolute = _cfg(output_dir=str(tmp_path / "mine"))
    assert place_run(absolute, None, env, tmp_path).run_dir == tmp_path / "mine" / "r"
    assert str(place_run(_cfg(), None, env, tmp_path).run_dir) == "s3://bucket/cluster/r"
    assert str(place_run(_cfg(), None, {}, tmp_path).run_dir) == "runs/r"  # as before
    with pytest.raises(ConfigError, match=f"{STORAGE_ENV}='rel' is relative"):
        place_run(_cfg(), None, {STORAGE_ENV: "rel"}, tmp_path)


def test_a_run_inside_a_ray_working_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inside the Ray job's unpacked working dir") as err:
        place_run(_cfg(), None, JOB_ENV, tmp_path)
    assert str(tmp_path / "runs" / "r") in str(err.value) and "--storage" in str(err.value)
    # an unpacked package is refused by its place too, whatever the environment says
    unpacked = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    with pytest.raises(ConfigError, match="working dir"):
        place_run(_cfg(output_dir=str(unpacked / "runs")), None, {}, tmp_path)
    # what outlives the cluster is fine: the flag, the cluster's setting, an absolute folder
    assert not place_run(_cfg(), "s3://b/runs", JOB_ENV, tmp_path).run_dir.is_local
    assert not place_run(_cfg(), None, {**JOB_ENV, STORAGE_ENV: "gs://b/r"}, tmp_path
                         ).run_dir.is_local
    elsewhere = _cfg(output_dir=str(tmp_path.parent / "keep"))
    assert place_run(elsewhere, None, JOB_ENV, tmp_path).run_dir.is_local
    assert where_line(place_run(_cfg(), "s3://b/runs", {}, tmp_path)) == \
        "run storage: s3://b/runs/r"


def test_inline_config_reaches_the_entry_point(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, "config")
    text = job_config_text(_cfg(seed=7))
    args = parser.parse_args(["--config-b64", encode_config(text), "--set", "seed=8",
                              "--storage", str(tmp_path)])
    cfg = config_from_args(args)
    assert cfg.seed == 8 and cfg.run_dir == tmp_path / "r"
    # the topology travels resolved, not as a name the cluster may not have
    assert [s["name"] for s in yaml.safe_load(text)["federated"]["topology"]["sites"]] == \
        ["site-0", "site-1"]
    for argv, message in ([], "exactly one"), (["x.yaml", "--config-b64", "eA=="], "exactly one"):
        with pytest.raises(ConfigError, match=message):
            config_from_args(parser.parse_args(argv))


def test_submit_checks_before_sending(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _cfg()
    with pytest.raises(ConfigError, match="relative"):
        storage_for_job(cfg, "runs")
    assert storage_for_job(cfg, None) is None  # the cluster's EDGEMETA_RUN_STORAGE
    assert storage_for_job(_cfg(output_dir="s3://b/x"), None) == "s3://b/x"
    entry = job_entrypoint(cfg, "s3://b/runs")
    assert entry.startswith("python -m experiments.federated --config-b64 ")
    assert entry.endswith(" --storage s3://b/runs")

    assert cli_main(["federated", "--config-b64", "not base64!"]) == 2
    assert "--config-b64: not base64-encoded" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(RAW))
    assert cli_main(["submit", str(config), "--address", "http://127.0.0.1:9",
                     "--storage", "relative/runs"]) == 2
    assert "--storage 'relative/runs' is relative" in capsys.readouterr().err
    assert cli_main(["submit", "sinusoid_maml", "--address", "http://127.0.0.1:9"]) == 2
    assert "the config has no federated section" in capsys.readouterr().err
    assert cli_main(["submit", str(config), "--address", "http://127.0.0.1:9"]) == 2
    assert "Failed to connect to Ray at address: http://127.0.0.1:9" in capsys.readouterr().err
