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
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import metrics as M
from common import schema as S
from common.config import Config, save_config, torch_threads
from env_workers.prepare import DataPaths, prepare_data
from learner.checkpoint import (Checkpointer, check_compatible, find_resume_checkpoint, latest_checkpoint, read_state,
                                truncate_metrics)
from learner.cluster import Placement, PrometheusTargets, RestartCounter
from learner.estimator_config import check_estimator_config
from learner.faults import EpisodeAudit, crash_summary, inject, rollout_with_retries, stale_episodes
from learner.weight_sync import generator_kwargs, make_weight_sync, rollout_kwargs
from learner.evaluation import (episode_metrics, episode_summaries, format_table, generation_metrics,
                                plot_learning_curves, summarize_episodes)

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



def make_env_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of every ``WikiSearchEnv`` of the run, from ``env.*``."""
    from env_workers.env import DEFAULT_SYSTEM_PROMPT, SYSTEM_PROMPTS
    from env_workers.rewards import RewardWeights

    return {
        "system_prompt": cfg.env.system_prompt or SYSTEM_PROMPTS.get(cfg.env.protocol, DEFAULT_SYSTEM_PROMPT),
        "protocol": cfg.env.protocol, "max_turns": cfg.env.max_turns, "top_k": cfg.env.top_k,
        "max_result_chars": cfg.env.max_result_chars, "answer_match": cfg.env.answer_match,
        "weights": RewardWeights(**vars(cfg.env.rewards)),
    }


class QuestionSampler:
    """Shuffled pass over the training questions, epoch after epoch; position is checkpointable."""

    def __init__(self, questions: list[dict], seed: int):
        self.questions = questions
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.questions)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            i = self._order[self.pos]
            out.append({**self.questions[i], "prompt_id": i})
            self.pos += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "num_questions": len(self.questions)}

    def load_state(self, state: dict[str, int]) -> None:
        if state["num_questions"] != len(self.questions) or state["seed"] != self.seed:
            raise ValueError(f"sampler state {state} does not fit {len(self.questions)} questions with seed "
                             f"{self.seed}: the training questions changed since the checkpoint")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


class Trainer:
    """Owns the actors of one run; Ray plumbing stays in the actor classes and here."""

    def __init__(self, cfg: Config, run_dir: Path, data: DataPaths):
        import ray

        from actors.engine import SamplingParams
        from actors.generator import Generator, WeightStore
        from actors.rollout import RolloutWorker
        from common.replay_queue import ReplayQueue, register_arrow_serializers
        from env_workers.demo_data import load_questions
        from env_workers.worker import EnvWorker
        from learner.worker import LearnerWorker

        self.cfg, self.run_dir = cfg, run_dir
        self.SamplingParams = SamplingParams
        register_arrow_serializers()  # tables this process sends the learners travel as one Arrow IPC buffer
        model_path = str(Path(cfg.model.path).resolve())
        self.train_questions = load_questions(data.train, max_hops=cfg.data.max_hops)
        self.eval_questions = load_questions(data.eval, max_hops=cfg.data.max_hops)
        rnd = random.Random(cfg.run.seed + 17)
        rnd.shuffle(self.eval_questions)
        self.eval_questions = self.eval_questions[: cfg.eval.num_questions]
        self.sampler = QuestionSampler(self.train_questions, cfg.run.seed)

        env_kwargs = make_env_kwargs(cfg)
        g = cfg.generators
        log.info("torch threads: %d per generator, %d per learner rank (rollout.mode %s)", *torch_threads(cfg),
                 cfg.rollout.mode)
        # learner ranks packed in one placement group; generators on their own GPUs unless colocated
        self.placement = Placement(cfg, run_dir.name)
        self.weight_store = ray.remote(WeightStore).options(num_cpus=0).remote()
        self.generators = [
            ray.remote(Generator).options(num_cpus=g.num_cpus, num_gpus=g.num_gpus, max_restarts=g.max_restarts,
                                          max_task_retries=2, **self.placement.generator_options(i)).remote(
                model_path, weight_store=self.weight_store, **generator_kwargs(cfg))
            for i in range(g.num)
        ]
        self.env_workers = [
            ray.remote(EnvWorker).options(num_cpus=cfg.env.num_cpus, max_restarts=cfg.env.max_restarts).remote(
                str(data.index_dir), env_kwargs, step_latency_s=cfg.env.step_latency_s)
            for _ in range(cfg.env.num_workers)
        ]
        self.queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(**cfg.queue.queue_kwargs())
        self.rollouts = [  # rollout.num_workers (async): that many rollout calls may run at once
            ray.remote(RolloutWorker).options(num_cpus=0, max_restarts=cfg.rollout.max_restarts).remote(
                model_path, self.generators, self.env_workers, self.queue, run_id=run_dir.name,
                env_restart_wait_s=cfg.faults.restart_wait_s, **rollout_kwargs(cfg))
            for i in range(cfg.rollout.num_workers)]
        self.rollout = self.rollouts[0]  # sync steps, evaluation and fault injection
        a, lc = cfg.algorithm, cfg.learner
        master_addr, port = self.placement.rendezvous()
        self.learners = [
            ray.remote(LearnerWorker).options(**self.placement.learner_options(r)).remote(
                model_path, learner={**vars(lc), "betas": list(lc.betas), "dtype": cfg.model.dtype,
                                     "torch_threads": torch_threads(cfg)[1]},
                algorithm={**vars(a), "ref_model_path": str(Path(a.ref_model_path).resolve()) if a.ref_model_path
                           else None}, temperature=cfg.generation.temperature,
                batch_episodes=a.prompts_per_step * a.group_size, rank=r, world_size=lc.num_ranks,
                master_port=port, master_addr=master_addr, seed=cfg.run.seed,
                loss_norm_len=cfg.generation.max_tokens_per_episode)
            for r in range(lc.num_ranks)
        ]
        ray.get([x.ping.remote() for x in self.generators])
        ray.get([x.get_version.remote() for x in self.learners])
        self.weight_sync = make_weight_sync(cfg, self.learners, self.generators, self.weight_store)  # learner.weight_sync
        self.restarts = RestartCounter({"generator": self.generators, "env_worker": self.env_workers,
                                        "learner": self.learners, "rollout": self.rollouts, "queue": [self.queue]})
        self.version = 0
        self.episode_counter = 0
        self.group_counter = 0
        self.audit = EpisodeAudit()  # every episode counted exactly once (learner/faults.py)

    # -- phases -----------------------------------------------------------------------------
    def sampling(self, *, greedy: bool = False, seed: int | None = None):
        gc = self.cfg.generation
        return self.SamplingParams(temperature=gc.temperature, top_p=gc.top_p, top_k=gc.top_k,
                                   max_new_tokens=gc.max_tokens_per_turn, greedy=greedy, stop=list(gc.stop),
                                   seed=seed)

    def rollout_phase(self, questions: list[dict], step: int) -> dict[str, Any]:
        # G episodes per question; run again under new ids if the rollout worker dies (learner/faults.py)
        return rollout_with_retries(self, questions, self.sampling(seed=self.cfg.run.seed * 1_000_003 + step))

    def update_phase(self, n_groups: int) -> dict[str, float]:
        import ray

        table = ray.get(self.queue.get.remote(n_groups, self.version))
        if table is None:
            raise RuntimeError("the replay queue released no complete group; see queue metrics")
        return self.train_on(table)

    def train_on(self, table) -> dict[str, float]:
        """One learner step on an Arrow table of complete groups (every rank); returns the step's metrics."""
        import ray

        table_ref = ray.put(table)  # one copy in the object store for every rank
        per_rank = ray.get([lw.train_step.remote(table_ref) for lw in self.learners])
        self.audit.train(table.column(S.EPISODE_ID).to_pylist())
        summed = (M.LEARNER_TOKENS, M.LEARNER_UNIQUE_TOKENS)  # work counts add up over the ranks' shards
        stats = {k: sum(r[k] for r in per_rank) / (1 if k in summed else len(per_rank)) for k in per_rank[0]}
        self.version = int(stats[M.POLICY_VERSION])
        stats.update(episode_metrics(episode_summaries(table)))  # rollout/* of exactly the episodes trained on
        return stats

    def sync_phase(self) -> float:
        t0 = time.time()
        self.weight_sync.push(self.version)  # object store or broadcast from rank 0 (learner/weight_sync.py)
        return time.time() - t0

    def evaluate(self, label: str, greedy: bool) -> dict[str, float]:
        import ray

        res = ray.get(self.rollout.run.remote(
            self.eval_questions, group_size=1, first_group_id=-(10**9), first_episode_id=-(10**9),
            params=self.sampling(greedy=greedy, seed=self.cfg.run.seed + 99), to_queue=False))
        summary = summarize_episodes(res["episodes"])
        log.info("eval %s: %s", label, {k: round(v, 3) for k, v in summary.items()})
        return summary

    def close(self) -> None:
        """Kill this run's actors and free its placement group; Ray itself stays up for the next run."""
        import ray

        for handle in [*self.rollouts, *self.generators, *self.env_workers, *self.learners, self.queue,
                       self.weight_store]:
            try:
                ray.kill(handle, no_restart=True)
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.debug("could not kill an actor: %s", e)
        self.placement.remove()


def train(cfg: Config, resume: str | Path | None = None) -> Path:
    """Run one training job end to end; return the run directory.

    ``resume``: a run directory with checkpoints; the run goes on from its newest one (same step
    numbering, counters, sampler position, queue contents, weights and optimizer state).
    """
    import ray
    from tqdm import tqdm

    from learner.async_loop import AsyncLoop

    t_start = time.time()
    from common.modeling import check_model_dir

    check_estimator_config(cfg.algorithm)  # the config rules that need the estimators (ConfigError)
    M.check_report_to(cfg.metrics.report_to)  # a tracker's package is missing: say so before Ray starts
    check_model_dir(cfg.model.path)  # fails before Ray starts (and before data prep) on a bad model directory
    if cfg.algorithm.ref_model_path:
        check_model_dir(cfg.algorithm.ref_model_path)
    data = prepare_data(cfg.data)  # fails before Ray starts on a bad corpus / question file
    resume_from = None
    if resume is not None:  # fail before Ray starts if there is nothing to resume or the config changed
        cfg.run.run_dir = str(resume)
        resume_from = find_resume_checkpoint(Path(resume), cfg)
        check_compatible(cfg, read_state(resume_from), resume_from)
    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    if not ray.is_initialized():
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_DEDUP_LOGS", "1")
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                     log_to_driver=True, runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get(
                         "DS_ACCELERATOR", "cpu"), "TOKENIZERS_PARALLELISM": "false"}})
    mc = cfg.metrics
    sink = M.MetricsSink(run_dir, enabled=mc.enabled, host=mc.host, port=mc.port, report_to=mc.report_to,
                         run_name=run_dir.name, config=cfg.to_dict(), wandb_project=mc.wandb_project,
                         wandb_mode=mc.wandb_mode)
    targets = None
    if sink.port is not None:
        (run_dir / "metrics_endpoint.txt").write_text(f"http://{cfg.metrics.host}:{sink.port}/metrics\n")
        targets = PrometheusTargets(run_dir, cfg.metrics.host, sink.port, discovery_dir=cfg.metrics.discovery_dir,
                                    advertise=cfg.metrics.advertise_host)
    trainer: Trainer | None = None
    ckpt, step, start_step, restart_base = Checkpointer(cfg, run_dir), 0, 0, {}
    try:
        trainer = Trainer(cfg, run_dir, data)
        results: dict[str, Any] = {}
        if resume_from is not None:
            state = ckpt.restore(trainer, resume_from)
            start_step, restart_base = int(state["step"]), state.get("restarts", {})
            results.update(state.get("eval", {}))
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
        elif cfg.eval.before_training:
            results["warm_start"] = trainer.evaluate("warm_start", greedy=False)
            if cfg.eval.greedy:
                results["warm_start_greedy"] = trainer.evaluate("warm_start_greedy", greedy=True)
        a = cfg.algorithm
        loop = AsyncLoop(trainer) if cfg.rollout.mode == "async" else None
        bar = tqdm(range(start_step + 1, cfg.learner.total_steps + 1), desc="train", unit="step", dynamic_ncols=True,
                   initial=start_step, total=cfg.learner.total_steps)
        for step in bar:
            t0 = time.time()
            inject(trainer, step)  # faults.kill: deterministic actor kills (tests)
            if loop is not None:  # generation runs on while the learner trains (learner/async_loop.py)
                stats = loop.step(step)
            else:
                questions = trainer.sampler.next(a.prompts_per_step)
                rollout = trainer.rollout_phase(questions, step)
                stats = generation_metrics(rollout)
                stats.update(trainer.update_phase(a.prompts_per_step))
                stats[M.TIME_SYNC] = trainer.sync_phase() if step % cfg.learner.push_every == 0 else 0.0
            stats.update(ray.get(trainer.queue.stats.remote()))
            stats.setdefault(M.EPISODES_TOTAL, len(trainer.audit.trained))
            restarts = {k: v + restart_base.get(k, 0.0) for k, v in trainer.restarts.sample().items()}  # carried over resumes
            stats.update(restarts)
            stats.update(trainer.audit.counts(trainer.episode_counter, stale_episodes(stats, a.group_size),
                                              sync=loop is None))
            stats[M.TIME_STEP] = time.time() - t0
            save = ckpt.due(step, final=step == cfg.learner.total_steps)
            stats[M.CHECKPOINT_STEP], stats[M.CHECKPOINT_TIME] = (step if save else ckpt.last_step), ckpt.last_seconds
            if step % cfg.metrics.log_every == 0 or step == cfg.learner.total_steps:
                sink.log(step, stats)
            if save:  # after the log line, so a resume from it never repeats or skips a step
                ckpt.save(trainer, step, {"eval": results, "restarts": restarts})
            bar.set_postfix(reward=f"{stats[M.REWARD_TOTAL]:.2f}", tool=f"{stats[M.TOOL_SUCCESS]:.2f}",
                            air=f"{stats[M.ANSWER_IN_RESULT]:.2f}", em=f"{stats[M.EXACT_MATCH]:.2f}")
        if loop is not None:
            loop.close()  # the calls still generating finish; their groups are dropped
        results["trained"] = trainer.evaluate("trained", greedy=False)
        if cfg.eval.greedy:
            results["trained_greedy"] = trainer.evaluate("trained_greedy", greedy=True)
        ray.get([lw.save_pretrained.remote(str((run_dir / "policy").resolve())) for lw in trainer.learners])
        summary = {
            "generator_versions": ray.get([g.version.remote() for g in trainer.generators]),
            "learner_version": trainer.version,
            "queue": ray.get(trainer.queue.stats.remote()),
            "episodes_trained": loop.episodes_trained if loop is not None else len(trainer.audit.trained),
            "audit": trainer.audit.counts(trainer.episode_counter, stale_episodes(
                ray.get(trainer.queue.stats.remote()), a.group_size), sync=loop is None),
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
        if cfg.metrics.linger_s > 0 and sink.port is not None:
            log.info("serving the final metrics for %.0f s more (metrics.linger_s)", cfg.metrics.linger_s)
            time.sleep(cfg.metrics.linger_s)
    except Exception as err:
        crashed = crash_summary(err, trainer, run_dir, step, ckpt)  # a dead learner rank: say how to resume
        if crashed is None:
            raise
        raise crashed from err
    finally:
        if trainer is not None:
            trainer.close()
        if targets is not None:
            targets.close()
        sink.close()
    return run_dir
