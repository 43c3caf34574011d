"""learner.credit_tree: tree_grpo by hand, and its baseline property by exact enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from learner.credit import mt_grpo_k, tree_grpo
from learner.credit_ops import group_normalize
from learner.credit_tree import tree_values
from tests.learner.helpers import F64, close, t

S2 = math.sqrt(2.0)


def _tree_batch(roots, with_turn0_leaf=False):
    """Leaves of a two-turn tree as [B, K] rows. ``roots``: list of (r0, [(r1, R), ...] children);
    a root whose children list is a float answered at turn 0 (a leaf) with that outcome, its copies
    filling ``with_turn0_leaf`` leaves."""
    tr, ro, mask, nodes, groups = [], [], [], [], []
    for i, (r0, kids) in enumerate(roots):
        if isinstance(kids, float):
            for _ in range(with_turn0_leaf):
                tr.append([r0, 0.0]); ro.append(kids); mask.append([True, False]); nodes.append([10 * i, -1])
                groups.append(0)
            continue
        for j, (r1, outcome) in enumerate(kids):
            tr.append([r0, r1]); ro.append(outcome); mask.append([True, True]); nodes.append([10 * i, 10 * i + 1 + j])
            groups.append(0)
    return t(tr), t(ro), torch.tensor(mask), torch.tensor(groups), torch.tensor(nodes)


def test_tree_grpo_hand_case():
    # root A: r0 = .5, children R = 1, 0 -> Q(A1) = 1, Q(A2) = 0, Q(A) = .5 + .5 = 1
    # root B: r0 = 0,  children R = 0, 0 -> Q(B) = 0
    # first turns {A, B}: Q = [1, 0] -> +-1/sqrt2; A's children [1, 0] -> +-1/sqrt2; B's children equal -> 0
    tr, ro, mask, ids, nodes = _tree_batch([(0.5, [(0.0, 1.0), (0.0, 0.0)]), (0.0, [(0.0, 0.0), (0.0, 0.0)])])
    adv = tree_grpo(tr, ro, mask, ids, node_ids=nodes, eps=0.0)
    close(adv, [[1 / S2, 1 / S2], [1 / S2, -1 / S2], [-1 / S2, 0.0], [-1 / S2, 0.0]])
    q, node_of, parent, first = tree_values(tr, ro, mask, nodes)
    close(q, [1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # nodes in id order: A(0), A1(1), A2(2), B(10), B1(11), B2(12)
    assert parent.tolist() == [-1, 0, 0, -1, 3, 3]


def test_tree_grpo_turn_coef_gamma_and_an_early_answer():
    # root B answered at turn 0 (a leaf, R = .2, two copies of it); root A as before with gamma = .5, c_T = 2:
    # Q(A) = 2 * .5 + .5 * mean(1, 0) = 1.25, Q(B) = .2 -> first turns [1.25, .2]: +-1/sqrt2
    tr, ro, mask, ids, nodes = _tree_batch([(0.5, [(0.0, 1.0), (0.0, 0.0)]), (0.0, 0.2)], with_turn0_leaf=2)
    q, _, _, _ = tree_values(tr, ro, mask, nodes, turn_coef=2.0, gamma=0.5)
    close(q, [1.25, 1.0, 0.0, 0.2])
    adv = tree_grpo(tr, ro, mask, ids, node_ids=nodes, turn_coef=2.0, gamma=0.5, eps=0.0)
    close(adv, [[1 / S2, 1 / S2], [1 / S2, -1 / S2], [-1 / S2, 0.0], [-1 / S2, 0.0]])


def test_on_independent_episodes_only_the_first_turn_gets_credit():
    gen = torch.Generator().manual_seed(0)
    tr = torch.rand(6, 3, generator=gen, dtype=F64)
    ro = torch.rand(6, generator=gen, dtype=F64)
    mask = torch.ones(6, 3, dtype=torch.bool)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = tree_grpo(tr, ro, mask, ids)  # node_ids None: every turn its own node
    close(adv[:, 1:], torch.zeros(6, 2, dtype=F64))
    close(adv[:, 0], group_normalize(tr.sum(1) + ro, ids))


def test_a_malformed_tree_is_an_error():
    tr, ro, mask, ids, nodes = _tree_batch([(0.5, [(0.0, 1.0), (0.0, 0.0)])])
    tree_values(tr, ro, mask, nodes)
    bad = tr.clone()
    bad[1, 0] = 0.25  # two copies of the root with different rewards
    with pytest.raises(ValueError, match="malformed tree"):
        tree_values(bad, ro, mask, nodes)
    short = mask.clone()
    short[1, 1] = False  # the root ends one copy's episode but has a child in the other
    with pytest.raises(ValueError, match="malformed tree"):
        tree_values(tr, ro, short, nodes)


# ---------------------------------------------------------------------------------------------
# The baseline, exactly: a two-turn toy agent, every tree enumerated
# ---------------------------------------------------------------------------------------------
#
# turn 0: a0 ~ Bern(p0); a0 = 1 is a good search: r0 = .5 and state s = 1, else r0 = 0 and s = 0.
# turn 1 in state s: a1 ~ Bern(p1[s]); R = a1 * PAY[s]. Parameters theta0 and theta1_s (one per state).
# score of turn 0: a0 - p0 (d/dtheta0); of turn 1: a1 - p1[s] (d/dtheta1_s).

PAY = (0.4, 1.0)


def _true_grad(p0, p1):
    return t([p0 * (1 - p0) * (0.5 + p1[1] * PAY[1] - p1[0] * PAY[0]),
              (1 - p0) * p1[0] * (1 - p1[0]) * PAY[0],
              p0 * p1[1] * (1 - p1[1]) * PAY[1]])


def _bern(p, a):
    return p if a else 1 - p


def _tree_rows(a0s, a1s, n2):
    """Rows of a tree with roots' actions ``a0s`` and children's ``a1s[i][j]``."""
    tr, ro, nodes = [], [], []
    for i, a0 in enumerate(a0s):
        for j in range(n2):
            a1 = a1s[i][j]
            tr.append([0.5 * a0, 0.0])
            ro.append(a1 * PAY[a0])
            nodes.append([100 * i, 100 * i + 1 + j])
    b = len(tr)
    return t(tr), t(ro), torch.ones(b, 2, dtype=torch.bool), torch.zeros(b, dtype=torch.long), torch.tensor(nodes)


def _enumerate_trees(p0, p1, n1, n2):
    """Yield (prob, a0s, a1s, adv) over every tree of n1 roots with n2 children each."""
    for a0s in itertools.product((0, 1), repeat=n1):
        for flat in itertools.product((0, 1), repeat=n1 * n2):
            a1s = [flat[i * n2:(i + 1) * n2] for i in range(n1)]
            prob = math.prod(_bern(p0, a) for a in a0s) * math.prod(
                _bern(p1[a0s[i]], a) for i in range(n1) for a in a1s[i])
            tr, ro, mask, ids, nodes = _tree_rows(a0s, a1s, n2)
            yield prob, a0s, a1s, tree_grpo(tr, ro, mask, ids, node_ids=nodes, scale_by_std=False)


@pytest.mark.parametrize("p0,p1", [(0.6, (0.3, 0.7)), (0.25, (0.8, 0.5))])
def test_tree_grpo_expected_update_is_the_policy_gradient(p0, p1):
    """Sum over nodes of score * A, each node once: (n1 - 1) dJ/dtheta0 from the roots and n1 (n2 - 1) dJ/dtheta1_s
    from the children (the (m-1)/m of a group-mean baseline at every branch)."""
    n1, n2 = 2, 2
    total = torch.zeros(3, dtype=F64)
    for prob, a0s, a1s, adv in _enumerate_trees(p0, p1, n1, n2):
        g = torch.zeros(3, dtype=F64)
        for i, a0 in enumerate(a0s):
            g[0] += (a0 - p0) * adv[i * n2, 0]  # the root node once (its copies are not trained again)
            for j in range(n2):
                g[1 + a0] += (a1s[i][j] - p1[a0]) * adv[i * n2 + j, 1]
        total += prob * g
    grad = _true_grad(p0, p1)
    close(total, torch.stack([(n1 - 1) * grad[0], n1 * (n2 - 1) * grad[1], n1 * (n2 - 1) * grad[2]]), atol=1e-12)


@pytest.mark.parametrize("p0,p1", [(0.6, (0.3, 0.7))])
def test_tree_grpo_gives_a_per_state_advantage_and_flat_per_turn_grpo_does_not(p0, p1):
    """E[A | s, a1] of a second turn is (m-1)/m (Q(s, a1) - V(s)) in a tree; across independent episodes the
    per-turn baseline is the mean over states, so a good action in the bad state is still blamed."""
    n1, n2 = 2, 2
    q = {(s, a): a * PAY[s] for s in (0, 1) for a in (0, 1)}
    v = {s: p1[s] * PAY[s] for s in (0, 1)}
    num = {(s, a): 0.0 for s in (0, 1) for a in (0, 1)}
    den = dict(num)
    for prob, a0s, a1s, adv in _enumerate_trees(p0, p1, n1, n2):
        key = (a0s[0], a1s[0][0])  # leaf (0, 0)
        num[key] += prob * float(adv[0, 1])
        den[key] += prob
    for key in num:
        close(torch.tensor(num[key] / den[key], dtype=F64), torch.tensor((n2 - 1) / n2 * (q[key] - v[key[0]]),
                                                                        dtype=F64), atol=1e-12)

    g = n1 * n2  # the same number of leaves as independent two-turn episodes, per-turn GRPO (mt_grpo_k)
    paths = [(a0, a1) for a0 in (0, 1) for a1 in (0, 1)]
    num = {k: 0.0 for k in paths}
    den = dict(num)
    for combo in itertools.product(paths, repeat=g):
        prob = math.prod(_bern(p0, a0) * _bern(p1[a0], a1) for a0, a1 in combo)
        tr = t([[0.5 * a0, 0.0] for a0, _ in combo])
        ro = t([a1 * PAY[a0] for a0, a1 in combo])
        adv = mt_grpo_k(tr, ro, torch.ones(g, 2, dtype=torch.bool), torch.zeros(g, dtype=torch.long),
                        scale_by_std=False)
        num[combo[0]] += prob * float(adv[0, 1])
        den[combo[0]] += prob
    flat = {k: num[k] / den[k] for k in num}
    # the good action (a1 = 1) in the bad state (s = 0) pays .4 > V(0) = .12, yet its flat advantage is negative
    assert q[(0, 1)] - v[0] > 0 and flat[(0, 1)] < 0
    assert max(abs(flat[k] - (g - 1) / g * (q[k] - v[k[0]])) for k in flat) > 0.1
