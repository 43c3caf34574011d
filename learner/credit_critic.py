"""Estimators that bootstrap from a learned critic: MT-PPO (turn rewards + outcome) and PPO (outcome only).

Same calling convention as :mod:`learner.credit`, plus the critic's values at the turn boundaries::

    ESTIMATORS[name](turn_rewards, outcome_rewards, turn_mask, group_ids, *, values, **hparams) -> advantages

    values  float[B, K]  V(s_{b,k}): the critic's estimate of the return from the state before turn k of
                         episode b (read at the last token before the turn's first action token;
                         ``learner.critic``); ignored where the turn is absent

The turn is the unit of the MDP: one action = one assistant turn, its reward the turn reward at the
turn's last action token, the outcome arriving with the last turn, and GAE runs over turns::

    r'_{b,k}  = c_T * r~_{b,k} + [k == L_b] * R^O_b
    delta_b,k = r'_{b,k} + gamma * V_{b,k+1} * [k < L_b] - V_{b,k}       (the last turn is terminal)
    A_{b,k}   = sum_{j = k}^{L_b} (gamma * lam)^(j - k) * delta_{b,j}
    R_{b,k}   = A_{b,k} + V_{b,k}                                          (the critic's regression target)

A truncated episode is terminal too (no state after its last row is in the batch), the same choice the
group estimators make by scoring it where it ended. The advantage handed to the loss is ``A`` whitened
over the batch's existing turns (``whiten``), the usual PPO normalisation; ``R`` uses the raw ``A``.
``group_ids`` are unused: the critic is the baseline, so no group is needed (the argument keeps the
calling convention). This module never imports Ray and takes no config objects.

Reference: the MT-PPO variant of Zeng et al. 2025, arXiv 2505.11821 (v2); GAE: Schulman et al. 2016.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.credit_ops import _check_inputs, _masked, register_estimator, segment_normalize


def turn_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over turns, each episode terminal after its last existing turn.

    Args:
        rewards: float[B, K] r'_{b,k} (0 where absent).
        values: float[B, K] V_{b,k} (ignored where absent).
        mask: bool[B, K] contiguous from turn 0.
        gamma, lam: discount and GAE lambda, in [0, 1].

    Returns:
        (advantages A float[B, K], returns R = A + V float[B, K]), both exactly 0 on absent turns.
    """
    r = _masked(rewards, mask)  # [B, K]
    v = _masked(values, mask)  # [B, K]
    v_next = torch.cat([v[:, 1:], v.new_zeros(v.shape[0], 1)], dim=1)  # [B, K] V_{b,k+1}; 0 past the end
    delta = _masked(r + gamma * v_next - v, mask)  # [B, K] absent k+1 has V = 0: the last turn is terminal
    adv = torch.zeros_like(delta)  # [B, K]
    running = delta.new_zeros(delta.shape[0])  # [B]
    for k in range(delta.shape[1] - 1, -1, -1):
        running = delta[:, k] + gamma * lam * running  # [B]
        adv[:, k] = running
    adv = _masked(adv, mask)
    return adv, _masked(adv + v, mask)


def _whiten(adv: Tensor, mask: Tensor, eps: float) -> Tensor:
    """(A - mean) / (std + eps) over the existing turns of the batch (std unbiased); float[B, K]."""
    out = torch.zeros_like(adv)
    if mask.any():
        vals = adv[mask]  # [N]
        out[mask] = segment_normalize(vals, torch.zeros_like(vals, dtype=torch.long), eps, True)
    return out


def _shaped_rewards(turn_rewards: Tensor, outcome_rewards: Tensor, mask: Tensor, turn_coef: float) -> Tensor:
    """r'_{b,k} = c_T * r~_{b,k} + [k == L_b] * R^O_b; float[B, K]."""
    k_idx = torch.arange(mask.shape[1], device=mask.device)  # [K]
    last = (mask.sum(dim=1) - 1)[:, None] == k_idx[None, :]  # [B, K]
    outcome = torch.where(last, outcome_rewards[:, None], torch.zeros_like(turn_rewards))  # [B, K]
    return _masked(turn_coef * turn_rewards, mask) + outcome


def _check_values(values: Tensor, mask: Tensor) -> None:
    if values.shape != mask.shape:
        raise ValueError(f"values must be [B, K]={tuple(mask.shape)}; got {tuple(values.shape)}")


def mt_ppo_targets(turn_rewards: Tensor, outcome_rewards: Tensor, turn_mask: Tensor, group_ids: Tensor, *,
                   values: Tensor, turn_coef: float = 1.0, gamma: float = 1.0, lam: float = 1.0,
                   **_: object) -> Tensor:
    """The critic's targets R float[B, K] of :func:`mt_ppo` (same arguments; the others are ignored)."""
    mask = _check_inputs(turn_rewards, outcome_rewards, turn_mask, group_ids)
    _check_values(values, mask)
    return turn_gae(_shaped_rewards(turn_rewards, outcome_rewards, mask, turn_coef), values, mask, gamma, lam)[1]


def ppo_targets(turn_rewards: Tensor, outcome_rewards: Tensor, turn_mask: Tensor, group_ids: Tensor, *,
                values: Tensor, gamma: float = 1.0, lam: float = 1.0, **_: object) -> Tensor:
    """The critic's targets R float[B, K] of :func:`ppo` (outcome only)."""
    return mt_ppo_targets(turn_rewards, outcome_rewards, turn_mask, group_ids, values=values, turn_coef=0.0,
                          gamma=gamma, lam=lam)


@register_estimator("mt_ppo")
def mt_ppo(
    turn_rewards: Tensor,
    outcome_rewards: Tensor,
    turn_mask: Tensor,
    group_ids: Tensor,
    *,
    values: Tensor,
    turn_coef: float = 1.0,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """MT-PPO: turn-level GAE with turn rewards and the outcome (module docstring for the equations).

    Args:
        turn_rewards: float[B, K]. outcome_rewards: float[B]. turn_mask: bool[B, K]. group_ids: long[B] (unused).
        values: float[B, K] the critic's V at each turn's start.
        turn_coef: c_T, weight of the turn rewards in r'.
        gamma, lam: discount and GAE lambda over turns.
        whiten: normalise A over the batch's existing turns (mean 0, std 1); false: the raw GAE advantage.
        eps: added to that std.

    Returns:
        float[B, K], 0 on absent turns.
    """
    mask = _check_inputs(turn_rewards, outcome_rewards, turn_mask, group_ids)
    _check_values(values, mask)
    adv, _ = turn_gae(_shaped_rewards(turn_rewards, outcome_rewards, mask, turn_coef), values, mask, gamma, lam)
    return _whiten(adv, mask, eps) if whiten else adv


@register_estimator("ppo")
def ppo(
    turn_rewards: Tensor,
    outcome_rewards: Tensor,
    turn_mask: Tensor,
    group_ids: Tensor,
    *,
    values: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Outcome-only PPO, MT-PPO's baseline: :func:`mt_ppo` with ``turn_coef = 0`` (the turn rewards unseen).

    Returns:
        float[B, K], 0 on absent turns.
    """
    return mt_ppo(turn_rewards, outcome_rewards, turn_mask, group_ids, values=values, turn_coef=0.0, gamma=gamma,
                  lam=lam, whiten=whiten, eps=eps)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = None,
               norm: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value regression of the critic (``mt_ppo``, ``ppo``), over the turns that exist::

        V^clip = V_old + clamp(V - V_old, -clip, clip)
        loss   = sum_{b,k} m_{b,k} * 0.5 * max((V - R)^2, (V^clip - R)^2) / norm

    With ``clip=None`` only the first square is used. ``norm`` defaults to ``sum(m)`` (a mean).

    Args:
        values: float[B, K] V of the critic being trained (with gradient).
        old_values: float[B, K] its values before this step's update (the GAE's V).
        returns: float[B, K] targets R = A + V_old.
        mask: float[B, K] 1 on existing turns.
        clip: PPO's value clip range (same units as the reward), or None.
        norm: divisor of the summed loss (the batch's turn count, for micro-batch invariance).

    Returns:
        (loss scalar, {"clip_frac": share of turns where the clipped square was the larger}).
    """
    m = mask > 0
    v = torch.where(m, values, torch.zeros_like(values))
    r = torch.where(m, returns, torch.zeros_like(returns))
    sq = (v - r) ** 2  # [B, K]
    if clip is not None:
        v_old = torch.where(m, old_values, torch.zeros_like(old_values))
        sq_clip = (v_old + (v - v_old).clamp(-clip, clip) - r) ** 2  # [B, K]
        used_clip = (sq_clip > sq) & m
        sq = torch.maximum(sq, sq_clip)
    else:
        used_clip = torch.zeros_like(m)
    den = m.sum().clamp(min=1).to(sq.dtype) if norm is None else torch.as_tensor(float(norm), dtype=sq.dtype)
    loss = (0.5 * sq * m.to(sq.dtype)).sum() / den
    clip_frac = used_clip.sum().to(sq.dtype) / m.sum().clamp(min=1).to(sq.dtype)
    return loss, {"clip_frac": clip_frac.detach()}


VALUE_TARGETS = {"mt_ppo": mt_ppo_targets, "ppo": ppo_targets}
"""Estimators that take a critic's ``values``: name -> the critic's regression targets (same arguments)."""
