"""Surviving dying actors: the episode audit, fault injection, rollout retries, learner crashes.

What happens when an actor dies (Ray restarts it up to its role's ``max_restarts``):

* env worker: the rollout worker's :class:`actors.env_client.EnvClient` replays the episodes it
  lost on the restarted actor (same ids, no row sent twice);
* generator: :class:`actors.pool.GeneratorPool` re-sends the turn with the episode's full token
  history; the restarted generator reloads the latest pushed weights first;
* rollout worker: the step's rollout call fails; :func:`rollout_with_retries` aborts its groups in
  the replay queue (rows already there are discarded, late ones dropped), counts their episodes as
  abandoned and runs the same prompts again under new group and episode ids;
* learner rank: DeepSpeed's process group cannot take a new member, so the job ends with
  :class:`LearnerCrashed`, whose message names the run directory and the checkpoint to resume from.

:class:`EpisodeAudit` proves nothing was lost or counted twice: every episode id handed to the
rollout worker is, at the end of a step, trained exactly once, abandoned (and re-sampled), or
dropped as stale by the queue; ``duplicates`` and ``unaccounted`` stay 0.
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import Any, Iterable

from actors.liveness import wait_alive
from common import metrics as M

log = logging.getLogger(__name__)


class IdSet:
    """A set of ints stored as sorted disjoint half-open intervals (episode ids come in long runs).

    ``add`` returns how many of the ids were already present (duplicates), so an episode counted
    twice is noticed; the state is a short JSON list however many ids it holds.
    """

    def __init__(self, intervals: Iterable[Iterable[int]] = ()):
        self._lo: list[int] = []
        self._hi: list[int] = []
        self._n = 0
        for lo, hi in intervals:
            self._add_run(int(lo), int(hi))

    def __len__(self) -> int:
        return self._n

    def __contains__(self, x: int) -> bool:
        i = bisect.bisect_right(self._lo, x) - 1
        return i >= 0 and x < self._hi[i]

    def add(self, ids: Iterable[int]) -> int:
        """Insert ``ids``; return the number that were already in the set (or repeated within ``ids``)."""
        dup = 0
        run: list[int] | None = None
        for x in sorted(int(i) for i in ids):
            if run is not None and x < run[1]:  # repeated within this batch
                dup += 1
            elif run is not None and x == run[1]:
                run[1] += 1
            else:
                if run is not None:
                    dup += self._add_run(*run)
                run = [x, x + 1]
        if run is not None:
            dup += self._add_run(*run)
        return dup

    def _add_run(self, lo: int, hi: int) -> int:
        """Merge [lo, hi) into the intervals; return how many of its ids were present already."""
        i = bisect.bisect_left(self._hi, lo)  # first interval ending at or after lo (touching merges)
        j = bisect.bisect_right(self._lo, hi)  # intervals [i, j) overlap or touch [lo, hi)
        overlap = sum(max(0, min(hi, self._hi[k]) - max(lo, self._lo[k])) for k in range(i, j))
        if i < j:
            lo, hi = min(lo, self._lo[i]), max(hi, self._hi[j - 1])
            self._n -= sum(self._hi[k] - self._lo[k] for k in range(i, j))
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]
        self._n += hi - lo
        return overlap

    def intervals(self) -> list[list[int]]:
        return [[lo, hi] for lo, hi in zip(self._lo, self._hi)]


class EpisodeAudit:
    """Counts every episode of the run from start to training, exactly once (see the module docstring)."""

    def __init__(self) -> None:
        self.abandoned = 0  # episodes given up after a fault (their prompts ran again under new ids)
        self.env_replayed = 0  # episodes rebuilt on a restarted env worker (not restarted: same id, same rows)
        self.rollout_retries = 0  # rollout calls re-run after the rollout worker died
        self.duplicates = 0  # episodes completed or trained twice: must stay 0
        self.completed = IdSet()
        self.trained = IdSet()

    def complete(self, result: dict[str, Any]) -> None:
        """A finished ``RolloutWorker.run`` result."""
        self.duplicates += self.completed.add(e["episode_id"] for e in result["episodes"])
        self.env_replayed += int(result.get("env_replayed", 0))

    def train(self, episode_ids: Iterable[int]) -> int:
        """The distinct episode ids of a batch the learner trained on; returns how many were new."""
        ids = set(int(i) for i in episode_ids)
        dup = self.trained.add(ids)
        self.duplicates += dup
        return len(ids) - dup

    def abandon(self, n: int) -> None:
        self.abandoned += n

    def counts(self, started: int, stale_episodes: int = 0, *, sync: bool = True) -> dict[str, float]:
        """Metrics after a step. ``started``: episode ids allocated so far (the trainer's counter);
        ``stale_episodes``: the queue's stale drops. ``unaccounted`` = started - trained - abandoned -
        stale is reported in synchronous mode only, where no episode is in flight between steps."""
        out = {M.AUDIT_STARTED: started, M.AUDIT_COMPLETED: len(self.completed),
               M.AUDIT_TRAINED: len(self.trained), M.AUDIT_ABANDONED: self.abandoned,
               M.AUDIT_STALE: stale_episodes, M.AUDIT_DUPLICATES: self.duplicates,
               M.AUDIT_ENV_REPLAYED: self.env_replayed, M.AUDIT_ROLLOUT_RETRIES: self.rollout_retries}
        if sync:
            out[M.AUDIT_UNACCOUNTED] = started - len(self.trained) - self.abandoned - stale_episodes
        return out

    def state(self) -> dict[str, Any]:
        return {"abandoned": self.abandoned, "env_replayed": self.env_replayed,
                "rollout_retries": self.rollout_retries, "duplicates": self.duplicates,
                "completed": self.completed.intervals(), "trained": self.trained.intervals()}

    def load_state(self, state: dict[str, Any]) -> None:
        for key in ("abandoned", "env_replayed", "rollout_retries", "duplicates"):
            setattr(self, key, int(state.get(key, 0)))
        self.completed = IdSet(state.get("completed", []))
        self.trained = IdSet(state.get("trained", []))


def stale_episodes(queue_stats: dict[str, float], group_size: int) -> int:
    """Episodes the replay queue dropped as stale (its counter is in groups of ``group_size``)."""
    return int(queue_stats.get(M.QUEUE_DROPPED_STALE, 0)) * group_size


# -- fault injection ------------------------------------------------------------------------------
def kills_due(cfg: Any, step: int) -> list[Any]:
    """``faults.kill`` entries that fire during ``step`` (``after_step + 1 == step``)."""
    return [k for k in cfg.faults.kill if k.after_step + 1 == step]


def inject(trainer: Any, step: int) -> list[str]:
    """Arm this step's kills: the rollout worker fires env-worker / generator / rollout kills after the
    step's first turn (mid-episode); learner ranks are killed now (the step's update then fails); a judge
    actor exits inside its next scoring call."""
    import ray

    fired = []
    for k in kills_due(trainer.cfg, step):
        if k.actor == "learner":
            log.warning("fault injection: killing learner rank %d before step %d's update", k.index, step)
            ray.kill(trainer.learners[k.index], no_restart=False)
        elif k.actor == "judge":  # dies inside its next scoring call, while an env worker waits on it
            ray.get(trainer.judges[k.index].arm_exit.remote())
        else:
            ray.get(trainer.rollout.arm_kill.remote(k.actor, k.index))
        fired.append(f"{k.actor}[{k.index}]@step{step}")
    return fired


# -- rollout retries -------------------------------------------------------------------------------
def abandon_rollout(trainer: Any, group_ids: list[int], episode_ids: range, err: BaseException) -> int:
    """The one lost-work rule, for a rollout call whose worker died (sync and async modes alike).

    Its groups are aborted in the replay queue (rows already held are discarded, rows that still
    arrive are dropped as late), its episodes are freed on the env workers and counted abandoned in
    the audit; the caller then runs its prompts again under new group and episode ids. Returns the
    number of rows the queue discarded.
    """
    import ray

    rows = ray.get(trainer.queue.abort_groups.remote(group_ids))
    ids = [str(e) for e in episode_ids]
    for w in trainer.env_workers:  # unknown ids are ignored
        w.close.remote(ids)
    trainer.audit.abandon(len(episode_ids))
    trainer.audit.rollout_retries += 1
    log.warning("rollout call for groups %d..%d lost (%s); aborted %d rows, running its prompts again",
                group_ids[0], group_ids[-1], type(err).__name__, rows)
    return rows


def rollout_with_retries(trainer: Any, questions: list[dict], params: Any) -> dict[str, Any]:
    """``RolloutWorker.run`` for the step's questions; if the worker dies, abort and run them again.

    Each attempt gets fresh group and episode ids (the queue retires aborted ids, so a late row of
    the dead attempt can never join a new group). Up to ``rollout.max_restarts`` retries.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    G, n = trainer.cfg.algorithm.group_size, len(questions)
    retries = max(0, trainer.cfg.rollout.max_restarts)
    for attempt in range(retries + 1):
        first_group, first_episode = trainer.group_counter, trainer.episode_counter
        trainer.group_counter += n
        trainer.episode_counter += n * G
        try:
            result = ray.get(trainer.rollout.run.remote(
                questions, group_size=G, first_group_id=first_group, first_episode_id=first_episode, params=params))
        except (RayActorError, ActorUnavailableError) as err:
            if attempt == retries:
                raise RuntimeError(f"the rollout worker died {attempt + 1} times in one step (rollout.max_restarts="
                                   f"{trainer.cfg.rollout.max_restarts}): {err}") from err
            abandon_rollout(trainer, list(range(first_group, first_group + n)),
                            range(first_episode, first_episode + n * G), err)
            wait_alive(trainer.rollout, "rollout worker", trainer.cfg.faults.restart_wait_s, "rollout.max_restarts")
            continue
        trainer.audit.complete(result)
        return result
    raise AssertionError("unreachable")


# -- learner crashes --------------------------------------------------------------------------------
def crash_summary(err: BaseException, trainer: Any, run_dir: Path, step: int, ckpt: Any) -> "LearnerCrashed | None":
    """If ``err`` came from a dead learner rank: write ``run_summary.json`` (status, message, audit) and
    return the :class:`LearnerCrashed` to raise; otherwise None (the caller re-raises ``err``)."""
    import json

    from ray.exceptions import RayActorError

    from learner.checkpoint import latest_checkpoint

    if trainer is None or not isinstance(err, RayActorError):
        return None
    dead = dead_learners(trainer.learners)
    if not dead:
        return None
    checkpoint = latest_checkpoint(ckpt.root)
    message = crash_message(Path(run_dir), dead, step, err, checkpoint, trainer.cfg.checkpoint.every_steps)
    log.error(message)
    summary = {"status": "learner_crashed", "message": message, "step": step,
               "checkpoint": str(checkpoint) if checkpoint else None,
               "audit": trainer.audit.counts(trainer.episode_counter, sync=False)}  # mid-step: some in flight
    (Path(run_dir) / "run_summary.json").write_text(json.dumps(summary, indent=2))
    return LearnerCrashed(message)


class LearnerCrashed(RuntimeError):
    """A learner rank died; the message names the run directory and how to resume it."""


def dead_learners(learners: list, timeout_s: float = 30.0) -> list[int]:
    """Ranks that do not answer a ping."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    dead = []
    for r, lw in enumerate(learners):
        try:
            ray.get(lw.get_version.remote(), timeout=timeout_s)
        except (RayActorError, GetTimeoutError):
            dead.append(r)
    return dead


def crash_message(run_dir: Path, ranks: list[int], step: int, err: BaseException, checkpoint: Path | None,
                  every_steps: int) -> str:
    """The message of :class:`LearnerCrashed`."""
    head = (f"learner rank(s) {ranks} died during step {step} ({type(err).__name__}); DeepSpeed's group cannot "
            f"take a restarted rank, so the run stopped. ")
    if checkpoint is None:
        how = (f"No checkpoint was written in {str(run_dir)!r} (checkpoint.every_steps={every_steps}); "
               "set checkpoint.every_steps > 0 to make runs resumable.")
    else:
        how = (f"The run directory {str(run_dir)!r} is resumable from {checkpoint.name}: "
               f"turnrl train --config {run_dir / 'config.yaml'} --resume {run_dir}")
    return head + how
