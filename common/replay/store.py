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

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from common import schema as S

log = logging.getLogger(__name__)

STALENESS_WEIGHT = "staleness_weight"  # float32, only in tables released in "reweight" mode
STALE_MODES = ("drop", "reweight")
SNAPSHOT_FORMAT = "turnrl.replay_queue/1"
SNAPSHOT_ROWS = "rows.arrow"
SNAPSHOT_STATE = "state.json"
_KEY_COLUMNS = (S.GROUP_ID, S.EPISODE_ID, S.TURN_INDEX, S.POLICY_VERSION, S.IS_LAST_TURN, S.GROUP_SIZE)
_COUNTERS = ("put_rows_total", "get_rows_total", "get_groups_total", "dropped_stale_groups",
             "dropped_stale_rows", "reweighted_stale_groups", "dropped_duplicate_rows", "dropped_late_rows",
             "aborted_groups", "aborted_rows", "spilled_bytes_total", "released_lag_max")


class QueueFull(RuntimeError):
    """A put waited longer than its timeout for room in the queue (see the message for what was stored)."""


def check_schema(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """Return ``batch`` as one RecordBatch with exactly ``TRANSITION_SCHEMA``, or raise TypeError saying why not.

    Columns in another order are reordered; missing, unexpected or mistyped columns are an error.
    """
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks()
        batch = batch.to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], schema=batch.schema)
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"the replay queue takes a pyarrow RecordBatch or Table, got {type(batch).__name__}")
    expected = S.TRANSITION_SCHEMA
    if not batch.schema.equals(expected, check_metadata=False):
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
            raise TypeError("batch does not match common.schema.TRANSITION_SCHEMA: " + "; ".join(problems))
        batch = batch.select(list(expected.names))
    return pa.RecordBatch.from_arrays(batch.columns, schema=expected)


@dataclass
class _Part:
    """The rows of one group from one put (a copy of the producer's data, in arrival order)."""

    group_id: int
    batch: pa.RecordBatch
    episode_ids: np.ndarray  # int64[n]
    turns: np.ndarray  # int32[n]
    last: np.ndarray  # bool[n]
    versions: np.ndarray  # int64[n]
    size: int  # G

    @property
    def rows(self) -> int:
        return self.batch.num_rows


@dataclass
class _Episode:
    turns: set[int] = field(default_factory=set)
    last_turn: int = -1  # -1 until the last turn has arrived

    def complete(self) -> bool:
        return self.last_turn >= 0 and len(self.turns) == self.last_turn + 1


@dataclass
class _SpillFile:
    path: Path
    rows: int
    nbytes: int


@dataclass
class _Group:
    group_id: int
    size: int
    episodes: dict[int, _Episode] = field(default_factory=dict)
    complete_episodes: int = 0
    chunks: list[pa.RecordBatch] = field(default_factory=list)  # in memory, arrival order, after `files`
    files: list[_SpillFile] = field(default_factory=list)  # spilled, arrival order
    rows: int = 0
    mem_bytes: int = 0
    min_version: int = 2**62
    complete: bool = False

    @property
    def disk_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)


class ReplayStore:
    """Synchronous replay store; see the module docstring for the rules.

    Args:
        capacity_rows: rows (turns) admitted for new groups; see ``has_room``.
        max_policy_lag: largest group lag released as is.
        capacity_bytes: bytes (memory + spilled) admitted for new groups; None = no byte limit.
        stale_mode: "drop" or "reweight" (see module docstring).
        stale_decay: base of the staleness weight in "reweight" mode, in (0, 1].
        memory_bytes: in-memory budget; past it, cold groups are spilled to Arrow IPC files. None = never spill.
        spill_dir: where spill files go (a private temporary directory if None).
    """

    def __init__(self, capacity_rows: int = 100_000, max_policy_lag: int = 1, *, capacity_bytes: int | None = None,
                 stale_mode: str = "drop", stale_decay: float = 0.5, memory_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None):
        if capacity_rows < 1:
            raise ValueError(f"capacity_rows={capacity_rows}: must be >= 1")
        if capacity_bytes is not None and capacity_bytes < 1:
            raise ValueError(f"capacity_bytes={capacity_bytes}: must be >= 1 or None")
        if max_policy_lag < 0:
            raise ValueError(f"max_policy_lag={max_policy_lag}: must be >= 0")
        if stale_mode not in STALE_MODES:
            raise ValueError(f"stale_mode={stale_mode!r}: must be one of {STALE_MODES}")
        if not 0.0 < stale_decay <= 1.0:
            raise ValueError(f"stale_decay={stale_decay}: must be in (0, 1]")
        if memory_bytes is not None and memory_bytes < 0:
            raise ValueError(f"memory_bytes={memory_bytes}: must be >= 0 or None")
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
        self.rows = 0
        self.mem_bytes = 0
        self.disk_bytes = 0
        self.learner_version: int | None = None  # last version passed to take()
        self.last_lag_mean = 0.0
        self.last_lag_max = 0
        for name in _COUNTERS:
            setattr(self, name, 0)

    # -- put --------------------------------------------------------------------------------
    def prepare(self, batch: pa.RecordBatch | pa.Table) -> list[_Part]:
        """Validate ``batch`` (schema, nulls, per-group consistency) and split it by group; no state changes."""
        batch = check_schema(batch)
        if batch.num_rows == 0:
            return []
        nulls = [c for c in _KEY_COLUMNS if batch.column(c).null_count]
        if nulls:
            raise ValueError(f"batch has nulls in key columns {nulls}")
        gids = batch.column(S.GROUP_ID).to_numpy()
        order = np.argsort(gids, kind="stable")
        batch = batch.take(pa.array(order))  # copy: groups contiguous, and no pin on Ray's object store
        gids = gids[order]
        eids = batch.column(S.EPISODE_ID).to_numpy()
        turns = batch.column(S.TURN_INDEX).to_numpy()
        last = batch.column(S.IS_LAST_TURN).to_numpy(zero_copy_only=False)
        versions = batch.column(S.POLICY_VERSION).to_numpy()
        sizes = batch.column(S.GROUP_SIZE).to_numpy()
        if (turns < 0).any():
            raise ValueError(f"negative turn_index in rows {np.flatnonzero(turns < 0)[:5].tolist()}")
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(gids)) + 1, [len(gids)]])
        parts = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            gid, size = int(gids[a]), int(sizes[a])
            if (sizes[a:b] != size).any():
                raise ValueError(f"group {gid}: rows disagree on group_size ({sorted(set(sizes[a:b].tolist()))})")
            if size < 1:
                raise ValueError(f"group {gid}: group_size={size} must be >= 1")
            parts.append(_Part(gid, batch.slice(a, b - a), eids[a:b], turns[a:b], last[a:b], versions[a:b], size))
        return parts

    def is_new(self, part: _Part) -> bool:
        """True if ``part`` would open a group (not held, not retired): such rows are subject to capacity."""
        return part.group_id not in self._groups and part.group_id not in self._retired

    def fits_ever(self, rows: int, nbytes: int) -> None:
        """Raise ValueError if ``rows``/``nbytes`` of new groups could never be admitted, even into an empty queue."""
        if rows > self.capacity_rows:
            raise ValueError(f"a put opens groups with {rows} rows; capacity_rows is {self.capacity_rows}: "
                             "put smaller batches or raise the capacity")
        if self.capacity_bytes is not None and nbytes > self.capacity_bytes:
            raise ValueError(f"a put opens groups with {nbytes} bytes; capacity_bytes is {self.capacity_bytes}: "
                             "put smaller batches or raise the capacity")

    def has_room(self, rows: int, nbytes: int) -> bool:
        """Room for ``rows``/``nbytes`` of *new* groups.

        Capacity gates the admission of new groups only. Rows continuing a group already held
        are always admitted: holding them back could deadlock (the group can never complete,
        so never leave) and would only make them staler. The queue can therefore exceed its
        capacity by the unfinished turns of the groups it has admitted.
        """
        if self.rows + rows > self.capacity_rows:
            return False
        return self.capacity_bytes is None or self.held_bytes + nbytes <= self.capacity_bytes

    def validate(self, parts: list[_Part]) -> None:
        """Raise ValueError if ``commit(parts)`` would, without changing anything."""
        for p in self._check(parts):
            self._plan(p)

    def commit(self, parts: Iterable[_Part]) -> int:
        """Store ``parts`` atomically (all or, on a ValueError, nothing); return the rows stored."""
        parts = list(parts)
        plans = [self._plan(p) for p in self._check(parts)]
        stored = 0
        for part, (keep, views) in zip(parts, plans):
            stored += self._apply(part, keep, views)
        if self.stale_mode == "drop" and self.learner_version is not None:
            self._evict_stale(self.learner_version, [p.group_id for p in parts])
        self._maybe_spill()
        return stored

    def _check(self, parts: list[_Part]) -> list[_Part]:
        seen: dict[int, int] = {}
        for p in parts:
            size = self._groups[p.group_id].size if p.group_id in self._groups else seen.get(p.group_id, p.size)
            if size != p.size:
                raise ValueError(f"group {p.group_id}: group_size {p.size} but the queue holds it with {size}")
            seen[p.group_id] = size
        return parts

    def _plan(self, p: _Part) -> tuple[np.ndarray | None, dict[int, _Episode]]:
        """Which rows of ``p`` to keep (None = drop all as late) and the episodes' states after it."""
        if p.group_id in self._retired:
            return None, {}
        g = self._groups.get(p.group_id)
        held = g.episodes if g is not None else {}
        views: dict[int, _Episode] = {}
        keep = np.ones(p.rows, dtype=bool)
        for i, (eid, turn, last) in enumerate(zip(p.episode_ids.tolist(), p.turns.tolist(), p.last.tolist())):
            ep = views.get(eid)
            if ep is None:
                old = held.get(eid)
                ep = views[eid] = _Episode(set(old.turns), old.last_turn) if old else _Episode()
            if turn in ep.turns:
                keep[i] = False
                continue
            if ep.last_turn >= 0 and turn > ep.last_turn:
                raise ValueError(f"episode {eid}: turn {turn} arrived after its last turn {ep.last_turn}")
            if last:
                if ep.turns and max(ep.turns) > turn:
                    raise ValueError(f"episode {eid}: last turn {turn} but turn {max(ep.turns)} is held")
                ep.last_turn = turn
            ep.turns.add(turn)
        n_eps = len(set(held) | set(views))
        if n_eps > p.size:
            raise ValueError(f"group {p.group_id}: {n_eps} distinct episodes but group_size is {p.size}")
        return keep, views

    def _apply(self, p: _Part, keep: np.ndarray | None, views: dict[int, _Episode]) -> int:
        if keep is None:
            self.dropped_late_rows += p.rows
            log.warning("dropped %d rows of group %d, already released, dropped or aborted", p.rows, p.group_id)
            return 0
        batch, versions = p.batch, p.versions
        if not keep.all():
            self.dropped_duplicate_rows += int((~keep).sum())
            log.warning("dropped %d duplicate rows of group %d", int((~keep).sum()), p.group_id)
            batch, versions = batch.filter(pa.array(keep)), versions[keep]
        if batch.num_rows == 0:
            return 0
        g = self._groups.get(p.group_id)
        if g is None:
            g = self._groups[p.group_id] = _Group(p.group_id, p.size)
        g.chunks.append(batch)
        g.rows += batch.num_rows
        g.mem_bytes += batch.nbytes
        g.min_version = min(g.min_version, int(versions.min()))
        self.rows += batch.num_rows
        self.mem_bytes += batch.nbytes
        self.put_rows_total += batch.num_rows
        for eid, new in views.items():
            old = g.episodes.get(eid)
            g.complete_episodes += int(new.complete()) - int(old is not None and old.complete())
            g.episodes[eid] = new
        if not g.complete and g.complete_episodes == g.size:
            g.complete = True
            self._ready.append(g.group_id)
            self.n_ready += 1
        return batch.num_rows

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
        table = pa.Table.from_batches(batches, schema=S.TRANSITION_SCHEMA).combine_chunks()
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
        _write_ipc(path, g.chunks)
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
            out += _read_ipc(f.path)
        return out + g.chunks

    def close(self) -> None:
        """Delete spill files (and the spill directory if the store created it)."""
        for g in self._groups.values():
            for f in g.files:
                f.path.unlink(missing_ok=True)
        if self._spill_dir is not None and self._spill_dir_arg is None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    # -- snapshot / restore -----------------------------------------------------------------
    def snapshot(self, path: str | os.PathLike) -> dict[str, Any]:
        """Write contents (Arrow IPC, ``rows.arrow``) and state + counters (JSON, ``state.json``) to directory ``path``.

        Files are written under temporary names and renamed, the JSON last; returns the JSON state.
        """
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        _write_ipc(d / (SNAPSHOT_ROWS + ".tmp"), (b for g in self._groups.values()
                                                   for b in self._group_batches(g)))
        os.replace(d / (SNAPSHOT_ROWS + ".tmp"), d / SNAPSHOT_ROWS)
        state = {
            "format": SNAPSHOT_FORMAT,
            "rows": self.rows,
            "groups": list(self._groups),
            "ready": [i for i in self._ready if i in self._groups and self._groups[i].complete],
            "retired": sorted(self._retired),
            "learner_version": self.learner_version,
            "counters": {name: getattr(self, name) for name in _COUNTERS},
            "config": {"capacity_rows": self.capacity_rows, "capacity_bytes": self.capacity_bytes,
                       "max_policy_lag": self.max_policy_lag, "stale_mode": self.stale_mode,
                       "stale_decay": self.stale_decay, "memory_bytes": self.memory_bytes},
            "schema": S.TRANSITION_SCHEMA.to_string(show_schema_metadata=False),
        }
        tmp = d / (SNAPSHOT_STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, d / SNAPSHOT_STATE)
        return state

    def restore(self, path: str | os.PathLike) -> int:
        """Load a snapshot written by ``snapshot`` into this (empty) store; return the rows loaded.

        This store's configuration (capacity, bound, mode) applies, not the snapshot's. Row versions
        come from the snapshot, so the lag check at the next ``take`` uses them against the version
        the learner passes then.
        """
        if self._groups:
            raise RuntimeError(f"restore needs an empty queue; this one holds {len(self._groups)} groups")
        d = Path(path)
        state = json.loads((d / SNAPSHOT_STATE).read_text())
        if state.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{d}: not a replay-queue snapshot (format {state.get('format')!r})")
        if state["config"]["max_policy_lag"] != self.max_policy_lag:
            log.warning("restoring a snapshot taken with max_policy_lag=%s under max_policy_lag=%s",
                        state["config"]["max_policy_lag"], self.max_policy_lag)
        self._retired, self.learner_version = set(), None
        for batch in _read_ipc(d / SNAPSHOT_ROWS):  # one group per batch, in the snapshot's arrival order
            self.commit(self.prepare(batch))
        complete = {i for i, g in self._groups.items() if g.complete}
        if self.rows != state["rows"] or list(self._groups) != state["groups"] or complete != set(state["ready"]):
            self._groups, self._ready, self.n_ready, self.rows, self.mem_bytes, self.disk_bytes = {}, deque(), 0, 0, 0, 0
            raise ValueError(f"{d}: rows.arrow and state.json disagree; the snapshot is damaged")
        self._ready = deque(state["ready"])
        self._retired = set(state["retired"])
        self.learner_version = state["learner_version"]
        for name in _COUNTERS:
            setattr(self, name, state["counters"].get(name, 0))
        return self.rows


def _write_ipc(path: Path, batches: Iterable[pa.RecordBatch]) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, S.TRANSITION_SCHEMA) as writer:
        for b in batches:
            writer.write_batch(b)


def _read_ipc(path: Path) -> list[pa.RecordBatch]:
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        if not reader.schema.equals(S.TRANSITION_SCHEMA, check_metadata=False):
            raise TypeError(f"{path}: schema differs from common.schema.TRANSITION_SCHEMA")
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
