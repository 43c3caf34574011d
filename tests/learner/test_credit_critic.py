"""MT-PPO / PPO: GAE over turns, whitening, critic targets and the clipped value loss, by hand."""

from __future__ import annotations

import pytest
import torch

from learner.credit import ESTIMATORS
from learner.credit_critic import VALUE_TARGETS, mt_ppo, ppo, turn_gae, value_loss
from learner.critic import explained_variance, turn_start_positions
from tests.learner.helpers import F64, close, t

# episode 0: two turns (turn reward 1 on the search turn, outcome 2); episode 1: one turn (outcome 0)
TURN_R = t([[1.0, 0.5], [0.3, 0.0]])
OUTCOME = t([2.0, 0.0])
MASK = torch.tensor([[True, True], [True, False]])
GROUPS = torch.tensor([0, 0])
VALUES = t([[1.5, 1.0], [0.5, 9.0]])  # 9.0 on the absent turn must not matter


def test_turn_gae_by_hand():
    # r' (c_T = 1): ep0 [1, 0.5 + 2] = [1, 2.5]; ep1 [0.3 + 0] = [0.3]
    # gamma 0.9, lam 0.5:
    #   ep0 delta_1 = 2.5 - 1.0 = 1.5 (terminal); delta_0 = 1 + 0.9 * 1.0 - 1.5 = 0.4
    #       A_1 = 1.5; A_0 = 0.4 + 0.45 * 1.5 = 1.075;  R = A + V = [2.575, 2.5]
    #   ep1 delta_0 = 0.3 - 0.5 = -0.2 = A_0; R_0 = 0.3
    rewards = t([[1.0, 2.5], [0.3, 0.0]])
    adv, ret = turn_gae(rewards, VALUES, MASK, gamma=0.9, lam=0.5)
    close(adv, [[1.075, 1.5], [-0.2, 0.0]])
    close(ret, [[2.575, 2.5], [0.3, 0.0]])
    # lam = 1: Monte-Carlo return minus V; lam = 0: one-step TD error
    close(turn_gae(rewards, VALUES, MASK, 1.0, 1.0)[0], [[1 + 2.5 - 1.5, 1.5], [-0.2, 0.0]])
    close(turn_gae(rewards, VALUES, MASK, 0.9, 0.0)[0], [[0.4, 1.5], [-0.2, 0.0]])


def test_mt_ppo_shapes_rewards_whitens_and_its_targets_use_the_raw_advantage():
    raw = mt_ppo(TURN_R, OUTCOME, MASK, GROUPS, values=VALUES, gamma=0.9, lam=0.5, whiten=False)
    close(raw, [[1.075, 1.5], [-0.2, 0.0]])
    white = mt_ppo(TURN_R, OUTCOME, MASK, GROUPS, values=VALUES, gamma=0.9, lam=0.5, eps=0.0)
    vals = t([1.075, 1.5, -0.2])
    close(white[MASK], (vals - vals.mean()) / vals.std(), atol=1e-12)
    assert white[1, 1] == 0.0
    close(VALUE_TARGETS["mt_ppo"](TURN_R, OUTCOME, MASK, GROUPS, values=VALUES, gamma=0.9, lam=0.5, whiten=True),
          [[2.575, 2.5], [0.3, 0.0]])
    # c_T scales the turn rewards only: c_T = 0 is outcome-only PPO
    close(mt_ppo(TURN_R, OUTCOME, MASK, GROUPS, values=VALUES, turn_coef=0.0, whiten=False),
          ppo(TURN_R, OUTCOME, MASK, GROUPS, values=VALUES, whiten=False))


def test_ppo_sees_only_the_outcome():
    # r' = [0, 2] and [0]; gamma = lam = 1: A_0 = 0 + 1.0 - 1.5 + (2 - 1.0) = 0.5, A_1 = 1.0; ep1 A_0 = -0.5
    close(ppo(TURN_R, OUTCOME, MASK, GROUPS, values=VALUES, whiten=False), [[0.5, 1.0], [-0.5, 0.0]])
    close(VALUE_TARGETS["ppo"](TURN_R, OUTCOME, MASK, GROUPS, values=VALUES), [[2.0, 2.0], [0.0, 0.0]])
    assert {"mt_ppo", "ppo"} <= set(ESTIMATORS)


def test_a_perfect_critic_leaves_only_the_unexplained_part():
    """With V equal to the expected return the advantage is the return's deviation from it (the baseline
    property: a constant V per state does not change the expected gradient, only the variance)."""
    rewards = t([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True]])
    v = t([[0.5, 0.5], [0.5, 0.5]])  # the two episodes start in the same state; half of them succeed
    adv, _ = turn_gae(rewards, v, mask, 1.0, 1.0)
    close(adv, [[0.5, 0.5], [-0.5, -0.5]])
    assert float(adv[:, 0].sum()) == 0.0  # averaged over the outcomes the first turn's advantage is 0


def test_value_loss_by_hand():
    v, old, ret = t([[1.0, 0.0]]), t([[0.0, 0.0]]), t([[2.0, 5.0]])
    mask = t([[1.0, 0.0]])
    loss, d = value_loss(v, old, ret, mask)
    assert float(loss) == pytest.approx(0.5 * 1.0) and float(d["clip_frac"]) == 0.0
    # clip 0.5: V^clip = 0 + clamp(1, -0.5, 0.5) = 0.5; (0.5 - 2)^2 = 2.25 > 1 -> the clipped square is used
    loss, d = value_loss(v, old, ret, mask, clip=0.5)
    assert float(loss) == pytest.approx(0.5 * 2.25) and float(d["clip_frac"]) == 1.0
    loss, _ = value_loss(v, old, ret, mask, clip=0.5, norm=3.0)  # a fixed divisor (micro-batch invariance)
    assert float(loss) == pytest.approx(0.5 * 2.25 / 3.0)
    v.requires_grad_(True)
    value_loss(v, old, t([[2.0, float("nan")]]), mask)[0].backward()  # absent turns never reach the gradient
    assert torch.isfinite(v.grad).all() and v.grad[0, 1] == 0.0


def test_values_are_read_one_token_before_each_turns_first_action_token():
    # tokens: [p p a0 a0 o o a1 pad] and [p a0 pad ...]
    token_turn = torch.tensor([[-1, -1, 0, 0, -1, -1, 1, -1], [-1, 0, -1, -1, -1, -1, -1, -1]])
    mask = torch.tensor([[True, True], [True, False]])
    assert turn_start_positions(token_turn, mask).tolist() == [[1, 5], [0, 0]]


def test_explained_variance():
    mask = torch.tensor([[True, True], [True, False]])
    ret = t([[1.0, 2.0], [3.0, 0.0]], F64)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask) == pytest.approx(0.0)


@pytest.mark.parametrize("name", sorted(VALUE_TARGETS))
def test_absent_turns_never_leak_into_advantages_or_targets(name):
    dirty_r, dirty_v = TURN_R.clone(), VALUES.clone()
    dirty_r[1, 1], dirty_v[1, 1] = float("nan"), float("inf")
    for fn in (ESTIMATORS[name], VALUE_TARGETS[name]):
        clean = fn(TURN_R, OUTCOME, MASK, GROUPS, values=VALUES)
        dirty = fn(dirty_r, OUTCOME, MASK, GROUPS, values=dirty_v)
        assert torch.equal(clean, dirty) and torch.isfinite(clean).all() and clean[1, 1] == 0.0
    with pytest.raises(ValueError, match="values must be"):
        ESTIMATORS[name](TURN_R, OUTCOME, MASK, GROUPS, values=VALUES[:, :1])


def test_a_critic_checkpoint_of_another_layout_fails_saying_so(monkeypatch):
    """A checkpoint whose critic weights do not fit ValueModel (e.g. written before its layout changed) fails
    naming the directory and the reason, not with DeepSpeed's raw key lists; other errors pass through."""
    import types

    import learner.checkpoint as checkpoint
    from learner.critic import Critic

    def mismatch(*args):
        raise RuntimeError('Error(s) in loading state_dict for ValueModel: Missing key(s) in state_dict: "lm.x"')

    monkeypatch.setattr(checkpoint, "load_engine", mismatch)
    with pytest.raises(RuntimeError, match=r"critic checkpoint in '/ckpt/critic' .* earlier critic layout"):
        Critic.load(types.SimpleNamespace(engine=None), "/ckpt/critic", 0)

    def other(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(checkpoint, "load_engine", other)
    with pytest.raises(RuntimeError, match="disk on fire"):
        Critic.load(types.SimpleNamespace(engine=None), "/ckpt/critic", 0)
