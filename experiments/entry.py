"""What the training entry points share: where the config comes from, where the run goes.

A config is a file, the name of a bundled config, a file in run storage
(``s3://bucket/configs/x.yaml``), or the YAML itself, base64-encoded (``--config-b64``, what
``edgemeta submit`` sends: a config kept outside the repository, or in a git-ignored folder
such as ``runs/``, never reaches a job through ``--working-dir``). The run goes where
:func:`experiments.run_storage.place_run` says (``--storage``, ``output_dir``,
``EDGEMETA_RUN_STORAGE``).
"""

from __future__ import annotations

import argparse
import base64
import binascii

from experiments.config import (
    ConfigError,
    ExperimentConfig,
    config_from_text,
    load_config,
    resolve_config,
)
from experiments.run_storage import STORAGE_ENV, place_run

CONFIG_B64 = "--config-b64"


def add_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The config, overrides, storage and resume flags of a training entry point."""
    parser.add_argument("config", nargs="?", default=None,
                        help=f"{what}: a YAML file, a bundled config's name, or a file in run "
                             "storage (s3://...)")
    parser.add_argument(CONFIG_B64, default=None, metavar="B64",
                        help="the config's YAML, base64-encoded, instead of CONFIG (what "
                             "`edgemeta submit` sends)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100")
    parser.add_argument("--storage", default=None, metavar="ROOT",
                        help="run storage root: an absolute folder or a URI such as "
                             f"s3://BUCKET/runs (default: an absolute output_dir, else "
                             f"{STORAGE_ENV}, else output_dir)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")


def decode_config(b64: str) -> str:
    """The YAML text of ``--config-b64``; a clear error if it is not base64 of UTF-8."""
    try:
        return base64.b64decode(b64.encode(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as err:
        raise ConfigError(f"{CONFIG_B64}: not base64-encoded UTF-8 text ({err})") from None


def encode_config(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The validated config the arguments name, placed in run storage."""
    if (args.config is None) == (args.config_b64 is None):
        raise ConfigError(f"give a config: CONFIG or {CONFIG_B64} (exactly one)")
    if args.config_b64 is not None:
        cfg = config_from_text(decode_config(args.config_b64), CONFIG_B64, args.set)
    else:
        cfg = load_config(resolve_config(args.config), args.set)
    return place_run(cfg, args.storage)
