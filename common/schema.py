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
# Tree rollouts (rollout.tree): a row is one node of a tree of turns. Leaves are the episodes; a turn
# several leaves share (the common prefix before a branch) appears in each of their episodes under one
# node id. Siblings (the children of one node, or a group's first turns) share (group_id, parent_node_id).
NODE_ID = "node_id"  # node_id(episode that generated the turn, turn index); unique per generated turn
PARENT_NODE_ID = "parent_node_id"  # node of the previous turn on this episode's path; -1 on turn 0
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
        pa.field(NODE_ID, pa.int64()),
        pa.field(PARENT_NODE_ID, pa.int64()),
    ]
)

COLUMNS = tuple(TRANSITION_SCHEMA.names)
#: the tree columns, derived from (episode_id, turn_index) when a producer leaves them out (flat episodes)
_DERIVED = (NODE_ID, PARENT_NODE_ID)
#: node ids of one episode's turns: turn indices stay below this
MAX_TURN_IDS = 4096


def node_id(episode_id: int, turn: int) -> int:
    """The id of the node that episode ``episode_id`` generated at ``turn`` (-1 for ``turn`` -1: no parent)."""
    if turn < 0:
        return -1
    if turn >= MAX_TURN_IDS:
        raise ValueError(f"turn index {turn} >= {MAX_TURN_IDS}: node ids cannot tell it apart")
    return int(episode_id) * MAX_TURN_IDS + int(turn)


def transitions_to_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """Build a RecordBatch from row dicts; every schema column must be present (the tree columns
    default to a flat episode's: ``node_id(episode, turn)`` and its previous turn's)."""
    missing = [c for c in COLUMNS if rows and c not in rows[0] and c not in _DERIVED]
    if missing:
        raise KeyError(f"transition rows lack columns {missing}")
    arrays = []
    for f in TRANSITION_SCHEMA:
        if f.name in _DERIVED and rows and f.name not in rows[0]:
            back = 0 if f.name == NODE_ID else 1
            values = [node_id(r[EPISODE_ID], r[TURN_INDEX] - back) for r in rows]
        else:
            values = [r[f.name] for r in rows]
        if pa.types.is_map(f.type):
            values = [list(v.items()) for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=TRANSITION_SCHEMA)


def derived_since(old: pa.Schema, schema: pa.Schema) -> list[str] | None:
    """The tree columns ``schema`` has and ``old`` lacks when that is the only difference ([] when equal); None
    when the schemas differ otherwise. Batches of ``old`` then upgrade with :func:`upgrade_batch`."""
    if old.equals(schema):
        return []
    missing = [f.name for f in schema if f.name not in old.names]
    kept = pa.schema([f for f in schema if f.name not in missing])
    if not missing or set(missing) - set(_DERIVED) or not kept.equals(old):
        return None
    return missing


def upgrade_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` under ``schema``: unchanged when it has that schema; with the tree columns added (a flat
    episode's values, as :func:`transitions_to_batch` derives them) when it was written before they existed
    (a checkpoint's queue snapshot from an older version). TypeError when it differs otherwise."""
    missing = derived_since(batch.schema, schema)
    if missing is None:
        raise TypeError(f"a batch of schema {batch.schema.names} cannot be read as {schema.names}")
    if not missing:
        return batch
    episodes = batch.column(EPISODE_ID).to_pylist()
    turns = batch.column(TURN_INDEX).to_pylist()
    derived = {NODE_ID: [node_id(e, t) for e, t in zip(episodes, turns)],
               PARENT_NODE_ID: [node_id(e, t - 1) for e, t in zip(episodes, turns)]}
    arrays = [pa.array(derived[f.name], type=f.type) if f.name in missing else batch.column(f.name) for f in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def components_to_dict(value: Any) -> dict[str, float]:
    """A map cell (list of key/value pairs from ``to_pylist``) as a dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    return {str(k): float(v) for k, v in value}


# ---------------------------------------------------------------------------------------------
# Tensor agents (non-LLM policies: ``kind: tensor`` configs): one row per turn, a turn being one or more env
# steps. The key columns above keep their meaning, so the replay queue treats both kinds of row alike; the token
# columns are replaced by tensor columns, one element per env step of the turn.
# ---------------------------------------------------------------------------------------------
OBSERVATIONS = "observations"  # list<fixed_shape_tensor[obs_shape]>: the observation each step's action saw
ACTIONS = "actions"  # list<fixed_shape_tensor[action_shape]>: the action taken at each step
STEP_LOGPROBS = "step_logprobs"  # list<float32>: log-prob of each step's action under the generating weights
STEP_REWARDS = "step_rewards"  # list<float32>: the env's reward after each step (summed per turn in turn_reward)

TENSOR_KEY_COLUMNS = (RUN_ID, GROUP_ID, EPISODE_ID, PROMPT_ID, TURN_INDEX, POLICY_VERSION, STATE_HASH)  # state_hash: the
#                     turn's kind (env_workers.tensor_env TensorStep.turn_kind), the anchor of gigpo's step grouping
TENSOR_TAIL_COLUMNS = (TURN_REWARD, TURN_REWARD_COMPONENTS, IS_LAST_TURN, OUTCOME_REWARD, OUTCOME_REWARD_COMPONENTS,
                       TRUNCATED, GROUP_SIZE, T_START, T_END)


def tensor_transition_schema(obs_shape: tuple[int, ...], action_shape: tuple[int, ...],
                             action_dtype: str = "int64") -> pa.Schema:
    """The per-turn row schema of a tensor agent whose observations are float32[*obs_shape] and actions
    ``action_dtype``[*action_shape] (``int64`` [1] for a discrete action, ``float32`` [d] for a box).

    The tensor columns are Arrow lists of the canonical ``arrow.fixed_shape_tensor`` extension type: row r's
    list holds one tensor per env step of turn r, so ``column.combine_chunks().values.to_numpy_ndarray()``
    is every step of the batch as one ``[steps, *shape]`` array without a copy.
    """
    if action_dtype not in ("int64", "float32"):
        raise ValueError(f"action_dtype={action_dtype!r}: must be int64 (discrete) or float32 (box)")
    if not obs_shape or not action_shape or min(obs_shape) < 1 or min(action_shape) < 1:
        raise ValueError(f"obs_shape {obs_shape} and action_shape {action_shape} must be non-empty and positive")
    by_name = {f.name: f for f in TRANSITION_SCHEMA}
    obs_t = pa.fixed_shape_tensor(pa.float32(), list(obs_shape))
    act_t = pa.fixed_shape_tensor(pa.int64() if action_dtype == "int64" else pa.float32(), list(action_shape))
    return pa.schema([*(by_name[c] for c in TENSOR_KEY_COLUMNS),
                      pa.field(OBSERVATIONS, pa.list_(obs_t)), pa.field(ACTIONS, pa.list_(act_t)),
                      pa.field(STEP_LOGPROBS, pa.list_(pa.float32())), pa.field(STEP_REWARDS, pa.list_(pa.float32())),
                      *(by_name[c] for c in TENSOR_TAIL_COLUMNS)])


def _tensor_list(arrays: list[Any], list_type: pa.DataType) -> pa.Array:
    """A ``list<fixed_shape_tensor>`` column from one ``[steps_r, *shape]`` numpy array per row."""
    import numpy as np

    value_type = list_type.value_type
    shape = tuple(value_type.shape)
    dtype = value_type.value_type.to_pandas_dtype()
    parts = [np.asarray(a, dtype=dtype).reshape((-1, *shape)) for a in arrays]
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    flat = np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=dtype)
    if len(flat):
        values = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(flat))
    else:  # no step at all: Arrow builds no tensor array from an empty ndarray
        values = pa.ExtensionArray.from_storage(value_type, pa.array([], value_type.storage_type))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=list_type)


def tensor_rows_to_batch(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """A RecordBatch of ``schema`` (:func:`tensor_transition_schema`) from row dicts; tensor columns hold one
    ``[steps, *shape]`` array per row, every other column its scalar or map."""
    missing = [c for c in schema.names if rows and c not in rows[0]]
    if missing:
        raise KeyError(f"tensor transition rows lack columns {missing}")
    arrays = []
    for f in schema:
        values = [r[f.name] for r in rows]
        if f.name in (OBSERVATIONS, ACTIONS):
            arrays.append(_tensor_list(values, f.type))
            continue
        if pa.types.is_map(f.type):
            values = [list(v.items()) for v in values]
        elif pa.types.is_list(f.type):
            values = [[float(x) for x in v] for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def tensor_column(table: pa.Table | pa.RecordBatch, name: str) -> tuple[Any, Any]:
    """``(values [steps, *shape], offsets int[rows + 1])`` of a tensor column, as numpy arrays."""
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    values = col.values.to_numpy_ndarray() if len(col.values) else None
    if values is None:
        import numpy as np

        t = col.type.value_type
        values = np.zeros((0, *t.shape), dtype=t.value_type.to_pandas_dtype())
    return values, col.offsets.to_numpy()
