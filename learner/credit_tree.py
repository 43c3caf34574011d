"""Turn-level credit over tree rollouts (``rollout.tree``): ``tree_grpo``.

A tree rollout forks an episode at a branch turn into children that share its exact prefix (same
tokens, same env state), so the turns a node's children take all start from *one* state. Their
group is the baseline GRPO assumes and independent episodes only give at turn 0: comparing later
turns of independent episodes mixes the merit of the turn with the luck of the state it started in.

Same calling convention as :mod:`learner.credit` (``turn_rewards`` float[B, K], ``outcome_rewards``
float[B], ``turn_mask`` bool[B, K], ``group_ids`` long[B] -> float[B, K]), plus ``node_ids``
long[B, K]: the tree node of turn k of episode b. Episodes are the leaves; a turn several leaves
share has one node id in all of their rows (their values must agree), and the parent of the node at
``(b, k)`` is the node at ``(b, k - 1)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.credit_ops import _check_inputs, _masked, register_estimator, segment_normalize

__all__ = ["tree_grpo", "tree_values"]


def tree_values(turn_rewards: Tensor, outcome_rewards: Tensor, turn_mask: Tensor, node_ids: Tensor, *,
                turn_coef: float = 1.0, gamma: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The value of every node, from its descendants' rewards.

    ::

        Q(n) = c_T * r_n + R_b                            n is the last turn of episode (leaf) b
        Q(n) = c_T * r_n + gamma * mean_{c in children(n)} Q(c)     otherwise

    The mean runs over distinct child *nodes* (a child with many leaves counts once), so ``Q(n)`` is an
    unbiased estimate of the action value of the turn ``n`` took from its state when each child was
    sampled independently from that state.

    Returns ``(q float[N], node_of long[M], parent long[N], first long[N])`` over the N distinct nodes:
    ``node_of`` maps each of the M existing turns (``turn_mask.nonzero()`` order) to its node, ``parent``
    is the parent node's index (-1 for a first turn), ``first`` one existing turn of the node.
    """
    mask = turn_mask.bool()
    b, k = turn_rewards.shape
    if node_ids.shape != (b, k):
        raise ValueError(f"node_ids must be [B, K]={b, k}; got {tuple(node_ids.shape)}")
    bi, ki = mask.nonzero(as_tuple=True)  # [M], [M]
    ids = node_ids[bi, ki].long()  # [M]
    uniq, node_of = torch.unique(ids, return_inverse=True)  # [N], [M]
    n = uniq.numel()
    pos = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((n,), ids.numel(), dtype=torch.long, device=ids.device).scatter_reduce(
        0, node_of, pos, reduce="amin")  # [N] one existing turn per node
    index = torch.full((b, k), -1, dtype=torch.long, device=ids.device)  # [B, K] node index of each turn
    index[bi, ki] = node_of
    fb, fk = bi[first], ki[first]  # [N]
    parent = torch.where(fk > 0, index[fb, (fk - 1).clamp(min=0)], torch.full_like(fk, -1))  # [N]
    ends = ((mask.sum(dim=1) - 1)[bi] == ki).long()  # [M] the turn ends its episode
    last = torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, node_of, ends)  # [N]
    copies = torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, node_of, torch.ones_like(ends))
    r = turn_rewards[fb, fk]  # [N]
    if bool(((last > 0) & (last < copies)).any()) or not torch.equal(turn_rewards[bi, ki], r[node_of]):
        raise ValueError("malformed tree: the copies of a node disagree (its reward, or whether it ends the episode)")
    last = last > 0
    dtype = turn_rewards.dtype
    q = torch.zeros(n, dtype=dtype, device=r.device)
    for col in range(k - 1, -1, -1):  # children (column col + 1) are done before their parents
        here = fk == col
        kids = fk == col + 1
        total = torch.zeros(n, dtype=dtype, device=r.device).index_add_(0, parent[kids], q[kids])
        count = torch.zeros(n, dtype=dtype, device=r.device).index_add_(
            0, parent[kids], torch.ones_like(q[kids]))
        later = gamma * total / count.clamp(min=1)
        q = torch.where(here, turn_coef * r + torch.where(last, outcome_rewards[fb].to(dtype), later), q)
    return q, node_of, parent, first


@register_estimator("tree_grpo")
def tree_grpo(
    turn_rewards: Tensor,
    outcome_rewards: Tensor,
    turn_mask: Tensor,
    group_ids: Tensor,
    *,
    node_ids: Tensor | None = None,
    turn_coef: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """Each turn normalised among its siblings: the turns taken from the same state.

    With ``Q(n)`` from :func:`tree_values` and ``sib(n)`` the nodes with n's parent in n's group (for a
    first turn: the group's first turns)::

        A_n = (Q(n) - mean_{sib(n)} Q) / (std_{sib(n)} Q + eps)      (a set of one member, or equal values: 0)

    and every copy of node n (each leaf below it) gets ``A_n``; :func:`learner.batch.assemble` trains one.

    **Baseline.** Siblings are sampled independently from the *same* state s, so with ``scale_by_std=False``
    ``A_n = (m-1)/m * (Q(n) - mean of the other m - 1 siblings' Q)``: the leave-one-out mean does not depend
    on n's action and ``E[Q(n) | s, a_n] = Q(s, a_n)``, so ``E[A_n | s, a_n] = (m-1)/m * (Q(s, a_n) - V(s))``,
    a per-state advantage. The expected update is ``(m-1)/m`` times the policy gradient at every branch
    (tested by exact enumeration in tests/learner/test_credit_tree.py). Normalising turn k over all of a
    group's turn-k steps instead, as per-turn GRPO on independent episodes does, centres on the mean over
    *states*: ``E[A | s, a] = c * (Q(s, a) - E_s' V(s'))``, which blames a good turn for a bad state.

    On independent episodes (no shared node) every later turn is alone among its siblings and gets 0, and
    a first turn gets its group-normalised return: a tree is what gives later turns their credit.

    Args:
        turn_rewards, outcome_rewards, turn_mask, group_ids: see :mod:`learner.credit`.
        node_ids: long[B, K] tree node of each turn (``common.schema.NODE_ID``); None: independent
            episodes (every turn its own node).
        turn_coef: c_T, weight of a node's own turn reward in ``Q``.
        gamma: discount of the children's mean value.
        eps, scale_by_std: see :func:`learner.credit_ops.group_normalize`.

    Returns:
        float[B, K], 0 on absent turns.
    """
    mask = _check_inputs(turn_rewards, outcome_rewards, turn_mask, group_ids)
    if node_ids is None:  # independent episodes: every turn its own node
        b, k = turn_rewards.shape
        node_ids = torch.arange(b * k, device=turn_rewards.device).view(b, k)
    q, node_of, parent, first = tree_values(turn_rewards, outcome_rewards, mask, node_ids,
                                            turn_coef=turn_coef, gamma=gamma)  # [N], [M], [N], [N]
    bi, ki = mask.nonzero(as_tuple=True)  # [M]
    adv = torch.zeros_like(turn_rewards)  # [B, K]
    if q.numel() == 0:
        return adv
    keys = torch.stack([group_ids[bi[first]].long(), parent], dim=1)  # [N, 2] sibling set of each node
    _, seg = torch.unique(keys, dim=0, return_inverse=True)  # [N]
    a = segment_normalize(q, seg, eps, scale_by_std)  # [N]
    adv[bi, ki] = a[node_of]
    return _masked(adv, mask)  # [B, K]
