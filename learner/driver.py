"""The training driver: MT-GRPO as a loop of named, timed phases.

    for step in 1..N:
        questions  <- next prompts_per_step training questions
        rollout    <- G episodes per question through generators + env workers (rows -> replay queue)
        batch      <- complete groups from the replay queue (policy-lag bound enforced)
        update     <- learner: per-turn advantages, PPO-clip over action tokens, DeepSpeed step
        sync       <- push versioned weights to the generators (every push_every steps)
        log        <- metrics.jsonl + Prometheus /metrics + progress bar

Evaluation of the starting and the trained policy on held-out questions brackets the loop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import metrics as M
from common import telemetry as T
from common.config import Config, save_config
from common.modeling import check_model_dir, load_tokenizer
from env_workers.prepare import DataPaths, prepare_data
from learner.async_loop import AsyncLoop
from learner.checkpoint import (
    Checkpointer,
    check_compatible,
    find_resume_checkpoint,
    latest_checkpoint,
    read_state,
    truncate_metrics,
)
from learner.estimator_config import check_estimator_config
from learner.evaluation import curve_point_due, eval_metrics, format_table, generation_metrics, plot_learning_curves
from learner.faults import crash_summary, inject, stale_episodes
from learner.trainer import Trainer

log = logging.getLogger(__name__)


def make_run_dir(cfg: Config) -> Path:
    if cfg.run.run_dir:
        run_dir = Path(cfg.run.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.run.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = run_dir.parent / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.resolve(), target_is_directory=True)
    except OSError as e:  # e.g. a filesystem without symlinks
        log.warning("could not point %s at the run: %s", latest, e)
    return run_dir



def preflight(cfg: Config, resume: str | Path | None) -> tuple[DataPaths, Path | None]:
    """Everything that can fail before Ray starts: config rules that need the estimators, missing trackers,
    the model directories, the corpus and question files, and a resume that has nothing to resume from or
    whose config changed. Returns the prepared data and the checkpoint to resume from (or None)."""

    check_estimator_config(cfg.algorithm)
    T.check_report_to(cfg.metrics.report_to)
    check_model_dir(cfg.model.path)
    if cfg.judge.enabled:
        check_model_dir(cfg.judge.model_path)
    if cfg.algorithm.ref_model_path:
        check_model_dir(cfg.algorithm.ref_model_path)
    data = prepare_data(cfg.data)
    resume_from = None
    if resume is not None:
        cfg.run.run_dir = str(resume)
        resume_from = find_resume_checkpoint(Path(resume), cfg)
        check_compatible(cfg, read_state(resume_from), resume_from)
    return data, resume_from


def start_ray(cfg: Config) -> None:
    """Join ``ray.address``, or start Ray in this process (local mode)."""
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, log_to_driver=True,
             runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                                       "TOKENIZERS_PARALLELISM": "false"}})


def open_metrics(cfg: Config, run_dir: Path) -> tuple[T.MetricsSink, T.PrometheusTargets | None]:
    """``metrics.jsonl``, the Prometheus endpoint and its file_sd target, and the ``metrics.report_to`` trackers."""
    mc = cfg.metrics
    sink = T.MetricsSink(run_dir, enabled=mc.enabled, host=mc.host, port=mc.port, report_to=mc.report_to,
                         run_name=run_dir.name, config=cfg.to_dict(), wandb_project=mc.wandb_project,
                         wandb_mode=mc.wandb_mode)
    if sink.port is None:
        return sink, None
    (run_dir / "metrics_endpoint.txt").write_text(f"http://{mc.host}:{sink.port}/metrics\n")
    return sink, T.PrometheusTargets(run_dir, mc.host, sink.port, discovery_dir=mc.discovery_dir,
                                   advertise=mc.advertise_host)


def begin(trainer: "Trainer", ckpt: Checkpointer, resume_from: Path | None) -> tuple[dict[str, Any], int, dict]:
    """Restore a checkpoint (resume), or evaluate the starting policy. Returns (eval results so far, the step
    to continue after, restart counts carried over)."""
    cfg, results = trainer.cfg, {}
    if resume_from is not None:
        state = ckpt.restore(trainer, resume_from)
        results.update(state.get("eval", {}))
        truncate_metrics(trainer.run_dir / "metrics.jsonl", int(state["step"]))
        return results, int(state["step"]), state.get("restarts", {})
    if cfg.eval.before_training:
        results["warm_start"] = trainer.evaluate("warm_start", greedy=False)
        results["curve"] = [{"step": 0, **results["warm_start"]}]
        if cfg.eval.greedy:
            results["warm_start_greedy"] = trainer.evaluate("warm_start_greedy", greedy=True)
    return results, 0, {}


def sync_step(trainer: "Trainer", step: int) -> dict[str, float]:
    """One synchronous step: rollout, then update on exactly those groups, then (every push_every) sync."""
    cfg = trainer.cfg
    n = cfg.algorithm.prompts_per_step
    stats = generation_metrics(trainer.rollout_phase(trainer.sampler.next(n), step))
    stats.update(trainer.update_phase(n))
    stats[M.TIME_SYNC] = trainer.sync_phase() if step % cfg.learner.push_every == 0 else 0.0
    return stats


def run_counters(trainer: "Trainer", restart_base: dict, *, sync: bool) -> dict[str, float]:
    """The step's queue, restart, judge and episode-audit figures (restarts carried over resumes)."""
    import ray

    stats = dict(ray.get(trainer.queue.stats.remote()))
    stats.setdefault(M.EPISODES_TOTAL, len(trainer.audit.trained))
    stats.update({k: v + restart_base.get(k, 0.0) for k, v in trainer.restarts.sample().items()})
    stats.update(trainer.judge_metrics())  # judge/* and perf/time/judge_s ({} without judge.enabled)
    stats.update(trainer.audit.counts(trainer.episode_counter, stale_episodes(stats, trainer.cfg.algorithm.group_size),
                                      sync=sync))
    return stats


def last_curve_point(results: dict[str, Any], last_step: int) -> dict[str, float] | None:
    """The held-out curve's point at ``last_step`` without its step (the trained evaluation), or None."""
    curve = results.get("curve", [])
    if curve and curve[-1]["step"] == last_step:
        return {k: v for k, v in curve[-1].items() if k != "step"}
    return None


def linger(cfg: Any, sink: T.MetricsSink) -> None:
    """Keep serving /metrics ``metrics.linger_s`` more seconds so the last values get scraped."""
    if cfg.metrics.linger_s > 0 and sink.port is not None:
        log.info("serving the final metrics for %.0f s more (metrics.linger_s)", cfg.metrics.linger_s)
        time.sleep(cfg.metrics.linger_s)


def close_run(trainer: Any, targets: T.PrometheusTargets | None, sink: T.MetricsSink) -> None:
    """Kill the run's actors (if they were made), drop its Prometheus target and close the metrics sink."""
    if trainer is not None:
        trainer.close()
    if targets is not None:
        targets.close()
    sink.close()


def finish(trainer: "Trainer", loop: Any, results: dict[str, Any], resume_from: Path | None, ckpt: Checkpointer,
           sink: T.MetricsSink, t_start: float) -> None:
    """Evaluate the trained policy, save it, and write ``run_summary.json``, ``eval.json``, the table and plot."""
    import ray

    cfg, run_dir = trainer.cfg, trainer.run_dir
    results["trained"] = (last_curve_point(results, cfg.learner.total_steps)  # evaluated at the last step already
                          or trainer.evaluate("trained", greedy=False))
    if cfg.eval.greedy:
        results["trained_greedy"] = trainer.evaluate("trained_greedy", greedy=True)
    ray.get([lw.save_pretrained.remote(str((run_dir / "policy").resolve())) for lw in trainer.learners])
    load_tokenizer(cfg.model.path).save_pretrained(str(run_dir / "policy"))  # a standalone model directory
    queue = ray.get(trainer.queue.stats.remote())
    summary = {
        "generator_versions": ray.get([g.version.remote() for g in trainer.generators]),
        "learner_version": trainer.version,
        "queue": queue,
        "episodes_trained": loop.episodes_trained if loop is not None else len(trainer.audit.trained),
        "audit": trainer.audit.counts(trainer.episode_counter, stale_episodes(queue, cfg.algorithm.group_size),
                                      sync=loop is None),
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "checkpoint": str(latest_checkpoint(ckpt.root)) if cfg.checkpoint.every_steps else None,
        "metrics_endpoint": f"http://{cfg.metrics.host}:{sink.port}/metrics" if sink.port else None,
    }
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
    results["wall_time_s"] = time.time() - t_start
    results["steps"] = cfg.learner.total_steps
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    plot_learning_curves(run_dir / "metrics.jsonl", run_dir / "learning_curves.png")
    table = format_table(results)
    (run_dir / "eval_table.txt").write_text(table + "\n")
    print(f"\nHeld-out evaluation ({len(trainer.eval_questions)} questions):\n{table}\n"
          f"wall time {results['wall_time_s']:.0f} s; run directory: {run_dir}")
    linger(cfg, sink)


def train(cfg: Config, resume: str | Path | None = None) -> Path:
    """Run one training job end to end (the loop of the module docstring); return the run directory.

    ``resume``: a run directory with checkpoints; the run goes on from its newest one (same step
    numbering, counters, sampler position, queue contents, weights and optimizer state).
    """
    from tqdm import tqdm

    t_start = time.time()
    data, resume_from = preflight(cfg, resume)
    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    start_ray(cfg)
    sink, targets = open_metrics(cfg, run_dir)
    trainer: Trainer | None = None
    ckpt, step, last = Checkpointer(cfg, run_dir), 0, cfg.learner.total_steps
    try:
        trainer = Trainer(cfg, run_dir, data)
        results, start_step, restart_base = begin(trainer, ckpt, resume_from)
        loop = AsyncLoop(trainer) if cfg.rollout.mode == "async" else None  # generation runs on while it trains
        bar = tqdm(range(start_step + 1, last + 1), desc="train", unit="step", dynamic_ncols=True,
                   initial=start_step, total=last)
        for step in bar:
            t0 = time.time()
            inject(trainer, step)  # faults.kill: deterministic actor kills (tests)
            stats = loop.step(step) if loop is not None else sync_step(trainer, step)
            stats.update(run_counters(trainer, restart_base, sync=loop is None))
            stats[M.TIME_STEP] = time.time() - t0
            if curve_point_due(cfg.eval.every_steps, cfg.eval.extra_steps, step, last):  # held-out curve
                held_out = trainer.evaluate(f"step {step}", greedy=False)
                results.setdefault("curve", []).append({"step": step, **held_out})
                stats.update(eval_metrics(held_out))
            save = ckpt.due(step, final=step == last)
            stats[M.CHECKPOINT_STEP], stats[M.CHECKPOINT_TIME] = (step if save else ckpt.last_step), ckpt.last_seconds
            if step % cfg.metrics.log_every == 0 or step == last:
                sink.log(step, stats)
            if save:  # after the log line, so a resume from it never repeats or skips a step
                restarts = {k: v for k, v in stats.items() if k.startswith("actors/restarts/")}  # carried over
                ckpt.save(trainer, step, {"eval": results, "restarts": restarts})
            bar.set_postfix(reward=f"{stats[M.REWARD_TOTAL]:.2f}", tool=f"{stats[M.TOOL_SUCCESS]:.2f}",
                            air=f"{stats[M.ANSWER_IN_RESULT]:.2f}", em=f"{stats[M.EXACT_MATCH]:.2f}")
        if loop is not None:
            loop.close()  # the calls still generating finish; their groups are dropped
        finish(trainer, loop, results, resume_from, ckpt, sink, t_start)
    except Exception as err:
        crashed = crash_summary(err, trainer, run_dir, step, ckpt)  # a dead learner rank: say how to resume
        if crashed is None:
            raise
        raise crashed from err
    finally:
        close_run(trainer, targets, sink)
    return run_dir
