"""The ``turnrl`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.config import ConfigError, load_config

log = logging.getLogger("turnrl")


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turnrl", description="Multi-turn tool-use RL with turn-level credit")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a policy (starts Ray locally or joins ray.address)")
    p_train.add_argument("--config", default=None, help="YAML config file (with --resume: default RUN_DIR/config.yaml)")
    p_train.add_argument("--run-dir", default=None, help="run directory (default runs/<name>-<time>)")
    p_train.add_argument("--resume", default=None, metavar="RUN_DIR",
                         help="continue the run in RUN_DIR from its newest checkpoint (same step numbering)")
    p_train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-4")
    p_warm = sub.add_parser("warmstart", help="regenerate the demo warm-start checkpoint deterministically")
    p_warm.add_argument("--config", required=True, help="YAML config file (data + model sections)")
    p_warm.add_argument("--out", default=None, help="output directory (default: model.path)")
    p_warm.add_argument("overrides", nargs="*", help="dotted overrides")
    from env_workers.cli import add_index_arguments, run_index

    add_index_arguments(sub.add_parser("index", help="build a BM25 index from a Wikipedia dump"))
    from learner.experiment import add_experiment_arguments, run_experiment_command

    add_experiment_arguments(sub.add_parser(
        "experiment", help="train a grid of estimators x tasks x seeds (resumable) and write docs/results.md"))
    args = parser.parse_args(argv)
    if args.command == "index":
        _setup_logging()
        return run_index(args)
    if args.command == "experiment":
        _setup_logging()
        return run_experiment_command(args, sys.argv[1:] if argv is None else list(argv))

    if args.command == "train" and args.config is None:
        if args.resume is None:
            parser.error("train needs --config (or --resume RUN_DIR, which reads RUN_DIR/config.yaml)")
        args.config = str(Path(args.resume) / "config.yaml")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"turnrl: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.run.log_level)
    if args.command == "train":
        from learner.driver import train
        from learner.faults import LearnerCrashed

        if args.run_dir:
            cfg.run.run_dir = args.run_dir
        try:
            train(cfg, resume=args.resume)
        except (FileNotFoundError, ValueError) as e:
            print(f"turnrl: {e}", file=sys.stderr)
            return 2
        except LearnerCrashed as e:
            print(f"turnrl: {e}", file=sys.stderr)
            return 3
        return 0
    if args.command == "warmstart":
        from learner.warmstart import build_warmstart

        build_warmstart(cfg, out_dir=args.out or cfg.model.path)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
