"""Tensor transition rows (common.schema, bottom part) and the replay queue holding them (store, spill,
snapshot, IPC, a real Ray actor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from common import schema as S
from common.replay import ReplayQueue, ReplayStore, check_schema
from common.replay.snapshot import load_snapshot, write_snapshot
from common.replay.wire import (
    batch_from_ipc,
    batch_to_ipc,
    table_from_ipc,
    table_to_ipc,
)

OBS_SHAPE = (12,)
SCHEMA = S.tensor_transition_schema(OBS_SHAPE, (1,), "int64")
TENSOR_COLUMNS = (S.OBSERVATIONS, S.ACTIONS, S.STEP_LOGPROBS, S.STEP_REWARDS)


# -- helpers --------------------------------------------------------------------------------------
def obs_of(eid: int, turn: int, steps: int, shape: tuple[int, ...] = OBS_SHAPE) -> np.ndarray:
    """Observations that encode (episode, turn, step, element), so content can be checked."""
    n = int(np.prod(shape))
    base = np.arange(steps * n, dtype=np.float32).reshape(steps, *shape) / 1000
    return base + np.float32(eid * 10 + turn)


def tensor_row(gid: int, eid: int, turn: int, steps: int, *, last: bool, size: int = 2, version: int = 0,
               action_dim: int | None = None) -> dict:
    """One turn of ``steps`` env steps; discrete actions unless ``action_dim`` (a float32 box)."""
    if action_dim is None:
        actions = (np.arange(steps, dtype=np.int64) + eid + turn).reshape(steps, 1) % 8
    else:
        actions = np.linspace(-1, 1, steps * action_dim, dtype=np.float32).reshape(steps, action_dim) + turn
    return {
        S.RUN_ID: "t", S.GROUP_ID: gid, S.EPISODE_ID: eid, S.PROMPT_ID: gid, S.TURN_INDEX: turn,
        S.POLICY_VERSION: version, S.STATE_HASH: turn, S.OBSERVATIONS: obs_of(eid, turn, steps), S.ACTIONS: actions,
        S.STEP_LOGPROBS: [-0.5 - 0.25 * k for k in range(steps)], S.STEP_REWARDS: [0.125 * (k + turn) for k in range(steps)],
        S.TURN_REWARD: 0.5 * turn, S.TURN_REWARD_COMPONENTS: {"grasp": 1.0} if turn == 0 else {"aim": 0.5},
        S.IS_LAST_TURN: last, S.OUTCOME_REWARD: 1.0 if last else 0.0,
        S.OUTCOME_REWARD_COMPONENTS: {"basket": 1.0} if last else {}, S.TRUNCATED: False, S.GROUP_SIZE: size,
        S.T_START: 1.0, S.T_END: 2.0,
    }


def group(gid: int, size: int = 2, turns: int = 2, version: int = 0) -> list[dict]:
    """All turns of the ``size`` episodes of group ``gid`` (episode ids gid*100 + j, turn k has k+1 steps)."""
    return [tensor_row(gid, gid * 100 + j, k, k + 1, last=k == turns - 1, size=size, version=version)
            for j in range(size) for k in range(turns)]


def rows_by_key(rows: list[dict]) -> dict[tuple[int, int], dict]:
    return {(r[S.EPISODE_ID], r[S.TURN_INDEX]): r for r in rows}


def assert_tensor_rows(table: pa.Table | pa.RecordBatch, want: list[dict]) -> None:
    """``table`` holds exactly the rows ``want`` (any order), tensors and scalars intact."""
    assert table.schema.equals(SCHEMA)
    want_by_key = rows_by_key(want)
    eids, turns = table.column(S.EPISODE_ID).to_pylist(), table.column(S.TURN_INDEX).to_pylist()
    assert sorted(zip(eids, turns)) == sorted(want_by_key)
    obs, obs_off = S.tensor_column(table, S.OBSERVATIONS)
    act, act_off = S.tensor_column(table, S.ACTIONS)
    np.testing.assert_array_equal(obs_off, act_off)
    lps = table.column(S.STEP_LOGPROBS).to_pylist()
    for i, key in enumerate(zip(eids, turns)):
        w = want_by_key[key]
        np.testing.assert_array_equal(obs[obs_off[i]:obs_off[i + 1]], w[S.OBSERVATIONS])
        np.testing.assert_array_equal(act[act_off[i]:act_off[i + 1]], w[S.ACTIONS])
        assert lps[i] == pytest.approx(w[S.STEP_LOGPROBS])


# -- the schema -----------------------------------------------------------------------------------
def test_tensor_schema_keeps_the_key_columns_and_adds_tensor_lists() -> None:
    sch = S.tensor_transition_schema((12,), (1,), "int64")
    token = {f.name: f.type for f in S.TRANSITION_SCHEMA}
    assert sch.names == [*S.TENSOR_KEY_COLUMNS, *TENSOR_COLUMNS, *S.TENSOR_TAIL_COLUMNS]
    for name in (*S.TENSOR_KEY_COLUMNS, *S.TENSOR_TAIL_COLUMNS):
        assert sch.field(name).type.equals(token[name]), name
    # the queue's key columns are all there
    for name in (S.GROUP_ID, S.EPISODE_ID, S.TURN_INDEX, S.POLICY_VERSION, S.IS_LAST_TURN, S.GROUP_SIZE):
        assert name in sch.names
    # no token columns
    assert not {S.CONTEXT_TOKEN_IDS, S.ACTION_TOKEN_IDS, S.ACTION_LOGPROBS, S.OBSERVATION_TOKEN_IDS} & set(sch.names)
    for name, shape, value in [(S.OBSERVATIONS, [12], pa.float32()), (S.ACTIONS, [1], pa.int64())]:
        t = sch.field(name).type
        assert pa.types.is_list(t)
        assert isinstance(t.value_type, pa.FixedShapeTensorType)
        assert t.value_type.extension_name == "arrow.fixed_shape_tensor"
        assert list(t.value_type.shape) == shape and t.value_type.value_type == value
    for name in (S.STEP_LOGPROBS, S.STEP_REWARDS):
        assert sch.field(name).type == pa.list_(pa.float32())


def test_tensor_schema_box_actions_and_multi_dim_observations() -> None:
    sch = S.tensor_transition_schema((2, 3), (4,), "float32")
    assert list(sch.field(S.OBSERVATIONS).type.value_type.shape) == [2, 3]
    act = sch.field(S.ACTIONS).type.value_type
    assert list(act.shape) == [4] and act.value_type == pa.float32()
    assert not sch.equals(SCHEMA)
    assert S.tensor_transition_schema((12,), (1,)).equals(SCHEMA)  # int64 is the default


@pytest.mark.parametrize("obs_shape,action_shape,dtype", [
    ((12,), (1,), "float64"), ((12,), (1,), "int32"), ((12,), (1,), "bool"),
    ((), (1,), "int64"), ((12,), (), "int64"), ((0,), (1,), "int64"), ((12,), (0,), "float32"),
    ((3, 0), (1,), "int64"), ((12,), (-1,), "float32"),
])
def test_tensor_schema_rejects_bad_dtype_and_shapes(obs_shape, action_shape, dtype) -> None:
    with pytest.raises(ValueError):
        S.tensor_transition_schema(obs_shape, action_shape, dtype)


# -- rows <-> batch ---------------------------------------------------------------------------------
def test_rows_of_different_step_counts_round_trip() -> None:
    rows = [tensor_row(1, 10, 0, 1, last=False), tensor_row(1, 10, 1, 3, last=False),
            tensor_row(1, 10, 2, 2, last=True)]
    b = S.tensor_rows_to_batch(rows, SCHEMA)
    assert isinstance(b, pa.RecordBatch) and b.num_rows == 3 and b.schema.equals(SCHEMA)
    obs, off = S.tensor_column(b, S.OBSERVATIONS)
    assert obs.shape == (6, 12) and obs.dtype == np.float32
    np.testing.assert_array_equal(off, [0, 1, 4, 6])
    np.testing.assert_array_equal(obs, np.concatenate([r[S.OBSERVATIONS] for r in rows]))
    act, act_off = S.tensor_column(b, S.ACTIONS)
    assert act.shape == (6, 1) and act.dtype == np.int64
    np.testing.assert_array_equal(act_off, [0, 1, 4, 6])
    np.testing.assert_array_equal(act, np.concatenate([r[S.ACTIONS] for r in rows]))
    for name in (S.STEP_LOGPROBS, S.STEP_REWARDS):
        assert b.column(name).to_pylist() == [pytest.approx(r[name]) for r in rows]
    for name in (S.TURN_REWARD_COMPONENTS, S.OUTCOME_REWARD_COMPONENTS):
        got = [S.components_to_dict(v) for v in b.column(name).to_pylist()]
        assert got == [r[name] for r in rows]
    for name in (S.RUN_ID, S.GROUP_ID, S.EPISODE_ID, S.TURN_INDEX, S.IS_LAST_TURN, S.GROUP_SIZE, S.TURN_REWARD):
        assert b.column(name).to_pylist() == [r[name] for r in rows]
    assert check_schema(b, SCHEMA) is b


def test_tensor_column_of_a_table_with_several_chunks() -> None:
    rows = [tensor_row(1, 10, 0, 1, last=False), tensor_row(1, 10, 1, 3, last=False),
            tensor_row(1, 10, 2, 2, last=True)]
    t = pa.Table.from_batches([S.tensor_rows_to_batch(rows[:1], SCHEMA), S.tensor_rows_to_batch(rows[1:], SCHEMA)])
    assert t.column(S.OBSERVATIONS).num_chunks == 2
    obs, off = S.tensor_column(t, S.OBSERVATIONS)
    np.testing.assert_array_equal(off, [0, 1, 4, 6])
    np.testing.assert_array_equal(obs, np.concatenate([r[S.OBSERVATIONS] for r in rows]))


def test_tensor_column_of_a_slice_indexes_its_own_rows() -> None:
    rows = [tensor_row(1, 10, k, n, last=k == 3) for k, n in enumerate([2, 1, 3, 2])]
    b = S.tensor_rows_to_batch(rows, SCHEMA).slice(1, 2)
    obs, off = S.tensor_column(b, S.OBSERVATIONS)
    assert len(off) == 3
    for i, r in enumerate(rows[1:3]):
        np.testing.assert_array_equal(obs[off[i]:off[i + 1]], r[S.OBSERVATIONS])


def test_box_action_schema_round_trips_float32_actions() -> None:
    sch = S.tensor_transition_schema((12,), (3,), "float32")
    rows = [tensor_row(1, 5, 0, 2, last=False, action_dim=3), tensor_row(1, 5, 1, 1, last=True, action_dim=3)]
    b = S.tensor_rows_to_batch(rows, sch)
    act, off = S.tensor_column(b, S.ACTIONS)
    assert act.dtype == np.float32 and act.shape == (3, 3)
    np.testing.assert_array_equal(off, [0, 2, 3])
    np.testing.assert_array_equal(act, np.concatenate([r[S.ACTIONS] for r in rows]))
    # a flat [steps * dim] input is reshaped to [steps, dim]
    flat = dict(rows[0], **{S.ACTIONS: rows[0][S.ACTIONS].reshape(-1)})
    act2, _ = S.tensor_column(S.tensor_rows_to_batch([flat], sch), S.ACTIONS)
    np.testing.assert_array_equal(act2, rows[0][S.ACTIONS])


def test_a_row_with_zero_steps_beside_others() -> None:
    rows = [tensor_row(1, 10, 0, 2, last=False), tensor_row(1, 10, 1, 0, last=True)]
    b = S.tensor_rows_to_batch(rows, SCHEMA)
    obs, off = S.tensor_column(b, S.OBSERVATIONS)
    np.testing.assert_array_equal(off, [0, 2, 2])
    np.testing.assert_array_equal(obs, rows[0][S.OBSERVATIONS])
    assert b.column(S.STEP_LOGPROBS).to_pylist()[1] == []


def test_tensor_column_of_a_column_without_steps() -> None:
    t = SCHEMA.field(S.OBSERVATIONS).type
    empty = pa.ExtensionArray.from_storage(t.value_type, pa.array([], t.value_type.storage_type))
    col = pa.ListArray.from_arrays(pa.array([0, 0], pa.int32()), empty, type=t)
    obs, off = S.tensor_column(pa.table({S.OBSERVATIONS: col}), S.OBSERVATIONS)
    assert obs.shape == (0, 12) and obs.dtype == np.float32
    np.testing.assert_array_equal(off, [0, 0])


# a batch without any env step (no rows, or rows of zero steps) is a valid, empty tensor column
def test_rows_with_no_steps_at_all_make_a_batch() -> None:
    b = S.tensor_rows_to_batch([tensor_row(1, 10, 0, 0, last=True)], SCHEMA)
    obs, off = S.tensor_column(b, S.OBSERVATIONS)
    assert obs.shape == (0, 12)
    np.testing.assert_array_equal(off, [0, 0])


def test_no_rows_make_an_empty_batch() -> None:
    b = S.tensor_rows_to_batch([], SCHEMA)
    assert b.num_rows == 0 and b.schema.equals(SCHEMA)


def test_rows_missing_a_column_raise_key_error() -> None:
    row = tensor_row(1, 10, 0, 1, last=True)
    del row[S.STEP_REWARDS]
    with pytest.raises(KeyError, match=S.STEP_REWARDS):
        S.tensor_rows_to_batch([row], SCHEMA)


def test_check_schema_reorders_columns_and_rejects_mistyped_tensors() -> None:
    b = S.tensor_rows_to_batch(group(1), SCHEMA)
    shuffled = b.select(list(reversed(SCHEMA.names)))
    fixed = check_schema(shuffled, SCHEMA)
    assert fixed.schema.equals(SCHEMA)
    assert fixed.column(S.OBSERVATIONS).equals(b.column(S.OBSERVATIONS))
    other = S.tensor_transition_schema((11,), (1,), "int64")
    with pytest.raises(TypeError, match=S.OBSERVATIONS):
        check_schema(S.tensor_rows_to_batch([dict(r, **{S.OBSERVATIONS: r[S.OBSERVATIONS][:, :11]})
                                             for r in group(1)], other), SCHEMA)
    with pytest.raises(TypeError, match="tensor_transition_schema"):
        check_schema(b.drop_columns([S.ACTIONS]), SCHEMA)


# -- Arrow IPC ------------------------------------------------------------------------------------
def test_tensor_batch_and_table_survive_arrow_ipc() -> None:
    rows = group(3)
    b = S.tensor_rows_to_batch(rows, SCHEMA)
    back = batch_from_ipc(batch_to_ipc(b))
    assert back.schema.equals(SCHEMA)
    assert isinstance(back.schema.field(S.OBSERVATIONS).type.value_type, pa.FixedShapeTensorType)
    assert back.equals(b)
    assert_tensor_rows(back, rows)
    t = table_from_ipc(table_to_ipc(pa.Table.from_batches([b])))
    assert t.schema.equals(SCHEMA) and t.num_rows == b.num_rows
    assert_tensor_rows(t, rows)


# -- ReplayStore ----------------------------------------------------------------------------------
def complete_and_incomplete() -> tuple[list[dict], list[dict]]:
    """Two complete groups (1, 2) and group 3 missing its second episode's last turn."""
    complete = group(1) + group(2)
    incomplete = [r for r in group(3) if not (r[S.EPISODE_ID] == 301 and r[S.IS_LAST_TURN])]
    return complete, incomplete


def test_store_with_tensor_schema_releases_only_complete_groups() -> None:
    complete, incomplete = complete_and_incomplete()
    store = ReplayStore(100, 1, schema=SCHEMA)
    assert store.put(S.tensor_rows_to_batch(complete + incomplete, SCHEMA)) == len(complete) + len(incomplete)
    assert store.n_ready == 2 and store.n_groups == 3
    table = store.take(10, 0)
    assert isinstance(table, pa.Table)
    assert table.num_rows == len(complete) == 8
    assert_tensor_rows(table, complete)
    assert sorted(set(table.column(S.GROUP_ID).to_pylist())) == [1, 2]
    assert store.take(10, 0) is None
    # completing group 3 releases it
    store.put(S.tensor_rows_to_batch([r for r in group(3) if r[S.EPISODE_ID] == 301 and r[S.IS_LAST_TURN]], SCHEMA))
    assert_tensor_rows(store.take(10, 0), group(3))
    store.close()


def test_store_accepts_a_table_of_several_chunks() -> None:
    rows = group(4)
    t = pa.Table.from_batches([S.tensor_rows_to_batch(rows[:3], SCHEMA), S.tensor_rows_to_batch(rows[3:], SCHEMA)])
    store = ReplayStore(100, 1, schema=SCHEMA)
    store.put(t)
    assert_tensor_rows(store.take(1, 0), rows)


def test_tensor_store_rejects_token_rows_and_token_store_rejects_tensor_rows() -> None:
    from tests.common.test_replay_queue import batch as token_batch
    from tests.common.test_replay_queue import group_rows

    tensor_store, token_store = ReplayStore(100, 1, schema=SCHEMA), ReplayStore(100, 1)
    with pytest.raises(TypeError, match="tensor_transition_schema"):
        tensor_store.put(token_batch(group_rows(1)))
    with pytest.raises(TypeError, match="TRANSITION_SCHEMA"):
        token_store.put(S.tensor_rows_to_batch(group(1), SCHEMA))
    box = S.tensor_transition_schema((12,), (1,), "float32")  # same names, another action type
    with pytest.raises(TypeError, match=S.ACTIONS):
        tensor_store.put(S.tensor_rows_to_batch(group(1), box))
    assert tensor_store.rows == token_store.rows == 0


def test_spilled_tensor_groups_come_back_intact(tmp_path: Path) -> None:
    complete, incomplete = complete_and_incomplete()
    store = ReplayStore(100, 1, schema=SCHEMA, memory_bytes=1, spill_dir=tmp_path)
    for gid in (1, 2):  # one put per group: each spills on its own
        store.put(S.tensor_rows_to_batch([r for r in complete if r[S.GROUP_ID] == gid], SCHEMA))
    store.put(S.tensor_rows_to_batch(incomplete, SCHEMA))
    assert store.disk_bytes > 0 and store.spilled_bytes_total > 0
    files = list(tmp_path.glob("*.arrow"))
    assert files
    with pa.OSFile(str(files[0]), "rb") as f:
        assert pa.ipc.open_file(f).schema.equals(SCHEMA)
    table = store.take(10, 0)
    assert table.num_rows == len(complete)
    assert_tensor_rows(table, complete)
    store.close()


def test_snapshot_of_a_tensor_store_restores_into_a_tensor_store(tmp_path: Path) -> None:
    complete, incomplete = complete_and_incomplete()
    src = ReplayStore(100, 1, schema=SCHEMA, memory_bytes=1, spill_dir=tmp_path / "spill")
    src.put(S.tensor_rows_to_batch(complete + incomplete, SCHEMA))
    state = write_snapshot(src, tmp_path / "snap")
    assert state["rows"] == len(complete) + len(incomplete)
    assert "fixed_shape_tensor" in state["schema"]

    dst = ReplayStore(100, 1, schema=SCHEMA)
    assert load_snapshot(dst, tmp_path / "snap") == len(complete) + len(incomplete)
    assert dst.n_ready == 2 and dst.n_groups == 3
    assert_tensor_rows(dst.take(10, 0), complete)
    assert dst.n_groups == 1  # the incomplete group is held again, not released

    token = ReplayStore(100, 1)
    with pytest.raises(TypeError, match="schema"):
        load_snapshot(token, tmp_path / "snap")
    assert token.rows == 0 and token.n_groups == 0
    other = ReplayStore(100, 1, schema=S.tensor_transition_schema((12,), (2,), "float32"))
    with pytest.raises(TypeError):
        load_snapshot(other, tmp_path / "snap")
    src.close()


# -- through a real Ray actor -------------------------------------------------------------------
def test_replay_queue_actor_with_tensor_schema(ray_local, tmp_path: Path) -> None:
    ray = ray_local
    complete, incomplete = complete_and_incomplete()
    queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(100, 1, schema=SCHEMA)
    try:
        n = ray.get(queue.put.remote(S.tensor_rows_to_batch(complete + incomplete, SCHEMA)))
        assert n == len(complete) + len(incomplete)
        assert ray.get(queue.num_complete.remote()) == 2
        table = ray.get(queue.get.remote(10, 0))
        assert isinstance(table, pa.Table)
        assert_tensor_rows(table, complete)
        assert ray.get(queue.get.remote(10, 0)) is None
        from tests.common.test_replay_queue import batch as token_batch
        from tests.common.test_replay_queue import group_rows

        with pytest.raises(TypeError, match="tensor_transition_schema"):
            ray.get(queue.put.remote(token_batch(group_rows(9))))
        # snapshot -> a fresh actor with the same schema
        ray.get(queue.snapshot.remote(str(tmp_path / "snap")))
        q2 = ray.remote(ReplayQueue).options(num_cpus=0).remote(100, 1, schema=SCHEMA)
        assert ray.get(q2.restore.remote(str(tmp_path / "snap"))) == len(incomplete)
        ray.get(q2.put.remote(S.tensor_rows_to_batch(
            [r for r in group(3) if r[S.EPISODE_ID] == 301 and r[S.IS_LAST_TURN]], SCHEMA)))
        assert_tensor_rows(ray.get(q2.get.remote(1, 0, timeout=5.0)), group(3))
        ray.kill(q2)
    finally:
        ray.kill(queue)
