"""Tensor rows -> episode tensors, and the registered estimators on rows that hold no token at all."""

from __future__ import annotations

import math


import numpy as np
import pytest
import torch

from common import schema as S
from learner.credit import ESTIMATORS
from learner.tensor_batch import assemble_tensor, turn_to_steps, values_at_turn_starts
from learner.worker import compute_turn_advantages

D = 3
SCHEMA = S.tensor_transition_schema((D,), (1,), "int64")
R = 1 / math.sqrt(2)  # norm_g of (1, 0) over G = 2 with the unbiased std: +-0.7071


def _row(ep: int, turn: int, steps: int, reward: float, last: bool, outcome: float = 0.0, group: int = 0,
         version: int = 0, kind: int | None = None) -> dict:
    base = 100 * ep + 10 * turn
    return {S.RUN_ID: "t", S.GROUP_ID: group, S.EPISODE_ID: ep, S.PROMPT_ID: 7, S.TURN_INDEX: turn,
            S.POLICY_VERSION: version, S.STATE_HASH: turn if kind is None else kind,
            S.OBSERVATIONS: np.arange(base, base + steps * D, dtype=np.float32).reshape(steps, D),
            S.ACTIONS: np.full((steps, 1), turn, dtype=np.int64), S.STEP_LOGPROBS: [-0.5 - turn] * steps,
            S.STEP_REWARDS: [0.0] * steps, S.TURN_REWARD: reward, S.TURN_REWARD_COMPONENTS: {"r": reward},
            S.IS_LAST_TURN: last, S.OUTCOME_REWARD: outcome if last else 0.0,
            S.OUTCOME_REWARD_COMPONENTS: {"o": outcome} if last else {}, S.TRUNCATED: False, S.GROUP_SIZE: 2,
            S.T_START: 0.0, S.T_END: 1.0}


def _close(t: torch.Tensor, expected: list) -> None:
    assert torch.allclose(t.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-5), (t.tolist(), expected)


def _table():
    import pyarrow as pa

    rows = [  # out of order on purpose: the assembly sorts by group, episode, turn
        _row(2, 1, 1, 0.5, False, version=3), _row(1, 1, 1, 0.0, True, outcome=1.0, version=4),
        _row(2, 0, 1, 0.0, False, version=3), _row(1, 0, 2, 1.0, False, version=4), _row(2, 2, 1, 0.0, True, 0.0, version=3),
    ]
    return pa.Table.from_batches([S.tensor_rows_to_batch(rows, SCHEMA)])


def test_assemble_pads_steps_and_turns():
    b = assemble_tensor(_table())
    assert b.episode_ids.tolist() == [1, 2] and b.group_ids.tolist() == [0, 0]
    assert b.obs.shape == (2, 3, D)
    assert b.obs[0, 0].tolist() == [100, 101, 102] and b.obs[0, 1].tolist() == [103, 104, 105]  # turn 0, 2 steps
    assert b.obs[0, 2].tolist() == [110, 111, 112]  # turn 1 of episode 1
    assert b.obs[1, 2].tolist() == [220, 221, 222]  # turn 2 of episode 2
    assert b.step_mask.tolist() == [[True, True, True], [True, True, True]]
    assert b.step_turn.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert b.turn_start.tolist() == [[0, 2, 0], [0, 1, 2]]
    assert b.turn_mask.tolist() == [[True, True, False], [True, True, True]]
    assert b.turn_rewards.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]
    assert b.outcome_rewards.tolist() == [1.0, 0.0]
    assert b.actions[:, :, 0].tolist() == [[0, 0, 1], [0, 1, 2]]
    assert b.old_logprobs.tolist() == [[-0.5, -0.5, -1.5], [-0.5, -1.5, -2.5]]
    assert b.versions.tolist() == [4, 3]


def test_ragged_steps_leave_padding_masked():
    import pyarrow as pa

    rows = [_row(1, 0, 3, 0.0, True, 1.0), _row(2, 0, 1, 0.0, True, 0.0)]
    b = assemble_tensor(pa.Table.from_batches([S.tensor_rows_to_batch(rows, SCHEMA)]))
    assert b.step_mask.tolist() == [[True, True, True], [True, False, False]]
    assert b.obs[1, 1:].abs().sum() == 0


def test_incomplete_or_unordered_episode_is_an_error():
    import pyarrow as pa

    rows = [_row(1, 0, 1, 0.0, False), _row(1, 2, 1, 0.0, True, 1.0)]  # turn 1 missing
    with pytest.raises(ValueError, match="not 0..L"):
        assemble_tensor(pa.Table.from_batches([S.tensor_rows_to_batch(rows, SCHEMA)]))
    rows = [_row(1, 0, 1, 0.0, False)]  # no last turn
    with pytest.raises(ValueError, match="is_last_turn"):
        assemble_tensor(pa.Table.from_batches([S.tensor_rows_to_batch(rows, SCHEMA)]))


def test_estimators_on_tensor_rows_by_hand():
    b = assemble_tensor(_table())
    # grpo_or: norm_g(R^O) = (+R, -R) on every existing turn
    adv = compute_turn_advantages(b, "grpo_or", {})
    _close(adv, [[R, R, 0.0], [-R, -R, -R]])
    # mt_grpo_k: n_j = norm_g(r_j) per turn index; A_k = sum_{j>=k} n_j + norm_g(R^O)
    #   n_0 = (R, -R), n_1 = (-R, R), n_2 = (0, 0); norm(R^O) = (R, -R)
    adv = compute_turn_advantages(b, "mt_grpo_k", {})
    _close(adv, [[0 + R, -R + R, 0.0], [0 - R, R - R, 0 - R]])
    # per step: each step carries its turn's advantage
    steps = turn_to_steps(adv, b.step_turn, b.step_mask)
    _close(steps, [[R, R, 0.0], [-R, 0.0, -R]])
    # the same numbers as calling the registered function on the tensors directly
    direct = ESTIMATORS["mt_grpo_k"](b.turn_rewards, b.outcome_rewards, b.turn_mask, b.group_ids)
    assert torch.allclose(adv, direct)


def test_mt_ppo_reads_values_at_turn_starts():
    b = assemble_tensor(_table())
    step_values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    v = values_at_turn_starts(step_values, b.turn_start, b.turn_mask)
    _close(v, [[0.1, 0.3, 0.0], [0.4, 0.5, 0.6]])
    adv = compute_turn_advantages(b, "mt_ppo", {"whiten": False}, values=v)
    # gamma = lam = 1: A_k = sum_{j>=k} r'_j - V_k with r' = turn reward (+ outcome on the last turn)
    _close(adv, [[1 + 1 - 0.1, 1 - 0.3, 0.0], [0.5 - 0.4, 0.5 - 0.5, 0 - 0.6]])
    with pytest.raises(ValueError, match="critic"):
        compute_turn_advantages(b, "mt_ppo", {})


def test_gigpo_anchors_are_the_turn_kinds():
    """Episode 1 fails its first grasp (kind 0) and grasps at turn 1; episode 2 grasps at turn 0 and aims (kind 1)
    at turn 1. gigpo compares turn 1 of episode 1 with the grasp turns, never with episode 2's aim turn."""
    import pyarrow as pa

    rows = [_row(1, 0, 2, 0.0, False, kind=0), _row(1, 1, 1, 1.0, True, outcome=0.0, kind=0),
            _row(2, 0, 1, 1.0, False, kind=0), _row(2, 1, 1, 0.5, True, outcome=0.0, kind=1)]
    b = assemble_tensor(pa.Table.from_batches([S.tensor_rows_to_batch(rows, SCHEMA)]))
    assert b.state_ids.tolist() == [[0, 0], [0, 1]]
    adv = compute_turn_advantages(b, "gigpo", {})
    # outcomes equal: A^E = 0. Kind 0 holds three turns with returns G = (1, 1, 1.5): mean 7/6, std 0.2887
    g = torch.tensor([1.0, 1.0, 1.5])
    z = (g - g.mean()) / (g.std() + 1e-6)
    _close(adv, [[float(z[0]), float(z[1])], [float(z[2]), 0.0]])  # the lone aim turn: no baseline, 0
