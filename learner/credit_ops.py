"""Tensor operations under the credit-assignment estimators of :mod:`learner.credit`.

* :func:`group_normalize` -- GRPO group normalisation of one value per episode (over
  :func:`segment_normalize`, which GiGPO also uses for its step groups);
* :func:`broadcast_to_tokens` -- per-turn advantages to per-token advantages;
* the estimator registry (:data:`ESTIMATORS`, :func:`register_estimator`, :func:`get_estimator`) and the
  input checks every estimator runs, shared by :mod:`learner.credit` and :mod:`learner.credit_critic`.

Pure functions on tensors (no Ray, no config); shapes are in each docstring.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["segment_normalize", "group_normalize", "broadcast_to_tokens", "ESTIMATORS", "register_estimator",
           "get_estimator"]


def segment_normalize(
    x: Tensor, segment_ids: Tensor, eps: float, scale_by_std: bool
) -> Tensor:
    """Normalise ``x`` within segments: (x - mean_s) / (std_s + eps), std unbiased (n - 1).

    Args:
        x: float[N] values.
        segment_ids: long[N] arbitrary ints; equal ids form one segment.
        eps: added to the std before dividing.
        scale_by_std: if False only the mean is subtracted.

    Returns:
        float[N]; exactly 0 for every member of a segment of size 1 or whose values are all
        equal (so no NaN/inf and no 1e-17 / eps leftovers from rounding in the mean).
    """
    if x.numel() == 0:
        return x.clone()
    _, inv = torch.unique(segment_ids, return_inverse=True)  # [N] in [0, S)
    n_seg = int(inv.max().item()) + 1
    zeros = x.new_zeros(n_seg)  # [S]
    count = torch.bincount(inv, minlength=n_seg).to(x.dtype)  # [S]
    mean = zeros.index_add(0, inv, x) / count  # [S]
    centered = x - mean[inv]  # [N]
    if scale_by_std:
        sq = zeros.index_add(0, inv, centered * centered)  # [S]
        std = (sq / (count - 1).clamp_min(1)).sqrt()  # [S] unbiased; n=1 handled below
        out = centered / (std[inv] + eps)  # [N]
    else:
        out = centered  # [N]
    seg_max = x.new_full((n_seg,), float("-inf")).scatter_reduce(0, inv, x, "amax")  # [S]
    seg_min = x.new_full((n_seg,), float("inf")).scatter_reduce(0, inv, x, "amin")  # [S]
    degenerate = (count < 2) | (seg_max == seg_min)  # [S]
    return torch.where(degenerate[inv], torch.zeros_like(out), out)  # [N]


def group_normalize(
    x: Tensor, group_ids: Tensor, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """GRPO group normalisation ``norm_g(x)_b = (x_b - mean_g) / (std_g + eps)``.

    ``mean_g`` and ``std_g`` run over the episodes b' with ``group_ids[b'] == group_ids[b]``.
    ``std_g`` is the *unbiased* (Bessel, n - 1) standard deviation, as ``torch.std`` and the
    GRPO implementations in TRL and verl use.

    Args:
        x: float[B] one value per episode.
        group_ids: long[B] group of each episode (arbitrary, not necessarily contiguous ints).
        eps: added to ``std_g`` before dividing.
        scale_by_std: False gives plain centring ``x_b - mean_g`` (Dr.GRPO, arXiv 2503.20783).

    Returns:
        float[B]. A group whose values are all identical gives exactly 0 (never NaN), and so
        does a group of size 1.
    """
    if x.dim() != 1 or group_ids.shape != x.shape:
        raise ValueError(
            f"group_normalize expects x [B] and group_ids [B]; got {tuple(x.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    return segment_normalize(x, group_ids, eps, scale_by_std)


def broadcast_to_tokens(
    turn_advantages: Tensor, token_turn_index: Tensor, loss_mask: Tensor
) -> Tensor:
    """Give every loss token the advantage of the turn it belongs to.

    ``out[b, t] = turn_advantages[b, token_turn_index[b, t]]`` where ``loss_mask[b, t] != 0``,
    else 0. Prompt, observation (tool output) and padding tokens carry ``loss_mask == 0`` and
    may have ``token_turn_index == -1``.

    Args:
        turn_advantages: float[B, K].
        token_turn_index: long[B, T] turn of each token; any value where the mask is 0.
        loss_mask: bool or float[B, T].

    Returns:
        float[B, T].

    Raises:
        ValueError: a loss token points outside [0, K).
    """
    b, k = turn_advantages.shape
    if token_turn_index.dim() != 2 or token_turn_index.shape[0] != b:
        raise ValueError(
            f"token_turn_index must be [B={b}, T]; got {tuple(token_turn_index.shape)}"
        )
    if loss_mask.shape != token_turn_index.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must match token_turn_index "
            f"{tuple(token_turn_index.shape)}"
        )
    on = loss_mask != 0  # [B, T]
    idx = token_turn_index.long()  # [B, T]
    if bool((on & ((idx < 0) | (idx >= k))).any()):
        raise ValueError(f"a loss token has a turn index outside [0, {k})")
    safe = idx.clamp(0, max(k - 1, 0))  # [B, T]
    if k == 0:
        return turn_advantages.new_zeros(token_turn_index.shape)
    vals = turn_advantages.gather(1, safe)  # [B, T]
    return torch.where(on, vals, torch.zeros_like(vals))  # [B, T]


# --------------------------------------------------------------------------------------------
# The estimator registry (learner.credit, learner.credit_critic) and the input checks they share
# --------------------------------------------------------------------------------------------

Estimator = Callable[..., Tensor]

ESTIMATORS: dict[str, Estimator] = {}
"""Advantage estimators by name; see the module docstring for the calling convention."""


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator adding an estimator to :data:`ESTIMATORS` under ``name``."""

    def decorator(fn: Estimator) -> Estimator:
        if name in ESTIMATORS and ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn

    return decorator


def get_estimator(name: str) -> Estimator:
    """Look up an estimator by name; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {sorted(ESTIMATORS)}"
        ) from None


def _check_inputs(
    turn_rewards: Tensor, outcome_rewards: Tensor, turn_mask: Tensor, group_ids: Tensor
) -> Tensor:
    """Validate shapes and turn contiguity; return ``turn_mask`` as bool[B, K]."""
    if turn_rewards.dim() != 2:
        raise ValueError(f"turn_rewards must be [B, K]; got {tuple(turn_rewards.shape)}")
    b, k = turn_rewards.shape
    if turn_mask.shape != (b, k):
        raise ValueError(f"turn_mask must be [B, K]={b, k}; got {tuple(turn_mask.shape)}")
    if outcome_rewards.shape != (b,):
        raise ValueError(f"outcome_rewards must be [B]={b}; got {tuple(outcome_rewards.shape)}")
    if group_ids.shape != (b,):
        raise ValueError(f"group_ids must be [B]={b}; got {tuple(group_ids.shape)}")
    if not torch.is_floating_point(turn_rewards) or not torch.is_floating_point(outcome_rewards):
        raise ValueError("turn_rewards and outcome_rewards must be floating point tensors")
    mask = turn_mask.bool()  # [B, K]
    if k > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("turn_mask must be contiguous from turn 0 (a turn exists after a gap)")
    return mask


def _masked(adv: Tensor, mask: Tensor) -> Tensor:
    """Zero out absent turns exactly (``where``, so inf/NaN never leak through a 0 * x)."""
    return torch.where(mask, adv, torch.zeros_like(adv))  # [B, K]
