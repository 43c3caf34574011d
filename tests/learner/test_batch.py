"""Episodes rebuilt from Arrow rows: exact token ids, action-only masks, per-turn rewards."""

import pyarrow as pa
import pytest
import torch

from common import schema as S
from learner.batch import assemble


def row(ep, turn, ctx, act, obs, last, turn_r=0.0, out_r=0.0, group=0):
    return {
        S.RUN_ID: "r", S.GROUP_ID: group, S.EPISODE_ID: ep, S.PROMPT_ID: 0, S.TURN_INDEX: turn, S.POLICY_VERSION: 1,
        S.CONTEXT_TOKEN_IDS: ctx, S.ACTION_TOKEN_IDS: act, S.ACTION_LOGPROBS: [-0.1 * (i + 1) for i in range(len(act))],
        S.OBSERVATION_TOKEN_IDS: obs, S.STATE_HASH: 100 + turn, S.TURN_REWARD: turn_r, S.TURN_REWARD_COMPONENTS: {},
        S.IS_LAST_TURN: last, S.OUTCOME_REWARD: out_r, S.OUTCOME_REWARD_COMPONENTS: {}, S.TRUNCATED: False,
        S.TOOL_CALLED: False, S.TOOL_SUCCESS: False, S.RESULT_CONTAINS_ANSWER: False, S.GROUP_SIZE: 2,
        S.T_START: 0.0, S.T_END: 0.0,
    }


def table(rows):
    return pa.Table.from_batches([S.transitions_to_batch(rows)])


def test_exact_sequence_and_masks():
    rows = [
        row(1, 1, [], [20, 21], [], True, out_r=1.4),  # arrives out of order
        row(1, 0, [1, 2, 3], [10, 11, 12], [30, 31], False, turn_r=0.7),
        row(2, 0, [1, 2, 3], [13], [], True, out_r=0.2),
    ]
    b = assemble(table(rows), pad_id=0)
    assert b.input_ids[0].tolist() == [1, 2, 3, 10, 11, 12, 30, 31, 20, 21]
    assert b.action_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert b.token_turn[0].tolist() == [-1, -1, -1, 0, 0, 0, -1, -1, 1, 1]
    assert b.behaviour_logprobs[0, 3:6].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert b.input_ids[1].tolist() == [1, 2, 3, 13] + [0] * 6  # right padding
    assert b.attention_mask[1].tolist() == [1, 1, 1, 1] + [0] * 6
    assert torch.allclose(b.turn_rewards, torch.tensor([[0.7, 0.0], [0.0, 0.0]]))
    assert b.turn_mask.tolist() == [[True, True], [True, False]]
    assert b.outcome_rewards.tolist() == pytest.approx([1.4, 0.2])
    assert b.state_ids[0].tolist() == [100, 101]


def test_incomplete_episode_rejected():
    with pytest.raises(ValueError, match="incomplete"):
        assemble(table([row(1, 0, [1], [2], [3], False)]), pad_id=0)


def test_turn_gap_rejected():
    with pytest.raises(ValueError, match="not contiguous"):
        assemble(table([row(1, 0, [1], [2], [3], False), row(1, 2, [], [4], [], True)]), pad_id=0)


def test_staleness_weights_come_from_the_queue_in_reweight_mode():
    from common.replay_queue import ReplayStore

    store = ReplayStore(max_policy_lag=0, stale_mode="reweight", stale_decay=0.5)
    old = [row(1, 0, [1], [2], [], True, group=0), row(2, 0, [1], [3], [], True, group=0)]
    new = [{**r, S.POLICY_VERSION: 3} for r in (row(3, 0, [1], [4], [], True, group=1),
                                                  row(4, 0, [1], [5], [], True, group=1))]
    store.put(S.transitions_to_batch(old + new))
    b = assemble(store.take(2, current_version=3), pad_id=0)
    assert b.episode_ids.tolist() == [1, 2, 3, 4]
    assert b.staleness_weights.tolist() == [0.25, 0.25, 1.0, 1.0]  # group 0 lags 3 - 1 = 2 versions: 0.5 ** 2
    assert assemble(table(old), pad_id=0).staleness_weights.tolist() == [1.0, 1.0]  # "drop" mode: no column
