"""Replay queue: complete groups only, exactly once, lag bound, backpressure, spill, snapshot (no Ray here).

The async actor class is driven directly with asyncio; ``test_replay_queue_ray.py`` runs it as a
real Ray actor with many producers and consumers, ``test_replay_queue_schedules.py`` checks the
lag bound and exactly-once delivery over random schedules.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from common import metrics as M
from common import schema as S
from common.replay.snapshot import load_snapshot, write_snapshot
from common.replay_queue import STALENESS_WEIGHT, QueueFull, ReplayQueue, ReplayStore


# -- helpers shared by the replay-queue tests -----------------------------------------------------
def turn_row(gid: int, eid: int, turn: int, *, last: bool, version: int = 0, size: int = 2, ntok: int = 3) -> dict:
    """One transition whose action tokens encode (episode, turn, version), so content can be checked."""
    return {
        S.RUN_ID: "test", S.GROUP_ID: gid, S.EPISODE_ID: eid, S.PROMPT_ID: gid, S.TURN_INDEX: turn,
        S.POLICY_VERSION: version, S.CONTEXT_TOKEN_IDS: list(range(ntok)) if turn == 0 else [],
        S.ACTION_TOKEN_IDS: [eid, turn, version] + [7] * ntok, S.ACTION_LOGPROBS: [-0.5] * (ntok + 3),
        S.OBSERVATION_TOKEN_IDS: [] if last else [9] * ntok, S.STATE_HASH: eid * 100 + turn,
        S.TURN_REWARD: 0.25 * turn, S.TURN_REWARD_COMPONENTS: {"format": 0.25 * turn}, S.IS_LAST_TURN: last,
        S.OUTCOME_REWARD: 1.0 if last else 0.0, S.OUTCOME_REWARD_COMPONENTS: {"em": 1.0} if last else {},
        S.TRUNCATED: False, S.TOOL_CALLED: turn > 0, S.TOOL_SUCCESS: turn > 0, S.RESULT_CONTAINS_ANSWER: False,
        S.GROUP_SIZE: size, S.T_START: 1.0, S.T_END: 2.0,
    }


def group_rows(gid: int, size: int = 2, turns: int = 2, version: int = 0) -> list[dict]:
    """All turns of the ``size`` episodes of group ``gid`` (episode ids gid*100 + j)."""
    return [turn_row(gid, gid * 100 + j, k, last=k == turns - 1, version=version, size=size)
            for j in range(size) for k in range(turns)]


def batch(rows: list[dict]) -> pa.RecordBatch:
    return S.transitions_to_batch(rows)


def keys(table: pa.Table | None) -> list[tuple[int, int]]:
    """(episode_id, turn_index) of every row."""
    if table is None:
        return []
    return list(zip(table.column(S.EPISODE_ID).to_pylist(), table.column(S.TURN_INDEX).to_pylist()))


def assert_complete_groups(table: pa.Table) -> None:
    """Every group has group_size episodes, each with turns 0..last and exactly one last turn, each row once."""
    rows = table.select([S.GROUP_ID, S.EPISODE_ID, S.TURN_INDEX, S.IS_LAST_TURN, S.GROUP_SIZE]).to_pylist()
    groups: dict[int, dict[int, list[tuple[int, bool]]]] = {}
    for r in rows:
        eps = groups.setdefault(r[S.GROUP_ID], {})
        eps.setdefault(r[S.EPISODE_ID], []).append((r[S.TURN_INDEX], r[S.IS_LAST_TURN]))
    sizes = {r[S.GROUP_ID]: r[S.GROUP_SIZE] for r in rows}
    for gid, eps in groups.items():
        assert len(eps) == sizes[gid], f"group {gid}: {len(eps)} episodes, group_size {sizes[gid]}"
        for eid, turns in eps.items():
            idx = sorted(t for t, _ in turns)
            assert idx == list(range(len(idx))), f"episode {eid}: turns {idx}"
            assert [t for t, last in turns if last] == [idx[-1]], f"episode {eid}: last-turn flags {turns}"


def group_lags(table: pa.Table, version: int) -> dict[int, int]:
    """Lag of each group's oldest turn at learner version ``version``."""
    out: dict[int, int] = {}
    for g, v in zip(table.column(S.GROUP_ID).to_pylist(), table.column(S.POLICY_VERSION).to_pylist()):
        out[g] = max(out.get(g, 0), version - v)
    return out


def run(coro):
    return asyncio.run(coro)


# -- completeness, exactly once ---------------------------------------------------------------------
def test_only_complete_groups_released_in_completion_order() -> None:
    store = ReplayStore(capacity_rows=100, max_policy_lag=5)
    rows0, rows1 = group_rows(0), group_rows(1)
    store.put(batch(rows1[:3]))  # group 1: episode 100 done, episode 101 turn 0
    store.put(batch([rows0[3], rows0[0]]))  # group 0: turns out of order, no turn 1 of ep 0
    assert store.take(4, 0) is None
    store.put(batch([rows0[2]]))  # group 0 episode 1 turn 0; episode 0 still lacks turn 1
    assert store.take(4, 0) is None and store.n_ready == 0
    store.put(batch([rows1[3]]))  # group 1 complete first
    store.put(batch([rows0[1]]))  # then group 0
    t = store.take(4, 0)
    assert_complete_groups(t)
    assert t.column(S.GROUP_ID).to_pylist()[:4] == [1, 1, 1, 1] and len(t) == 8
    assert t.schema.equals(S.TRANSITION_SCHEMA)


def test_duplicates_and_late_rows_are_counted_not_stored() -> None:
    q = ReplayQueue(capacity_rows=100, max_policy_lag=5)
    b = batch(group_rows(3))

    async def go():
        assert await q.put(b) == 4
        assert await q.put(b) == 0  # a producer retry
        assert keys(await q.get(1, 0)) == keys(pa.Table.from_batches([b]))
        assert await q.put(b) == 0  # late: group 3 was released
        assert await q.get(1, 0) is None
        return await q.stats()

    st = run(go())
    assert st[M.QUEUE_DROPPED_DUPLICATE] == 4 and st[M.QUEUE_DROPPED_LATE] == 4
    assert st[M.QUEUE_PUT_ROWS] == 4 and st[M.QUEUE_GET_ROWS] == 4 and st[M.QUEUE_ROWS] == 0


def test_schema_mismatch_rejected_with_clear_error() -> None:
    q = ReplayQueue()
    b = batch(group_rows(0))
    wrong_type = b.set_column(b.schema.get_field_index(S.POLICY_VERSION), S.POLICY_VERSION,
                              b.column(S.POLICY_VERSION).cast(pa.int32()))
    with pytest.raises(TypeError, match=r"'policy_version' has type int32, expected int64"):
        run(q.put(wrong_type))
    with pytest.raises(TypeError, match=r"missing columns \['group_size'\]"):
        run(q.put(b.drop_columns([S.GROUP_SIZE])))
    with pytest.raises(TypeError, match=r"unexpected columns \['extra'\]"):
        run(q.put(b.append_column("extra", pa.array([1] * len(b)))))
    with pytest.raises(TypeError, match="RecordBatch or Table"):
        run(q.put(group_rows(0)))
    reordered = b.select(list(reversed(b.schema.names)))
    assert run(q.put(reordered)) == 4  # same columns in another order are fine
    assert run(q.stats())[M.QUEUE_ROWS] == 4


@pytest.mark.parametrize("rows, message", [
    ([turn_row(0, 0, 0, last=False, size=2), turn_row(0, 1, 0, last=True, size=3)], "disagree on group_size"),
    ([turn_row(0, 0, 0, last=True), turn_row(0, 0, 1, last=True)], "turn 1 arrived after its last turn 0"),
    ([turn_row(0, 0, 2, last=False), turn_row(0, 0, 1, last=True)], "last turn 1 but turn 2 is held"),
    ([turn_row(0, j, 0, last=True, size=2) for j in range(3)], "3 distinct episodes but group_size is 2"),
    ([turn_row(0, 0, 0, last=True, size=0)], "group_size=0"),
    ([turn_row(0, 0, -1, last=True)], "turn_index outside 0..4095"),
    ([turn_row(0, 5, 0, last=False), turn_row(1, 5, 1, last=True)],
     "episode 5 arrived in group 1; it belongs to group 0"),
])
def test_inconsistent_rows_rejected_and_nothing_stored(rows: list[dict], message: str) -> None:
    store = ReplayStore()
    store.put(batch([turn_row(9, 900, 0, last=False)]))
    with pytest.raises(ValueError, match=message):
        store.put(batch(rows + [turn_row(9, 900, 1, last=True)]))
    assert store.rows == 1 and store.n_ready == 0  # the valid group-9 row of the same batch was not stored


def test_group_size_conflict_with_held_group_rejected() -> None:
    store = ReplayStore()
    store.put(batch([turn_row(0, 0, 0, last=True, size=2)]))
    with pytest.raises(ValueError, match="group_size 3 but the queue holds it with 2"):
        store.put(batch([turn_row(0, 1, 0, last=True, size=3)]))


# -- staleness ----------------------------------------------------------------------------------
def test_drop_mode_drops_and_counts_stale_groups() -> None:
    q = ReplayQueue(max_policy_lag=1)

    async def go():
        await q.put(batch(group_rows(0, version=0)))
        await q.put(batch(group_rows(1, version=1)))
        await q.put(batch(group_rows(2, version=2)[:3]))  # incomplete, fresh
        await q.put(batch([turn_row(3, 300, 0, last=False, version=0)]))  # incomplete, will be stale
        t = await q.get(8, 2)  # group 0 lags 2 > 1: dropped; group 1 lags 1: kept
        assert t.column(S.GROUP_ID).unique().to_pylist() == [1]
        assert STALENESS_WEIGHT not in t.schema.names
        assert await q.put(batch([turn_row(3, 300, 1, last=True, version=2)])) == 0  # group 3 was evicted
        return await q.stats()

    st = run(go())
    assert st[M.QUEUE_DROPPED_STALE] == 2 and st[M.QUEUE_DROPPED_STALE_ROWS] == 5
    assert st[M.QUEUE_DROPPED_LATE] == 1
    assert st[M.POLICY_LAG_MAX] == 1 and st[M.POLICY_LAG_MEAN] == 1 and st[M.POLICY_LAG_RELEASED_MAX] == 1
    assert st[M.QUEUE_ROWS] == 3 and st[M.QUEUE_GROUPS_IN_FLIGHT] == 1


def test_reweight_mode_keeps_stale_groups_with_a_weight() -> None:
    store = ReplayStore(max_policy_lag=1, stale_mode="reweight", stale_decay=0.5)
    for gid, version in [(0, 5), (1, 2), (2, 0)]:
        rows = group_rows(gid, version=version)
        rows[-1] = {**rows[-1], S.POLICY_VERSION: version + 1}  # the oldest turn sets the group's lag
        store.put(batch(rows))
    t = store.take(3, 5)
    # lags 0, 3, 5 -> weights 1, 0.5 ** (3 - 1), 0.5 ** (5 - 1)
    w = {g: x for g, x in zip(t.column(S.GROUP_ID).to_pylist(), t.column(STALENESS_WEIGHT).to_pylist())}
    assert w == {0: 1.0, 1: 0.25, 2: 0.0625}
    assert store.reweighted_stale_groups == 2 and store.dropped_stale_groups == 0 and store.released_lag_max == 5


# -- backpressure -------------------------------------------------------------------------------
def test_backpressure_blocks_rather_than_drops() -> None:
    q = ReplayQueue(capacity_rows=8, max_policy_lag=5)

    async def go():
        assert await q.put(batch(group_rows(0) + group_rows(1))) == 8  # full
        second = asyncio.ensure_future(q.put(batch(group_rows(2))))
        third = asyncio.ensure_future(q.put(batch(group_rows(3))))
        await asyncio.sleep(0.05)
        assert not second.done() and not third.done()  # blocked, not dropped
        assert (await q.get(1, 0)).column(S.GROUP_ID).unique().to_pylist() == [0]
        assert await second == 4  # first in line gets the room
        assert not third.done()
        await q.get(1, 0)
        assert await third == 4
        return keys(await q.get(8, 0)), await q.stats()

    got, st = run(go())
    assert sorted(got) == sorted(keys(pa.Table.from_batches([batch(group_rows(2) + group_rows(3))])))
    assert st[M.QUEUE_PRODUCER_BLOCKED] == 2 and st[M.QUEUE_PRODUCER_WAIT] > 0
    assert st[M.QUEUE_PUT_ROWS] == st[M.QUEUE_GET_ROWS] == 16 and st[M.QUEUE_DROPPED_LATE] == 0


def test_rows_continuing_a_held_group_enter_over_capacity() -> None:
    q = ReplayQueue(capacity_rows=4, max_policy_lag=5)
    rows = group_rows(0, size=2, turns=3)  # 6 rows, streamed turn by turn: more than the capacity

    async def go():
        stored = 0
        for k in range(3):
            stored += await q.put(batch([r for r in rows if r[S.TURN_INDEX] == k]), timeout=1.0)
        return stored, await q.get(1, 0)

    stored, t = run(go())
    assert stored == 6 and len(t) == 6


def test_new_groups_enter_over_capacity_while_no_complete_group_waits() -> None:
    q = ReplayQueue(capacity_rows=4, max_policy_lag=5)
    in_flight = [turn_row(g, g * 10 + j, 0, last=False) for g in (0, 1) for j in (0, 1)]  # 4 rows, none complete

    async def go():
        await q.put(batch(in_flight))
        # Waiting here could never end: the learner has nothing to take, and a blocked producer
        # also stops the episodes it is running. So it enters over capacity...
        assert await q.put(batch(group_rows(2)), timeout=0.05) == 4
        # ...but once a complete group waits for the learner, new groups wait for room.
        with pytest.raises(QueueFull):
            await q.put(batch(group_rows(3)), timeout=0.05)
        return await q.stats()

    st = run(go())
    assert st[M.QUEUE_ROWS] == 8 and st[M.QUEUE_PRODUCER_BLOCKED] == 1


def test_put_timeout_raises_stores_only_continuing_rows_and_retry_is_safe() -> None:
    q = ReplayQueue(capacity_rows=6, max_policy_lag=5)
    mixed = batch(group_rows(2) + [turn_row(1, 100, 1, last=True)])  # new group 2 + the end of episode 100

    async def go():
        await q.put(batch(group_rows(0)))
        await q.put(batch([turn_row(1, 100, 0, last=False)]))  # 5 rows: no room for 4 more
        with pytest.raises(QueueFull, match=r"new groups \[2\].*NOT stored \(1 rows continuing"):
            await q.put(mixed, timeout=0.05)
        assert (await q.stats())[M.QUEUE_ROWS] == 6
        await q.get(1, 0)  # group 0 leaves
        assert await q.put(mixed, timeout=1.0) == 4  # the retry stores group 2; the repeat is dropped
        return await q.stats()

    st = run(go())
    assert st[M.QUEUE_DROPPED_DUPLICATE] == 1 and st[M.QUEUE_ROWS] == 6


def test_capacity_in_bytes_and_puts_that_can_never_fit() -> None:
    one = batch(group_rows(0))
    q = ReplayQueue(capacity_rows=1000, capacity_bytes=int(one.nbytes * 1.5), max_policy_lag=5)

    async def go():
        await q.put(one)
        with pytest.raises(QueueFull):
            await q.put(batch(group_rows(1)), timeout=0.05)
        with pytest.raises(ValueError, match="capacity_bytes"):
            await q.put(batch(group_rows(2) + group_rows(3) + group_rows(4)))
        await q.get(1, 0)
        return await q.put(batch(group_rows(1)), timeout=1.0)

    assert run(go()) == 4
    with pytest.raises(ValueError, match="capacity_rows is 3"):
        run(ReplayQueue(capacity_rows=3).put(batch(group_rows(0))))


# -- blocking get ------------------------------------------------------------------------------
def test_get_waits_for_enough_fresh_groups_or_timeout() -> None:
    q = ReplayQueue(max_policy_lag=1)

    async def go():
        assert await q.get(2, 5, timeout=0.02) is None
        waiter = asyncio.ensure_future(q.get(2, 5, timeout=math.inf))
        await q.put(batch(group_rows(0, version=5)))
        await q.put(batch(group_rows(1, version=0)))  # stale at version 5: dropped, does not count
        await asyncio.sleep(0.02)
        assert not waiter.done()
        await q.put(batch(group_rows(2, version=4)))
        assert sorted(set((await waiter).column(S.GROUP_ID).to_pylist())) == [0, 2]
        await q.put(batch(group_rows(3, version=5)))
        partial = await q.get(2, 5, timeout=0.02)  # timeout: what is there
        assert set(partial.column(S.GROUP_ID).to_pylist()) == {3}
        early = asyncio.ensure_future(q.get(4, 5, timeout=math.inf, min_groups=1))
        await q.put(batch(group_rows(4, version=5)))
        assert set((await early).column(S.GROUP_ID).to_pylist()) == {4}
        return await q.stats()

    st = run(go())
    assert st[M.QUEUE_DROPPED_STALE] == 1 and st[M.POLICY_LAG_RELEASED_MAX] == 1
    assert st[M.QUEUE_LEARNER_WAIT] > 0 and 0 < st[M.QUEUE_LEARNER_IDLE] <= 1
    assert st[M.QUEUE_GET_GROUPS] == 4


def test_get_without_partial_takes_all_or_nothing() -> None:
    q = ReplayQueue(max_policy_lag=1)

    async def go():
        await q.put(batch(group_rows(0, version=3)))
        await q.put(batch(group_rows(1, version=1)))  # stale at version 3: dropped, does not count
        assert await q.get(2, 3, timeout=0.02, min_groups=2, partial=False) is None
        assert await q.num_complete() == 1  # nothing was taken
        assert await q.held([0, 1, 2]) == [0]  # group 1 was dropped as stale, group 2 never arrived
        await q.put(batch(group_rows(2, version=3)))
        return await q.get(2, 3, timeout=0.02, min_groups=2, partial=False)

    assert sorted(set(run(go()).column(S.GROUP_ID).to_pylist())) == [0, 2]


# -- spill, snapshot, metrics --------------------------------------------------------------------
def _mixed_batches(seed: int, n_groups: int = 6, size: int = 3) -> list[pa.RecordBatch]:
    """Turns of several groups, interleaved the way a rollout worker streams them."""
    rng = np.random.default_rng(seed)
    rows = [turn_row(g, g * 100 + j, k, last=k == n - 1, version=int(rng.integers(0, 3)), size=size, ntok=20)
            for g in range(n_groups) for j in range(size) for n in [int(rng.integers(1, 4))] for k in range(n)]
    rows.sort(key=lambda r: (r[S.TURN_INDEX], rng.random()))
    cuts = sorted(set(rng.integers(1, len(rows), 6).tolist()))
    return [batch(rows[a:b]) for a, b in zip([0] + cuts, cuts + [len(rows)])]


@pytest.mark.parametrize("memory_bytes", [0, 3000])
def test_spill_and_reload_give_identical_tables(tmp_path: Path, memory_bytes: int) -> None:
    plain = ReplayStore(max_policy_lag=9)
    spilled = ReplayStore(max_policy_lag=9, memory_bytes=memory_bytes, spill_dir=tmp_path)
    for b in _mixed_batches(1):
        plain.put(b)
        spilled.put(b)
        assert spilled.mem_bytes <= memory_bytes
    assert spilled.disk_bytes > 0 and any(tmp_path.iterdir())
    assert spilled.held_bytes == plain.held_bytes and spilled.rows == plain.rows
    while (a := plain.take(2, 2)) is not None:
        assert a.equals(spilled.take(2, 2))
    assert spilled.take(2, 2) is None and spilled.disk_bytes == 0
    assert not any(tmp_path.iterdir())  # reloaded files are removed


def test_snapshot_restore_keeps_contents_order_counters_and_versions(tmp_path: Path) -> None:
    def fresh() -> ReplayStore:
        return ReplayStore(capacity_rows=1000, max_policy_lag=2, memory_bytes=2000, spill_dir=tmp_path / "spill")

    src = fresh()
    for b in _mixed_batches(2) + [batch([turn_row(50, 5000, 0, last=False, version=3)])]:
        src.put(b)
    src.put(_mixed_batches(2)[0])  # duplicates, counted
    first = src.take(1, 2)
    state = write_snapshot(src, tmp_path / "snap")
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["rows.arrow", "state.json"]
    assert state["learner_version"] == 2 and state["counters"]["dropped_duplicate_rows"] > 0

    dst = fresh()
    assert load_snapshot(dst, tmp_path / "snap") == src.rows
    for name in ("rows", "n_ready", "n_groups", "put_rows_total", "get_rows_total",
                 "dropped_duplicate_rows", "learner_version"):  # bytes differ by chunking (offsets)
        assert getattr(dst, name) == getattr(src, name), name
    first_gid = first.column(S.GROUP_ID)[0].as_py()
    assert dst.put(batch([turn_row(first_gid, 1, 0, last=True, size=3)])) == 0  # still retired
    while (a := src.take(2, 3)) is not None:
        assert a.equals(dst.take(2, 3))
    assert dst.take(2, 3) is None

    late = fresh()  # after restore, the bound is checked against the version the learner passes then
    load_snapshot(late, tmp_path / "snap")
    assert late.take(100, 6) is None and late.rows == 0  # every held group lags > 2 at version 6
    assert late.dropped_stale_groups == state["counters"]["dropped_stale_groups"] + len(state["groups"])

    with pytest.raises(RuntimeError, match="empty queue"):
        src.put(batch(group_rows(77)))
        load_snapshot(src, tmp_path / "snap")
    state_file = tmp_path / "snap" / "state.json"
    state_file.write_text(state_file.read_text().replace('"rows": ', '"rows": 1'))
    with pytest.raises(ValueError, match="damaged"):
        load_snapshot(fresh(), tmp_path / "snap")


def test_stats_are_declared_metrics() -> None:
    q = ReplayQueue(max_policy_lag=1)

    async def go():
        await q.put(batch(group_rows(0)))
        await q.get(1, 0)
        return await q.stats(), await q.num_complete()

    st, n = run(go())
    assert n == 0
    assert set(st) <= set(M.METRICS), set(st) - set(M.METRICS)
    assert all(isinstance(v, (int, float)) for v in st.values())
    for name in (M.QUEUE_ROWS, M.QUEUE_BYTES, M.QUEUE_GROUPS, M.QUEUE_PUT_RATE, M.QUEUE_GET_RATE,
                 M.POLICY_LAG_MEAN, M.POLICY_LAG_MAX, M.QUEUE_DROPPED_STALE, M.QUEUE_PRODUCER_WAIT,
                 M.QUEUE_LEARNER_WAIT, M.QUEUE_LEARNER_IDLE):
        assert name in st


def test_constructor_rejects_bad_settings() -> None:
    for kwargs, message in [({"capacity_rows": 0}, "capacity_rows"), ({"max_policy_lag": -1}, "max_policy_lag"),
                            ({"stale_mode": "ignore"}, "stale_mode"), ({"stale_decay": 0.0}, "stale_decay"),
                            ({"capacity_bytes": 0}, "capacity_bytes"), ({"memory_bytes": -1}, "memory_bytes")]:
        with pytest.raises(ValueError, match=message):
            ReplayQueue(**kwargs)


def test_arrow_ipc_wire_round_trip_and_copy() -> None:
    from common.replay.wire import (
        batch_from_ipc,
        batch_to_ipc,
        register_arrow_serializers,
        table_from_ipc,
        table_to_ipc,
    )

    b = batch(group_rows(0, size=3, turns=2))
    buf = batch_to_ipc(b)
    back = batch_from_ipc(buf)
    assert back.equals(b)
    assert all(x is None or x.address != y.address  # the queue keeps a copy, not a view of Ray's buffer
               for x, y in zip(back.column(S.ACTION_TOKEN_IDS).buffers(), b.column(S.ACTION_TOKEN_IDS).buffers())
               if x is not None and y is not None)
    t = pa.Table.from_batches([b.slice(1, 2), b.slice(4, 2)])
    assert table_from_ipc(table_to_ipc(t)).equals(t)
    import ray

    if not ray.is_initialized():
        assert register_arrow_serializers() is False


def test_a_snapshot_from_before_the_tree_columns_restores_with_them_derived(tmp_path: Path) -> None:
    """Checkpoints written before node_id / parent_node_id existed (their rows.arrow lacks both) still resume:
    the rows gain a flat episode's values; any other schema difference is still refused."""
    from common.replay.wire import write_ipc_file

    src = ReplayStore(max_policy_lag=9)
    for b in _mixed_batches(3):
        src.put(b)
    write_snapshot(src, tmp_path / "snap")
    rows_file = tmp_path / "snap" / "rows.arrow"
    with pa.OSFile(str(rows_file), "rb") as f:
        reader = pa.ipc.open_file(f)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    old = pa.schema([f for f in S.TRANSITION_SCHEMA if f.name not in (S.NODE_ID, S.PARENT_NODE_ID)])
    write_ipc_file(rows_file, [b.select(old.names) for b in batches], old)  # as an older version wrote it
    dst = ReplayStore(max_policy_lag=9)
    assert load_snapshot(dst, tmp_path / "snap") == src.rows
    while (a := src.take(2, 3)) is not None:
        assert a.equals(dst.take(2, 3))  # node ids derived = the ones flat episodes get
    assert dst.take(2, 3) is None
    other = pa.schema([f for f in old if f.name != S.TURN_REWARD])
    write_ipc_file(rows_file, [b.select(other.names) for b in batches], other)
    with pytest.raises(TypeError, match="schema differs"):
        load_snapshot(ReplayStore(max_policy_lag=9), tmp_path / "snap")
