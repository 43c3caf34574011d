"""Tests for learner.credit: hand-computed cases for every estimator plus properties.

Hand cases use float64 and ``eps=0`` so the arithmetic in the comments is exact up to
rounding (degenerate groups are still exactly 0, independent of eps). std is unbiased (n - 1).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from learner.credit import (
    ESTIMATORS,
    get_estimator,
    gigpo,
    grpo_mr,
    grpo_or,
    mt_grpo,
    mt_grpo_k,
)
from learner.credit_critic import VALUE_TARGETS
from learner.credit_ops import group_normalize
from tests.learner.helpers import F64, close, t

S3 = math.sqrt(3.0)
S2 = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------
# Hand-computed estimator cases
# ---------------------------------------------------------------------------------------------


def test_grpo_or_hand_case() -> None:
    # one group, outcomes [0, 1, 2] -> norm [-1, 0, 1] on every existing turn
    tr = t([[5.0, 5.0], [9.0, 9.0], [0.0, 3.0]])  # ignored by grpo_or
    ro = t([0.0, 1.0, 2.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    adv = grpo_or(tr, ro, mask, torch.tensor([4, 4, 4]), eps=0.0)
    close(adv, [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])


def test_grpo_mr_hand_case() -> None:
    # totals R^O + sum of existing turn rewards: [0+1+0, 1+0 (the 9 is masked), 2+0+0] = [1, 1, 2]
    # mean 4/3, deviations [-1/3, -1/3, 2/3], var (1/9+1/9+4/9)/2 = 1/3, std 1/sqrt3
    # -> [-1/sqrt3, -1/sqrt3, 2/sqrt3]
    tr = t([[1.0, 0.0], [0.0, 9.0], [0.0, 0.0]])
    ro = t([0.0, 1.0, 2.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    adv = grpo_mr(tr, ro, mask, torch.tensor([0, 0, 0]), eps=0.0)
    a, c = -1 / S3, 2 / S3
    close(adv, [[a, a], [a, 0.0], [c, c]])


def test_mt_grpo_hand_case_two_turns() -> None:
    # paper setting: turn 0 = tool call (turn reward), turn 1 = answer.
    # R^T = [0, 1, 2] -> norm [-1, 0, 1]
    # R^O = [0, 0, 3] -> mean 1, dev [-1, -1, 2], var 6/2 = 3 -> [-1/sqrt3, -1/sqrt3, 2/sqrt3]
    tr = t([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    ro = t([0.0, 0.0, 3.0])
    mask = torch.ones(3, 2, dtype=torch.bool)
    ids = torch.tensor([1, 1, 1])
    o = [-1 / S3, -1 / S3, 2 / S3]
    adv = mt_grpo(tr, ro, mask, ids, eps=0.0)
    # turn 0: c_T * nT + c_O * nO ; turn 1: nO
    close(adv, [[-1 + o[0], o[0]], [0 + o[1], o[1]], [1 + o[2], o[2]]])
    # c_T = 1, c_O = 0.2 (relevance factor): last turn still gets plain nO
    adv = mt_grpo(tr, ro, mask, ids, outcome_coef=0.2, eps=0.0)
    close(adv, [[-1 + 0.2 * o[0], o[0]], [0.2 * o[1], o[1]], [1 + 0.2 * o[2], o[2]]])


def test_mt_grpo_single_turn_episode_gets_combined() -> None:
    # episode 1 answered without a tool call: its only turn gets c_T nT + c_O nO.
    # R^T = [0, 1, 2] -> [-1, 0, 1];  R^O = [0, 3, 0] -> [-1/sqrt3, 2/sqrt3, -1/sqrt3]
    tr = t([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    ro = t([0.0, 3.0, 0.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    adv = mt_grpo(tr, ro, mask, torch.tensor([0, 0, 0]), turn_coef=2.0, outcome_coef=0.5, eps=0.0)
    a, c = -1 / S3, 2 / S3
    close(adv, [[2 * -1 + 0.5 * a, a], [2 * 0 + 0.5 * c, 0.0], [2 * 1 + 0.5 * a, a]])


def test_mt_grpo_turn_return_is_the_turns_before_the_last() -> None:
    # R^T sums the rewards of the turns that receive it (all but the last of a multi-turn episode):
    # [1 (turn 0; the last turn's 1 is not in it), 0+0 (the 3 on the last turn and the masked 7 are not)]
    # two episodes: [1, 0] -> mean 0.5, std sqrt(0.5) -> [1/sqrt2, -1/sqrt2]; R^O equal -> 0
    tr = t([[1.0, 1.0, 7.0], [0.0, 0.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = mt_grpo(tr, t([1.0, 1.0]), mask, torch.tensor([0, 0]), eps=0.0)
    close(adv, [[1 / S2, 0.0, 0.0], [-1 / S2, -1 / S2, 0.0]])


def test_mt_grpo_a_tool_call_on_the_truncated_last_turn_is_not_credited_to_the_first() -> None:
    # both episodes searched with the same reward on turn 0; episode 0 searched again on its last turn
    # (cut by max_turns, reward 0.7). The first turns did the same: equal R^T, zero turn-term advantage.
    tr = t([[0.7, 0.7], [0.7, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = mt_grpo(tr, t([0.0, 1.0]), mask, torch.tensor([0, 0]), eps=0.0)
    o = 1 / S2  # R^O [0, 1] -> [-1/sqrt2, 1/sqrt2]
    close(adv, [[-o, -o], [o, o]])


def test_mt_grpo_k_hand_case_variable_lengths() -> None:
    # lengths 3, 2, 1; rewards on existing turns, missing turns count as 0 (the 9s are masked):
    #   r~ = [[1, 1, 1], [0, 1, 0], [2, 0, 0]]
    # per turn index over ALL three episodes:
    #   n0 = norm[1, 0, 2] = [0, -1, 1]
    #   n1 = norm[1, 1, 0] : mean 2/3, dev [1/3, 1/3, -2/3], var (6/9)/2 = 1/3 -> [1, 1, -2]/sqrt3
    #   n2 = norm[1, 0, 0] : -> [2, -1, -1]/sqrt3
    # gamma = 0.5:  S2 = n2, S1 = n1 + 0.5 n2, S0 = n0 + 0.5 n1 + 0.25 n2
    #   ep0: S0 = 0 + 0.5/s3 + 0.25*2/s3 = 1/s3;   S1 = 1/s3 + 0.5*2/s3 = 2/s3;  S2 = 2/s3
    #   ep1: S0 = -1 + 0.5/s3 - 0.25/s3 = -1 + 0.25/s3;  S1 = 1/s3 - 0.5/s3 = 0.5/s3
    #   ep2: S0 = 1 - 1/s3 - 0.25/s3 = 1 - 1.25/s3
    # outcome [0, 1, 2] -> nO = [-1, 0, 1]; outcome_coef 0.5, final_outcome_coef 1:
    #   ep0 turns 0,1: 0.5*-1, turn 2 (final of multi-turn): 1*-1
    #   ep1 turn 0: 0, turn 1 (final): 0
    #   ep2 single turn: 0.5 * 1
    tr = t([[1.0, 1.0, 1.0], [0.0, 1.0, 9.0], [2.0, 9.0, 9.0]])
    ro = t([0.0, 1.0, 2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = mt_grpo_k(
        tr, ro, mask, torch.tensor([3, 3, 3]), gamma=0.5, outcome_coef=0.5, eps=0.0
    )
    expected = [
        [1 / S3 - 0.5, 2 / S3 - 0.5, 2 / S3 - 1.0],
        [-1 + 0.25 / S3, 0.5 / S3, 0.0],
        [1 - 1.25 / S3 + 0.5, 0.0, 0.0],
    ]
    close(adv, expected)


def test_gigpo_hand_case_with_states() -> None:
    # group 0 (4 episodes, 2 turns), no turn rewards, gamma=1 -> every step return = R^O.
    # R^O = [1, 0, 1, 1]: mean .75, dev [.25, -.75, .25, .25], var .75/3 = .25, std .5
    #   episode adv = [.5, -1.5, .5, .5]
    # turn 0: all in state 5 -> step adv = same normalisation = [.5, -1.5, .5, .5]
    # turn 1: states [7, 7, 8, 8]; {1, 0} -> mean .5, std sqrt(.5) -> [+1/sqrt2, -1/sqrt2];
    #         {1, 1} identical -> 0
    # group 1 reuses the same state ids but is a different group: its sets never merge with
    # group 0's. Its R^O = [2, 2] (identical) -> episode adv 0; states 7 & 8 singletons -> 0.
    tr = torch.zeros(6, 2, dtype=F64)
    ro = t([1.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    mask = torch.ones(6, 2, dtype=torch.bool)
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    states = torch.tensor([[5, 7], [5, 7], [5, 8], [5, 8], [5, 7], [6, 8]])
    adv = gigpo(tr, ro, mask, ids, state_ids=states, eps=0.0)
    h = 1 / S2
    close(
        adv,
        [[1.0, 0.5 + h], [-3.0, -1.5 - h], [1.0, 0.5], [1.0, 0.5], [0.0, 0.0], [0.0, 0.0]],
    )
    # step_coef scales only the step part
    adv2 = gigpo(tr, ro, mask, ids, state_ids=states, step_coef=0.0, eps=0.0)
    close(adv2[:4], [[0.5, 0.5], [-1.5, -1.5], [0.5, 0.5], [0.5, 0.5]])


def test_gigpo_hand_case_turn_index_states_and_discount() -> None:
    # no state ids -> state = turn index. Outcome added to the last turn's reward:
    #   ep0: 2 turns, r = [1, 0], R^O = 1 -> r' = [1, 1];  gamma .5 -> G = [1 + .5, 1] = [1.5, 1]
    #   ep1: 2 turns, r = [0, 0], R^O = 0 -> G = [0, 0]
    #   ep2: 1 turn,  r = [1],    R^O = 0 -> G = [1]
    #   ep3: 2 turns, r = [0, 0], R^O = 1 -> r' = [0, 1] -> G = [.5, 1]
    # episode adv: R^O [1, 0, 0, 1] -> mean .5, var 1/3 -> [.5, -.5, -.5, .5]*sqrt3
    # turn 0 set {1.5, 0, 1, .5}: mean .75, dev [.75, -.75, .25, -.25], var (1.25)/3
    # turn 1 set {1, 0, 1} (ep2 has no turn 1): mean 2/3, var 1/3 -> [1, -2, 1]/sqrt3
    tr = t([[1.0, 0.0], [0.0, 0.0], [1.0, 5.0], [0.0, 0.0]])
    ro = t([1.0, 0.0, 0.0, 1.0])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    adv = gigpo(tr, ro, mask, torch.tensor([2, 2, 2, 2]), gamma=0.5, eps=0.0)
    e = [0.5 * S3, -0.5 * S3, -0.5 * S3, 0.5 * S3]
    s0 = math.sqrt(1.25 / 3)
    step0 = [0.75 / s0, -0.75 / s0, 0.25 / s0, -0.25 / s0]
    step1 = [1 / S3, -2 / S3, 0.0, 1 / S3]
    expected = [[e[i] + step0[i], (e[i] + step1[i]) if i != 2 else 0.0] for i in range(4)]
    close(adv, expected)


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------


def _random_batch(
    gen: torch.Generator, n_groups: int, group_size: int, k: int, variable: bool, dtype=F64
):
    b = n_groups * group_size
    # small integers -> many ties inside groups, including fully identical groups
    tr = torch.randint(0, 3, (b, k), generator=gen).to(dtype)
    ro = torch.randint(0, 3, (b,), generator=gen).to(dtype)
    if variable:
        lengths = torch.randint(1, k + 1, (b,), generator=gen)
    else:
        lengths = torch.full((b,), k)
    mask = torch.arange(k)[None, :] < lengths[:, None]
    # non-contiguous, shuffled group ids
    ids = (torch.arange(n_groups) * 37 - 11).repeat_interleave(group_size)
    perm = torch.randperm(b, generator=gen)
    return tr[perm], ro[perm], mask[perm], ids[perm]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize(
    "hp", [{}, {"turn_coef": 0.7, "outcome_coef": 0.2, "gamma": 0.9}, {"scale_by_std": False}]
)
def test_mt_grpo_k_reduces_to_mt_grpo_for_k2_with_reward_on_turn0(dtype, variable, hp) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        tr, ro, mask, ids = _random_batch(gen, 5, 4, 2, variable, dtype)
        tr[:, 1] = 0.0  # a turn reward only on turn 0
        mt_hp = {key: v for key, v in hp.items() if key != "gamma"}
        expected = mt_grpo(tr, ro, mask, ids, **mt_hp)
        got = mt_grpo_k(tr, ro, mask, ids, **hp)
        assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_turn_coef_zero_gives_grpo_or_on_every_turn(variable, gamma) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        tr, ro, mask, ids = _random_batch(gen, 4, 5, 4, variable)
        expected = grpo_or(tr, ro, mask, ids)
        got = mt_grpo_k(tr, ro, mask, ids, turn_coef=0.0, gamma=gamma)
        assert torch.equal(got, expected)
        if not variable:  # mt_grpo's last turn already is plain nO; c_T = 0 kills the rest
            assert torch.equal(mt_grpo(tr, ro, mask, ids, turn_coef=0.0), expected)


# ---------------------------------------------------------------------------------------------
# Properties shared by every group-baseline estimator (the critic-based mt_ppo / ppo normalise over the
# batch, not the group, and take values: tests/learner/test_credit_critic.py)
# ---------------------------------------------------------------------------------------------

GROUP_ESTIMATORS = sorted(set(ESTIMATORS) - set(VALUE_TARGETS))


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1])
def test_identical_rewards_give_zero_advantage(name, value) -> None:
    b, k = 6, 3
    tr = torch.full((b, k), value, dtype=torch.float32)
    ro = torch.full((b,), value, dtype=torch.float32)
    mask = torch.ones(b, k, dtype=torch.bool)
    ids = torch.tensor([9, 9, 9, 2, 2, 2])
    adv = get_estimator(name)(tr, ro, mask, ids)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv, torch.zeros_like(adv))


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_absent_turns_are_exactly_zero_and_ignored(name) -> None:
    gen = torch.Generator().manual_seed(2)
    tr, ro, mask, ids = _random_batch(gen, 3, 4, 4, True)
    assert (~mask).any()
    garbage = tr.clone()
    garbage[~mask] = float("nan")
    garbage[~mask & (torch.arange(4) % 2 == 0)] = float("inf")
    fn = get_estimator(name)
    clean = fn(tr, ro, mask, ids)
    dirty = fn(garbage, ro, mask, ids)
    assert torch.equal(dirty, clean)
    assert torch.isfinite(clean).all()
    assert torch.equal(clean[~mask], torch.zeros_like(clean[~mask]))


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_group_ids_are_labels_only(name) -> None:
    # Relabelling groups with arbitrary (negative, sparse, huge) ids or permuting the batch
    # changes nothing but the order of the rows.
    gen = torch.Generator().manual_seed(3)
    tr, ro, mask, ids = _random_batch(gen, 4, 3, 3, True)
    fn = get_estimator(name)
    ref = fn(tr, ro, mask, ids)
    _, dense = torch.unique(ids, return_inverse=True)
    relabel = torch.tensor([10**12, -7, 3, 55])[dense]
    assert torch.equal(fn(tr, ro, mask, relabel), ref)
    perm = torch.randperm(tr.shape[0], generator=gen)
    assert torch.equal(fn(tr[perm], ro[perm], mask[perm], ids[perm]), ref[perm])


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_groups_are_independent(name) -> None:
    # advantages of one group do not depend on another group's rewards
    gen = torch.Generator().manual_seed(4)
    tr, ro, mask, ids = _random_batch(gen, 2, 4, 3, True)
    fn = get_estimator(name)
    ref = fn(tr, ro, mask, ids)
    other = ids != ids[0]
    tr2, ro2 = tr.clone(), ro.clone()
    tr2[other] += 5.0
    ro2[other] *= -3.0
    out = fn(tr2, ro2, mask, ids)
    assert torch.equal(out[~other], ref[~other])


def test_registry_and_validation() -> None:
    assert {"grpo_or", "grpo_mr", "mt_grpo", "mt_grpo_k", "gigpo"} <= set(ESTIMATORS)
    with pytest.raises(ValueError, match="valid"):
        get_estimator("nope")
    tr = torch.zeros(2, 2)
    ro = torch.zeros(2)
    ids = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="contiguous"):
        mt_grpo(tr, ro, torch.tensor([[1, 0], [0, 1]], dtype=torch.bool), ids)
    with pytest.raises(ValueError, match="outcome_rewards"):
        mt_grpo(tr, torch.zeros(3), torch.ones(2, 2, dtype=torch.bool), ids)
    with pytest.raises(TypeError):  # misspelt hyperparameters are not silently ignored
        mt_grpo_k(tr, ro, torch.ones(2, 2, dtype=torch.bool), ids, turn_coeff=1.0)


# ---------------------------------------------------------------------------------------------
# mt_grpo_k baseline: unbiased under variable turn counts
# ---------------------------------------------------------------------------------------------


def _reached_only_mt_grpo_k(tr, ro, mask, ids):
    """The flawed variant: normalise turn j only over episodes that reached turn j."""
    n = torch.zeros_like(tr)
    for g in ids.unique():
        rows = ids == g
        for j in range(tr.shape[1]):
            sel = rows & mask[:, j]
            vals = tr[sel, j]
            n[sel, j] = vals - vals.mean() if vals.numel() else vals
    s = torch.flip(torch.cumsum(torch.flip(n, [1]), 1), [1])  # gamma = 1
    n_o = group_normalize(ro, ids, scale_by_std=False)
    adv = s + n_o[:, None]
    return torch.where(mask, adv, torch.zeros_like(adv))


def _expected_update(estimator, p0: float, p1: float, group_size: int) -> torch.Tensor:
    """Exact E[(1/G) sum_b sum_k score(a_{b,k}) * A_{b,k}] by enumerating every group.

    Simulated agent, parameters (theta0, theta1), pi(a=1) = sigmoid(theta):
      turn 0: a0 ~ Bern(p0). a0 = 0: answer at once -> 1 turn, r0 = 0,   R^O = 0.2
                             a0 = 1: call the tool  -> r0 = 0.5, a turn 1 follows
      turn 1: a1 ~ Bern(p1). R^O = a1, r1 = a1 (a good search)
    score of turn 0: d/dtheta0 log pi(a0) = a0 - p0;  of turn 1: d/dtheta1 log pi(a1) = a1 - p1
    """
    paths = [  # (prob, turn rewards, outcome, n_turns, score0, score1)
        (1 - p0, [0.0, 0.0], 0.2, 1, -p0, 0.0),
        (p0 * (1 - p1), [0.5, 0.0], 0.0, 2, 1 - p0, -p1),
        (p0 * p1, [0.5, 1.0], 1.0, 2, 1 - p0, 1 - p1),
    ]
    total = torch.zeros(2, dtype=F64)
    for combo in itertools.product(paths, repeat=group_size):
        prob = math.prod(c[0] for c in combo)
        tr = t([c[1] for c in combo])
        ro = t([c[2] for c in combo])
        mask = torch.arange(2)[None, :] < torch.tensor([c[3] for c in combo])[:, None]
        adv = estimator(tr, ro, mask, torch.zeros(group_size, dtype=torch.long))
        score0 = t([c[4] for c in combo])
        score1 = t([c[5] for c in combo])
        g = torch.stack([(score0 * adv[:, 0]).sum(), (score1 * adv[:, 1]).sum()]) / group_size
        total += prob * g
    return total


@pytest.mark.parametrize("p0,p1", [(0.6, 0.3), (0.2, 0.8)])
def test_mt_grpo_k_baseline_is_unbiased_under_variable_turn_counts(p0, p1) -> None:
    group = 4
    # J = E[r0 + r~1 + R^O] = (1-p0)*0.2 + p0*0.5 + p0*p1*(1 + 1)
    # dJ/dtheta0 = p0(1-p0) * (0.5 - 0.2 + 2 p1);  dJ/dtheta1 = p0 * p1(1-p1) * 2
    true_grad = t([p0 * (1 - p0) * (0.3 + 2 * p1), p0 * p1 * (1 - p1) * 2])
    # group-mean baseline including self: A = (G-1)/G * (x - leave-one-out mean)
    target = (group - 1) / group * true_grad

    def ours(tr, ro, mask, ids):
        return mt_grpo_k(tr, ro, mask, ids, scale_by_std=False)

    close(_expected_update(ours, p0, p1, group), target, atol=1e-12)

    # Normalising turn 1 over only the episodes that reached it is biased: the value of
    # going on to turn 1 (r1, centred among reachers) is erased from turn 0's credit.
    flawed = _expected_update(_reached_only_mt_grpo_k, p0, p1, group)
    assert (flawed - target).abs().max() > 1e-2


def test_mt_grpo_k_stopping_early_is_not_credited_like_reaching() -> None:
    # Two episodes, same turn-0 and outcome rewards; episode 0 went on to a turn-1 reward of 1,
    # episode 1 stopped. Missing turn = reward 0 in the baseline: n1 = norm[1, 0] = [+, -], so
    # episode 0's turn 0 is credited above episode 1's. (Normalising turn 1 over reachers only
    # would give 0 to both.)
    tr = t([[1.0, 1.0], [1.0, 0.0]])
    ro = t([1.0, 1.0])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = mt_grpo_k(tr, ro, mask, torch.tensor([0, 0]), eps=0.0)
    # n1 = [1, 0] -> mean .5, std sqrt(.5) -> [1/sqrt2, -1/sqrt2]; n0 = 0; nO = 0
    close(adv, [[1 / S2, 1 / S2], [-1 / S2, 0.0]])
