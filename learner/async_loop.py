"""Asynchronous actor-learner training: the rollout worker generates while the learner trains.

    keep the rollout worker's mailbox full, within the lag budget   -> rows stream into the queue
    batch   <- queue.get(prompts_per_step groups, learner version)   (waits; lag bound enforced)
    update  <- learner step on the batch                             (version += 1)
    sync    <- push the new weights to the generators                (turn boundaries)
    submit  <- more prompts, now that the learner has used a step's worth

A rollout worker is a Ray actor that runs one ``run`` call (one step's prompts) at a time; the
next call already waits in its mailbox, so it starts generating the moment the previous one ends,
while the learner trains. With ``rollout.num_workers`` > 1 calls go to the least busy worker and run
at once (their env waits overlap; the generators serve both). How far generation runs ahead is bounded by ``queue.max_policy_lag`` = L:
at most L + 1 steps' worth of groups are out at once (handed to the rollout worker and not finished,
or finished and waiting in the queue), so a group sampled while the learner is at version v is
normally trained by version v + L. This budget only avoids wasted work. The bound is enforced by
the queue: at every get it drops (``stale_mode: drop``) or down-weights (``reweight``) groups whose
oldest turn lags the learner's version by more than L, using the version stored in every row. So it
holds whatever the scheduling, after pauses, generator or rollout-worker restarts, and snapshot
restores.

A weight push never interrupts a turn: a generator applies new weights between turns. What happens
to an episode caught between two turns is ``rollout.partial_rollouts``: ``finish`` (default) lets it
go on, so its later turns come from the newer version; ``abort`` restarts it from its prompt on the
new weights (actors/rollout.py). Every turn keeps the version that produced it, and a group's lag is
that of its oldest turn.

If the rollout worker dies, Ray restarts it (``rollout.max_restarts``). Its calls in flight fail.
Their groups are aborted in the queue: rows already held are discarded, and rows that still arrive
are dropped as late. Their prompts run again under new group ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from actors.liveness import wait_alive
from common import metrics as M
from common import schema as S
from learner.evaluation import generation_metrics
from learner.faults import abandon_rollout

log = logging.getLogger(__name__)


def batch_lag(table: pa.Table, version: int) -> int:
    """Largest policy lag of any row of ``table`` for a learner at ``version`` (its oldest turn's lag)."""
    return int(version - np.min(table.column(S.POLICY_VERSION).to_numpy()))


def merge_rollouts(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ``RolloutWorker.run`` results as one (episodes concatenated, counts summed)."""
    return {"episodes": [e for r in results for e in r["episodes"]],
            "rows": sum(r["rows"] for r in results),
            "action_tokens": sum(r["action_tokens"] for r in results),
            "seconds": sum(r["seconds"] for r in results),
            **{k: sum(r.get(k, 0) for r in results)
               for k in ("aborted_episodes", "aborted_action_tokens", "mixed_version_episodes", "reused_tokens",
                         "prefilled_tokens", "forked_episodes")}}


@dataclass
class _Call:
    """One ``RolloutWorker.run`` call in flight."""

    ref: Any  # ray.ObjectRef of the result
    group_ids: list[int]
    episode_ids: range
    questions: list[dict]
    worker: int = 0  # index into trainer.rollouts


class AsyncLoop:
    """Runs asynchronous training steps on a ``learner.trainer.Trainer``; ``step()`` returns the step's metrics.

    Args:
        trainer: the run's actors (``rollout``, ``queue``, learners, generators) and its counters.
        poll_s: how long one blocking queue get waits before the loop checks for failed rollout calls.
        restart_wait_s: how long to wait for Ray to restart a dead rollout worker.
    """

    def __init__(self, trainer: Any, *, poll_s: float = 1.0, restart_wait_s: float = 300.0):
        cfg = trainer.cfg
        self.trainer = trainer
        self.n_groups = cfg.algorithm.prompts_per_step
        self.budget = (cfg.queue.max_policy_lag + 1) * self.n_groups  # groups out at once
        self.get_timeout_s = cfg.rollout.get_timeout_s
        self.poll_s = poll_s
        self.restart_wait_s = restart_wait_s
        self.calls: list[_Call] = []
        self.untrained: set[int] = set()  # ids of groups handed out and not trained (or aborted) yet
        self.finished: list[dict[str, Any]] = []  # results of calls finished since the last step's report
        self.failed_calls = 0
        self.aborted_episodes = 0  # episode attempts restarted after a mid-episode push (partial_rollouts: abort)
        self.trained_lags: list[int] = []  # lag of each trained batch, from its rows
        self.episodes_trained = 0
        self._step = 0

    # -- rollouts -------------------------------------------------------------------------
    def in_flight(self) -> int:
        """Groups of rollout calls not finished yet, less those already trained."""
        return sum(1 for c in self.calls for g in c.group_ids if g in self.untrained)

    def out(self) -> int:
        """Groups out: in rollout calls not finished, or finished and still held by the queue (not trained yet).

        Groups of finished calls that the queue no longer holds were dropped as stale: forgotten here.
        """
        running = {g for c in self.calls for g in c.group_ids}
        done = [g for g in self.untrained if g not in running]
        held = set(ray.get(self.trainer.queue.held.remote(done))) if done else set()
        self.untrained -= set(done) - held
        return self.in_flight() + len(held)

    def top_up(self) -> int:
        """Hand the rollout worker more prompts while fewer than the budget's groups are out; return calls made."""
        made = 0
        out = self.out()
        while out + self.n_groups <= self.budget:
            self._submit(self.trainer.sampler.next(self.n_groups))
            out += self.n_groups
            made += 1
        return made

    def _submit(self, questions: list[dict]) -> None:
        """One rollout call for ``questions`` on the rollout worker with the fewest calls out
        (``rollout.num_workers``: calls on different workers run at once)."""
        t = self.trainer
        self._step += 1
        first = t.group_counter
        busy = [sum(c.worker == w for c in self.calls) for w in range(len(t.rollouts))]
        worker = busy.index(min(busy))
        first_episode, n_episodes = t.episode_counter, len(questions) * t.cfg.algorithm.group_size
        ref = t.rollouts[worker].run.remote(
            questions, group_size=t.cfg.algorithm.group_size, first_group_id=first,
            first_episode_id=first_episode, params=t.sampling(seed=t.cfg.run.seed * 1_000_003 + self._step))
        t.group_counter += len(questions)
        t.episode_counter += n_episodes
        self.calls.append(_Call(ref, list(range(first, first + len(questions))),
                                range(first_episode, first_episode + n_episodes), questions, worker))
        self.untrained.update(self.calls[-1].group_ids)

    def collect(self) -> None:
        """Gather finished rollout calls; a call that failed (its worker died) is aborted and resubmitted."""
        if not self.calls:
            return
        refs = [c.ref for c in self.calls]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(done)
        for call in [c for c in self.calls if c.ref in done]:
            self.calls.remove(call)
            try:
                self.finished.append(ray.get(call.ref))
                self.aborted_episodes += self.finished[-1].get("aborted_episodes", 0)
                self.trainer.audit.complete(self.finished[-1])  # episode audit (learner/faults.py)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                self.failed_calls += 1
                abandon_rollout(self.trainer, call.group_ids, call.episode_ids, e)  # the sync mode's rule too
                self.untrained.difference_update(call.group_ids)
                self.wait_for_rollout_worker(call.worker)
                self._submit(call.questions)

    def wait_for_rollout_worker(self, worker: int = 0) -> None:
        """Block until the (restarting) rollout worker answers; ``ActorGone`` if it will not."""
        wait_alive(self.trainer.rollouts[worker], f"rollout worker {worker}", self.restart_wait_s,
                   "rollout.max_restarts")

    # -- one training step ----------------------------------------------------------------
    def next_batch(self) -> tuple[pa.Table, float]:
        """Block until the queue releases a step's complete groups; return (table, seconds waited)."""
        t = self.trainer
        t0 = time.time()
        while True:
            self.collect()
            self.top_up()  # replaces lost calls and groups the queue dropped as stale
            table = ray.get(t.queue.get.remote(self.n_groups, t.version, timeout=self.poll_s,
                                               min_groups=self.n_groups, partial=False))
            if table is not None:
                return table, time.time() - t0
            if time.time() - t0 > self.get_timeout_s:
                stats = ray.get(t.queue.stats.remote())
                raise RuntimeError(f"no batch of {self.n_groups} complete groups within rollout.get_timeout_s="
                                   f"{self.get_timeout_s} s; {len(self.calls)} rollout calls in flight; queue: "
                                   f"{ {k: v for k, v in stats.items() if 'depth' in k or 'dropped' in k} }")

    def step(self, step: int) -> dict[str, float]:
        """One learner step on the oldest complete groups, then a weight push; generation keeps running.

        The step's ``rollout/*`` reward and task metrics are those of the episodes it trained on (from
        the batch's rows, as in synchronous mode). The generation metrics (``perf/tokens_per_s``,
        ``perf/time/rollout_s``, aborted / mixed-version episodes, KV reuse) are those of the rollout
        calls that finished since the previous step, and absent from a step during which none did: a
        step never repeats an earlier step's figures.
        """

        t = self.trainer
        table, waited = self.next_batch()
        self.trained_lags.append(batch_lag(table, t.version))
        self.episodes_trained += len(set(table.column(S.EPISODE_ID).to_pylist()))
        self.untrained.difference_update(table.column(S.GROUP_ID).to_pylist())
        stats = t.train_on(table)
        stats[M.TIME_SYNC] = t.sync_phase() if step % t.cfg.learner.push_every == 0 else 0.0
        self.collect()
        self.top_up()  # the learner used a step's worth: generation may run ahead again
        if self.finished:
            stats.update(generation_metrics(merge_rollouts(self.finished)))
            self.finished = []
        stats[M.TIME_BATCH_WAIT] = waited
        stats[M.ROLLOUT_IN_FLIGHT] = self.in_flight()
        stats[M.ROLLOUT_FAILED_CALLS] = self.failed_calls
        stats[M.EPISODES_TOTAL] = self.episodes_trained
        return stats

    def close(self) -> None:
        """Let the calls in flight finish (the rollout worker serves evaluation next), then abort every group
        generated ahead and not trained, so the queue holds none of this loop's groups."""
        for call in self.calls:
            try:
                ray.get(call.ref)
            except ray.exceptions.RayError as e:
                log.warning("a rollout call failed while draining: %s", e)
        if self.untrained:
            ray.get(self.trainer.queue.abort_groups.remote(sorted(self.untrained)))
        self.calls, self.untrained = [], set()
