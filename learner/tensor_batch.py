"""Tensor rows (one Arrow row per turn, ``common.schema.tensor_transition_schema``) -> padded episode tensors.

Pure (numpy / torch, no Ray). The learner of a tensor agent calls :func:`assemble_tensor` on each table of
complete groups the replay queue releases, then the same per-turn estimators as the LLM learner
(``learner.credit.ESTIMATORS``) on ``turn_rewards`` / ``outcome_rewards`` / ``turn_mask`` / ``group_ids``,
and :func:`turn_to_steps` to give each step its turn's advantage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from common import schema as S


@dataclass
class TensorBatch:
    obs: torch.Tensor  # float[B, T, *obs_shape] observation before step t of episode b (0 past its end)
    actions: torch.Tensor  # long[B, T, 1] or float[B, T, d] the action taken
    old_logprobs: torch.Tensor  # float[B, T] its log-prob under the generating weights
    step_mask: torch.Tensor  # bool[B, T] step t exists
    step_turn: torch.Tensor  # long[B, T] the turn step t belongs to (0 past the end)
    turn_start: torch.Tensor  # long[B, K] index of turn k's first step (0 where the turn does not exist)
    turn_rewards: torch.Tensor  # float[B, K]
    outcome_rewards: torch.Tensor  # float[B]
    turn_mask: torch.Tensor  # bool[B, K]
    group_ids: torch.Tensor  # long[B]
    episode_ids: torch.Tensor  # long[B]
    truncated: torch.Tensor  # bool[B]
    versions: torch.Tensor  # long[B] oldest policy version among the episode's turns
    state_ids: torch.Tensor  # long[B, K] the kind of turn k (state_hash; gigpo's anchor), -1 where absent

    def __len__(self) -> int:
        return int(self.obs.shape[0])


def assemble_tensor(table: pa.Table) -> TensorBatch:
    """Group ``table``'s rows into episodes (ordered by group, then episode id), turns by ``turn_index``.

    Raises ValueError if an episode's turns are not 0..L contiguous or it has no last turn: the queue only
    releases complete groups, so that is a producer bug, not a case to train on.
    """
    if table.num_rows == 0:
        raise ValueError("an empty table has no episode")
    cols = {c: table.column(c).to_numpy() for c in (S.GROUP_ID, S.EPISODE_ID, S.TURN_INDEX, S.TURN_REWARD,
                                                    S.OUTCOME_REWARD, S.POLICY_VERSION, S.STATE_HASH)}
    last = table.column(S.IS_LAST_TURN).to_numpy(zero_copy_only=False)
    trunc = table.column(S.TRUNCATED).to_numpy(zero_copy_only=False)
    order = np.lexsort((cols[S.TURN_INDEX], cols[S.EPISODE_ID], cols[S.GROUP_ID]))
    obs_v, obs_off = S.tensor_column(table, S.OBSERVATIONS)
    act_v, act_off = S.tensor_column(table, S.ACTIONS)
    lp = table.column(S.STEP_LOGPROBS).combine_chunks()
    lp_v, lp_off = lp.values.to_numpy(), lp.offsets.to_numpy()
    if not (np.array_equal(obs_off, act_off) and np.array_equal(obs_off, lp_off)):
        raise ValueError("rows disagree on their step counts (observations, actions, step_logprobs)")
    eps = cols[S.EPISODE_ID][order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(eps)) + 1, [len(order)]])
    B = len(starts) - 1
    n_steps = obs_off[1:] - obs_off[:-1]  # per row
    K = int(max(starts[1:] - starts[:-1]))
    T = int(max(n_steps[order[starts[b]:starts[b + 1]]].sum() for b in range(B)))
    obs = np.zeros((B, T, *obs_v.shape[1:]), dtype=np.float32)
    actions = np.zeros((B, T, *act_v.shape[1:]), dtype=act_v.dtype)
    old_lp = np.zeros((B, T), dtype=np.float32)
    step_mask = np.zeros((B, T), dtype=bool)
    step_turn = np.zeros((B, T), dtype=np.int64)
    turn_start = np.zeros((B, K), dtype=np.int64)
    turn_r = np.zeros((B, K), dtype=np.float32)
    turn_mask = np.zeros((B, K), dtype=bool)
    state_ids = np.full((B, K), -1, dtype=np.int64)
    outcome = np.zeros(B, dtype=np.float32)
    group_ids, episode_ids = np.zeros(B, np.int64), np.zeros(B, np.int64)
    truncated, versions = np.zeros(B, bool), np.zeros(B, np.int64)
    for b in range(B):
        rows = order[starts[b]:starts[b + 1]]
        turns = cols[S.TURN_INDEX][rows]
        if not np.array_equal(turns, np.arange(len(rows))) or not last[rows[-1]] or last[rows[:-1]].any():
            raise ValueError(f"episode {int(eps[starts[b]])}: turns {turns.tolist()} are not 0..L with only the "
                             "last one marked is_last_turn")
        t = 0
        for k, r in enumerate(rows):
            lo, hi = obs_off[r], obs_off[r + 1]
            n = hi - lo
            obs[b, t:t + n] = obs_v[lo:hi]
            actions[b, t:t + n] = act_v[lo:hi]
            old_lp[b, t:t + n] = lp_v[lo:hi]
            step_mask[b, t:t + n] = True
            step_turn[b, t:t + n] = k
            turn_start[b, k] = t
            turn_r[b, k] = cols[S.TURN_REWARD][r]
            turn_mask[b, k] = True
            state_ids[b, k] = cols[S.STATE_HASH][r]
            t += n
        outcome[b] = cols[S.OUTCOME_REWARD][rows[-1]]
        group_ids[b], episode_ids[b] = cols[S.GROUP_ID][rows[0]], eps[starts[b]]
        truncated[b] = bool(trunc[rows[-1]])
        versions[b] = int(cols[S.POLICY_VERSION][rows].min())
    as_t = torch.from_numpy
    return TensorBatch(as_t(obs), as_t(actions), as_t(old_lp), as_t(step_mask), as_t(step_turn), as_t(turn_start),
                       as_t(turn_r), as_t(outcome), as_t(turn_mask), as_t(group_ids), as_t(episode_ids),
                       as_t(truncated), as_t(versions), as_t(state_ids))


def turn_to_steps(per_turn: torch.Tensor, step_turn: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """``out[b, t] = per_turn[b, step_turn[b, t]]`` where step t exists, else 0: float[B, T] from float[B, K]."""
    out = per_turn.gather(1, step_turn)  # [B, T]
    return torch.where(step_mask, out, torch.zeros_like(out))


def values_at_turn_starts(step_values: torch.Tensor, turn_start: torch.Tensor, turn_mask: torch.Tensor
                          ) -> torch.Tensor:
    """V at the state before each turn: ``out[b, k] = step_values[b, turn_start[b, k]]`` (0 where absent)."""
    out = step_values.gather(1, turn_start)  # [B, K]
    return torch.where(turn_mask, out, torch.zeros_like(out))
