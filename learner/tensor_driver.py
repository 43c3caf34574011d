"""The training driver of a tensor agent (``kind: tensor``): the same loop as the LLM driver, with a
``torch.nn.Module`` policy, tensor envs and tensor rows.

    for step in 1..N:
        seeds      <- next prompts_per_step training reset seeds (the "questions")
        rollout    <- G episodes per seed: rollout worker (policy) + env workers (rows -> replay queue)
        batch      <- complete groups from the replay queue (policy-lag bound enforced)
        update     <- DeepSpeed learner: per-turn advantages (same ESTIMATORS), PPO-clip over env steps
        sync       <- push versioned weights to the rollout worker (every push_every steps)
        log        <- metrics.jsonl + Prometheus /metrics + progress bar; held-out curve every eval.every_steps

Held-out episodes use reset seeds from ``env.train_seeds`` up, never trained on. The run directory holds
``config.yaml``, ``metrics.jsonl``, ``eval.json`` (``warm_start``, ``curve``, ``trained``,
``trained_greedy``), ``learning_curves.png`` and ``policy/policy.safetensors``.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import metrics as M
from common import schema as S
from common.config import save_config
from common.config_agent import AgentConfig
from common.config_sections import ConfigError
from common.replay_queue import ReplayQueue, register_arrow_serializers
from env_workers.tensor_env import make_tensor_env
from learner.cluster import kill_actors
from learner.estimator_config import check_estimator_config

log = logging.getLogger(__name__)


def summarize_tensor_episodes(episodes: list[dict[str, Any]]) -> dict[str, float]:
    """Per-episode summaries (``TensorRolloutWorker.run``) -> means: ``success`` (the env's ``success`` info),
    ``return`` (turn rewards + outcome), ``turn_reward``, ``outcome``, ``turns``, ``steps``, ``truncated``, and
    every other numeric info key the env reports (the arm: ``grasped``, ``aimed``, ``miss_distance``, ...)."""
    if not episodes:
        return {}
    n = len(episodes)
    out = {"success": sum(e["info"].get("success", 0.0) for e in episodes) / n,
           "return": sum(e["turn_reward"] + e["outcome_reward"] for e in episodes) / n,
           "turn_reward": sum(e["turn_reward"] for e in episodes) / n,
           "outcome": sum(e["outcome_reward"] for e in episodes) / n,
           "turns": sum(e["turns"] for e in episodes) / n, "steps": sum(e["steps"] for e in episodes) / n,
           "truncated": sum(float(e["truncated"]) for e in episodes) / n}
    keys = sorted({k for e in episodes for k in e["info"]} - set(out))
    out.update({k: sum(e["info"].get(k, 0.0) for e in episodes) / n for k in keys})
    return out


def step_metrics(summary: dict[str, float]) -> dict[str, float]:
    """``rollout/*`` metric names of a training step's episode summary."""
    out = {M.REWARD_TOTAL: summary["return"], M.REWARD_TURN: summary["turn_reward"],
           M.REWARD_OUTCOME: summary["outcome"], M.AGENT_SUCCESS: summary["success"], M.TURNS_MEAN: summary["turns"],
           M.AGENT_STEPS: summary["steps"], M.TRUNCATED: summary["truncated"]}
    out.update({M.AGENT_SUBGOAL.format(name=k): summary[k] for k in M.SUBGOALS if k in summary})
    return out


class SeedSampler:
    """The training reset seeds, drawn from ``[0, train_seeds)`` by a generator seeded with the run seed: the
    same sequence for every estimator of one seed (paired comparisons). Its position is its draw count."""

    def __init__(self, train_seeds: int, seed: int):
        self.rng = np.random.default_rng([int(seed), 7])
        self.train_seeds = train_seeds

    def next(self, n: int) -> list[int]:
        return [int(s) for s in self.rng.integers(0, self.train_seeds, size=n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preflight_agent(cfg: AgentConfig) -> dict[str, Any]:
    """What can fail before Ray starts: the estimator's keys, and building the env (a bad Gymnasium id, an
    arm setting out of range). Returns the env's spec (observation shape, action space)."""
    check_estimator_config(cfg.algorithm)
    try:
        env = make_tensor_env(cfg.env.kind, **cfg.env.env_kwargs())
    except Exception as e:  # noqa: BLE001 - a Gymnasium error, a bad arm setting: say which section
        raise ConfigError(f"config section `env.{cfg.env.kind}`: the env could not be built: {e}") from e
    return {"observation_shape": tuple(env.observation_shape), "action_space": env.action_space}


class AgentTrainer:
    """The actors of one tensor-agent run; Ray plumbing stays here and in the actor classes."""

    def __init__(self, cfg: AgentConfig, run_dir: Path, spec: dict[str, Any]):
        import ray

        from actors.tensor_rollout import TensorRolloutWorker
        from env_workers.tensor_worker import TensorEnvWorker
        from learner.tensor_learner import TensorLearner

        register_arrow_serializers()
        self.cfg, self.run_dir = cfg, run_dir
        shape, space = spec["observation_shape"], spec["action_space"]
        self.schema = S.tensor_transition_schema(shape, space.shape, space.dtype)
        policy = {"kind": cfg.policy.kind, "hidden": cfg.policy.hidden, "layers": cfg.policy.layers,
                  "factory": cfg.policy.factory}
        self.queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(schema=self.schema,
                                                                        **cfg.queue.queue_kwargs())
        self.env_workers = [ray.remote(TensorEnvWorker).options(num_cpus=cfg.env.num_cpus).remote(
            cfg.env.kind, cfg.env.env_kwargs()) for _ in range(cfg.env.num_workers)]
        self.rollout = ray.remote(TensorRolloutWorker).options(num_cpus=0).remote(
            policy, shape, space, self.env_workers, self.queue, run_id=run_dir.name)
        a = cfg.algorithm
        self.learner = ray.remote(TensorLearner).options(num_cpus=cfg.learner.num_cpus).remote(
            policy, shape, space, learner={**vars(cfg.learner), "betas": list(cfg.learner.betas)},
            algorithm=vars(a).copy(), batch_episodes=a.prompts_per_step * a.group_size, seed=cfg.run.seed,
            master_port=_free_port())
        ray.get([w.ping.remote() for w in self.env_workers] + [self.rollout.ping.remote()])
        self.version = 0
        self.sync_phase()  # the rollout worker starts from the learner's initial weights (seeded by run.seed)
        self.sampler = SeedSampler(cfg.env.train_seeds, cfg.run.seed)
        self.group_counter = self.episode_counter = 0
        self.eval_seeds = [cfg.env.train_seeds + i for i in range(cfg.eval.num_episodes)]  # never trained on

    def _episodes(self, seeds: list[int], group_size: int) -> list[dict[str, Any]]:
        out = []
        for seed in seeds:
            for _ in range(group_size):
                out.append({"group_id": self.group_counter, "episode_id": self.episode_counter, "prompt_id": seed,
                            "group_size": group_size})
                self.episode_counter += 1
            self.group_counter += 1
        return out

    def rollout_phase(self, step: int) -> dict[str, Any]:
        import ray

        a = self.cfg.algorithm
        eps = self._episodes(self.sampler.next(a.prompts_per_step), a.group_size)
        return ray.get(self.rollout.run.remote(eps, seed=self.cfg.run.seed * 1_000_003 + step))

    def update_phase(self, n_groups: int) -> dict[str, float]:
        import ray

        table = ray.get(self.queue.get.remote(n_groups, self.version))
        if table is None:
            raise RuntimeError("the replay queue released no complete group; see queue metrics")
        stats = ray.get(self.learner.train_step.remote(table))
        self.version = int(stats[M.POLICY_VERSION])
        return stats

    def sync_phase(self) -> float:
        import ray

        t0 = time.time()
        ray.get(self.rollout.load_weights.remote(self.version, self.learner.state_dict.remote()))
        return time.time() - t0

    def evaluate(self, greedy: bool) -> dict[str, float]:
        import ray

        eps = [{"group_id": -1 - i, "episode_id": -1 - i, "prompt_id": s, "group_size": 1}
               for i, s in enumerate(self.eval_seeds)]
        res = ray.get(self.rollout.run.remote(eps, greedy=greedy, seed=self.cfg.run.seed + 99, to_queue=False))
        return summarize_tensor_episodes(res["episodes"])

    def env_errors(self) -> float:
        import ray

        return sum(s["errors"] for s in ray.get([w.stats.remote() for w in self.env_workers]))

    def close(self) -> None:
        kill_actors([self.rollout, self.learner, *self.env_workers, self.queue])


def format_agent_table(results: dict[str, Any]) -> str:
    """Held-out success / return / sub-goals before and after training, as a fixed-width table."""
    cols = [k for k in ("success", "return", "grasped", "aimed", "turns", "steps") if k in results.get("trained", {})]
    rows = [(label, results[key]) for key, label in (("warm_start", "initial (sampled)"), ("trained", "trained (sampled)"),
                                                     ("trained_greedy", "trained (greedy)")) if key in results]
    head = f"{'':20s}" + "".join(f"{c:>10s}" for c in cols)
    return "\n".join([head] + [f"{label:20s}" + "".join(f"{r.get(c, float('nan')):10.3f}" for c in cols)
                               for label, r in rows])


def train_agent(cfg: AgentConfig) -> Path:
    """Run one tensor-agent training job end to end (the module docstring's loop); return the run directory."""
    import ray
    from tqdm import tqdm

    from learner.driver import close_run, last_curve_point, linger, make_run_dir, open_metrics, start_ray
    from learner.evaluation import plot_learning_curves

    t_start = time.time()
    spec = preflight_agent(cfg)
    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    start_ray(cfg)
    sink, targets = open_metrics(cfg, run_dir)
    trainer: AgentTrainer | None = None
    last, results = cfg.learner.total_steps, {}
    try:
        trainer = AgentTrainer(cfg, run_dir, spec)
        if cfg.eval.before_training:
            results["warm_start"] = trainer.evaluate(greedy=False)
            results["curve"] = [{"step": 0, **results["warm_start"]}]
        bar = tqdm(range(1, last + 1), desc="train", unit="step", dynamic_ncols=True, total=last)
        for step in bar:
            t0 = time.time()
            roll = trainer.rollout_phase(step)
            stats = step_metrics(summarize_tensor_episodes(roll["episodes"]))
            stats[M.TIME_ROLLOUT] = roll["seconds"]
            stats.update(trainer.update_phase(cfg.algorithm.prompts_per_step))
            stats[M.TIME_SYNC] = trainer.sync_phase() if step % cfg.learner.push_every == 0 else 0.0
            stats.update(ray.get(trainer.queue.stats.remote()))
            stats[M.EPISODES_TOTAL] = float(trainer.episode_counter)
            stats[M.AGENT_ENV_ERRORS] = trainer.env_errors()
            stats[M.TIME_STEP] = time.time() - t0
            every = cfg.eval.every_steps
            if every and (step % every == 0 or step == last):
                held = trainer.evaluate(greedy=False)
                results.setdefault("curve", []).append({"step": step, **held})
                stats.update({M.EVAL_SUCCESS: held["success"], M.EVAL_RETURN: held["return"],
                              M.EVAL_TURNS: held["turns"]})
            if step % cfg.metrics.log_every == 0 or step == last:
                sink.log(step, stats)
            bar.set_postfix(success=f"{stats[M.AGENT_SUCCESS]:.2f}", reward=f"{stats[M.REWARD_TOTAL]:.2f}")
        results["trained"] = last_curve_point(results, last) or trainer.evaluate(greedy=False)
        if cfg.eval.greedy:
            results["trained_greedy"] = trainer.evaluate(greedy=True)
        ray.get(trainer.learner.save.remote(str((run_dir / "policy").resolve())))
        results["wall_time_s"] = time.time() - t_start
        results["steps"] = last
        (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
        subgoals = tuple(M.AGENT_SUBGOAL.format(name=k) for k in M.SUBGOALS if k in results["trained"])
        plot_learning_curves(run_dir / "metrics.jsonl", run_dir / "learning_curves.png",
                             keys=(M.REWARD_TOTAL, M.AGENT_SUCCESS, *subgoals))
        table = format_agent_table(results)
        (run_dir / "eval_table.txt").write_text(table + "\n")
        print(f"\nHeld-out evaluation ({cfg.eval.num_episodes} episodes, {cfg.env.kind}):\n{table}\n"
              f"wall time {results['wall_time_s']:.0f} s; run directory: {run_dir}")
        linger(cfg, sink)
    finally:
        close_run(trainer, targets, sink)
    return run_dir
