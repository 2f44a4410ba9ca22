"""Where a run is written: run storage chosen by flag, config or the cluster's setting.

The run folder is ``ROOT/NAME`` in run storage (:mod:`metalearn.storage`), and ``ROOT`` is,
first that applies:

1. ``--storage ROOT`` on the command line;
2. the config's ``output_dir`` when it is absolute or a URI (the config chose a place);
3. ``EDGEMETA_RUN_STORAGE``, the default place of a machine or cluster (``cluster.yaml`` sets
   it on every node's ``ray start``, so every job's driver sees it);
4. the config's relative ``output_dir`` (``runs``), under the working directory.

Why a relative folder can be refused: a job submitted with ``ray job submit --working-dir .``
runs in Ray's unpacked copy of that folder, under the cluster's temp dir, which ``ray down`` and
``edgemeta cluster down`` delete. A run written there would vanish with the cluster, silently,
so it is refused with what to set instead.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from experiments.config import ConfigError, ExperimentConfig
from metalearn.storage import is_uri

STORAGE_ENV = "EDGEMETA_RUN_STORAGE"
# What Ray's job supervisor hands a job's driver: its runtime env (with the working dir).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Where Ray unpacks runtime-env packages (working dirs, py_modules) under a node's temp dir.
RAY_RUNTIME_RESOURCES = "runtime_resources"


def is_absolute(where: str) -> bool:
    """An absolute local folder or a URI: a place that means the same from any directory."""
    return is_uri(where) or Path(where).expanduser().is_absolute()


def ray_working_dir(env: Mapping[str, str], cwd: Path) -> Path | None:
    """The unpacked working dir of the Ray job this process drives (its cwd), if any."""
    raw = env.get(RAY_JOB_CONFIG_ENV)
    if raw:
        try:
            runtime_env = json.loads(raw).get("runtime_env") or {}
        except (ValueError, AttributeError):
            runtime_env = {}
        if runtime_env.get("working_dir"):
            return cwd
    return cwd if RAY_RUNTIME_RESOURCES in cwd.parts else None


def place_run(cfg: ExperimentConfig, storage: str | None = None,
              env: Mapping[str, str] | None = None, cwd: Path | None = None
              ) -> ExperimentConfig:
    """``cfg`` with ``output_dir`` set to the run storage root that applies (see the module
    docstring); a local run folder inside a Ray job's working dir is a :class:`ConfigError`."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    from_env = env.get(STORAGE_ENV, "").strip()
    if storage:
        root, why = storage, "--storage"
    elif is_absolute(cfg.output_dir):
        root, why = cfg.output_dir, "output_dir"
    elif from_env:
        root, why = from_env, STORAGE_ENV
    else:
        root, why = cfg.output_dir, "output_dir"
    if why == STORAGE_ENV and not is_absolute(root):
        raise ConfigError(f"{STORAGE_ENV}={root!r} is relative: give an absolute folder or a "
                          "URI such as s3://BUCKET/runs")
    placed = cfg if root == cfg.output_dir else cfg.model_copy(update={"output_dir": root})
    run = placed.run_dir
    if run.is_local:
        folder = (cwd / run.path.expanduser()).resolve()
        job_dir = ray_working_dir(env, cwd)
        inside = RAY_RUNTIME_RESOURCES in folder.parts or (
            job_dir is not None and folder.is_relative_to(job_dir.resolve()))
        if inside:
            raise ConfigError(
                f"run folder {folder} ({why}={root!r}) is inside the Ray job's unpacked working "
                "dir, which is deleted with the cluster (`ray down`, `edgemeta cluster down`): "
                "give run storage that outlives it: --storage s3://BUCKET/runs (or an absolute "
                f"folder), {STORAGE_ENV} on the cluster's nodes (cluster.yaml sets it), or an "
                "absolute output_dir in the config")
    return placed


def where_line(cfg: ExperimentConfig) -> str:
    """One line that says where the run's files go (and, locally, on which host)."""
    run = cfg.run_dir
    if run.is_local:
        return (f"run storage: {run.resolve()} (a local folder on {socket.gethostname()}; "
                "give --storage s3://... for storage every node reaches)")
    return f"run storage: {run}"
