"""Rebuild episodes from per-turn Arrow rows into padded tensors.

The sequence of episode b is exactly the token ids the generator saw:
``context(turn 0) + action_0 + observation_0 + action_1 + ...``. Only action
tokens carry loss; context and observation (env / template) tokens are masked.

Tree rollouts (``rollout.tree``): an episode is a leaf, and a turn several leaves share is one node
(``node_id``) in each of their episodes. Its tokens are context in every copy, and carry loss in one
(the episode with the lowest id), so each node is trained once whatever the number of its leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from common import schema as S


@dataclass
class EpisodeBatch:
    input_ids: torch.Tensor  # long[B, T] right-padded
    attention_mask: torch.Tensor  # long[B, T]
    action_mask: torch.Tensor  # float[B, T]  1 where token t was sampled by the policy
    token_turn: torch.Tensor  # long[B, T]   turn index of token t (-1 on non-action tokens)
    behaviour_logprobs: torch.Tensor  # float[B, T] generator log-prob of token t (0 elsewhere)
    turn_rewards: torch.Tensor  # float[B, K]
    outcome_rewards: torch.Tensor  # float[B]
    turn_mask: torch.Tensor  # bool[B, K]
    group_ids: torch.Tensor  # long[B]
    state_ids: torch.Tensor  # long[B, K]
    versions: torch.Tensor  # long[B, K]
    episode_ids: torch.Tensor  # long[B]
    staleness_weights: torch.Tensor  # float[B] staleness weight of the episode's group (queue "reweight"; else 1)
    truncated: torch.Tensor  # bool[B] the episode ran out of turns or tokens (its last row's ``truncated``)
    node_ids: torch.Tensor  # long[B, K] tree node of turn k (shared by the leaves of a tree that share the turn)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, idx: torch.Tensor | slice) -> "EpisodeBatch":
        return EpisodeBatch(**{k: v[idx] for k, v in self.__dict__.items()})


def assemble(table: pa.Table, pad_id: int) -> EpisodeBatch:
    """Arrow table of complete episodes -> ``EpisodeBatch`` (episodes ordered by id)."""
    cols = {name: table.column(name).to_pylist() for name in (
        S.EPISODE_ID, S.GROUP_ID, S.TURN_INDEX, S.POLICY_VERSION, S.CONTEXT_TOKEN_IDS, S.ACTION_TOKEN_IDS,
        S.ACTION_LOGPROBS, S.OBSERVATION_TOKEN_IDS, S.STATE_HASH, S.TURN_REWARD, S.OUTCOME_REWARD,
        S.IS_LAST_TURN, S.TRUNCATED, S.NODE_ID)}
    episodes: dict[int, list[int]] = {}
    for i, eid in enumerate(cols[S.EPISODE_ID]):
        episodes.setdefault(eid, []).append(i)
    order = sorted(episodes)
    k_max = max(len(v) for v in episodes.values())
    seqs, acts, turns, lps = [], [], [], []
    b = len(order)
    turn_rewards = torch.zeros(b, k_max)
    outcome = torch.zeros(b)
    turn_mask = torch.zeros(b, k_max, dtype=torch.bool)
    state_ids = torch.zeros(b, k_max, dtype=torch.long)
    versions = torch.zeros(b, k_max, dtype=torch.long)
    group_ids = torch.zeros(b, dtype=torch.long)
    stale_w = table.column(S.STALENESS_WEIGHT).to_pylist() if S.STALENESS_WEIGHT in table.schema.names else None
    weights = torch.ones(b)
    truncated = torch.zeros(b, dtype=torch.bool)
    node_ids = torch.full((b, k_max), -1, dtype=torch.long)
    trained: set[int] = set()  # nodes whose action tokens carry loss in an earlier episode (tree copies)
    for bi, eid in enumerate(order):
        rows = sorted(episodes[eid], key=lambda r: cols[S.TURN_INDEX][r])
        turn_idx = [cols[S.TURN_INDEX][r] for r in rows]
        if turn_idx != list(range(len(rows))):
            raise ValueError(f"episode {eid}: turns {turn_idx} are not contiguous from 0")
        if not cols[S.IS_LAST_TURN][rows[-1]]:
            raise ValueError(f"episode {eid} is incomplete (its last turn has not arrived)")
        ids: list[int] = list(cols[S.CONTEXT_TOKEN_IDS][rows[0]])
        act = [0.0] * len(ids)
        trn = [-1] * len(ids)
        lp = [0.0] * len(ids)
        for k, r in enumerate(rows):
            a = cols[S.ACTION_TOKEN_IDS][r]
            node = cols[S.NODE_ID][r]
            ids += a
            act += [0.0 if node in trained else 1.0] * len(a)
            trained.add(node)
            node_ids[bi, k] = node
            trn += [k] * len(a)
            lp += [float(x) for x in cols[S.ACTION_LOGPROBS][r]]
            o = cols[S.OBSERVATION_TOKEN_IDS][r]
            ids += o
            act += [0.0] * len(o)
            trn += [-1] * len(o)
            lp += [0.0] * len(o)
            turn_rewards[bi, k] = cols[S.TURN_REWARD][r]
            turn_mask[bi, k] = True
            state_ids[bi, k] = cols[S.STATE_HASH][r]
            versions[bi, k] = cols[S.POLICY_VERSION][r]
        outcome[bi] = cols[S.OUTCOME_REWARD][rows[-1]]
        truncated[bi] = bool(cols[S.TRUNCATED][rows[-1]])
        group_ids[bi] = cols[S.GROUP_ID][rows[0]]
        if stale_w is not None:
            weights[bi] = stale_w[rows[0]]
        seqs.append(ids)
        acts.append(act)
        turns.append(trn)
        lps.append(lp)
    t_max = max(len(s) for s in seqs)
    input_ids = torch.full((b, t_max), pad_id, dtype=torch.long)
    attn = torch.zeros(b, t_max, dtype=torch.long)
    action_mask = torch.zeros(b, t_max)
    token_turn = torch.full((b, t_max), -1, dtype=torch.long)
    blp = torch.zeros(b, t_max)
    for bi in range(b):
        n = len(seqs[bi])
        input_ids[bi, :n] = torch.tensor(seqs[bi])
        attn[bi, :n] = 1
        action_mask[bi, :n] = torch.tensor(acts[bi])
        token_turn[bi, :n] = torch.tensor(turns[bi])
        blp[bi, :n] = torch.tensor(lps[bi])
    return EpisodeBatch(input_ids, attn, action_mask, token_turn, blp, turn_rewards, outcome, turn_mask,
                        group_ids, state_ids, versions, torch.tensor(order, dtype=torch.long), weights, truncated,
                        node_ids)
