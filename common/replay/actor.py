"""The replay queue as an asyncio Ray actor: backpressure for producers, blocking gets for the learner.

Callers wrap the class: ``queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(capacity_rows, lag)``.
Its methods are ``async``, so Ray runs it as an async actor: a put blocked on a full queue
does not stop gets (which make room) or stats. Every state change is one synchronous call
into ``ReplayStore``, so the event loop sees it atomically; waiting happens only between them.

    n = ray.get(queue.put.remote(batch))                    # waits for room; put_timeout_s -> QueueFull
    table = ray.get(queue.get.remote(8, version, timeout=30.0))   # waits up to 30 s for 8 complete groups
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from typing import Any

import pyarrow as pa

from common import metrics as M
from common.replay.rows import prepare
from common.replay.snapshot import load_snapshot, write_snapshot
from common.replay.store import QueueFull, ReplayStore
from common.replay.wire import register_arrow_serializers

_RATE_WINDOW_S = 30.0


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class _Rate:
    """Rows per second over roughly the last ``window`` seconds, from a cumulative counter."""

    def __init__(self, window: float = _RATE_WINDOW_S):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def observe(self, total: int, now: float) -> None:
        if self.samples and now - self.samples[-1][0] < self.window / 60:
            return
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.window:
            self.samples.popleft()

    def rate(self, total: int, now: float) -> float:
        if not self.samples or now - self.samples[0][0] <= 0:
            return 0.0
        return (total - self.samples[0][1]) / (now - self.samples[0][0])


class ReplayQueue:
    """Arrow replay queue of per-turn transitions; see ``common.replay.store`` for the rules.

    Args:
        capacity_rows: turns held before producers opening new groups wait (see ``ReplayStore.may_admit``).
        max_policy_lag: a group whose oldest turn is more than this many versions behind the learner's
            version at get time is dropped ("drop") or down-weighted ("reweight").
        capacity_bytes: the same bound in bytes (memory + spilled); None = rows only.
        stale_mode: "drop" | "reweight".
        stale_decay: staleness weight base in "reweight" mode: ``stale_decay ** (lag - max_policy_lag)``.
        memory_bytes: in-memory budget past which cold groups spill to Arrow IPC files; None = never.
        spill_dir: directory for spill files (a private temporary one if None).
        put_timeout_s: default put timeout in seconds; None = wait for room as long as it takes.
        schema: the rows' Arrow schema: ``common.schema.TRANSITION_SCHEMA`` (token rows; the default) or a
            ``common.schema.tensor_transition_schema`` (tensor agents).
    """

    def __init__(self, capacity_rows: int = 100_000, max_policy_lag: int = 1, *, capacity_bytes: int | None = None,
                 stale_mode: str = "drop", stale_decay: float = 0.5, memory_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None, put_timeout_s: float | None = None,
                 schema: pa.Schema | None = None):
        if _in_ray_actor():
            register_arrow_serializers()  # replies travel as Arrow IPC (see common.replay.wire)
        self.store = ReplayStore(capacity_rows, max_policy_lag, capacity_bytes=capacity_bytes, stale_mode=stale_mode,
                                 stale_decay=stale_decay, memory_bytes=memory_bytes, spill_dir=spill_dir,
                                 schema=schema)
        self.put_timeout_s = put_timeout_s
        self._changed = asyncio.Condition()
        self._line: deque[object] = deque()  # producers waiting for room, first come first served
        self._put_rate, self._get_rate = _Rate(), _Rate()
        self.producer_wait_s = 0.0
        self.producer_blocked = 0
        self.learner_wait_s = 0.0
        self._first_get: float | None = None

    # -- producers --------------------------------------------------------------------------
    async def put(self, batch: pa.RecordBatch | pa.Table, timeout: float | None = None) -> int:
        """Store the turns of ``batch``; return how many were stored (duplicates and late rows are counted, not stored).

        Rows continuing groups already held enter at once; rows opening new groups wait, first
        come first served, while they do not fit under the capacity and a complete group is
        waiting for the learner (``ReplayStore.may_admit`` says why only then). After ``timeout``
        seconds (default ``put_timeout_s``; None or ``math.inf``: no limit) raises ``QueueFull``,
        having stored only the continuing rows (re-putting the whole batch is safe: repeats are
        dropped as duplicates). Raises ``TypeError`` on a schema mismatch and ``ValueError`` on
        inconsistent rows, storing nothing.
        """
        put = prepare(batch, self.store.schema)
        if put is None:
            return 0
        new = self.store.new_groups(put)
        rows, nbytes = put.rows_of(new)
        self.store.fits_ever(rows, nbytes)
        if not new or (not self._line and self.store.may_admit(rows, nbytes)):
            stored = self.store.commit(put)
        else:
            self.store.validate(put)
            old = sorted(set(range(len(put.group_ids))) - set(new))
            stored = self.store.commit(put, old)
            timeout = self.put_timeout_s if timeout is None else timeout
            await self._wait_for_room(rows, nbytes, None if timeout is None or math.isinf(timeout) else timeout,
                                      stored, [put.group_ids[k] for k in new])
            stored += self.store.commit(put, new)
        now = time.monotonic()
        self._put_rate.observe(self.store.put_rows_total, now)
        await self._notify()
        return stored

    async def _wait_for_room(self, rows: int, nbytes: int, timeout: float | None, stored: int,
                             gids: list[int]) -> None:
        ticket = object()
        self._line.append(ticket)
        self.producer_blocked += 1
        t0 = time.monotonic()
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self._line[0] is ticket and self.store.may_admit(rows, nbytes)), timeout)
        except asyncio.TimeoutError:
            raise QueueFull(
                f"no room for {rows} rows ({nbytes} bytes) of new groups {gids[:8]} within {timeout} s: queue holds "
                f"{self.store.rows}/{self.store.capacity_rows} rows, {self.store.held_bytes} bytes; "
                f"those rows were NOT stored ({stored} rows continuing held groups were)") from None
        finally:
            self.producer_wait_s += time.monotonic() - t0
            self._line.remove(ticket)
            await self._notify()  # the next producer in line may fit now

    async def abort_groups(self, group_ids: list[int] | None = None) -> int:
        """Drop the given groups (None: every incomplete group, e.g. after a producer restart); return rows dropped."""
        n = self.store.abort_groups(group_ids)
        await self._notify()
        return n

    # -- learner ----------------------------------------------------------------------------
    async def get(self, max_groups: int, current_version: int, timeout: float | None = None,
                  min_groups: int | None = None, partial: bool = True) -> pa.Table | None:
        """Up to ``max_groups`` complete groups as one Arrow table (None if there are none).

        ``current_version`` is the learner's policy version now: groups lagging it by more than
        ``max_policy_lag`` are dropped or weighted (see ``stale_mode``). With ``timeout`` None or 0
        it returns at once; otherwise it waits up to ``timeout`` seconds (``math.inf``: no limit)
        until ``min_groups`` (default ``max_groups``) usable groups are complete, then returns what
        is there; with ``partial=False`` it returns None (taking nothing) unless ``min_groups`` are there.
        """
        if max_groups < 1:
            raise ValueError(f"max_groups={max_groups}: must be >= 1")
        need = max_groups if min_groups is None else max(1, min(min_groups, max_groups))
        now = time.monotonic()
        if self._first_get is None:
            self._first_get = now
        if self.store.observe_version(current_version):
            await self._notify()
        if timeout and self.store.n_ready < need:
            t0 = now
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait_for(
                        lambda: self._usable(current_version) >= need), None if math.isinf(timeout) else timeout)
            except asyncio.TimeoutError:
                pass
            self.learner_wait_s += time.monotonic() - t0
        if not partial:
            if self.store.observe_version(current_version):  # a put may have added stale turns
                await self._notify()
            if self.store.n_ready < need:
                return None
        table = self.store.take(max_groups, current_version)
        self._get_rate.observe(self.store.get_rows_total, time.monotonic())
        await self._notify()
        return table

    def _usable(self, current_version: int) -> int:
        if self.store.observe_version(current_version):  # a put may have added stale turns
            self._changed.notify_all()  # called with the lock held (inside wait_for)
        return self.store.n_ready

    async def num_complete(self) -> int:
        """Complete groups waiting (stale ones are dropped at the next get)."""
        return self.store.n_ready

    async def held(self, group_ids: list[int]) -> list[int]:
        """Those of ``group_ids`` the queue holds now, complete or not."""
        return self.store.held(group_ids)

    # -- state ------------------------------------------------------------------------------
    async def snapshot(self, path: str) -> dict[str, Any]:
        """Write contents and counters to directory ``path`` (Arrow IPC + JSON); returns the JSON state."""
        return write_snapshot(self.store, path)

    async def restore(self, path: str) -> int:
        """Load a snapshot into this empty queue (this queue's config applies); returns rows loaded."""
        n = load_snapshot(self.store, path)
        await self._notify()
        return n

    async def close(self) -> None:
        """Delete spill files."""
        self.store.close()

    async def stats(self) -> dict[str, float]:
        """Queue metrics keyed by the names in ``common.metrics``."""
        s, now = self.store, time.monotonic()
        waited = now - self._first_get if self._first_get is not None else 0.0
        return {
            M.QUEUE_ROWS: s.rows,
            M.QUEUE_BYTES: s.held_bytes,
            M.QUEUE_GROUPS: s.n_ready,
            M.QUEUE_GROUPS_IN_FLIGHT: s.n_groups - s.n_ready,
            M.QUEUE_SPILLED_BYTES: s.disk_bytes,
            M.QUEUE_PUT_ROWS: s.put_rows_total,
            M.QUEUE_GET_ROWS: s.get_rows_total,
            M.QUEUE_GET_GROUPS: s.get_groups_total,
            M.QUEUE_PUT_RATE: self._put_rate.rate(s.put_rows_total, now),
            M.QUEUE_GET_RATE: self._get_rate.rate(s.get_rows_total, now),
            M.QUEUE_DROPPED_STALE: s.dropped_stale_groups,
            M.QUEUE_DROPPED_STALE_ROWS: s.dropped_stale_rows,
            M.QUEUE_REWEIGHTED_STALE: s.reweighted_stale_groups,
            M.QUEUE_DROPPED_DUPLICATE: s.dropped_duplicate_rows,
            M.QUEUE_DROPPED_LATE: s.dropped_late_rows,
            M.QUEUE_ABORTED_GROUPS: s.aborted_groups,
            M.QUEUE_ABORTED_ROWS: s.aborted_rows,
            M.QUEUE_SPILLED_TOTAL: s.spilled_bytes_total,
            M.POLICY_LAG_MEAN: s.last_lag_mean,
            M.POLICY_LAG_MAX: s.last_lag_max,
            M.POLICY_LAG_RELEASED_MAX: s.released_lag_max,
            M.QUEUE_PRODUCER_WAIT: self.producer_wait_s,
            M.QUEUE_PRODUCER_BLOCKED: self.producer_blocked,
            M.QUEUE_LEARNER_WAIT: self.learner_wait_s,
            M.QUEUE_LEARNER_IDLE: self.learner_wait_s / waited if waited > 0 else 0.0,
        }

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
