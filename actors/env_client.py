"""The rollout worker's side of the env workers: calls that survive an env worker's restart.

An env worker keeps its live episodes in memory, so when it dies and Ray restarts it
(``env.max_restarts``) those episodes are gone: a call in flight fails (``RayActorError``) and
later steps come back as ``error_code == "unknown_episode"`` results. Neither may end an episode
that is still running. :class:`EnvClient` notices both, waits for the restarted actor, and
*replays* each lost episode on it: ``reset`` with its example, then ``step`` with every action
it already took, then the step that was asked for. The environment is deterministic (parsing,
BM25 search, rubric), so the rebuilt episode is the one that was lost, and the rows already sent
to the replay queue stay valid: the episode goes on under the same id, no turn is sent twice,
no episode is dropped. ``replayed`` counts the episodes rebuilt this way.

Plain Python (no actor): the rollout worker owns one, as it owns a ``GeneratorPool``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from actors.liveness import wait_alive

log = logging.getLogger(__name__)

LOST = "unknown_episode"  # EnvWorker.step's error_code for an id it does not hold

#: ``history(episode_id) -> (example, actions already taken)`` for a live episode.
History = Callable[[str], tuple[dict, list[str]]]


def lost_slots(results: Sequence[Any]) -> list[int]:
    """Positions of the results whose episode the env worker did not hold (it restarted)."""
    return [k for k, r in enumerate(results) if (getattr(r, "info", None) or {}).get("error_code") == LOST]


class EnvClient:
    """Calls into a list of env worker actors, replaying episodes a restarted worker lost.

    Args:
        workers: ``EnvWorker`` actor handles.
        restart_wait_s: how long to wait for Ray to bring a dead worker back before giving up.
        attempts: replays of one call before it fails (a worker may die again while replaying).
    """

    def __init__(self, workers: list, *, restart_wait_s: float = 120.0, attempts: int = 3):
        self.workers = list(workers)
        self.restart_wait_s = restart_wait_s
        self.attempts = attempts
        self.replayed = 0  # episodes rebuilt on a restarted worker

    def reset(self, i: int, episode_ids: list[str], examples: list[dict]) -> list[list[dict]]:
        """``EnvWorker.reset`` on worker ``i``; retried on its restarted actor if it dies meanwhile."""
        return self.finish_reset(i, self.workers[i].reset.remote(episode_ids, examples), episode_ids, examples)

    def finish_reset(self, i: int, ref: Any, episode_ids: list[str], examples: list[dict]) -> list[list[dict]]:
        """The result of a ``reset`` call already submitted as ``ref`` (resetting again after a crash)."""
        import ray
        from ray.exceptions import RayActorError

        for _ in range(self.attempts):
            try:
                return ray.get(ref)
            except RayActorError as err:
                log.warning("env worker %d died during reset (%s); resetting on its restart", i, type(err).__name__)
                self.wait(i)
                ref = self.workers[i].reset.remote(episode_ids, examples)
        return ray.get(ref)

    def submit_step(self, i: int, episode_ids: list[str], actions: list[str], final: list[bool]) -> Any:
        """Start ``EnvWorker.step`` on worker ``i``; returns the object ref for :meth:`finish_step`.

        ``final[k]``: episode k's turn is its last (its token budget is spent; the env scores it as at max turns).
        """
        return self.workers[i].step.remote(episode_ids, actions, final)

    def finish_step(self, i: int, ref: Any, episode_ids: list[str], actions: list[str], final: list[bool],
                    history: History) -> list:
        """The results of a submitted step; episodes the worker lost are replayed and stepped again."""
        import ray
        from ray.exceptions import RayActorError

        try:
            results: list = list(ray.get(ref))
            lost = lost_slots(results)
        except RayActorError as err:
            log.warning("env worker %d died during a step (%s)", i, type(err).__name__)
            results, lost = [None] * len(episode_ids), list(range(len(episode_ids)))
        if not lost:
            return results
        ids = [episode_ids[k] for k in lost]
        redo = self.replay(i, ids, [history(e) for e in ids], [actions[k] for k in lost], [final[k] for k in lost])
        for k, r in zip(lost, redo):
            results[k] = r
        return results

    def replay(self, i: int, episode_ids: list[str], histories: list[tuple[dict, list[str]]],
               actions: list[str], final: list[bool]) -> list:
        """Rebuild episodes on worker ``i`` (reset + their earlier actions), then step them with ``actions``."""
        import ray
        from ray.exceptions import RayActorError

        log.warning("env worker %d lost %d live episodes (restarted); replaying them", i, len(episode_ids))
        for attempt in range(self.attempts):
            self.wait(i)
            w = self.workers[i]
            try:
                ray.get(w.reset.remote(episode_ids, [h[0] for h in histories]))
                for t in range(max((len(h[1]) for h in histories), default=0)):
                    sel = [k for k, h in enumerate(histories) if len(h[1]) > t]
                    ray.get(w.step.remote([episode_ids[k] for k in sel], [histories[k][1][t] for k in sel]))
                results = list(ray.get(w.step.remote(episode_ids, actions, final)))
            except RayActorError as err:
                log.warning("env worker %d died again while replaying (%s)", i, type(err).__name__)
                continue
            if not lost_slots(results):
                self.replayed += len(episode_ids)
                return results
        raise RuntimeError(f"env worker {i} lost episodes {episode_ids[:4]}... and kept failing while they were "
                           f"replayed ({self.attempts} attempts); see env.max_restarts")

    def close(self, i: int, episode_ids: list[str]) -> None:
        """Forget finished episodes on worker ``i`` (fire and forget)."""
        self.workers[i].close.remote(episode_ids)

    def wait(self, i: int) -> None:
        """Block until worker ``i`` answers a ping (Ray restarts it); ``ActorGone`` if it will not."""
        wait_alive(self.workers[i], f"env worker {i}", self.restart_wait_s, "env.max_restarts")
