"""The per-turn transition: Arrow column names and schema, in one place.

One row per finished turn. Token ids are the ground truth: the learner rebuilds
the exact sequence the generator saw (context of turn 0, then action and
observation of each turn) and never re-tokenises conversation text.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

RUN_ID = "run_id"
GROUP_ID = "group_id"  # episodes sampled from the same prompt share it
EPISODE_ID = "episode_id"
PROMPT_ID = "prompt_id"
TURN_INDEX = "turn_index"
POLICY_VERSION = "policy_version"  # version of the weights that produced this action
CONTEXT_TOKEN_IDS = "context_token_ids"  # the prompt, on turn 0 only (empty otherwise)
ACTION_TOKEN_IDS = "action_token_ids"
ACTION_LOGPROBS = "action_logprobs"  # log-probs of the sampled tokens under the generating weights
OBSERVATION_TOKEN_IDS = "observation_token_ids"  # env reply after this action (empty on the last turn)
STATE_HASH = "state_hash"  # hash of the observation history before this turn (step grouping)
TURN_REWARD = "turn_reward"
TURN_REWARD_COMPONENTS = "turn_reward_components"
IS_LAST_TURN = "is_last_turn"
OUTCOME_REWARD = "outcome_reward"  # on the last turn; 0 elsewhere
OUTCOME_REWARD_COMPONENTS = "outcome_reward_components"
TRUNCATED = "truncated"  # hit max turns or max tokens: not the same as a failure
TOOL_CALLED = "tool_called"
TOOL_SUCCESS = "tool_success"
RESULT_CONTAINS_ANSWER = "result_contains_answer"
GROUP_SIZE = "group_size"  # G, so the queue knows when a group is complete
T_START = "t_start"  # unix seconds: generation of this turn began
T_END = "t_end"  # unix seconds: the env answered
# Not a transition column: the replay queue appends it to the tables it releases in "reweight"
# mode (float32 per row, stale_decay ** (group lag - max_policy_lag), 1.0 within the bound);
# the learner multiplies it into the group's token advantages.
STALENESS_WEIGHT = "staleness_weight"

_COMPONENTS = pa.map_(pa.string(), pa.float32())

TRANSITION_SCHEMA = pa.schema(
    [
        pa.field(RUN_ID, pa.string()),
        pa.field(GROUP_ID, pa.int64()),
        pa.field(EPISODE_ID, pa.int64()),
        pa.field(PROMPT_ID, pa.int64()),
        pa.field(TURN_INDEX, pa.int32()),
        pa.field(POLICY_VERSION, pa.int64()),
        pa.field(CONTEXT_TOKEN_IDS, pa.list_(pa.int32())),
        pa.field(ACTION_TOKEN_IDS, pa.list_(pa.int32())),
        pa.field(ACTION_LOGPROBS, pa.list_(pa.float32())),
        pa.field(OBSERVATION_TOKEN_IDS, pa.list_(pa.int32())),
        pa.field(STATE_HASH, pa.int64()),
        pa.field(TURN_REWARD, pa.float32()),
        pa.field(TURN_REWARD_COMPONENTS, _COMPONENTS),
        pa.field(IS_LAST_TURN, pa.bool_()),
        pa.field(OUTCOME_REWARD, pa.float32()),
        pa.field(OUTCOME_REWARD_COMPONENTS, _COMPONENTS),
        pa.field(TRUNCATED, pa.bool_()),
        pa.field(TOOL_CALLED, pa.bool_()),
        pa.field(TOOL_SUCCESS, pa.bool_()),
        pa.field(RESULT_CONTAINS_ANSWER, pa.bool_()),
        pa.field(GROUP_SIZE, pa.int32()),
        pa.field(T_START, pa.float64()),
        pa.field(T_END, pa.float64()),
    ]
)

COLUMNS = tuple(TRANSITION_SCHEMA.names)


def transitions_to_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """Build a RecordBatch from row dicts; every schema column must be present."""
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise KeyError(f"transition rows lack columns {missing}")
    arrays = []
    for f in TRANSITION_SCHEMA:
        values = [r[f.name] for r in rows]
        if pa.types.is_map(f.type):
            values = [list(v.items()) for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=TRANSITION_SCHEMA)


def components_to_dict(value: Any) -> dict[str, float]:
    """A map cell (list of key/value pairs from ``to_pylist``) as a dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    return {str(k): float(v) for k, v in value}
