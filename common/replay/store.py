"""The replay queue's bookkeeping: per-turn Arrow rows, complete groups, staleness, spill, snapshots.

``ReplayStore`` is synchronous and never waits; ``common.replay.actor.ReplayQueue`` wraps it
in an asyncio Ray actor that adds backpressure and blocking gets. Everything that changes
state happens inside one synchronous call, so the actor's event loop sees it atomically.

Rows are the per-turn transitions of ``common.schema``. A *group* is the G episodes sampled
from one prompt (``group_id``, ``group_size`` = G). An episode is complete when its last
turn (``is_last_turn``) has arrived together with every earlier turn (turn indices
``0..last`` all held); a group is complete when G distinct episodes are complete. Only
complete groups are released, oldest completion first, each exactly once: rows repeating
an (episode, turn) already held are dropped as duplicates, rows of a group already
released, dropped or aborted are dropped as late, and both are counted.

Staleness. The lag of a group at a ``take(..., current_version)`` is
``current_version - min(policy_version of its turns)``, i.e. the lag of its oldest turn.
With ``stale_mode="drop"`` a group whose lag exceeds ``max_policy_lag`` is dropped and
counted, never released; this is checked against the version the learner passes at take
time and the versions stored in the rows, so it holds across pauses, producer restarts and
restores from a snapshot. With ``stale_mode="reweight"`` such groups are released with a
``staleness_weight`` column ``stale_decay ** (lag - max_policy_lag)`` (1.0 for groups
within the bound) that the loss can multiply into the group's per-token weights; it is a
down-weighting of stale data, not an importance ratio (the learner's PPO ratio against the
stored behaviour log-probs already corrects the off-policyness per token).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from common import schema as S
from common.replay.rows import Put, prepare
from common.replay.wire import read_ipc_file, write_ipc_file

log = logging.getLogger(__name__)

STALENESS_WEIGHT = S.STALENESS_WEIGHT  # float32, only in tables released in "reweight" mode
STALE_MODES = ("drop", "reweight")
COUNTERS = ("put_rows_total", "get_rows_total", "get_groups_total", "dropped_stale_groups",
             "dropped_stale_rows", "reweighted_stale_groups", "dropped_duplicate_rows", "dropped_late_rows",
             "aborted_groups", "aborted_rows", "spilled_bytes_total", "released_lag_max")


class QueueFull(RuntimeError):
    """A put waited longer than its timeout for room in the queue (see the message for what was stored)."""


@dataclass
class _SpillFile:
    path: Path
    rows: int
    nbytes: int


@dataclass
class _Group:
    group_id: int
    size: int  # G
    episodes: list[int] = field(default_factory=list)  # episode ids, first-arrival order
    complete_episodes: int = 0
    chunks: list[pa.RecordBatch] = field(default_factory=list)  # in memory, arrival order, after `files`
    files: list[_SpillFile] = field(default_factory=list)  # spilled, arrival order
    rows: int = 0
    mem_bytes: int = 0
    min_version: int = 2**62
    complete: bool = False


def _episode_complete(state: list[int] | None) -> bool:
    """``state`` = [group id, bitmask of turns held, last turn or -1]: every turn 0..last is held."""
    return state is not None and state[2] >= 0 and state[1] == (1 << (state[2] + 1)) - 1


def queue_setting_errors(*, capacity_rows: int, max_policy_lag: int, capacity_bytes: int | None, stale_mode: str,
                         stale_decay: float, memory_bytes: int | None, put_timeout_s: float | None = None,
                         **_other) -> list[tuple[str, object, str]]:
    """The rules of the queue's settings, once: ``(field, value, rule)`` for each one broken.

    ``ReplayStore`` raises on the first; the ``queue:`` config section reports it as a ``ConfigError``
    naming ``queue.<field>``.
    """
    rules = [
        ("capacity_rows", capacity_rows, capacity_rows >= 1, "must be >= 1"),
        ("max_policy_lag", max_policy_lag, max_policy_lag >= 0, "must be >= 0"),
        ("capacity_bytes", capacity_bytes, capacity_bytes is None or capacity_bytes >= 1, "must be >= 1 or null"),
        ("stale_mode", stale_mode, stale_mode in STALE_MODES, f"must be one of {list(STALE_MODES)}"),
        ("stale_decay", stale_decay, 0.0 < stale_decay <= 1.0, "must be in (0, 1]"),
        ("memory_bytes", memory_bytes, memory_bytes is None or memory_bytes >= 0, "must be >= 0 or null"),
        ("put_timeout_s", put_timeout_s, put_timeout_s is None or put_timeout_s > 0, "must be > 0 or null"),
    ]
    return [(name, value, rule) for name, value, ok, rule in rules if not ok]


class ReplayStore:
    """Synchronous replay store; see the module docstring for the rules.

    Args:
        capacity_rows: rows (turns) admitted for new groups; see ``may_admit``.
        max_policy_lag: largest group lag released as is.
        capacity_bytes: bytes (memory + spilled) admitted for new groups; None = no byte limit.
        stale_mode: "drop" or "reweight" (see module docstring).
        stale_decay: base of the staleness weight in "reweight" mode, in (0, 1].
        memory_bytes: in-memory budget; past it, cold groups are spilled to Arrow IPC files. None = never spill.
        spill_dir: where spill files go (a private temporary directory if None).
        schema: the rows' Arrow schema (default ``common.schema.TRANSITION_SCHEMA``).
    """

    def __init__(self, capacity_rows: int = 100_000, max_policy_lag: int = 1, *, capacity_bytes: int | None = None,
                 stale_mode: str = "drop", stale_decay: float = 0.5, memory_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None, schema: pa.Schema | None = None):
        for name, value, rule in queue_setting_errors(
                capacity_rows=capacity_rows, max_policy_lag=max_policy_lag, capacity_bytes=capacity_bytes,
                stale_mode=stale_mode, stale_decay=stale_decay, memory_bytes=memory_bytes)[:1]:
            raise ValueError(f"{name}={value!r}: {rule}")
        self.schema = S.TRANSITION_SCHEMA if schema is None else schema  # the rows' schema (token or tensor rows)
        self.capacity_rows = capacity_rows
        self.capacity_bytes = capacity_bytes
        self.max_policy_lag = max_policy_lag
        self.stale_mode = stale_mode
        self.stale_decay = stale_decay
        self.memory_bytes = memory_bytes
        self._spill_dir_arg = spill_dir
        self._spill_dir: Path | None = None
        self._spill_prefix = uuid.uuid4().hex[:12]
        self._spill_seq = 0
        self._groups: dict[int, _Group] = {}  # held groups, arrival order
        self._ready: deque[int] = deque()  # complete group ids, completion order (may hold evicted ids)
        self.n_ready = 0
        self._retired: set[int] = set()  # released, dropped or aborted group ids: later rows are late
        self._eps: dict[int, list[int]] = {}  # held episode id -> [group id, turn bitmask, last turn or -1]
        self.rows = 0
        self.mem_bytes = 0
        self.disk_bytes = 0
        self.learner_version: int | None = None  # last version passed to take()
        self.last_lag_mean = 0.0
        self.last_lag_max = 0
        for name in COUNTERS:
            setattr(self, name, 0)

    # -- put --------------------------------------------------------------------------------
    def put(self, batch: pa.RecordBatch | pa.Table) -> int:
        """Validate and store ``batch`` (no capacity check: that is the actor's job); return rows stored."""
        return self.commit(prepare(batch, self.schema))

    def new_groups(self, put: Put) -> list[int]:
        """Positions in ``put`` of groups it would open (neither held nor retired): capacity applies to these."""
        return [k for k, g in enumerate(put.group_ids) if g not in self._groups and g not in self._retired]

    def fits_ever(self, rows: int, nbytes: int) -> None:
        """Raise ValueError if ``rows``/``nbytes`` of new groups could never be admitted, even into an empty queue."""
        if rows > self.capacity_rows:
            raise ValueError(f"a put opens groups with {rows} rows; capacity_rows is {self.capacity_rows}: "
                             "put smaller batches or raise the capacity")
        if self.capacity_bytes is not None and nbytes > self.capacity_bytes:
            raise ValueError(f"a put opens groups with {nbytes} bytes; capacity_bytes is {self.capacity_bytes}: "
                             "put smaller batches or raise the capacity")

    def has_room(self, rows: int, nbytes: int) -> bool:
        """Whether ``rows``/``nbytes`` of new groups fit under the capacity."""
        if self.rows + rows > self.capacity_rows:
            return False
        return self.capacity_bytes is None or self.held_bytes + nbytes <= self.capacity_bytes

    def may_admit(self, rows: int, nbytes: int) -> bool:
        """Whether rows opening new groups may enter now.

        Capacity gates the admission of *new* groups, and only while a complete group is waiting:
        then the learner can make room by taking it, so producers wait. When no complete group is
        waiting, only producers can make progress (a producer blocked on a put also stops the other
        episodes it is running), so waiting could never end: the rows enter even over capacity.
        Rows continuing a group already held always enter (``put`` commits them first). The queue
        can thus exceed its capacity by the groups producers have in flight, which their own
        concurrency bounds; what backpressure bounds is the data waiting for the learner.
        """
        return self.has_room(rows, nbytes) or self.n_ready == 0

    def commit(self, put: Put | None, groups: list[int] | None = None) -> int:
        """Store the rows of ``put`` (of the groups at positions ``groups`` only, if given); return rows stored.

        All or nothing: on a ValueError (inconsistent with what is held) nothing changes. Rows
        repeating an (episode, turn) already held are dropped as duplicates, rows of retired
        groups as late; both are counted.
        """
        if put is None:
            return 0
        plan, keep, late = self._plan(put, range(len(put.group_ids)) if groups is None else groups)
        return self._apply(put, plan, keep, late)

    def validate(self, put: Put) -> None:
        """Raise ValueError if ``commit(put)`` would, without changing anything."""
        self._plan(put, range(len(put.group_ids)))

    def _plan(self, put: Put, groups: Iterable[int]) -> tuple[dict[int, list[int]], list[tuple[int, list[bool]]],
                                                              int]:
        """Episode states after ``put``, the rows to keep per group position, and the late-row count."""
        plan: dict[int, list[int]] = {}  # episode id -> [group id, turn bitmask, last turn]
        keep: list[tuple[int, list[bool]]] = []
        late = 0
        eids, turns, lasts, bounds = put.episode_ids, put.turns, put.last, put.bounds
        for k in groups:
            gid, size, a, b = put.group_ids[k], put.sizes[k], bounds[k], bounds[k + 1]
            if gid in self._retired:
                late += b - a
                continue
            g = self._groups.get(gid)
            if g is not None and g.size != size:
                raise ValueError(f"group {gid}: group_size {size} but the queue holds it with {g.size}")
            n_eps = len(g.episodes) if g is not None else 0
            kept = [True] * (b - a)
            for i in range(a, b):
                eid, turn = eids[i], turns[i]
                st = plan.get(eid)
                if st is None:
                    old = self._eps.get(eid)
                    if old is None:
                        st, n_eps = [gid, 0, -1], n_eps + 1
                    else:
                        st = list(old)
                    plan[eid] = st
                if st[0] != gid:
                    raise ValueError(f"episode {eid} arrived in group {gid}; it belongs to group {st[0]}")
                bit = 1 << turn
                if st[1] & bit:
                    kept[i - a] = False
                    continue
                if 0 <= st[2] < turn:
                    raise ValueError(f"episode {eid}: turn {turn} arrived after its last turn {st[2]}")
                if lasts[i]:
                    if st[1] >> (turn + 1):
                        raise ValueError(f"episode {eid}: last turn {turn} but turn {st[1].bit_length() - 1} is held")
                    st[2] = turn
                st[1] |= bit
            if n_eps > size:
                raise ValueError(f"group {gid}: {n_eps} distinct episodes but group_size is {size}")
            keep.append((k, kept))
        return plan, keep, late

    def _apply(self, put: Put, plan: dict[int, list[int]], keep: list[tuple[int, list[bool]]], late: int) -> int:
        stored = dups = 0
        touched = []
        for k, kept in keep:
            gid, a, b = put.group_ids[k], put.bounds[k], put.bounds[k + 1]
            chunk, versions = put.batch.slice(a, b - a), put.versions[a:b]
            n_keep = sum(kept)
            if n_keep < b - a:
                dups += b - a - n_keep
                if n_keep == 0:
                    continue
                mask = np.array(kept)
                chunk, versions = chunk.filter(pa.array(mask)), versions[mask]
            g = self._groups.get(gid)
            if g is None:
                g = self._groups[gid] = _Group(gid, put.sizes[k])
            nbytes = round(n_keep * put.bytes_per_row)
            g.chunks.append(chunk)
            g.rows += n_keep
            g.mem_bytes += nbytes
            g.min_version = min(g.min_version, int(versions.min()))
            self.rows += n_keep
            self.mem_bytes += nbytes
            stored += n_keep
            touched.append(g)
        for eid, st in plan.items():
            old = self._eps.get(eid)
            if old is None:
                g = self._groups.get(st[0])
                if g is None:  # every row of a new episode was a duplicate of itself: nothing held
                    continue
                g.episodes.append(eid)
            self._eps[eid] = st
            if _episode_complete(st) and not _episode_complete(old):
                self._groups[st[0]].complete_episodes += 1
        for g in touched:
            if not g.complete and g.complete_episodes == g.size:
                g.complete = True
                self._ready.append(g.group_id)
                self.n_ready += 1
        self.put_rows_total += stored
        self.dropped_duplicate_rows += dups
        self.dropped_late_rows += late
        if dups or late:
            log.warning("put: dropped %d rows repeating turns already held and %d rows of groups already released, "
                        "dropped or aborted", dups, late)
        if self.stale_mode == "drop" and self.learner_version is not None:
            self._evict_stale(self.learner_version, [g.group_id for g in touched])
        self._maybe_spill()
        return stored

    # -- get --------------------------------------------------------------------------------
    def observe_version(self, current_version: int) -> int:
        """Note the learner's version; in "drop" mode drop every held group already past the bound."""
        self.learner_version = int(current_version)
        if self.stale_mode != "drop":
            return 0
        return self._evict_stale(self.learner_version, list(self._groups))

    def _evict_stale(self, version: int, gids: Iterable[int]) -> int:
        limit = version - self.max_policy_lag
        victims = [g for g in (self._groups.get(i) for i in gids) if g is not None and g.min_version < limit]
        for g in victims:
            self.dropped_stale_groups += 1
            self.dropped_stale_rows += g.rows
            self._discard(g)
        return len(victims)

    def take(self, max_groups: int, current_version: int) -> pa.Table | None:
        """Pop up to ``max_groups`` complete groups, within the lag bound ("drop") or weighted ("reweight")."""
        if max_groups < 1:
            raise ValueError(f"max_groups={max_groups}: must be >= 1")
        self.observe_version(current_version)
        taken: list[_Group] = []
        while self._ready and len(taken) < max_groups:
            g = self._groups.get(self._ready.popleft())
            if g is not None and g.complete:  # ids of evicted groups are skipped here
                taken.append(g)
        if not taken:
            return None
        batches = [b for g in taken for b in self._group_batches(g)]
        group_lags = np.array([current_version - g.min_version for g in taken], dtype=np.int64)
        group_rows = np.array([g.rows for g in taken], dtype=np.int64)
        for g in taken:
            self._discard(g)
        table = pa.Table.from_batches(batches, schema=self.schema).combine_chunks()
        lags = current_version - table.column(S.POLICY_VERSION).to_numpy()
        self.last_lag_mean = float(lags.mean())
        self.last_lag_max = int(lags.max())
        self.released_lag_max = max(self.released_lag_max, int(group_lags.max()))
        if self.stale_mode == "reweight":
            excess = np.maximum(group_lags - self.max_policy_lag, 0)
            self.reweighted_stale_groups += int((excess > 0).sum())
            weights = np.repeat(self.stale_decay ** excess.astype(np.float64), group_rows).astype(np.float32)
            table = table.append_column(pa.field(STALENESS_WEIGHT, pa.float32()), pa.array(weights))
        self.get_rows_total += table.num_rows
        self.get_groups_total += len(taken)
        return table

    def abort_groups(self, group_ids: Iterable[int] | None = None) -> int:
        """Drop held groups (all *incomplete* ones if ``group_ids`` is None); return the rows dropped.

        Their ids are retired: rows a stale producer still sends for them are dropped as late.
        """
        if group_ids is None:
            victims = [g for g in self._groups.values() if not g.complete]
        else:
            ids = set(int(i) for i in group_ids)
            victims = [g for g in self._groups.values() if g.group_id in ids]
            self._retired.update(ids)
        rows = sum(g.rows for g in victims)
        for g in victims:
            self._discard(g)
        self.aborted_groups += len(victims)
        self.aborted_rows += rows
        return rows

    def _discard(self, g: _Group) -> None:
        del self._groups[g.group_id]
        self._retired.add(g.group_id)
        for eid in g.episodes:
            del self._eps[eid]
        if g.complete:
            self.n_ready -= 1
        self.rows -= g.rows
        self.mem_bytes -= g.mem_bytes
        for f in g.files:
            self.disk_bytes -= f.nbytes
            f.path.unlink(missing_ok=True)

    @property
    def n_groups(self) -> int:
        """Groups held, complete or not."""
        return len(self._groups)

    def held(self, group_ids: Iterable[int]) -> list[int]:
        """Those of ``group_ids`` held now, complete or not (not yet released, dropped or aborted)."""
        return [int(g) for g in group_ids if int(g) in self._groups]

    # -- spill ------------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        return self.mem_bytes + self.disk_bytes

    def _maybe_spill(self) -> None:
        """Past the memory budget, write cold groups to Arrow IPC files.

        Cold = what the learner will want last: incomplete groups oldest first (stragglers),
        then complete groups in reverse release order. Complete groups next in line stay in memory.
        """
        if self.memory_bytes is None or self.mem_bytes <= self.memory_bytes:
            return
        incomplete = [g for g in self._groups.values() if not g.complete]
        ready = [self._groups[i] for i in reversed(self._ready) if i in self._groups]
        for g in incomplete + ready:
            if self.mem_bytes <= self.memory_bytes:
                break
            if g.chunks:
                self._spill(g)

    def _spill(self, g: _Group) -> None:
        if self._spill_dir is None:
            if self._spill_dir_arg is None:
                self._spill_dir = Path(tempfile.mkdtemp(prefix="turnrl-replay-"))
            else:
                self._spill_dir = Path(self._spill_dir_arg)
                self._spill_dir.mkdir(parents=True, exist_ok=True)
        self._spill_seq += 1
        path = self._spill_dir / f"{self._spill_prefix}-g{g.group_id}-{self._spill_seq}.arrow"
        write_ipc_file(path, g.chunks, self.schema)
        rows, nbytes = sum(b.num_rows for b in g.chunks), g.mem_bytes
        g.files.append(_SpillFile(path, rows, nbytes))
        g.chunks, g.mem_bytes = [], 0
        self.mem_bytes -= nbytes
        self.disk_bytes += nbytes
        self.spilled_bytes_total += nbytes

    def _group_batches(self, g: _Group) -> list[pa.RecordBatch]:
        """A group's rows in arrival order (spilled files are read, not removed)."""
        out = []
        for f in g.files:
            out += read_ipc_file(f.path, self.schema)
        return out + g.chunks

    def close(self) -> None:
        """Delete spill files (and the spill directory if the store created it)."""
        self._clear()
        if self._spill_dir is not None and self._spill_dir_arg is None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    def _clear(self) -> None:
        """Forget all contents (not the counters), deleting spill files."""
        for g in self._groups.values():
            for f in g.files:
                f.path.unlink(missing_ok=True)
        self._groups, self._eps, self._ready, self.n_ready = {}, {}, deque(), 0
        self.rows = self.mem_bytes = self.disk_bytes = 0
