"""The ``kind: tensor`` config: loading, its rules, the shipped YAML files, and no dead keys."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from common.config import ConfigError
from common.config_agent import AgentConfig, config_kind, load_agent_config

REPO = Path(__file__).resolve().parents[2]
YAMLS = ["deploy/configs/arm.yaml", "deploy/configs/cartpole.yaml", "deploy/configs/arm_experiment.yaml"]


def test_shipped_configs_load():
    arm = load_agent_config(REPO / "deploy/configs/arm.yaml")
    assert arm.env.kind == "arm" and arm.policy.kind == "mlp" and arm.algorithm.advantage == "mt_grpo_k"
    cp = load_agent_config(REPO / "deploy/configs/cartpole.yaml")
    assert cp.env.kind == "gym" and cp.env.gym.id == "CartPole-v1"
    assert cp.env.env_kwargs()["env_id"] == "CartPole-v1" and "grasp_steps" not in cp.env.env_kwargs()
    assert config_kind(REPO / "deploy/configs/arm.yaml") == "tensor"
    assert config_kind(REPO / "deploy/configs/local.yaml") == "llm"
    assert config_kind(None) == "llm"


@pytest.mark.parametrize("path", YAMLS)
def test_every_yaml_key_is_commented(path):
    uncommented = [ln for ln in (REPO / path).read_text().splitlines()
                   if re.match(r"^\s*[A-Za-z_.]+:", ln) and "#" not in ln]
    assert not uncommented, f"{path}: keys without a comment: {uncommented}"


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.kl_coef=0.1"], "algorithm.kl_coef"),  # token policies only
    (["algorithm.off_policy=tis"], "algorithm.off_policy"),
    (["algorithm.advantage=tree_grpo"], "a tensor run takes one of"),
    (["env.gym.max_steps=50"], "env.gym.max_steps"),  # env.kind is arm
    (["env.kind=gym", "env.arm.hoop_radius=0.3"], "env.arm.hoop_radius"),
    (["env.kind=gym", "env.gym.turn_steps=0"], "env.gym.turn_steps"),
    (["policy.kind=custom"], "policy.factory"),
    (["policy.factory=pkg.mod:fn"], "policy.factory"),  # kind mlp
    (["policy.kind=custom", "policy.factory=nocolon"], "package.module:function"),
    (["learner.push_every=2"], "learner.push_every"),  # max_policy_lag 0
    (["env.num_workers=0"], "env.num_workers"),
    (["kind=llm"], "kind"),
    (["env.arm.grasp_stepz=3"], "did you mean `grasp_steps`"),
])
def test_rules_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_agent_config(REPO / "deploy/configs/arm.yaml", overrides)


def test_a_bad_kind_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("kind: robot\n")
    with pytest.raises(ConfigError, match="kind"):
        config_kind(p)


def test_push_every_fits_a_larger_lag():
    cfg = load_agent_config(REPO / "deploy/configs/arm.yaml", ["learner.push_every=2", "queue.max_policy_lag=1"])
    assert cfg.learner.push_every == 2


def _fields(obj, prefix):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.name


def test_every_agent_specific_key_is_read_outside_the_config_modules():
    """The sections only tensor runs have (env, policy, learner, eval); the shared ones are checked with the LLM
    config (tests/common/test_no_dead_keys.py). ``env.gym.id`` reaches the env as ``env_id``."""
    code = "\n".join(line.split("#", 1)[0] for d in ("actors", "learner", "env_workers", "common")
                     for p in (REPO / d).rglob("*.py") if p.name not in ("config_agent.py", "config_sections.py")
                     for line in p.read_text().splitlines())
    cfg, dead = AgentConfig(), []
    for section in ("env", "policy", "learner", "eval"):
        for path, name in _fields(getattr(cfg, section), f"{section}."):
            name = "env_id" if path == "env.gym.id" else name
            pattern = rf"(\.{name}\b|[\"']{name}[\"']\s*[:\]]|get\([\"']{name}[\"']|\b{name}\s*=|\b{name}: [a-z])"
            if not re.search(pattern, code):
                dead.append(path)
    assert not dead, f"config fields no code reads: {dead}"
