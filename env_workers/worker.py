"""EnvWorker: one BM25 index and many live episodes, stepped in batches.

A plain Python class; Ray plumbing stays outside: training wraps it with ``ray.remote(EnvWorker)``
(``env.num_workers`` actors, restarted by Ray), and the rollout worker's :class:`actors.env_client.EnvClient`
replays the episodes a restarted one lost. Every ``step`` call runs the
searches of all its episodes in one batched BM25 call. Bad episode ids give an error
:class:`StepResult` (``done=True``, ``info["error"]`` set, ``info["error_code"]`` one of
``"unknown_episode"`` / ``"duplicate_id"``), never an exception, so one bad id cannot kill a
rollout. An episode is released as soon as it is done.

Optional LLM judge (:mod:`env_workers.judge`): with ``judge`` set (an ``LLMJudge``, or a Ray
handle to a ``JudgeActor``) and a positive ``judge_outcome_weight`` / ``judge_turn_weight``,
finished episodes get an outcome component ``judge`` and tool turns a turn component
``judge`` (weight x score in [0, 1]); every result then carries the key (0.0 where the judge
did not run). A failing judge scores 0 and never fails the step.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Sequence

from env_workers.env import StepResult, WikiSearchEnv, error_step_result, step_batch
from env_workers.index import BM25Index
from env_workers.judge import judge_component

logger = logging.getLogger(__name__)


def _call(obj: Any, method: str, items: list[dict[str, Any]]) -> list[float]:
    fn = getattr(obj, method)
    if hasattr(fn, "remote"):  # a Ray actor handle
        import ray

        return list(ray.get(fn.remote(items)))
    return list(fn(items))


class EnvWorker:
    """Holds one index and a table of live :class:`WikiSearchEnv` episodes keyed by id."""

    def __init__(
        self,
        index_dir: str,
        env_kwargs: dict[str, Any] | None = None,
        *,
        mmap: bool = True,
        judge: Any = None,
        judge_outcome_weight: float = 0.0,
        judge_turn_weight: float = 0.0,
        step_latency_s: float = 0.0,
    ) -> None:
        """Load the index saved in ``index_dir``; ``env_kwargs`` go to every ``WikiSearchEnv``.

        ``mmap=True`` (default) memory-maps the score arrays and documents: workers on one node
        share the operating system's page cache instead of each holding a copy of the corpus.
        """
        if judge_outcome_weight < 0 or judge_turn_weight < 0:
            raise ValueError("judge weights must be >= 0")
        if step_latency_s < 0:
            raise ValueError(f"step_latency_s={step_latency_s}: must be >= 0")
        self.step_latency_s = float(step_latency_s)  # added to every step call: a stand-in for a slow tool
        self.index = BM25Index.load(index_dir, mmap=mmap)
        self.env_kwargs = dict(env_kwargs or {})
        WikiSearchEnv(self.index, **self.env_kwargs)  # fail fast on bad kwargs
        self._episodes: dict[str, WikiSearchEnv] = {}
        self.judge = judge
        self.judge_outcome_weight = float(judge_outcome_weight) if judge is not None else 0.0
        self.judge_turn_weight = float(judge_turn_weight) if judge is not None else 0.0
        #: Changes every time the worker is constructed (a restarted actor gets a new one).
        self.instance_id = uuid.uuid4().hex
        logger.info("EnvWorker ready: %d documents from %s", len(self.index), index_dir)

    def ping(self) -> str:
        """This worker's :attr:`instance_id` (a changed id means the actor was restarted)."""
        return self.instance_id

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

    def step(self, episode_ids: Sequence[str], actions: Sequence[str],
             final: Sequence[bool] | None = None) -> list[StepResult]:
        """Step each episode with its action; searches are batched across episodes.

        ``final[i]``: episode i's turn is its last (its token budget is spent), scored as at ``max_turns``.
        """
        if len(episode_ids) != len(actions):
            raise ValueError(f"{len(episode_ids)} episode ids but {len(actions)} actions")
        final = [False] * len(actions) if final is None else list(final)
        if len(final) != len(actions):
            raise ValueError(f"{len(episode_ids)} episode ids but {len(final)} final flags")
        results: list[StepResult | None] = [None] * len(episode_ids)
        envs: list[WikiSearchEnv] = []
        batch_actions: list[str] = []
        batch_final: list[bool] = []
        slots: list[int] = []
        seen: set[str] = set()
        for i, (eid, action) in enumerate(zip(episode_ids, actions)):
            env = self._episodes.get(eid) if isinstance(eid, str) else None
            if env is None:
                results[i] = error_step_result(f"unknown or finished episode id {eid!r}", "unknown_episode")
            elif eid in seen:
                results[i] = error_step_result(f"episode id {eid!r} appears twice in one step call", "duplicate_id")
            else:
                seen.add(eid)
                envs.append(env)
                batch_actions.append(action)
                batch_final.append(bool(final[i]))
                slots.append(i)
        if self.step_latency_s > 0:
            time.sleep(self.step_latency_s)
        stepped = step_batch(envs, batch_actions, batch_final)
        if self.judge_outcome_weight > 0 or self.judge_turn_weight > 0:
            self._add_judge_terms(envs, stepped)
        for i, res in zip(slots, stepped):
            results[i] = res
            if res.done:
                del self._episodes[episode_ids[i]]
        return [r for r in results if r is not None]

    def _add_judge_terms(self, envs: list[WikiSearchEnv], results: list[StepResult]) -> None:
        """Add the ``judge`` component to turn and/or outcome rewards (batched judge calls)."""
        if self.judge_turn_weight > 0:
            turns = [k for k, r in enumerate(results) if r.info.get("tool_called")]
            scores = self._scores("score_turns", [
                {"question": envs[k].question, "answers": envs[k].answers, "action": envs[k].last_action,
                 "observation": results[k].observation_text or results[k].info.get("error") or ""}
                for k in turns
            ])
            by_turn = dict(zip(turns, scores))
            for k, r in enumerate(results):
                r.turn_reward.update(judge_component(by_turn.get(k, 0.0), self.judge_turn_weight))
                if k in by_turn:
                    r.info["judge_turn_score"] = by_turn[k]
        if self.judge_outcome_weight > 0:
            ends = [k for k, r in enumerate(results) if r.done and r.outcome_reward is not None]
            scores = self._scores("score_outcomes", [
                {"question": envs[k].question, "answers": envs[k].answers,
                 "response": results[k].info.get("answer") or ""}
                for k in ends
            ])
            for k, s in zip(ends, scores):
                assert results[k].outcome_reward is not None
                results[k].outcome_reward.update(judge_component(s, self.judge_outcome_weight))
                results[k].info["judge_outcome_score"] = s

    def _scores(self, method: str, items: list[dict[str, Any]]) -> list[float]:
        if not items:
            return []
        try:
            scores = _call(self.judge, method, items)
            if len(scores) != len(items):
                raise ValueError(f"judge returned {len(scores)} scores for {len(items)} items")
            return scores
        except Exception:  # noqa: BLE001 - the judge must never fail a step
            logger.exception("judge %s failed on %d items; scoring them 0", method, len(items))
            return [0.0] * len(items)

    def fork(self, parent_id: str, child_ids: Sequence[str]) -> int:
        """Tree rollouts: episodes ``child_ids`` continue from live episode ``parent_id`` (a copy of its state:
        question, answers, actions so far). Returns how many were forked: 0 when the parent is not live here
        (e.g. this worker restarted); the children's steps then come back ``unknown_episode`` and the rollout
        worker's :class:`actors.env_client.EnvClient` replays them from their histories."""
        env = self._episodes.get(parent_id)
        if env is None:
            return 0
        for cid in child_ids:
            self._episodes[cid] = env.clone()
        return len(child_ids)

    def close(self, episode_ids: Sequence[str]) -> None:
        """Forget these episodes (unknown ids are ignored)."""
        for eid in episode_ids:
            self._episodes.pop(eid, None)

    def num_live(self) -> int:
        """Number of episodes started and not yet done or closed."""
        return len(self._episodes)
