"""Typed, validated config of a tensor-agent run (``kind: tensor``: a non-LLM policy on a tensor env).

The same loader rules as :mod:`common.config` (YAML plus dotted ``key=value`` overrides, errors naming
the field and the rule, did-you-mean for unknown keys), and the same ``run``, ``ray``, ``queue``,
``metrics`` and ``algorithm`` sections. Keys of ``algorithm`` that only mean something for token
policies (a reference model, off-policy corrections against a generator, token-loss aggregation, an LLM
critic checkpoint) are rejected when changed; so are the settings of the env kind not chosen.

``turnrl train --config deploy/configs/arm.yaml`` sees ``kind: tensor`` at the top and loads this
instead of :class:`common.config.Config` (:func:`config_kind`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import _build, _validate_tree, apply_overrides, read_tree
from common.config_sections import (AlgorithmConfig, ConfigError, MetricsConfig, QueueConfig, RayConfig, RunConfig,
                                    _fail)

KINDS = ("llm", "tensor")
#: algorithm.* keys that apply to token policies only; a tensor run must leave them at their defaults
LLM_ONLY_ALGORITHM = ("off_policy", "is_cap", "loss_agg", "kl_coef", "kl_kind", "ref_model_path", "critic_model_path")
#: estimators a tensor run can use (gigpo's anchor states are the turns' kinds; tree_grpo needs tree rollouts)
TENSOR_ESTIMATORS = ("grpo_or", "grpo_mr", "mt_grpo", "mt_grpo_k", "gigpo", "mt_ppo", "ppo")


@dataclass
class ArmSettings:
    grasp_steps: int = 6  # most env steps of one grasp attempt (a turn); the attempt fails when they run out
    max_grasps: int = 2  # grasp attempts before the episode ends unscored (episodes have 2 to max_grasps + 2 turns)
    grasp_tol: float = 0.06  # a close within this distance of the ball (m) grasps it
    hoop_radius: float = 0.15  # a ball passing down through the hoop's height within this distance of its centre scores
    grasp_reward: float = 1.0  # turn reward of a successful grasp turn (component "grasp")
    aim_reward: float = 0.5  # turn reward of an aim turn that faces the hoop (component "aim")
    basket_reward: float = 1.0  # outcome of a basket (component "basket")


@dataclass
class GymSettings:
    id: str = "CartPole-v1"  # Gymnasium env id (Box observations; Discrete or 1-D Box actions)
    turn_steps: int = 25  # env steps per turn (the last turn may be shorter)
    max_steps: int = 200  # step limit of an episode (Gymnasium max_episode_steps; reaching it = success)
    turn_reward_scale: float = 0.04  # turn reward = this x the env's rewards summed over the turn (component "env")
    outcome_scale: float = 0.005  # outcome component "return" = this x the episode's env return
    success_weight: float = 1.0  # outcome component "success" = this when the episode reached max_steps

    def validate(self, p: str) -> None:
        if self.turn_steps < 1 or self.max_steps < self.turn_steps:
            _fail(f"{p}.turn_steps", self.turn_steps, f"must be in [1, {p}.max_steps = {self.max_steps}]")


@dataclass
class AgentEnvConfig:
    kind: str = "arm"  # arm (env_workers/arm.py: grasp, aim, throw) | gym (a Gymnasium env, turns = windows of steps)
    num_workers: int = 2  # env-worker actors; a step's episodes are spread over them
    num_cpus: float = 0.25  # Ray CPUs per env worker
    train_seeds: int = 100_000  # training episodes are drawn from reset seeds [0, train_seeds); held-out ones lie above
    arm: ArmSettings = field(default_factory=ArmSettings)  # env.kind arm only
    gym: GymSettings = field(default_factory=GymSettings)  # env.kind gym only

    def validate(self, p: str) -> None:
        if self.kind not in ("arm", "gym"):
            _fail(f"{p}.kind", self.kind, "must be arm or gym")
        if self.num_workers < 1:
            _fail(f"{p}.num_workers", self.num_workers, "must be >= 1")
        if self.train_seeds < 1:
            _fail(f"{p}.train_seeds", self.train_seeds, "must be >= 1")
        unused = "gym" if self.kind == "arm" else "arm"
        default = GymSettings() if unused == "gym" else ArmSettings()
        for f in dataclasses.fields(default):
            if getattr(getattr(self, unused), f.name) != getattr(default, f.name):
                _fail(f"{p}.{unused}.{f.name}", getattr(getattr(self, unused), f.name),
                      f"applies only with {p}.kind {unused} (this run's env.kind is {self.kind})")

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``env_workers.tensor_env.make_tensor_env(kind, ...)``: the chosen kind's settings."""
        if self.kind == "gym":
            g = self.gym
            return {"env_id": g.id, "turn_steps": g.turn_steps, "max_steps": g.max_steps,
                    "turn_reward_scale": g.turn_reward_scale, "outcome_scale": g.outcome_scale,
                    "success_weight": g.success_weight}
        return dict(vars(self.arm))


@dataclass
class PolicyConfig:
    kind: str = "mlp"  # mlp (feed-forward over the observation) | gru (recurrent over the episode's steps) | custom (factory)
    hidden: int = 64  # hidden width of the policy (and of the critic)
    layers: int = 2  # hidden layers of the mlp (of the gru: its input encoder's)
    factory: str | None = None  # kind custom: "package.module:function" building the nn.Module (see common/tensor_policy.py)

    def validate(self, p: str) -> None:
        if self.kind not in ("mlp", "gru", "custom"):
            _fail(f"{p}.kind", self.kind, "must be mlp, gru or custom")
        if self.hidden < 1 or self.layers < 1:
            _fail(f"{p}.hidden", self.hidden, "hidden and layers must be >= 1")
        if (self.kind == "custom") != (self.factory is not None):
            _fail(f"{p}.factory", self.factory, "is required with policy.kind custom and applies to it only")
        if self.factory is not None and ":" not in self.factory:
            _fail(f"{p}.factory", self.factory, "must look like package.module:function")


@dataclass
class AgentLearnerConfig:
    total_steps: int = 150  # training steps (one step = prompts_per_step groups of group_size episodes)
    lr: float = 3e-3  # Adam learning rate of the policy (the critic's: algorithm.critic_lr)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # Adam betas
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip
    num_cpus: float = 1.0  # Ray CPUs of the learner actor
    torch_threads: int = 1  # intra-op threads of the learner actor
    push_every: int = 1  # push weights to the rollout worker every k steps

    def validate(self, p: str) -> None:
        if self.total_steps < 0:
            _fail(f"{p}.total_steps", self.total_steps, "must be >= 0")
        if not self.lr > 0:
            _fail(f"{p}.lr", self.lr, "must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail(f"{p}.betas", self.betas, "must be two numbers in [0, 1)")
        if self.push_every < 1 or self.torch_threads < 1:
            _fail(f"{p}.push_every", self.push_every, "push_every and torch_threads must be >= 1")


@dataclass
class AgentEvalConfig:
    num_episodes: int = 200  # held-out episodes per evaluation (reset seeds never trained on)
    every_steps: int = 10  # held-out curve every k steps (sampled at temperature 1); 0: only before and after
    before_training: bool = True  # evaluate the initial policy (the curve's step 0)
    greedy: bool = True  # also evaluate the trained policy greedily (argmax; the box mean) at the end

    def validate(self, p: str) -> None:
        if self.num_episodes < 1 or self.every_steps < 0:
            _fail(f"{p}.num_episodes", self.num_episodes, "num_episodes must be >= 1 and every_steps >= 0")


@dataclass
class AgentConfig:
    kind: str = "tensor"  # this file configures a tensor agent (a non-LLM policy); LLM run configs have no kind
    run: RunConfig = field(default_factory=RunConfig)  # run identity and seed
    ray: RayConfig = field(default_factory=RayConfig)  # Ray cluster connection
    env: AgentEnvConfig = field(default_factory=AgentEnvConfig)  # the tensor environment and its workers
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # the policy network
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # credit assignment and loss (token-only keys rejected)
    learner: AgentLearnerConfig = field(default_factory=AgentLearnerConfig)  # DeepSpeed learner
    queue: QueueConfig = field(default_factory=lambda: QueueConfig(max_policy_lag=0))  # Arrow replay queue (tensor rows)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus endpoint, metrics.jsonl
    eval: AgentEvalConfig = field(default_factory=AgentEvalConfig)  # held-out evaluation

    def validate(self) -> None:
        if self.kind != "tensor":
            _fail("kind", self.kind, "must be tensor for an agent config")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                _validate_tree(value, f.name)
        defaults = AlgorithmConfig()
        for name in LLM_ONLY_ALGORITHM:
            if getattr(self.algorithm, name) != getattr(defaults, name):
                _fail(f"algorithm.{name}", getattr(self.algorithm, name), "applies to token (LLM) policies only")
        if self.algorithm.advantage not in TENSOR_ESTIMATORS:
            _fail("algorithm.advantage", self.algorithm.advantage,
                  f"a tensor run takes one of {', '.join(TENSOR_ESTIMATORS)}")
        if self.learner.push_every - 1 > self.queue.max_policy_lag:
            _fail("learner.push_every", self.learner.push_every, f"rows would lag the learner by push_every - 1 "
                  f"versions, more than queue.max_policy_lag = {self.queue.max_policy_lag}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_kind(path: str | Path | None) -> str:
    """``tensor`` when the YAML at ``path`` says ``kind: tensor``, else ``llm`` (no path: the LLM default)."""
    if path is None:
        return "llm"
    kind = read_tree(path).get("kind", "llm")
    if kind not in KINDS:
        raise ConfigError(f"config field `kind` = {kind!r}: must be tensor (a tensor agent), or absent (an LLM run)")
    return kind


def load_agent_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AgentConfig:
    """Load a ``kind: tensor`` YAML (optional), apply ``key.sub=value`` overrides, build and validate."""
    tree = apply_overrides(read_tree(path) if path is not None else {"kind": "tensor"}, overrides)
    cfg = _build(AgentConfig, tree, "")
    cfg.validate()
    return cfg
