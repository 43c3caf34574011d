"""The ``turnrl`` command line (the top of the dependency order: it may import every package)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from common.config import ConfigError, load_config
from common.config_agent import config_kind, load_agent_config
from learner.estimator_config import check_estimator_config

log = logging.getLogger("turnrl")
elog = logging.getLogger("learner.experiment")  # the experiment runner's messages, as before


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
    p_warm.add_argument("--out", default=None, help="output directory (default: model.path; with --judge: judge.model_path; with --multi-hop: deploy/warmstart_multihop)")
    p_warm.add_argument("--judge", action="store_true",
                        help="build the demo judge instead: fine-tune model.path into a yes/no reward model")
    p_warm.add_argument("--multi-hop", action="store_true",
                        help="build the multi-hop warm start (deploy/warmstart_multihop) from model.path: stage 3, "
                             "expert two-hop demonstrations")
    p_warm.add_argument("overrides", nargs="*", help="dotted overrides")
    from env_workers.cli import add_index_arguments, run_index

    add_index_arguments(sub.add_parser("index", help="build a BM25 index from a Wikipedia dump"))
    add_experiment_arguments(sub.add_parser(
        "experiment", help="train a grid of estimators x tasks x seeds (resumable) and write docs/results.md"))
    p_eval = sub.add_parser("evaluate", help="evaluate finished runs' saved policies on their held-out questions "
                                          "(adds what eval.json lacks, e.g. a greedy evaluation)")
    p_eval.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of `turnrl train`")
    p_eval.add_argument("--mode", choices=("sampled", "greedy", "both"), default="both",
                        help="sampled at the training temperature (eval.json `trained`), greedy (`trained_greedy`) "
                             "or both (default)")
    p_eval.add_argument("--no-write", action="store_true", help="print the figures, leave eval.json as it is")
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        _setup_logging()
        return run_evaluate_command(args, sys.argv[1:] if argv is None else list(argv))
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
        if config_kind(args.config) == "tensor":  # a non-LLM agent (common/config_agent.py)
            if args.command != "train" or args.resume:
                raise ConfigError(f"{args.config} is a tensor-agent config (kind: tensor): only `turnrl train "
                                  "--config` without --resume runs it")
            return _train_agent(load_agent_config(args.config, args.overrides), args.run_dir)
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            check_estimator_config(cfg.algorithm)
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
        if args.multi_hop:
            from learner.warmstart import build_multihop_warmstart

            build_multihop_warmstart(cfg, out_dir=args.out or "deploy/warmstart_multihop")
            return 0
        if args.judge:
            from learner.judge_warmstart import build_judge

            build_judge(cfg, out_dir=args.out or cfg.judge.model_path)
            return 0
        from learner.warmstart import build_warmstart

        build_warmstart(cfg, out_dir=args.out or cfg.model.path)
        return 0
    return 1


def run_evaluate_command(args: argparse.Namespace, argv: list[str]) -> int:
    """``turnrl evaluate RUN_DIR ...``: each run's saved policy, after training (learner/evaluate.py)."""
    from learner.evaluate import describe, evaluate_run

    modes = ("sampled", "greedy") if args.mode == "both" else (args.mode,)
    command = shlex.join(["turnrl", *argv])
    for run_dir in args.run_dirs:
        try:
            res = evaluate_run(run_dir, modes, write=not args.no_write, command=command)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"turnrl: {e}", file=sys.stderr)
            return 2
        print(describe(res))
    return 0


# -- turnrl experiment ------------------------------------------------------------------------------
def _train_agent(cfg, run_dir: str | None) -> int:
    """``turnrl train`` of a ``kind: tensor`` config (learner/tensor_driver.py)."""
    from learner.tensor_driver import train_agent

    _setup_logging(cfg.run.log_level)
    if run_dir:
        cfg.run.run_dir = run_dir
    try:
        train_agent(cfg)  # its preflight checks the estimator's keys before Ray starts
    except (ConfigError, ValueError) as e:
        print(f"turnrl: {e}", file=sys.stderr)
        return 2
    return 0


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``turnrl experiment`` arguments."""
    parser.add_argument("--config", default="deploy/configs/experiment.yaml", help="experiment YAML")
    parser.add_argument("--out", default=None, help="directory of the run directories (default: out_dir)")
    parser.add_argument("--only", nargs="+", default=None, metavar="GLOB",
                        help="train only runs whose name matches, e.g. 'two_turn-*' '*-seed0'")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs")
    parser.add_argument("--no-report", action="store_true", help="train, but do not rewrite the report")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their status, train nothing")
    parser.add_argument("overrides", nargs="*", help="run-config overrides for every run, e.g. learner.lr=1e-3")


def run_experiment_command(args: argparse.Namespace, argv: list[str]) -> int:
    """``turnrl experiment``: train the grid (or a part of it) and write the report."""
    from learner.experiment import (
        build_configs,
        expand_grid,
        load_experiment,
        read_state,
        record_session,
        run_grid,
        run_status,
        select_runs,
    )
    from learner.results import write_report

    try:
        exp = load_experiment(args.config)
        runs = expand_grid(exp, out_dir=args.out, extra=args.overrides)
        selected = select_runs(runs, args.only)
    except ConfigError as e:
        elog.error("%s", e)
        return 2
    out_dir = Path(args.out or exp.out_dir)
    if args.dry_run:
        try:
            build_configs(exp, selected)
        except ConfigError as e:
            elog.error("%s", e)
            return 2
        for spec in selected:
            print(f"{run_status(spec.run_dir):8} {spec.name:40} turnrl train --config {exp.base_config} "
                  + shlex.join(spec.overrides))
        return 0
    failed: list[str] = []
    if not args.report_only:
        started = time.time()
        try:
            outcome = run_grid(exp, selected)
        except ConfigError as e:
            elog.error("%s", e)
            return 2
        record_session(out_dir, shlex.join(["turnrl", *argv]), outcome, started)
        failed = outcome.failed
        elog.info("experiment: trained %d, skipped %d (done; %d of them evaluated greedily from their saved "
                  "policies), failed %d, in %.1f min", len(outcome.trained), len(outcome.skipped),
                  len(outcome.evaluated), len(failed), outcome.wall_s / 60)
    if not args.no_report:
        if config_kind(exp.base_config) == "tensor":  # the tensor-agent section of the report
            from learner.tensor_results import write_agent_report

            path = write_agent_report(exp, runs, read_state(out_dir))
        else:
            path = write_report(exp, runs, read_state(out_dir), os.cpu_count() or 0)
        elog.info("report written to %s", path)
    if failed:
        elog.error("failed runs (rerun the same command to redo them): %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
