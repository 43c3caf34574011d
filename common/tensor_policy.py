"""Policies of tensor agents: any ``torch.nn.Module`` that maps observation sequences to action-distribution
parameters, and the distribution maths the rollout worker and the learner share.

The contract (an MLP ignores ``state``; a recurrent policy carries it from step to step)::

    params, state = policy(obs, state)     obs float[B, T, *obs_shape] -> params float[B, T, P]
    policy.initial_state(B)                 the state before an episode's first step (None: stateless)

``P`` is ``n`` logits for a ``Discrete(n)`` action, or ``2 d`` for a ``d``-dimensional box (the mean, then
the log standard deviation). The rollout worker calls it with ``T = 1`` step by step; the learner with
the whole episode at once, so a recurrent policy sees the same inputs in both.

A ``custom`` policy (``policy.factory: package.module:function``) is built by
``function(obs_shape, action_space, hidden=..., layers=...)`` and must keep the contract.

The critic of ``mt_ppo`` / ``ppo`` is a separate :class:`ValueMLP` (its own optimiser, ``critic_lr``):
``V(obs) float[B, T]``, read at each turn's first step.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.spaces import ActionSpace

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def _mlp(inp: int, hidden: int, layers: int, out: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = inp
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


def param_dim(space: ActionSpace) -> int:
    return space.n if space.discrete else 2 * space.dim


class MLPPolicy(nn.Module):
    """Feed-forward policy: each step's parameters from its observation alone."""

    def __init__(self, obs_dim: int, space: ActionSpace, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.net = _mlp(obs_dim, hidden, layers, param_dim(space))
        with torch.no_grad():  # a near-uniform (or unit-variance) first policy
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.zero_()

    def initial_state(self, batch: int) -> Tensor | None:
        return None

    def forward(self, obs: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return self.net(obs.flatten(2)), None  # [B, T, P]


class GRUPolicy(nn.Module):
    """Recurrent policy: an MLP encoder, a GRU over the episode's steps, a linear head."""

    def __init__(self, obs_dim: int, space: ActionSpace, hidden: int = 64, layers: int = 1):
        super().__init__()
        self.encoder = _mlp(obs_dim, hidden, max(0, layers - 1), hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, param_dim(space))
        with torch.no_grad():
            self.head.weight.mul_(0.01)
            self.head.bias.zero_()
        self.hidden = hidden

    def initial_state(self, batch: int) -> Tensor:
        return torch.zeros(1, batch, self.hidden)

    def forward(self, obs: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.tanh(self.encoder(obs.flatten(2)))  # [B, T, H]
        y, h = self.gru(x, state)  # [B, T, H], [1, B, H]
        return self.head(y), h


class ValueMLP(nn.Module):
    """The critic: V(obs) float[B, T]."""

    def __init__(self, obs_dim: int, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.net = _mlp(obs_dim, hidden, layers, 1)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs.flatten(2)).squeeze(-1)


def build_policy(kind: str, obs_shape: tuple[int, ...], space: ActionSpace, *, hidden: int = 64, layers: int = 2,
                 factory: str | None = None) -> nn.Module:
    """The policy of ``policy.kind`` (see the module docstring for ``custom``)."""
    obs_dim = int(np.prod(obs_shape))
    if kind == "mlp":
        return MLPPolicy(obs_dim, space, hidden, layers)
    if kind == "gru":
        return GRUPolicy(obs_dim, space, hidden, layers)
    if kind == "custom":
        if not factory or ":" not in factory:
            raise ValueError(f"policy.factory {factory!r}: must look like package.module:function")
        mod, fn = factory.split(":", 1)
        policy = getattr(importlib.import_module(mod), fn)(obs_shape, space, hidden=hidden, layers=layers)
        if not isinstance(policy, nn.Module) or not hasattr(policy, "initial_state"):
            raise TypeError(f"policy.factory {factory!r} returned {type(policy).__name__}: need an nn.Module with "
                            "initial_state(batch) and forward(obs, state) -> (params, state)")
        return policy
    raise ValueError(f"policy.kind {kind!r}: must be mlp, gru or custom")


# ---------------------------------------------------------------------------------------------
# Distributions (pure)
# ---------------------------------------------------------------------------------------------


def _gaussian(params: Tensor) -> tuple[Tensor, Tensor]:
    mean, log_std = params.chunk(2, dim=-1)
    return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def log_prob(params: Tensor, actions: Tensor, space: ActionSpace) -> Tensor:
    """log pi(a | s) float[...] of ``actions`` (long[..., 1] discrete, float[..., d] box) under ``params``
    float[..., P]: ``log_softmax(logits)[a]``, or the diagonal Gaussian's summed log-density."""
    if space.discrete:
        return torch.log_softmax(params.float(), dim=-1).gather(-1, actions.long()).squeeze(-1)
    mean, log_std = _gaussian(params.float())
    z = (actions.float() - mean) / log_std.exp()
    return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def entropy(params: Tensor, space: ActionSpace) -> Tensor:
    """The distribution's entropy float[...]."""
    if space.discrete:
        logp = torch.log_softmax(params.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)
    _, log_std = _gaussian(params.float())
    return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)


def sample(params: Tensor, space: ActionSpace, generator: torch.Generator | None = None,
           greedy: bool = False) -> Tensor:
    """Actions [..., 1] (long) or [..., d] (float) drawn from ``params`` [..., P]; ``greedy``: the mode.
    A box action is sampled unclipped (its log-prob is of the sampled value); the env clips it."""
    if space.discrete:
        if greedy:
            return params.argmax(-1, keepdim=True)
        probs = torch.softmax(params.float(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(*probs.shape[:-1], 1)
    mean, log_std = _gaussian(params.float())
    if greedy:
        return mean
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return mean + noise * log_std.exp()


def state_to_numpy(module: nn.Module) -> dict[str, Any]:
    """The module's weights as numpy arrays (what travels to the rollout workers)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy_state(module: nn.Module, state: dict[str, Any]) -> None:
    module.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()})
