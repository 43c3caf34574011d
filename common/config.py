"""Typed, validated run configuration.

A config is a tree of dataclasses loaded from YAML, with dotted ``key=value``
overrides from the command line. Every error names the field, the value and
the rule, and unknown keys get a did-you-mean. Validation happens before Ray
starts so a typo never costs a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value broke a rule; the message names field, value and rule."""


def _fail(path: str, value: Any, rule: str) -> None:
    raise ConfigError(f"config field `{path}` = {value!r}: {rule}")


@dataclass
class RunConfig:
    name: str = "turnrl"  # run name; the run directory is runs/<name>-<time> unless run_dir is set
    run_dir: str | None = None  # explicit run directory (overrides the runs/<name>-<time> default)
    seed: int = 0  # global seed: data order, sampling, initialisation
    log_level: str = "INFO"  # logging level of the driver


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
    backend: str = "hf"  # decoding backend: hf (CPU/GPU) | vllm (GPU only)
    num_cpus: float = 1.0  # Ray CPUs reserved per generator actor
    num_gpus: float = 0.0  # Ray GPUs per generator actor
    torch_threads: int = 2  # intra-op threads per generator actor
    max_restarts: int = 3  # Ray restarts of a dead generator (it reloads the latest weights before serving)
    session_kv: bool = True  # keep each episode's KV cache on its generator between turns (False: re-prefill the history every turn)
    streaming: bool = False  # rollout: an episode's next turn joins the running batch as soon as its env step returns (needs session_kv)
    kv_budget_tokens: int = 262144  # hf: KV tokens a generator may hold (running turns' reservations + idle sessions; idle ones are evicted, then re-prefilled)
    max_prefill_tokens: int = 8192  # hf: padded tokens per prefill forward (bounds activation memory)
    keep_kv_across_versions: bool = False  # hf: reuse KV computed by older weights after an update (faster, slightly off-policy)
    vllm_gpu_memory_utilization: float = 0.5  # vllm: fraction of the GPU for weights + KV cache (the learner may share the GPU)

    def validate(self, p: str) -> None:
        if self.num < 1:
            _fail(f"{p}.num", self.num, "must be >= 1")
        if self.kv_budget_tokens < 64:
            _fail(f"{p}.kv_budget_tokens", self.kv_budget_tokens, "must be >= 64 (one turn needs its history + max tokens)")
        if self.max_prefill_tokens < 1:
            _fail(f"{p}.max_prefill_tokens", self.max_prefill_tokens, "must be >= 1")
        if self.streaming and not self.session_kv:
            _fail(f"{p}.streaming", self.streaming, "needs generators.session_kv: true")
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
                _fail(f"{p}.backend", self.backend, "needs a CUDA GPU; none is visible")


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


@dataclass
class QueueConfig:
    capacity_rows: int = 100_000  # turns held before producers block (backpressure)
    max_policy_lag: int = 1  # groups whose oldest turn is more than this many versions old are dropped

    def validate(self, p: str) -> None:
        if self.capacity_rows < 1:
            _fail(f"{p}.capacity_rows", self.capacity_rows, "must be >= 1")
        if self.max_policy_lag < 0:
            _fail(f"{p}.max_policy_lag", self.max_policy_lag, "must be >= 0")


@dataclass
class AlgorithmConfig:
    advantage: str = "mt_grpo"  # credit-assignment estimator (learner.credit.ESTIMATORS)
    turn_coef: float = 1.0  # c_T: weight of the normalised turn reward
    outcome_coef: float = 1.0  # c_O: weight of the normalised outcome reward
    gamma: float = 1.0  # discount over later turns (mt_grpo_k, gigpo)
    eps: float = 1e-6  # added to the group std
    group_size: int = 8  # G: episodes sampled per question
    prompts_per_step: int = 16  # questions per training step (batch = prompts_per_step x G episodes)
    ppo_epochs: int = 1  # optimisation passes over each batch (paper: 2)
    clip_low: float = 0.2  # PPO ratio lower clip (1 - clip_low)
    clip_high: float = 0.2  # PPO ratio upper clip (1 + clip_high)
    loss_agg: str = "token-mean"  # loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    kl_coef: float = 0.0  # KL-to-reference weight (0: no reference model)
    kl_kind: str = "k3"  # KL estimator: k1 | k3
    entropy_coef: float = 0.0  # entropy bonus weight

    def validate(self, p: str) -> None:
        from learner.credit import ESTIMATORS

        if self.advantage not in ESTIMATORS:
            close = difflib.get_close_matches(self.advantage, list(ESTIMATORS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(f"{p}.advantage", self.advantage, f"must be one of {sorted(ESTIMATORS)}{hint}")
        if self.group_size < 2:
            _fail(f"{p}.group_size", self.group_size, "must be >= 2 (group normalisation needs a group)")
        if self.prompts_per_step < 1:
            _fail(f"{p}.prompts_per_step", self.prompts_per_step, "must be >= 1")
        if self.ppo_epochs < 1:
            _fail(f"{p}.ppo_epochs", self.ppo_epochs, "must be >= 1")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            _fail(f"{p}.loss_agg", self.loss_agg, "must be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")
        if self.kl_kind not in ("k1", "k3"):
            _fail(f"{p}.kl_kind", self.kl_kind, "must be 'k1' or 'k3'")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            _fail(f"{p}.clip_low", self.clip_low, "clip_low must be in [0, 1) and clip_high >= 0")


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
    torch_threads: int = 2  # intra-op threads per learner rank
    push_every: int = 1  # push weights to the generators every k steps
    bucket_mb: int = 64  # weight-push bucket size in MiB
    recompute_old_logprobs: bool = False  # recompute behaviour log-probs in the learner (else use the generator's)

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


@dataclass
class MetricsConfig:
    enabled: bool = True  # serve Prometheus /metrics from the driver
    host: str = "127.0.0.1"  # bind address; set 0.0.0.0 deliberately to expose it
    port: int = 0  # 0: pick a free port (written to the run directory)
    log_every: int = 1  # append to metrics.jsonl every k steps
    discovery_dir: str | None = "/tmp/turnrl/prometheus"  # while a run lives, the driver writes <run name>.json (Prometheus file_sd) here; deploy/prometheus/prometheus.yml globs this folder; null: off
    advertise_host: str | None = None  # host put in the file_sd targets; null: metrics.host, or this node's IP when host is 0.0.0.0
    linger_s: float = 0.0  # keep serving /metrics this many seconds after the run so the last values get scraped

    def validate(self, p: str) -> None:
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


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)  # run identity and seed
    ray: RayConfig = field(default_factory=RayConfig)  # Ray cluster connection
    data: DataConfig = field(default_factory=DataConfig)  # corpus and questions
    model: ModelConfig = field(default_factory=ModelConfig)  # policy checkpoint
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # sampling
    generators: GeneratorsConfig = field(default_factory=GeneratorsConfig)  # generator actors
    env: EnvConfig = field(default_factory=EnvConfig)  # Wikipedia-search environment
    queue: QueueConfig = field(default_factory=QueueConfig)  # Arrow replay queue
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # credit assignment and loss
    learner: LearnerConfig = field(default_factory=LearnerConfig)  # DeepSpeed learner
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus endpoint, metrics.jsonl
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # where actors run (placement groups, colocation)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _validate_tree(getattr(self, f.name), f.name)
        if self.learner.micro_batch_size > self.algorithm.prompts_per_step * self.algorithm.group_size:
            _fail("learner.micro_batch_size", self.learner.micro_batch_size,
                  "must not exceed the batch (algorithm.prompts_per_step x algorithm.group_size)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate_tree(obj: Any, path: str) -> None:
    if hasattr(obj, "validate"):
        obj.validate(path)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, f"{path}.{f.name}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with int -> float widening)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        _fail(path, value, f"must be of type {tp}")
    if origin is list:
        if not isinstance(value, list):
            _fail(path, value, "must be a list")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(path, value, "must be a mapping")
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, value, "must be a string")
        return value
    return value


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"config field `{where}`: unknown key{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config override `{dotted}`: `{part}` is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML ``path`` (optional), apply ``key.sub=value`` overrides, build and validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a YAML mapping at the top level")
        tree = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"config override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    cfg = _build(Config, tree, "")
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
