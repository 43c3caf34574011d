"""The run's actors and the phases of a step: ``Trainer`` (generators, env workers, replay queue, rollout
workers, DeepSpeed learner ranks, weight sync) and the question sampler.

:func:`generator_kwargs` / :func:`rollout_kwargs` turn every ``generators.*`` (and ``generation.*`` cap)
setting into the keyword arguments of :class:`actors.generator.Generator` and
:class:`actors.rollout.RolloutWorker`; the tests build their actors from the same functions, so a config
field cannot silently stop here.

The loop that calls these phases is ``learner.driver.train``; the asynchronous schedule is
``learner.async_loop.AsyncLoop``.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from actors.engine import SamplingParams
from actors.generator import Generator, WeightStore
from actors.rollout import RolloutWorker
from common import metrics as M
from common import schema as S
from common.config import Config, torch_threads
from common.config_judge import judge_threads
from common.replay_queue import ReplayQueue, register_arrow_serializers
from env_workers.demo_data import load_questions
from env_workers.env import DEFAULT_SYSTEM_PROMPT, SYSTEM_PROMPTS
from env_workers.prepare import DataPaths
from env_workers.rewards import RewardWeights
from env_workers.judge_client import JudgeClient
from env_workers.judge_model import JudgeActor
from env_workers.worker import EnvWorker
from learner.cluster import Placement, RestartCounter, kill_actors
from learner.evaluation import episode_metrics, episode_summaries, multi_hop_summary, summarize_episodes
from learner.faults import EpisodeAudit, rollout_with_retries
from learner.weight_sync import make_weight_sync
from learner.worker import LearnerWorker

log = logging.getLogger(__name__)


def make_env_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of every ``WikiSearchEnv`` of the run, from ``env.*``."""

    return {
        "system_prompt": cfg.env.system_prompt or SYSTEM_PROMPTS.get(cfg.env.protocol, DEFAULT_SYSTEM_PROMPT),
        "protocol": cfg.env.protocol, "max_turns": cfg.env.max_turns, "top_k": cfg.env.top_k,
        "max_result_chars": cfg.env.max_result_chars, "answer_match": cfg.env.answer_match,
        "weights": RewardWeights(**vars(cfg.env.rewards)),
    }


def generator_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``Generator(model_path, **kwargs)`` from ``generators.*`` and ``model.dtype``.

    ``vllm_kwargs`` go to :class:`actors.vllm_engine.VLLMEngine` (``allow_cpu``) and on to ``vllm.LLM``
    (``gpu_memory_utilization``, the run seed).
    """
    g = cfg.generators
    return {
        "dtype": cfg.model.dtype, "torch_threads": torch_threads(cfg)[0], "backend": g.backend,
        "kv_budget_tokens": g.kv_budget_tokens, "max_prefill_tokens": g.max_prefill_tokens,
        "keep_kv_across_versions": g.keep_kv_across_versions, "lean_forward": g.lean_forward,
        "cuda_graphs": g.cuda_graphs,
        "vllm_kwargs": {"gpu_memory_utilization": g.vllm_gpu_memory_utilization, "seed": cfg.run.seed,
                        "allow_cpu": g.vllm_allow_cpu},
    }


def rollout_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``RolloutWorker`` from ``generation.*`` caps, ``generators.streaming``
    and ``rollout.partial_rollouts / max_aborts_per_episode / tree``."""
    return {
        "max_tokens_per_turn": cfg.generation.max_tokens_per_turn,
        "max_tokens_per_episode": cfg.generation.max_tokens_per_episode,
        "streaming": cfg.generators.streaming,
        "partial_rollouts": cfg.rollout.partial_rollouts, "max_aborts_per_episode": cfg.rollout.max_aborts_per_episode,
        "tree_branch_turns": tuple(cfg.rollout.tree.branch_turns), "tree_children": cfg.rollout.tree.children,
    }


def judge_actor_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``JudgeActor(model_path, **kwargs)`` from ``judge.*`` (the run seed seeds sampling)."""
    j = cfg.judge
    return {"backend": j.backend, "mode": j.mode, "dtype": j.dtype, "torch_threads": judge_threads(j),
            "yes_token": j.yes_token, "no_token": j.no_token, "max_new_tokens": j.max_new_tokens,
            "temperature": j.temperature, "max_prompt_tokens": j.max_prompt_tokens,
            "max_batch_tokens": j.max_batch_tokens, "seed": cfg.run.seed,
            "vllm_gpu_memory_utilization": j.vllm_gpu_memory_utilization}


def judge_client_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``JudgeClient(judges, **kwargs)`` (the env workers' side) from ``judge.*``."""
    j = cfg.judge
    return {"turn_weight": j.turn_weight, "outcome_weight": j.outcome_weight, "batch_size": j.batch_size,
            "timeout_s": j.timeout_s, "cache_size": j.cache_size, "turn_template": j.turn_template,
            "outcome_template": j.outcome_template, "max_field_chars": j.max_field_chars}


def held_out_questions(cfg: Config, data: DataPaths) -> list[dict]:
    """The run's held-out questions: ``eval.num_questions`` of the eval split, shuffled by the run seed (the
    same questions for every estimator of a seed, and for a later ``turnrl evaluate`` of the run)."""
    questions = load_questions(data.eval, max_hops=cfg.data.max_hops)
    random.Random(cfg.run.seed + 17).shuffle(questions)
    return questions[: cfg.eval.num_questions]


def sampling_params(cfg: Config, *, greedy: bool = False, seed: int | None = None) -> SamplingParams:
    """``generation.*`` as the generators' sampling parameters (greedy: argmax decoding, the rest unchanged)."""
    gc = cfg.generation
    return SamplingParams(temperature=gc.temperature, top_p=gc.top_p, top_k=gc.top_k,
                          max_new_tokens=gc.max_tokens_per_turn, greedy=greedy, stop=list(gc.stop), seed=seed)


def make_env_workers(cfg: Config, data: DataPaths, judge: JudgeClient | None = None) -> list:
    """``env.num_workers`` Wikipedia-search env worker actors over the run's index (``env.*``)."""
    import ray

    return [ray.remote(EnvWorker).options(num_cpus=cfg.env.num_cpus, max_restarts=cfg.env.max_restarts).remote(
                str(data.index_dir), make_env_kwargs(cfg), step_latency_s=cfg.env.step_latency_s, judge=judge)
            for _ in range(cfg.env.num_workers)]


def evaluate_policy(cfg: Config, rollout: Any, questions: list[dict], label: str, *, greedy: bool) -> dict[str, float]:
    """One held-out evaluation through a rollout worker: an episode per question (group size 1, judge off, not
    queued), sampled at the training temperature with the seed ``run.seed + 99`` or greedy; the summary of
    :func:`learner.evaluation.summarize_episodes` plus the multi-hop figures when some question has two hops."""
    import ray

    res = ray.get(rollout.run.remote(
        [{**q, "judge": False} for q in questions], group_size=1, first_group_id=-(10**9), first_episode_id=-(10**9),
        params=sampling_params(cfg, greedy=greedy, seed=cfg.run.seed + 99), to_queue=False, tree=False))
    summary = summarize_episodes(res["episodes"])
    summary.update(multi_hop_summary(res["episodes"], questions))  # {} without multi-hop questions
    log.info("eval %s: %s", label, {k: round(v, 3) for k, v in summary.items()})
    return summary


class JudgeCounters:
    """Per-step ``judge/*`` metrics and ``perf/time/judge_s`` from the env workers' running judge counts.

    Each env worker's counts start from 0 when it restarts (a new ``instance_id``); what its previous life
    counted is carried, so the totals never go back."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[str, dict[str, float]]] = {}
        self._carried: dict[str, float] = {}
        self._prev: dict[str, float] = {}

    def totals(self, per_worker: list[dict[str, Any]]) -> dict[str, float]:
        out = dict(self._carried)
        for i, st in enumerate(per_worker):
            counts = {k: float(v) for k, v in st.items() if k != "instance_id"}
            last = self._last.get(i)
            if last is not None and last[0] != st["instance_id"]:  # restarted: keep what the old one counted
                for k, v in last[1].items():
                    self._carried[k] = self._carried.get(k, 0.0) + v
                    out[k] = out.get(k, 0.0) + v
            self._last[i] = (st["instance_id"], counts)
            for k, v in counts.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def step(self, per_worker: list[dict[str, Any]]) -> dict[str, float]:
        tot = self.totals(per_worker)
        d = {k: v - self._prev.get(k, 0.0) for k, v in tot.items()}
        self._prev = tot
        return {
            M.JUDGE_REQUESTS: tot.get("requests", 0.0), M.JUDGE_FAILURES: tot.get("failures", 0.0),
            M.JUDGE_CACHE_HITS: tot.get("cache_hits", 0.0), M.JUDGE_RETRIES: tot.get("retries", 0.0),
            M.JUDGE_CACHE_HIT_RATE: d.get("cache_hits", 0.0) / max(1.0, d.get("requests", 0.0)),
            M.JUDGE_TURN_SCORE: d.get("turn_score_sum", 0.0) / max(1.0, d.get("turn_items", 0.0)),
            M.JUDGE_OUTCOME_SCORE: d.get("outcome_score_sum", 0.0) / max(1.0, d.get("outcome_items", 0.0)),
            M.JUDGE_THROUGHPUT: d.get("scored", 0.0) / d["model_s"] if d.get("model_s", 0.0) > 0 else 0.0,
            M.TIME_JUDGE: d.get("wait_s", 0.0),
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

        self.cfg, self.run_dir = cfg, run_dir
        register_arrow_serializers()  # tables this process sends the learners travel as one Arrow IPC buffer
        model_path = str(Path(cfg.model.path).resolve())
        self.train_questions = load_questions(data.train, max_hops=cfg.data.max_hops)
        self.eval_questions = held_out_questions(cfg, data)
        self.sampler = QuestionSampler(self.train_questions, cfg.run.seed)

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
        j = cfg.judge
        self.judges = [  # the judge model's actors, beside the env workers (judge.*)
            ray.remote(JudgeActor).options(num_cpus=j.num_cpus, num_gpus=j.num_gpus, max_restarts=j.max_restarts,
                                           max_task_retries=0).remote(str(Path(j.model_path).resolve()),
                                                                      **judge_actor_kwargs(cfg))
            for _ in range(j.num_actors if j.enabled else 0)]
        judge = JudgeClient(self.judges, **judge_client_kwargs(cfg)) if self.judges else None
        self.judge_counters = JudgeCounters()
        self.env_workers = make_env_workers(cfg, data, judge)
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
        ray.get([x.ping.remote() for x in self.generators + self.judges])
        ray.get([x.get_version.remote() for x in self.learners])
        self.weight_sync = make_weight_sync(cfg, self.learners, self.generators, self.weight_store)  # learner.weight_sync
        self.restarts = RestartCounter({"generator": self.generators, "env_worker": self.env_workers,
                                        "learner": self.learners, "rollout": self.rollouts, "queue": [self.queue],
                                        **({"judge": self.judges} if self.judges else {})})
        self.version = 0
        self.episode_counter = 0
        self.group_counter = 0
        self.audit = EpisodeAudit()  # every episode counted exactly once (learner/faults.py)

    # -- phases -----------------------------------------------------------------------------
    def sampling(self, *, greedy: bool = False, seed: int | None = None):
        return sampling_params(self.cfg, greedy=greedy, seed=seed)

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
        return evaluate_policy(self.cfg, self.rollout, self.eval_questions, label, greedy=greedy)

    def judge_metrics(self) -> dict[str, float]:
        """The step's ``judge/*`` metrics and ``perf/time/judge_s`` ({} without a judge)."""
        import ray

        if not self.judges:
            return {}
        return self.judge_counters.step(ray.get([w.judge_stats.remote() for w in self.env_workers]))

    def close(self) -> None:
        """Kill this run's actors and free its placement group; Ray itself stays up for the next run."""
        kill_actors([*self.rollouts, *self.generators, *self.env_workers, *self.judges, *self.learners, self.queue,
                     self.weight_store])
        self.placement.remove()
