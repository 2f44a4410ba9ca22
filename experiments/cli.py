"""The ``edgemeta`` command: train, evaluate, fetch data, and run the demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments.config import ConfigError, load_config

CONFIG_DIR = Path(__file__).parent / "configs"


def _resolve_config(name: str) -> Path:
    """A config path, or the name of a bundled config (``omniglot_maml_5w1s``)."""
    path = Path(name)
    if path.exists():
        return path
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.exists():
        return bundled
    choices = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no config file {name!r}; bundled configs: {choices}")


def cmd_train(args: argparse.Namespace) -> int:
    from experiments.train import train

    cfg = load_config(_resolve_config(args.config), args.set)
    train(cfg, resume=not args.fresh)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from experiments.train import evaluate_run

    evaluate_run(args.run_dir, step=args.step, episodes=args.episodes)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from metalearn.data.fetch import fetch_omniglot

    dest = args.dest or os.environ.get("EDGEMETA_DATA_DIR")
    path = fetch_omniglot(dest) if dest else fetch_omniglot()
    print(f"omniglot ready at {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from experiments.train import train

    cfg = load_config(_resolve_config("demo"), args.set)
    train(cfg, resume=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemeta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="centralized meta-training from a YAML config")
    p.add_argument("config", help="a YAML file, or the name of a bundled config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="re-evaluate a run folder's checkpoint on meta-test")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--episodes", type=int, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("data", help="data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download and convert a data set")
    f.add_argument("dataset", choices=["omniglot"])
    f.add_argument("--dest", default=None, help="folder (default: EDGEMETA_DATA_DIR or cache)")
    f.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser("demo", help="the end-to-end demo that `make demo` runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as err:
        print(f"edgemeta: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
