"""Typed, validated run configuration.

A config is a tree of dataclasses loaded from YAML, with dotted ``key=value``
overrides from the command line. Every error names the field, the value and
the rule, and unknown keys get a did-you-mean. Validation happens before Ray
starts so a typo never costs a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.config_sections import (  # noqa: F401 - the sections are part of this module's API
    FAULT_ROLES,
    AlgorithmConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EnvConfig,
    EvalConfig,
    FaultsConfig,
    GenerationConfig,
    GeneratorsConfig,
    KillSpec,
    LearnerConfig,
    MetricsConfig,
    ModelConfig,
    PlacementConfig,
    QueueConfig,
    RayConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    _fail,
)
from common.config_judge import JudgeConfig


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)  # run identity and seed
    ray: RayConfig = field(default_factory=RayConfig)  # Ray cluster connection
    data: DataConfig = field(default_factory=DataConfig)  # corpus and questions
    model: ModelConfig = field(default_factory=ModelConfig)  # policy checkpoint
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # sampling
    generators: GeneratorsConfig = field(default_factory=GeneratorsConfig)  # generator actors
    env: EnvConfig = field(default_factory=EnvConfig)  # Wikipedia-search environment
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # generative reward model (judge actors) for turn and/or outcome rewards
    queue: QueueConfig = field(default_factory=QueueConfig)  # Arrow replay queue
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # synchronous or asynchronous actor-learner mode
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # credit assignment and loss
    learner: LearnerConfig = field(default_factory=LearnerConfig)  # DeepSpeed learner
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus endpoint, metrics.jsonl
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # where actors run (placement groups, colocation)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # resumable checkpoints (turnrl train --resume RUN_DIR)
    faults: FaultsConfig = field(default_factory=FaultsConfig)  # fault injection (tests) and restart waits

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _validate_tree(getattr(self, f.name), f.name)
        if self.learner.micro_batch_size > self.algorithm.prompts_per_step * self.algorithm.group_size:
            _fail("learner.micro_batch_size", self.learner.micro_batch_size,
                  "must not exceed the batch (algorithm.prompts_per_step x algorithm.group_size)")
        check_placement(self)
        check_weight_sync(self)
        check_faults(self)
        if self.rollout.mode == "async" and self.queue.max_policy_lag < 1:
            _fail("queue.max_policy_lag", self.queue.max_policy_lag,
                  "must be >= 1 with rollout.mode async (0 leaves generation no room to run ahead: use mode sync)")
        if self.rollout.num_workers > self.queue.max_policy_lag + 1:
            _fail("rollout.num_workers", self.rollout.num_workers, f"at most queue.max_policy_lag + 1 = "
                  f"{self.queue.max_policy_lag + 1} rollout calls are out at once; more workers would stay idle")
        ahead = 1 if self.rollout.mode == "async" else 0  # async generation runs a step ahead of the learner
        if self.learner.push_every - 1 + ahead > self.queue.max_policy_lag:
            _fail("learner.push_every", self.learner.push_every,
                  f"with rollout.mode {self.rollout.mode}, rows can lag the learner by push_every - 1"
                  f"{' + 1' if ahead else ''} versions, more than queue.max_policy_lag = {self.queue.max_policy_lag}: "
                  "every such group would be dropped as stale; raise queue.max_policy_lag or lower push_every")
        check_tree(self)
        if self.algorithm.off_policy != "none" and self.learner.recompute_old_logprobs:
            _fail("learner.recompute_old_logprobs", True, f"is implied by algorithm.off_policy = "
                  f"{self.algorithm.off_policy!r} (the ratio is always taken against the learner's own log-probs)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_tree(cfg: Config) -> None:
    """Tree rollouts and the tree estimator go together; a tree must fit the group and the turns."""
    tree, tree_est = cfg.rollout.tree, cfg.algorithm.advantage == "tree_grpo"
    if not tree.branch_turns:
        if tree_est:
            _fail("algorithm.advantage", "tree_grpo", "needs tree rollouts: set rollout.tree.branch_turns (e.g. [1])")
        return
    if not tree_est:
        _fail("rollout.tree.branch_turns", tree.branch_turns, f"tree rollouts are trained by algorithm.advantage "
              f"tree_grpo (a shared turn is trained once, with its siblings' baseline), not "
              f"{cfg.algorithm.advantage!r}")
    if max(tree.branch_turns) >= cfg.env.max_turns:
        _fail("rollout.tree.branch_turns", tree.branch_turns, f"must be below env.max_turns = {cfg.env.max_turns} "
              "(an episode has no turn there to fork at)")
    leaves = tree.children ** len(tree.branch_turns)
    if cfg.algorithm.group_size % leaves:
        _fail("algorithm.group_size", cfg.algorithm.group_size, f"must be a multiple of rollout.tree.children ^ "
              f"len(rollout.tree.branch_turns) = {leaves} (the leaves of one root)")
    if cfg.rollout.partial_rollouts != "finish":
        _fail("rollout.partial_rollouts", cfg.rollout.partial_rollouts, "must be 'finish' with tree rollouts "
              "(an aborted leaf would leave its tree)")


def torch_threads(cfg: Config, cores: int | None = None) -> tuple[int, int]:
    """Intra-op threads of each generator and each learner rank: the configured values, or for ``null``:

    * local mode (``ray.address`` null), on this machine's ``cores``: in ``rollout.mode: sync`` the
      generators and the learner take turns, so each role gets every core (shared among its actors);
      in ``async`` they compute at the same time, so the cores are split in half between the roles.
      Oversubscribing the cores (2 + 2 threads on 2 cores) makes both sides several times slower.
    * on a cluster: the role's ``num_cpus`` (at least 1), what Ray reserved for the actor.
    """
    g, lc = cfg.generators, cfg.learner
    if cfg.ray.address:
        auto_g, auto_l = max(1, int(g.num_cpus)), max(1, int(lc.num_cpus))
    else:
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cfg.rollout.mode == "async":
            half = max(1, cores // 2)
            auto_g, auto_l = max(1, half // g.num), max(1, (cores - half) // lc.num_ranks)
        else:
            auto_g, auto_l = max(1, cores // g.num), max(1, cores // lc.num_ranks)
    return (g.torch_threads or auto_g), (lc.torch_threads or auto_l)


def check_placement(cfg: Config) -> None:
    """Cross-section placement rules; each error names the fields, the values and the rule."""
    lc, g, pc = cfg.learner, cfg.generators, cfg.placement
    if lc.num_cpus <= 0 and lc.num_gpus <= 0:
        raise ConfigError(f"config fields `learner.num_cpus` = {lc.num_cpus!r} and `learner.num_gpus` = "
                          f"{lc.num_gpus!r}: a learner rank must reserve some CPU or GPU (its placement bundle)")
    if lc.num_gpus > 1 and lc.num_gpus != int(lc.num_gpus):
        raise ConfigError(f"config field `learner.num_gpus` = {lc.num_gpus!r}: must be <= 1 or a whole number")
    if not pc.colocate:
        return
    if g.num > lc.num_ranks:
        raise ConfigError(f"config field `generators.num` = {g.num!r}: with placement.colocate each generator "
                          f"shares one learner rank's bundle, so it must be <= learner.num_ranks ({lc.num_ranks})")
    if lc.num_gpus > 0 and g.num_gpus > 0 and lc.num_gpus + g.num_gpus > 1 + 1e-9:
        raise ConfigError(f"config fields `learner.num_gpus` = {lc.num_gpus!r} and `generators.num_gpus` = "
                          f"{g.num_gpus!r}: with placement.colocate a generator and a learner rank share one GPU, "
                          "so the two must add up to at most 1 (e.g. 0.5 each)")


def check_faults(cfg: Config) -> None:
    """Each ``faults.kill`` entry must name an actor that exists (its index below the role's count)."""
    counts = {"env_worker": cfg.env.num_workers, "generator": cfg.generators.num, "rollout": 1,
              "learner": cfg.learner.num_ranks, "judge": cfg.judge.num_actors if cfg.judge.enabled else 0}
    for i, k in enumerate(cfg.faults.kill):
        if k.actor == "judge" and not cfg.judge.enabled:
            _fail(f"faults.kill[{i}].actor", k.actor, "needs judge.enabled: true (there is no judge actor)")
        if k.index >= counts[k.actor]:
            _fail(f"faults.kill[{i}].index", k.index, f"must be < {counts[k.actor]} (the number of {k.actor} actors)")


def weight_sync_mode(cfg: Config) -> tuple[str, str | None]:
    """The resolved ``learner.weight_sync``: ``("object_store", None)`` or ``("broadcast", backend)``.

    ``auto`` is ``broadcast`` when learner ranks and generators both reserve whole GPUs (and do
    not share them: NCCL refuses two ranks on one device), ``object_store`` otherwise. The broadcast backend is NCCL when both ends have
    GPUs, gloo (CPU tensors) when either end runs on CPU.
    """
    lc, g = cfg.learner, cfg.generators
    both_gpu = lc.num_gpus > 0 and g.num_gpus > 0
    mode = lc.weight_sync
    if mode == "auto":
        whole = lc.num_gpus >= 1 and g.num_gpus >= 1
        mode = "broadcast" if whole and not cfg.placement.colocate else "object_store"
    if mode == "object_store":
        return mode, None
    return mode, "nccl" if both_gpu else "gloo"


def check_weight_sync(cfg: Config) -> None:
    """Rules of ``learner.weight_sync: broadcast``; each error names the fields, the values and the rule."""
    lc, g = cfg.learner, cfg.generators
    if lc.weight_sync != "broadcast":
        return
    if g.backend == "vllm" and not (lc.num_gpus > 0 and g.num_gpus > 0):
        raise ConfigError(f"config field `learner.weight_sync` = 'broadcast' with `generators.backend` = 'vllm': "
                          f"vLLM receives the broadcast over NCCL inside its GPU worker, so learner.num_gpus "
                          f"({lc.num_gpus!r}) and generators.num_gpus ({g.num_gpus!r}) must both be > 0")
    if lc.num_gpus > 0 and g.num_gpus > 0 and cfg.placement.colocate:
        raise ConfigError("config field `learner.weight_sync` = 'broadcast' with `placement.colocate` = true: "
                          "NCCL cannot join two processes on the same GPU (generator 0 shares learner rank 0's); "
                          "use learner.weight_sync: object_store")
    if lc.num_gpus > 0 and g.num_gpus > 0 and (lc.num_gpus < 1 or g.num_gpus < 1):
        raise ConfigError(f"config field `learner.weight_sync` = 'broadcast' with learner.num_gpus = {lc.num_gpus!r} "
                          f"and generators.num_gpus = {g.num_gpus!r}: the NCCL broadcast needs whole GPUs (>= 1) "
                          "on both ends, since Ray may pack fractional ones onto one device and NCCL refuses two "
                          "ranks on one GPU ('Duplicate GPU detected'); use learner.weight_sync: object_store")


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
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot in the mantissa) as a string
            try:
                value = float(value.strip().replace("_", ""))
            except ValueError:
                _fail(path, value, "must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "must be a number")
        if not math.isfinite(value):
            _fail(path, value, "must be a finite number")
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


def _parse_yaml(data: bytes, where: str) -> Any:
    """``yaml.safe_load`` of UTF-8 ``data``; a ConfigError naming ``where`` (and the line) if it is not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}); expected a YAML mapping") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None


def read_tree(path: str | Path) -> dict[str, Any]:
    """The YAML mapping at ``path`` (a ConfigError if the file is missing, not YAML or not a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    loaded = _parse_yaml(p.read_bytes(), f"config file {str(p)!r}")
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a YAML mapping at the top level")
    return loaded or {}


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``tree`` with each ``key.sub=value`` override set (values parsed as YAML)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"config override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_yaml(raw.encode(), f"config override {item!r}"))
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML ``path`` (optional), apply ``key.sub=value`` overrides, build and validate."""
    tree = apply_overrides(read_tree(path) if path is not None else {}, overrides)
    cfg = _build(Config, tree, "")
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
