"""The `pope-lm` command line: `train`, `prepare`, and the tools that later issues add.

Every user mistake ends with one line `error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pope_lm.config import ConfigError

EXIT_USAGE = 2


def _train(args: argparse.Namespace) -> int:
    from pope_lm.config import load_config
    from pope_lm.train import train

    cfg = load_config(args.recipe, args.overrides)
    metrics = train(cfg)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val/", "train/"))}
    print(f"done: step {metrics['step']}, {shown}, run dir {cfg.resolved_run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pope-lm", description="Pretrain decoder LMs with PoPE attention.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train or resume a run described by a recipe",
                           description="Train the run a YAML recipe describes; key=value pairs override it, "
                                       "e.g. trainer.max_steps=200 resume=auto.")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    train.set_defaults(func=_train)

    from pope_lm.data.cli import add_prepare_subcommands

    add_prepare_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("POPE_LM_LOG_LEVEL", "INFO"), format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
