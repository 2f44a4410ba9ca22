"""``edgemeta submit``: federated training on a cluster as a Ray job, config included.

``ray job submit --working-dir .`` uploads the repository without its git-ignored files, so a
config kept in ``runs/`` or outside the repository never reaches the job. This command reads
and validates the config here (errors show before anything is submitted), resolves its
topology, and sends the whole config inline (``--config-b64``) with the job, through Ray's Job
API (:class:`ray.job_submission.JobSubmissionClient`). The run goes to run storage that
outlives the cluster (``--storage``, an absolute ``output_dir``, or the cluster's
``EDGEMETA_RUN_STORAGE``), and the command says where.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any

import yaml

from cluster import auth
from cluster.console import Printer
from experiments.config import ConfigError, ExperimentConfig, load_config, resolve_config
from experiments.entry import CONFIG_B64, encode_config
from experiments.run_storage import STORAGE_ENV, is_absolute

ENTRY_MODULE = "experiments.federated"
DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_config_text(cfg: ExperimentConfig) -> str:
    """The config as the job reads it: self-contained (the topology in full, not a file name
    the cluster may not have)."""
    config = cfg.to_dict()
    if cfg.federated is None:
        raise ConfigError("edgemeta submit runs federated training: the config has no "
                          "federated section")
    config["federated"]["topology"] = cfg.federated.resolved_topology().model_dump(mode="json")
    return yaml.safe_dump(config, sort_keys=False)


def job_entrypoint(cfg: ExperimentConfig, storage: str | None) -> str:
    """The shell command the job runs: the real federated entry point, config inline."""
    parts = ["python", "-m", ENTRY_MODULE, CONFIG_B64, encode_config(job_config_text(cfg))]
    if storage:
        parts += ["--storage", storage]
    return shlex.join(parts)


def storage_for_job(cfg: ExperimentConfig, storage: str | None) -> str | None:
    """The run storage root to send (None: the cluster's own ``EDGEMETA_RUN_STORAGE``)."""
    if storage is not None:
        if not is_absolute(storage):
            raise ConfigError(f"--storage {storage!r} is relative: on the cluster it would land "
                              "in the job's working dir; give a URI (s3://BUCKET/runs) or an "
                              "absolute folder")
        return storage
    return cfg.output_dir if is_absolute(cfg.output_dir) else None


def job_client(address: str | None) -> Any:
    """A Job API client for ``address`` (default ``RAY_ADDRESS``), with the token of the
    environment (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) when there is one."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster to submit to: give --address http://HEAD:8265 (the "
                          "dashboard) or set RAY_ADDRESS")
    token = os.environ.get(auth.TOKEN_ENV)
    if not token and os.environ.get(auth.TOKEN_PATH_ENV):
        token = auth.read_token(os.path.expanduser(os.environ[auth.TOKEN_PATH_ENV]))
    return JobSubmissionClient(address, headers=auth.bearer_headers(token) if token else None)


def submit_job(config: str, *, address: str | None = None, storage: str | None = None,
               overrides: list[str] | None = None, working_dir: str = ".",
               env_vars: dict[str, str] | None = None, echo: Printer = print) -> str:
    """Validate ``config`` here and submit it as a job; returns the job's submission id."""
    cfg = load_config(resolve_config(config), overrides)
    root = storage_for_job(cfg, storage)
    entrypoint = job_entrypoint(cfg, root)  # every check before anything reaches the cluster
    runtime_env: dict[str, Any] = {"working_dir": working_dir}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    job_id = job_client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    where = (f"{root.rstrip('/')}/{cfg.name}" if root is not None
             else f"the cluster's {STORAGE_ENV}/{cfg.name} (the job refuses to start without it)")
    echo(f"submitted job {job_id}: {cfg.name} -> {where}\n"
         f"  follow: ray job logs -f {job_id}   status: ray job status {job_id}")
    return job_id


def wait_for_job(client: Any, job_id: str, echo: Printer = print, poll_s: float = 1.0,
                 timeout_s: float | None = None) -> str:
    """Print the job's logs as they grow until it ends; its final status."""
    shown, t0 = 0, time.monotonic()
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in DONE:
            return status
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            return status
        time.sleep(poll_s)


def submit(config: str, *, address: str | None, storage: str | None, overrides: list[str],
           working_dir: str, wait: bool) -> int:
    """``edgemeta submit``: 0 when submitted (with ``--wait``: when the job succeeded)."""
    job_id = submit_job(config, address=address, storage=storage, overrides=overrides,
                        working_dir=working_dir)
    if not wait:
        return 0
    status = wait_for_job(job_client(address), job_id)
    print(f"job {job_id}: {status}", file=sys.stderr if status != "SUCCEEDED" else sys.stdout)
    return 0 if status == "SUCCEEDED" else 1
