"""EnvWorker: one BM25 index and many live episodes, stepped in batches.

A plain Python class; Ray plumbing stays outside (wrap it with ``ray.remote(EnvWorker)``).
Every ``step`` call runs the searches of all its episodes in one batched BM25 call. Bad
episode ids give an error :class:`StepResult` (``done=True``, ``info["error"]`` set), never an
exception, so one bad id cannot kill a rollout. An episode is released as soon as it is done.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from env_workers.env import StepResult, WikiSearchEnv, error_step_result, step_batch
from env_workers.index import BM25Index

logger = logging.getLogger(__name__)


class EnvWorker:
    """Holds one index and a table of live :class:`WikiSearchEnv` episodes keyed by id."""

    def __init__(self, index_dir: str, env_kwargs: dict[str, Any] | None = None, *, mmap: bool = False) -> None:
        """Load the index saved in ``index_dir``; ``env_kwargs`` go to every ``WikiSearchEnv``."""
        self.index = BM25Index.load(index_dir, mmap=mmap)
        self.env_kwargs = dict(env_kwargs or {})
        WikiSearchEnv(self.index, **self.env_kwargs)  # fail fast on bad kwargs
        self._episodes: dict[str, WikiSearchEnv] = {}
        logger.info("EnvWorker ready: %d documents from %s", len(self.index), index_dir)

    def reset(self, episode_ids: Sequence[str], examples: Sequence[dict[str, Any]]) -> list[list[dict[str, str]]]:
        """Start one episode per id; returns each episode's prompt messages.

        An id that is already live is restarted with its new example.
        """
        if len(episode_ids) != len(examples):
            raise ValueError(f"{len(episode_ids)} episode ids but {len(examples)} examples")
        prompts = []
        for eid, example in zip(episode_ids, examples):
            if eid in self._episodes:
                logger.warning("episode %r reset while live; restarting it", eid)
            env = WikiSearchEnv(self.index, **self.env_kwargs)
            prompts.append(env.reset(example))
            self._episodes[eid] = env
        return prompts

    def step(self, episode_ids: Sequence[str], actions: Sequence[str]) -> list[StepResult]:
        """Step each episode with its action; searches are batched across episodes."""
        if len(episode_ids) != len(actions):
            raise ValueError(f"{len(episode_ids)} episode ids but {len(actions)} actions")
        results: list[StepResult | None] = [None] * len(episode_ids)
        envs: list[WikiSearchEnv] = []
        batch_actions: list[str] = []
        slots: list[int] = []
        seen: set[str] = set()
        for i, (eid, action) in enumerate(zip(episode_ids, actions)):
            env = self._episodes.get(eid) if isinstance(eid, str) else None
            if env is None:
                results[i] = error_step_result(f"unknown or finished episode id {eid!r}")
            elif eid in seen:
                results[i] = error_step_result(f"episode id {eid!r} appears twice in one step call")
            else:
                seen.add(eid)
                envs.append(env)
                batch_actions.append(action)
                slots.append(i)
        for i, res in zip(slots, step_batch(envs, batch_actions)):
            results[i] = res
            if res.done:
                del self._episodes[episode_ids[i]]
        return [r for r in results if r is not None]

    def close(self, episode_ids: Sequence[str]) -> None:
        """Forget these episodes (unknown ids are ignored)."""
        for eid in episode_ids:
            self._episodes.pop(eid, None)

    def num_live(self) -> int:
        """Number of episodes started and not yet done or closed."""
        return len(self._episodes)
