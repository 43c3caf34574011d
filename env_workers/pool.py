"""EnvPool: several EnvWorker actors behind the EnvWorker interface, surviving worker deaths.

The rollout worker (itself a Ray actor) drives episodes through a pool instead of a fixed
actor per episode::

    pool = EnvPool([ray.remote(EnvWorker).options(max_restarts=1).remote(index_dir, kw) for _ in range(4)])
    prompts = pool.reset(ids, examples)
    results = pool.step(ids, actions)      # list[StepResult], same semantics as EnvWorker.step
    pool.close(ids)

The pool places each new episode on the live worker with the fewest episodes and records the
episode's example and every action it accepted. Search and rewards are deterministic (BM25
over a fixed index, a rule-based rubric), so an episode is rebuilt exactly by resetting it and
replaying its actions. When a worker fails:

* the call raises ``RayActorError`` (the actor died mid-step, or is restarting): the worker is
  probed with ``ping``. A restarted actor (Ray ``max_restarts``) answers with a new instance id
  and comes back empty; a dead one is replaced through the factory (when the pool was given
  one) or dropped from rotation. Every episode of the failed call, and every episode the
  worker held if it restarted or died, is rebuilt on a live worker (reset + replay) and the
  step is retried there;
* the call returns ``unknown_episode`` for an episode the pool knows is live (Ray retried the
  task on a restarted actor, ``max_task_retries``): same rebuild and retry.

Each step of each episode is answered exactly once: a step whose call failed is never counted,
and the rebuilt state holds the recorded actions only, so no action is applied twice. The
:attr:`EnvPool.stats` audit counts steps served, retries, replays and replay mismatches (a
replayed step whose observation or reward differs from the original; expected 0). After
``max_attempts`` failed tries an episode gets an error result (``error_code="worker_failed"``)
and is counted in ``stats["lost"]``.

Ray plumbing stays in this class; it needs Ray only for ``ray.get`` and the exception types.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from env_workers.env import StepResult, error_step_result

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    """Audit counters of an :class:`EnvPool`."""

    steps_served: int = 0
    """Step results handed back for live episodes (one per episode per step call)."""
    resets_served: int = 0
    retries: int = 0
    """Episode steps re-sent after their worker failed or forgot the episode."""
    replays: int = 0
    """Episodes rebuilt on a worker (reset + replay of their recorded actions)."""
    replayed_actions: int = 0
    replay_mismatches: int = 0
    worker_failures: int = 0
    restarts_detected: int = 0
    replacements: int = 0
    lost: int = 0
    """Episodes given up after ``max_attempts`` (expected 0)."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Record:
    example: dict[str, Any]
    worker: int
    actions: list[str] = field(default_factory=list)
    signatures: list[tuple[Any, ...]] = field(default_factory=list)
    lost: bool = False  # its worker no longer holds it: rebuild before the next step


@dataclass
class _Slot:
    handle: Any
    alive: bool = True
    instance_id: str | None = None


def _signature(res: StepResult) -> tuple[Any, ...]:
    return (res.observation_text, tuple(sorted((res.turn_reward or {}).items())), bool(res.done))


class EnvPool:
    """Spreads episodes over EnvWorker actors; rebuilds and retries when one fails."""

    def __init__(
        self,
        workers: Sequence[Any] | Callable[[int], Any],
        *,
        num_workers: int | None = None,
        max_attempts: int = 3,
        probe_timeout_s: float = 60.0,
        probe_retries: int = 4,
    ) -> None:
        """``workers``: actor handles, or a factory ``f(slot) -> handle`` (then ``num_workers``
        handles are made, and a dead worker is replaced by a new one from the factory)."""
        import ray

        self._ray = ray
        if callable(workers) and not isinstance(workers, (list, tuple)):
            if not num_workers or num_workers < 1:
                raise ValueError("num_workers >= 1 is required with a worker factory")
            self._factory: Callable[[int], Any] | None = workers
            handles = [workers(i) for i in range(num_workers)]
        else:
            self._factory = None
            handles = list(workers)
        if not handles:
            raise ValueError("EnvPool needs at least one worker")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.probe_timeout_s = probe_timeout_s
        self.probe_retries = probe_retries
        self._slots = [_Slot(h) for h in handles]
        self._episodes: dict[str, _Record] = {}
        self._stats = PoolStats()
        for i, iid in enumerate(ray.get([s.handle.ping.remote() for s in self._slots])):
            self._slots[i].instance_id = iid

    # ------------------------------------------------------------------ public API

    @property
    def stats(self) -> dict[str, int]:
        """A copy of the audit counters (see :class:`PoolStats`)."""
        return self._stats.to_dict()

    @property
    def num_workers(self) -> int:
        """Workers currently in rotation."""
        return sum(s.alive for s in self._slots)

    def num_live(self) -> int:
        """Episodes started and not yet done or closed."""
        return len(self._episodes)

    def worker_of(self, episode_id: str) -> int | None:
        """Slot index of the worker holding ``episode_id`` (``None`` if unknown)."""
        rec = self._episodes.get(episode_id)
        return rec.worker if rec is not None else None

    def handle(self, slot: int) -> Any:
        """The actor handle in ``slot``."""
        return self._slots[slot].handle

    def reset(self, episode_ids: Sequence[str], examples: Sequence[dict[str, Any]]) -> list[list[dict[str, str]]]:
        """Start one episode per id on the least-loaded live workers; returns the prompts."""
        if len(episode_ids) != len(examples):
            raise ValueError(f"{len(episode_ids)} episode ids but {len(examples)} examples")
        if len(set(episode_ids)) != len(episode_ids):
            raise ValueError("episode ids in one reset call must be distinct")
        for eid in episode_ids:
            if not isinstance(eid, str):
                raise ValueError(f"episode ids must be strings, got {eid!r}")
        load = self._load()
        for eid, ex in zip(episode_ids, examples):
            old = self._episodes.get(eid)
            if old is not None and self._slots[old.worker].alive:
                worker = old.worker  # restarting a live id: the worker replaces it in place
            else:
                worker = min((w for w in load), key=lambda w: (load[w], w))
            load[worker] += 1
            self._episodes[eid] = _Record(example=ex, worker=worker)
        prompts: dict[str, list[dict[str, str]]] = {}
        pending = list(episode_ids)
        for attempt in range(self.max_attempts + 1):
            if not pending:
                break
            failed: list[str] = []
            groups = self._group(pending)
            refs = {w: self._slots[w].handle.reset.remote(ids, [self._episodes[e].example for e in ids])
                    for w, ids in groups.items()}
            for w, ids in groups.items():
                try:
                    out = self._ray.get(refs[w])
                except self._ray.exceptions.RayActorError as exc:
                    self._worker_failed(w, exc)
                    failed.extend(ids)
                    continue
                for eid, p in zip(ids, out):
                    prompts[eid] = p
            for eid in failed:
                self._episodes[eid].worker = self._pick_worker(self._episodes[eid].worker)
            failed_set = set(failed)
            for eid in pending:
                if eid not in failed_set:
                    self._episodes[eid].lost = False  # reset went through (after any failure marks)
            pending = failed
        if pending:
            raise RuntimeError(f"could not reset {len(pending)} episode(s) after {self.max_attempts} retries")
        self._stats.resets_served += len(episode_ids)
        return [prompts[eid] for eid in episode_ids]

    def step(self, episode_ids: Sequence[str], actions: Sequence[str]) -> list[StepResult]:
        """Step each episode with its action (same semantics as :meth:`EnvWorker.step`)."""
        if len(episode_ids) != len(actions):
            raise ValueError(f"{len(episode_ids)} episode ids but {len(actions)} actions")
        results: list[StepResult | None] = [None] * len(episode_ids)
        pending: dict[str, int] = {}  # episode id -> position
        for i, eid in enumerate(episode_ids):
            if not isinstance(eid, str) or eid not in self._episodes:
                results[i] = error_step_result(f"unknown or finished episode id {eid!r}", "unknown_episode")
            elif eid in pending:
                results[i] = error_step_result(f"episode id {eid!r} appears twice in one step call", "duplicate_id")
            else:
                pending[eid] = i
        for attempt in range(self.max_attempts + 1):
            if not pending:
                break
            if attempt > 0:
                self._stats.retries += len(pending)
            self._rebuild([e for e in pending if self._episodes[e].lost])
            retry: dict[str, int] = {}
            groups = self._group(list(pending))
            refs = {w: self._slots[w].handle.step.remote(ids, [actions[pending[e]] for e in ids])
                    for w, ids in groups.items()}
            for w, ids in groups.items():
                try:
                    out: list[StepResult] = self._ray.get(refs[w])
                except self._ray.exceptions.RayActorError as exc:
                    self._worker_failed(w, exc)
                    for eid in ids:
                        self._episodes[eid].lost = True  # state after the failed call is unknown
                        retry[eid] = pending[eid]
                    continue
                forgotten = False
                for eid, res in zip(ids, out):
                    if (res.info or {}).get("error_code") == "unknown_episode":
                        self._episodes[eid].lost = True
                        retry[eid] = pending[eid]
                        forgotten = True
                        continue
                    self._accept(eid, actions[pending[eid]], res)
                    results[pending[eid]] = res
                if forgotten:
                    self._check_restart(w)
            pending = retry
        for eid, i in pending.items():
            logger.error("episode %r lost after %d attempts", eid, self.max_attempts)
            self._stats.lost += 1
            self._episodes.pop(eid, None)
            results[i] = error_step_result(
                f"environment worker failed {self.max_attempts + 1} times for episode {eid!r}", "worker_failed")
        return [r for r in results if r is not None]

    def close(self, episode_ids: Sequence[str]) -> None:
        """Forget these episodes here and on their workers (unknown ids are ignored)."""
        groups: dict[int, list[str]] = {}
        for eid in episode_ids:
            rec = self._episodes.pop(eid, None) if isinstance(eid, str) else None
            if rec is not None and self._slots[rec.worker].alive:
                groups.setdefault(rec.worker, []).append(eid)
        refs = [self._slots[w].handle.close.remote(ids) for w, ids in groups.items()]
        for ref in refs:
            try:
                self._ray.get(ref)
            except self._ray.exceptions.RayActorError:
                logger.warning("a worker died while closing episodes; nothing to close there")

    # ------------------------------------------------------------------ internals

    def _accept(self, eid: str, action: str, res: StepResult) -> None:
        rec = self._episodes[eid]
        rec.actions.append(action)
        rec.signatures.append(_signature(res))
        self._stats.steps_served += 1
        if res.done:
            del self._episodes[eid]

    def _load(self) -> dict[int, int]:
        load = {i: 0 for i, s in enumerate(self._slots) if s.alive}
        if not load:
            raise RuntimeError("no live environment workers left in the pool")
        for rec in self._episodes.values():
            if rec.worker in load:
                load[rec.worker] += 1
        return load

    def _pick_worker(self, previous: int) -> int:
        """Where a lost episode goes: its old worker if alive (restarted), else the least loaded."""
        if self._slots[previous].alive:
            return previous
        load = self._load()
        return min(load, key=lambda w: (load[w], w))

    def _group(self, episode_ids: list[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for eid in episode_ids:
            groups.setdefault(self._episodes[eid].worker, []).append(eid)
        return groups

    def _mark_all_lost(self, w: int) -> None:
        for rec in self._episodes.values():
            if rec.worker == w:
                rec.lost = True

    def _probe(self, w: int) -> str | None:
        """The instance id of worker ``w``, or ``None`` if it is gone for good.

        A ping that races with the actor's death fails like the call before it, even when Ray
        is about to restart the actor, so a failed ping is retried ``probe_retries`` times
        (``ActorUnavailableError``, "restarting", until ``probe_timeout_s``).
        """
        ray = self._ray
        deadline = time.monotonic() + self.probe_timeout_s
        died = 0
        while True:
            try:
                return ray.get(self._slots[w].handle.ping.remote(), timeout=self.probe_timeout_s)
            except ray.exceptions.ActorUnavailableError:
                pass  # restarting
            except ray.exceptions.RayActorError:
                died += 1
                if died > self.probe_retries:
                    return None
            except ray.exceptions.GetTimeoutError:
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.25)

    def _check_restart(self, w: int) -> None:
        """After a worker forgot an episode: if it restarted, all its episodes are lost."""
        iid = self._probe(w)
        if iid is None:
            self._retire(w)
        elif iid != self._slots[w].instance_id:
            logger.warning("env worker %d was restarted and forgot its episodes; rebuilding them", w)
            self._stats.restarts_detected += 1
            self._slots[w].instance_id = iid
            self._mark_all_lost(w)

    def _worker_failed(self, w: int, exc: BaseException) -> None:
        self._stats.worker_failures += 1
        logger.warning("env worker %d failed (%s); probing it", w, type(exc).__name__)
        iid = self._probe(w)
        if iid is None:
            self._retire(w)
            return
        if iid != self._slots[w].instance_id:
            logger.warning("env worker %d came back restarted (empty); rebuilding its episodes", w)
            self._stats.restarts_detected += 1
            self._slots[w].instance_id = iid
            self._mark_all_lost(w)

    def _retire(self, w: int) -> None:
        """Worker ``w`` is dead: replace it through the factory, or drop it from rotation."""
        self._mark_all_lost(w)
        if self._factory is not None:
            handle = self._factory(w)
            try:
                iid = self._ray.get(handle.ping.remote(), timeout=self.probe_timeout_s)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError):
                iid = None
            if iid is not None:
                self._slots[w] = _Slot(handle, True, iid)
                self._stats.replacements += 1
                logger.warning("env worker %d replaced by a new actor", w)
                return
        self._slots[w].alive = False
        logger.warning("env worker %d is dead; %d worker(s) left", w, self.num_workers)
        if self.num_workers == 0:
            raise RuntimeError("all environment workers in the pool are dead")
        for rec in self._episodes.values():
            if rec.worker == w:
                rec.worker = self._pick_worker(w)

    def _rebuild(self, episode_ids: list[str]) -> None:
        """Reset lost episodes on a live worker and replay their recorded actions."""
        todo = list(episode_ids)
        for _ in range(self.max_attempts + 1):
            if not todo:
                return
            for eid in todo:
                rec = self._episodes[eid]
                rec.worker = self._pick_worker(rec.worker)
            failed: set[str] = set()
            for w, ids in self._group(todo).items():
                if not self._replay_on(w, ids):
                    failed.update(ids)
            todo = [e for e in todo if e in failed]
        if todo:
            logger.error("could not rebuild %d episode(s); they will be retried or given up", len(todo))

    def _replay_on(self, w: int, ids: list[str]) -> bool:
        """Reset ``ids`` on worker ``w`` and replay their actions round by round; False on failure."""
        handle = self._slots[w].handle
        recs = [self._episodes[e] for e in ids]
        try:
            self._ray.get(handle.reset.remote(ids, [r.example for r in recs]))
            for t in range(max(len(r.actions) for r in recs)):
                sub = [(e, r) for e, r in zip(ids, recs) if t < len(r.actions)]
                out = self._ray.get(handle.step.remote([e for e, _ in sub], [r.actions[t] for _, r in sub]))
                for (eid, rec), res in zip(sub, out):
                    self._stats.replayed_actions += 1
                    if _signature(res) != rec.signatures[t]:
                        self._stats.replay_mismatches += 1
                        logger.error("replay of episode %r turn %d differs from the original", eid, t)
        except self._ray.exceptions.RayActorError as exc:
            self._worker_failed(w, exc)
            return False
        for rec in recs:
            rec.lost = False
        self._stats.replays += len(ids)
        return True
