"""Arrow-backed replay queue of per-turn transitions.

Producers put RecordBatches of finished turns (schema in ``common.schema``). The
queue tracks, per group, how many of its G episodes have finished (their last
turn arrived) and hands the learner only *complete* groups, as one Arrow table,
oldest-completed first. Groups whose oldest turn lags the learner's policy by
more than ``max_policy_lag`` versions are dropped and counted, never trained on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from common import schema as S

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Raised to a producer when a put would exceed the queue's capacity."""


@dataclass
class _Group:
    batches: list[pa.RecordBatch] = field(default_factory=list)
    finished: int = 0
    size: int = 0
    rows: int = 0
    nbytes: int = 0
    min_version: int = 2**62


class ReplayQueue:
    """Plain class; the driver wraps it with ``ray.remote``."""

    def __init__(self, capacity_rows: int = 100_000, max_policy_lag: int = 1):
        self.capacity_rows = capacity_rows
        self.max_policy_lag = max_policy_lag
        self._groups: OrderedDict[int, _Group] = OrderedDict()
        self._complete: list[int] = []  # group ids in order of completion
        self.rows = 0
        self.nbytes = 0
        self.put_rows_total = 0
        self.get_rows_total = 0
        self.dropped_stale_groups = 0
        self.last_lag_mean = 0.0
        self.last_lag_max = 0

    def put(self, batch: pa.RecordBatch) -> int:
        """Store the turns of ``batch``; return the number of rows stored."""
        if not batch.schema.equals(S.TRANSITION_SCHEMA):
            raise TypeError(f"batch schema does not match the transition schema:\n{batch.schema}")
        if self.rows + batch.num_rows > self.capacity_rows:
            raise QueueFull(f"replay queue holds {self.rows} rows; capacity is {self.capacity_rows}")
        gids = batch.column(S.GROUP_ID)
        for gid in pc.unique(gids).to_pylist():
            part = batch.filter(pc.equal(gids, gid))
            g = self._groups.setdefault(gid, _Group())
            g.batches.append(part)
            g.size = int(part.column(S.GROUP_SIZE)[0].as_py())
            g.finished += int(pc.sum(part.column(S.IS_LAST_TURN).cast(pa.int64())).as_py() or 0)
            g.rows += part.num_rows
            g.nbytes += part.nbytes
            g.min_version = min(g.min_version, int(pc.min(part.column(S.POLICY_VERSION)).as_py()))
            if g.finished >= g.size and gid not in self._complete:
                self._complete.append(gid)
        self.rows += batch.num_rows
        self.nbytes += batch.nbytes
        self.put_rows_total += batch.num_rows
        return batch.num_rows

    def get(self, max_groups: int, current_version: int) -> pa.Table | None:
        """Pop up to ``max_groups`` complete, fresh-enough groups as one table (None if none)."""
        taken: list[_Group] = []
        while self._complete and len(taken) < max_groups:
            gid = self._complete.pop(0)
            g = self._groups.pop(gid)
            self.rows -= g.rows
            self.nbytes -= g.nbytes
            if current_version - g.min_version > self.max_policy_lag:
                self.dropped_stale_groups += 1
                continue
            taken.append(g)
        if not taken:
            return None
        table = pa.Table.from_batches([b for g in taken for b in g.batches], schema=S.TRANSITION_SCHEMA)
        lags = pc.subtract(pa.scalar(current_version, pa.int64()), table.column(S.POLICY_VERSION))
        self.last_lag_mean = float(pc.mean(lags).as_py())
        self.last_lag_max = int(pc.max(lags).as_py())
        self.get_rows_total += table.num_rows
        return table

    def num_complete(self) -> int:
        return len(self._complete)

    def stats(self) -> dict[str, float]:
        from common import metrics as M

        return {
            M.QUEUE_ROWS: self.rows,
            M.QUEUE_BYTES: self.nbytes,
            M.QUEUE_GROUPS: len(self._complete),
            M.QUEUE_PUT_ROWS: self.put_rows_total,
            M.QUEUE_GET_ROWS: self.get_rows_total,
            M.QUEUE_DROPPED_STALE: self.dropped_stale_groups,
            M.POLICY_LAG_MEAN: self.last_lag_mean,
            M.POLICY_LAG_MAX: self.last_lag_max,
        }
