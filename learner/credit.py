"""Turn-level credit assignment: per-turn advantage estimators for multi-turn episodes.

Every estimator is a pure tensor function registered by name in :data:`ESTIMATORS`, so a YAML
config can say ``advantage: mt_grpo``. All share one calling convention::

    ESTIMATORS[name](turn_rewards, outcome_rewards, turn_mask, group_ids, **hparams) -> advantages

    turn_rewards     float[B, K]  reward of turn k of episode b (ignored where the turn is absent)
    outcome_rewards  float[B]     outcome (final-answer) reward of episode b
    turn_mask        bool[B, K]   turn k exists in episode b; turns are contiguous from 0
    group_ids        long[B]      episodes sampled for the same prompt share an id (any ints)
    advantages       float[B, K]  exactly 0 where the turn does not exist

Notation used in the docstrings: ``norm_g(x)_b = (x_b - mean_g(x)) / (std_g(x) + eps)`` where
the statistics run over the episodes of b's group (:func:`group_normalize`); ``L_b`` is the
index of episode b's last turn; ``r~_{b,k} = turn_rewards[b, k]`` if the turn exists else 0.

Turning per-turn advantages into per-token advantages is a separate step,
:func:`broadcast_to_tokens` (in :mod:`learner.credit_ops`, with
:func:`group_normalize`; both re-exported here).

Reference: Zeng et al. 2025, "Reinforcing Multi-Turn Reasoning in LLM Agents via Turn-Level
Credit Assignment", arXiv 2505.11821 (MT-GRPO). GiGPO: Feng et al. 2025, "Group-in-Group
Policy Optimization for LLM Agent Training", arXiv 2505.10978.

Estimators that bootstrap from a learned critic (``mt_ppo``, ``ppo``: GAE over turns) live in
:mod:`learner.credit_critic` and register here; they take the critic's ``values`` float[B, K] too.
``tree_grpo`` (:mod:`learner.credit_tree`) normalises each turn among its siblings in a tree rollout;
it takes the rows' ``node_ids`` long[B, K].

This module never imports Ray and takes no config objects: hyperparameters are keyword args.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from learner.credit_critic import mt_ppo, ppo  # registers the critic-based estimators too
from learner.credit_tree import tree_grpo  # and the tree estimator
from learner.credit_ops import (ESTIMATORS, _check_inputs, _masked, broadcast_to_tokens, get_estimator, group_normalize,
                                register_estimator, segment_normalize)

logger = logging.getLogger(__name__)

__all__ = [
    "ESTIMATORS",
    "register_estimator",
    "get_estimator",
    "group_normalize",
    "broadcast_to_tokens",
    "grpo_or",
    "grpo_mr",
    "mt_grpo",
    "mt_grpo_k",
    "gigpo",
    "mt_ppo",
    "ppo",
    "tree_grpo",
]

# --------------------------------------------------------------------------------------------
# Helpers shared by the estimators
# --------------------------------------------------------------------------------------------


def _num_turns(mask: Tensor) -> Tensor:
    """long[B] number of existing turns per episode (last turn index is this minus 1)."""
    return mask.sum(dim=1)  # [B]


def _is_final_of_multi_turn(mask: Tensor) -> Tensor:
    """bool[B, K]: turn k is the last turn of an episode that has at least two turns."""
    n_turns = _num_turns(mask)  # [B]
    k_idx = torch.arange(mask.shape[1], device=mask.device)  # [K]
    return (k_idx[None, :] == (n_turns - 1)[:, None]) & (n_turns >= 2)[:, None]  # [B, K]


def _discounted_suffix_sum(x: Tensor, gamma: float) -> Tensor:
    """S[:, k] = sum_{j >= k} gamma^(j - k) x[:, j] for x float[B, K] (backward recursion)."""
    out = torch.zeros_like(x)  # [B, K]
    running = x.new_zeros(x.shape[0])  # [B]
    for k in range(x.shape[1] - 1, -1, -1):
        running = x[:, k] + gamma * running  # [B]
        out[:, k] = running
    return out


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------


@register_estimator("grpo_or")
def grpo_or(
    turn_rewards: Tensor,
    outcome_rewards: Tensor,
    turn_mask: Tensor,
    group_ids: Tensor,
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """GRPO on the outcome reward only (the paper's GRPO-OR baseline).

    ``A_{b,k} = norm_g(R^O)_b`` for every existing turn k of episode b; turn rewards are
    ignored.

    Args:
        turn_rewards: float[B, K] (unused, kept for the common signature).
        outcome_rewards: float[B].
        turn_mask: bool[B, K].
        group_ids: long[B].
        eps, scale_by_std: see :func:`group_normalize`.

    Returns:
        float[B, K], 0 on absent turns.

    Reference: Zeng et al. 2025 (arXiv 2505.11821), GRPO-OR; Shao et al. 2024 (GRPO).
    """
    mask = _check_inputs(turn_rewards, outcome_rewards, turn_mask, group_ids)
    n_o = group_normalize(outcome_rewards, group_ids, eps, scale_by_std)  # [B]
    return _masked(n_o[:, None].expand_as(turn_rewards), mask)  # [B, K]


@register_estimator("grpo_mr")
def grpo_mr(
    turn_rewards: Tensor,
    outcome_rewards: Tensor,
    turn_mask: Tensor,
    group_ids: Tensor,
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """GRPO on the merged reward (the paper's GRPO-MR baseline).

    ``A_{b,k} = norm_g(R^O + sum_j r~_{·,j})_b`` for every existing turn k: the turn rewards
    are summed into the outcome and the total is smeared over the whole episode.

    Args / Returns: as :func:`grpo_or`.

    Reference: Zeng et al. 2025 (arXiv 2505.11821), GRPO-MR.
    """
    mask = _check_inputs(turn_rewards, outcome_rewards, turn_mask, group_ids)
    r = _masked(turn_rewards, mask)  # [B, K]
    total = outcome_rewards + r.sum(dim=1)  # [B]
    n = group_normalize(total, group_ids, eps, scale_by_std)  # [B]
    return _masked(n[:, None].expand_as(turn_rewards), mask)  # [B, K]


@register_estimator("mt_grpo")
def mt_grpo(
    turn_rewards: Tensor,
    outcome_rewards: Tensor,
    turn_mask: Tensor,
    group_ids: Tensor,
    *,
    turn_coef: float = 1.0,
    outcome_coef: float = 1.0,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """MT-GRPO, the paper's two-turn form generalised to "every turn before the last".

    With ``R^T_b = sum_{k < L_b} r~_{b,k}``, the rewards of the turns that receive it (all but the
    last turn ``L_b`` of a multi-turn episode; the only turn of a single-turn one)::

        A_{b,k} = c_T * norm_g(R^T)_b + c_O * norm_g(R^O)_b    for k < L_b
        A_{b,L_b} = norm_g(R^O)_b                               (last turn, if L_b >= 1)

    **Which turns form R^T.** The last turn's own reward is in nobody's advantage: the last turn
    gets the outcome only (the paper's rule), and crediting its reward to the earlier turns would
    reward them for a later decision, e.g. a tool call on a final turn cut by ``env.max_turns``.
    In the paper's two-turn task the answer turn's reward is 0, so this is the paper's form
    exactly. (:func:`mt_grpo_k` instead credits each turn with its own and later turns' rewards,
    the last turn's included; :func:`grpo_mr` merges every turn reward into the outcome.)

    An episode with a single turn (it answered without calling a tool) gets the combined
    ``c_T * norm_g(R^T) + c_O * norm_g(R^O)`` on that turn, as the paper's reference code does.
    In the paper's two-turn setting turn 0 is the tool call and turn 1 the answer, so the tool
    call is credited with its own reward plus the outcome, the answer with the outcome only.

    Args:
        turn_rewards: float[B, K].
        outcome_rewards: float[B].
        turn_mask: bool[B, K].
        group_ids: long[B].
        turn_coef: c_T, weight of the normalised turn reward (paper: 1).
        outcome_coef: c_O, weight of the normalised outcome on the non-final turns (paper's
            code: 1; write-ups call it the relevance factor lambda and quote 0.2).
        eps, scale_by_std: see :func:`group_normalize`.

    Returns:
        float[B, K], 0 on absent turns.

    Reference: Zeng et al. 2025, arXiv 2505.11821, MT-GRPO advantage (Sec. 4, Fig. 2).
    """
    mask = _check_inputs(turn_rewards, outcome_rewards, turn_mask, group_ids)
    final = _is_final_of_multi_turn(mask)  # [B, K]
    r = _masked(turn_rewards, mask & ~final)  # [B, K] the turns credited with R^T
    n_t = group_normalize(r.sum(dim=1), group_ids, eps, scale_by_std)  # [B]
    n_o = group_normalize(outcome_rewards, group_ids, eps, scale_by_std)  # [B]
    combined = turn_coef * n_t + outcome_coef * n_o  # [B]
    adv = torch.where(final, n_o[:, None], combined[:, None])  # [B, K]
    return _masked(adv, mask)  # [B, K]


@register_estimator("mt_grpo_k")
def mt_grpo_k(
    turn_rewards: Tensor,
    outcome_rewards: Tensor,
    turn_mask: Tensor,
    group_ids: Tensor,
    *,
    turn_coef: float = 1.0,
    outcome_coef: float = 1.0,
    final_outcome_coef: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """MT-GRPO for K turns and a variable number of turns per episode.

    Each turn index j gets its own group normalisation, and turn k is credited with the
    discounted sum of the normalised rewards of itself and every later turn, plus the outcome::

        n_{b,j}   = norm_g(r~_{·,j})_b          (per turn index j, over ALL episodes of g)
        S_{b,k}   = sum_{j >= k} gamma^(j-k) * n_{b,j}
        A_{b,k}   = c_T * S_{b,k} + w_{b,k} * norm_g(R^O)_b
        w_{b,k}   = final_outcome_coef  if k is the last turn of an episode with >= 2 turns
                    outcome_coef        otherwise (earlier turns, and single-turn episodes)

    **Baseline (variable turn counts).** A turn that episode b never reached counts as reward
    0 (``r~_{b,j} = 0``) and episode b stays in the normalisation set of turn index j. So the
    statistics of index j are over all G episodes of the group, whatever their lengths, and
    ``n_{b,j}`` is defined for every j, including turns b did not reach; those values enter
    ``S`` of b's earlier turns. Why: the centred term is
    ``r~_{b,j} - mean_g = (G-1)/G * (r~_{b,j} - mean_{g without b})`` and the leave-one-out
    mean depends only on the *other* episodes, which are independent of b's actions, so
    ``E[grad log pi(a_{b,k}) * baseline] = 0`` and, with ``scale_by_std=False``, the
    expected update is exactly ``(G-1)/G`` times the policy gradient of
    ``E[sum_j gamma^j r~_j + R^O]`` (reward-to-go form; a turn only credits its own and later
    rewards). Normalising turn j only over the episodes that *reached* j instead makes the
    baseline set depend on b's earlier actions (stopping vs. calling another tool): every
    reacher's turn-j reward is centred among reachers, so the value of reaching turn j is
    erased and stopping early is never penalised (cf. verl issue #7244). With
    ``scale_by_std=True`` the std is a per-(group, turn) positive scale, the same
    approximation GRPO itself makes. Unbiasedness also needs ``final_outcome_coef ==
    outcome_coef`` (otherwise the outcome weight depends on the decision to stop, as in the
    paper's own two-turn form); the defaults satisfy it.

    Reductions (tested): with K = 2, a turn reward only on turn 0 (turn 1 rewards all 0), any
    gamma, c_T, c_O, this equals :func:`mt_grpo` exactly (``n_{·,1} = 0`` so
    ``S_{·,0} = n_{·,0} = norm_g(R^T)``; the last turn gets ``final_outcome_coef = 1`` times
    ``norm_g(R^O)``). With ``turn_coef = 0`` and default outcome weights it equals
    :func:`grpo_or` on every turn.

    Args:
        turn_rewards: float[B, K].
        outcome_rewards: float[B].
        turn_mask: bool[B, K].
        group_ids: long[B].
        turn_coef: c_T, weight of the discounted normalised turn rewards.
        outcome_coef: weight of ``norm_g(R^O)`` on every turn except the final turn of a
            multi-turn episode.
        final_outcome_coef: weight of ``norm_g(R^O)`` on the final turn of a multi-turn
            episode (1, as in the paper's two-turn form).
        gamma: discount applied to later turns' normalised rewards.
        eps, scale_by_std: see :func:`group_normalize`.

    Returns:
        float[B, K], 0 on absent turns.

    Reference: generalises Zeng et al. 2025, arXiv 2505.11821 (MT-GRPO) to K turns.
    """
    mask = _check_inputs(turn_rewards, outcome_rewards, turn_mask, group_ids)
    b, k = turn_rewards.shape
    r = _masked(turn_rewards, mask)  # [B, K] unreached turns count as reward 0
    k_idx = torch.arange(k, device=r.device)  # [K]
    _, g_inv = torch.unique(group_ids, return_inverse=True)  # [B] contiguous group index
    seg = g_inv[:, None] * k + k_idx[None, :]  # [B, K] one segment per (group, turn index)
    n = segment_normalize(r.reshape(-1), seg.reshape(-1), eps, scale_by_std).view(b, k)  # [B, K]
    s = _discounted_suffix_sum(n, gamma)  # [B, K]
    n_o = group_normalize(outcome_rewards, group_ids, eps, scale_by_std)  # [B]
    w = torch.where(
        _is_final_of_multi_turn(mask),
        n_o.new_tensor(final_outcome_coef),
        n_o.new_tensor(outcome_coef),
    )  # [B, K]
    adv = turn_coef * s + w * n_o[:, None]  # [B, K]
    return _masked(adv, mask)  # [B, K]


@register_estimator("gigpo")
def gigpo(
    turn_rewards: Tensor,
    outcome_rewards: Tensor,
    turn_mask: Tensor,
    group_ids: Tensor,
    *,
    state_ids: Tensor | None = None,
    gamma: float = 1.0,
    step_coef: float = 1.0,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """GiGPO-style two-level advantage: episode level plus step level over shared states.

    The outcome is treated as a reward arriving with the episode's last turn, and the step
    return is the discounted reward-to-go::

        r'_{b,k}  = r~_{b,k} + [k == L_b] * R^O_b
        G_{b,k}   = sum_{j >= k} gamma^(j-k) * r'_{b,j}
        A^E_b     = norm_g(R^O)_b
        A^S_{b,k} = (G_{b,k} - mean_{(g,s)}(G)) / (std_{(g,s)}(G) + eps)
        A_{b,k}   = A^E_b + step_coef * A^S_{b,k}

    where the step statistics run over the existing turns (b', k') of the same group whose
    state id equals ``state_ids[b, k]`` (an "anchor state" set); a set with one member, or
    whose returns are all equal, gives ``A^S = 0``. ``state_ids=None`` uses the turn index as
    the state (all turn-k steps of a group share a baseline; note this is a baseline over the
    episodes that reached turn k, which is GiGPO's anchor-state design, not ``mt_grpo_k``'s).

    Args:
        turn_rewards: float[B, K].
        outcome_rewards: float[B].
        turn_mask: bool[B, K].
        group_ids: long[B].
        state_ids: long[B, K] hash of the observation/state before turn k; equal ids within a
            group mean the same state. Values on absent turns are ignored.
        gamma: discount of the step return.
        step_coef: weight (omega in the paper) of the step-level advantage.
        eps, scale_by_std: see :func:`group_normalize` (std is unbiased, n - 1).

    Returns:
        float[B, K], 0 on absent turns.

    Reference: Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training",
    arXiv 2505.10978.
    """
    mask = _check_inputs(turn_rewards, outcome_rewards, turn_mask, group_ids)
    b, k = turn_rewards.shape
    k_idx = torch.arange(k, device=turn_rewards.device)  # [K]
    if state_ids is None:
        states = k_idx[None, :].expand(b, k)  # [B, K]
    else:
        if state_ids.shape != (b, k):
            raise ValueError(f"state_ids must be [B, K]={b, k}; got {tuple(state_ids.shape)}")
        states = state_ids.long()  # [B, K]
    last = (_num_turns(mask) - 1)[:, None] == k_idx[None, :]  # [B, K] (all False if no turns)
    r = _masked(turn_rewards, mask) + torch.where(
        last, outcome_rewards[:, None], torch.zeros_like(turn_rewards)
    )  # [B, K]
    returns = _discounted_suffix_sum(r, gamma)  # [B, K]
    ep_adv = group_normalize(outcome_rewards, group_ids, eps, scale_by_std)  # [B]

    step_adv = torch.zeros_like(returns)  # [B, K]
    bi, ki = mask.nonzero(as_tuple=True)  # [N], [N] existing turns
    if bi.numel() > 0:
        keys = torch.stack([group_ids[bi].long(), states[bi, ki]], dim=1)  # [N, 2]
        _, seg = torch.unique(keys, dim=0, return_inverse=True)  # [N]
        step_adv[bi, ki] = segment_normalize(returns[bi, ki], seg, eps, scale_by_std)  # [N]
    adv = ep_adv[:, None] + step_coef * step_adv  # [B, K]
    return _masked(adv, mask)  # [B, K]
