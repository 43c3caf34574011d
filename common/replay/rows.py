"""Incoming turns: schema check and split by group, before any queue state is looked at."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from common import schema as S

_KEY_COLUMNS = (S.GROUP_ID, S.EPISODE_ID, S.TURN_INDEX, S.POLICY_VERSION, S.IS_LAST_TURN, S.GROUP_SIZE)
MAX_TURN_INDEX = 4095  # turns per episode are few; the queue keeps a bitmask of the turns held per episode


def check_schema(batch: pa.RecordBatch | pa.Table, schema: pa.Schema | None = None) -> pa.RecordBatch:
    """Return ``batch`` as one RecordBatch with exactly ``schema`` (default ``TRANSITION_SCHEMA``, the token
    rows; ``common.schema.tensor_transition_schema`` for tensor agents), or raise TypeError saying why not.

    Columns in another order are reordered and schema metadata is ignored; missing, unexpected
    or mistyped columns are an error.
    """
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks()
        batch = batch.to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], schema=batch.schema)
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"the replay queue takes a pyarrow RecordBatch or Table, got {type(batch).__name__}")
    expected = S.TRANSITION_SCHEMA if schema is None else schema
    if batch.schema.equals(expected):  # the usual case
        return batch
    got = {f.name: f.type for f in batch.schema}
    problems = []
    missing = [n for n in expected.names if n not in got]
    extra = [n for n in got if n not in expected.names]
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(f"unexpected columns {extra}")
    problems += [f"column {f.name!r} has type {got[f.name]}, expected {f.type}"
                 for f in expected if f.name in got and not got[f.name].equals(f.type)]
    if problems:
        raise TypeError(f"batch does not match the queue's schema ({schema_name(expected)}): " + "; ".join(problems))
    return pa.RecordBatch.from_arrays(batch.select(list(expected.names)).columns, schema=expected)


@dataclass
class Put:
    """One producer batch, validated, its rows ordered by group (zero-copy when they already were)."""

    batch: pa.RecordBatch
    group_ids: list[int]  # [n_groups]
    sizes: list[int]  # [n_groups] G of each group
    bounds: list[int]  # [n_groups + 1] rows of group k: bounds[k]:bounds[k + 1]
    episode_ids: list[int]  # [rows]
    turns: list[int]  # [rows]
    last: list[bool]  # [rows]
    versions: np.ndarray  # int64[rows]
    bytes_per_row: float  # Arrow buffer bytes, shared out by rows

    @property
    def rows(self) -> int:
        return self.batch.num_rows

    def rows_of(self, groups: list[int]) -> tuple[int, int]:
        """(rows, bytes) of the groups at positions ``groups``."""
        n = sum(self.bounds[k + 1] - self.bounds[k] for k in groups)
        return n, round(n * self.bytes_per_row)


def schema_name(schema: pa.Schema) -> str:
    return "common.schema.TRANSITION_SCHEMA" if schema.equals(S.TRANSITION_SCHEMA) else "tensor_transition_schema"


def key_index(schema: pa.Schema) -> tuple[int, ...]:
    """Positions in ``schema`` of the columns the queue reads (every transition schema has them)."""
    return tuple(schema.get_field_index(c) for c in _KEY_COLUMNS)


def prepare(batch: pa.RecordBatch | pa.Table, schema: pa.Schema | None = None) -> Put | None:
    """Validate ``batch`` (schema, nulls, group sizes, turn indices) and order it by group; None if empty."""
    batch = check_schema(batch, schema)
    _KEY_INDEX = key_index(batch.schema)
    n = batch.num_rows
    if n == 0:
        return None
    cols = [batch.column(i) for i in _KEY_INDEX]
    nulls = [name for name, c in zip(_KEY_COLUMNS, cols) if c.null_count]
    if nulls:
        raise ValueError(f"batch has nulls in key columns {nulls}")
    gids = cols[0].to_numpy()
    if n > 1 and (np.diff(gids) < 0).any():  # rollout workers send groups in order: rarely taken
        order = np.argsort(gids, kind="stable")
        batch, gids = batch.take(pa.array(order)), gids[order]
        cols = [batch.column(i) for i in _KEY_INDEX]
    turns = cols[2].to_numpy()
    sizes = cols[5].to_numpy()
    bad_turns = (turns < 0) | (turns > MAX_TURN_INDEX)
    if bad_turns.any():
        raise ValueError(f"turn_index outside 0..{MAX_TURN_INDEX} in rows {np.flatnonzero(bad_turns)[:5].tolist()}")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(gids)) + 1])
    group_sizes = sizes[starts]
    bounds = np.append(starts, n)
    bad = np.flatnonzero(sizes != np.repeat(group_sizes, np.diff(bounds)))
    if len(bad):
        gid = int(gids[bad[0]])
        raise ValueError(f"group {gid}: rows disagree on group_size ({sorted(set(sizes[gids == gid].tolist()))})")
    if (group_sizes < 1).any():
        raise ValueError(f"group {int(gids[starts[group_sizes < 1][0]])}: group_size="
                         f"{int(group_sizes[group_sizes < 1][0])} must be >= 1")
    return Put(batch, gids[starts].tolist(), group_sizes.tolist(), bounds.tolist(), cols[1].to_numpy().tolist(),
               turns.tolist(), cols[4].to_numpy(zero_copy_only=False).tolist(), cols[3].to_numpy(),
               batch.get_total_buffer_size() / n)
