"""EnvWorker: one BM25 index and many live episodes, stepped in batches.

A plain Python class; Ray plumbing stays outside: training wraps it with ``ray.remote(EnvWorker)``
(``env.num_workers`` actors, restarted by Ray), and the rollout worker's :class:`actors.env_client.EnvClient`
replays the episodes a restarted one lost. Every ``step`` call runs the
searches of all its episodes in one batched BM25 call. Bad episode ids give an error
:class:`StepResult` (``done=True``, ``info["error"]`` set, ``info["error_code"]`` one of
``"unknown_episode"`` / ``"duplicate_id"``), never an exception, so one bad id cannot kill a
rollout. An episode is released as soon as it is done.

Optional judge (``judge:`` config; :mod:`env_workers.judge_client`): with ``judge`` set (a
:class:`env_workers.judge_client.JudgeClient` holding the judge actors' handles), each step sends
one batched request for all its episodes: search turns get a turn component ``judge`` and
finished answers an outcome component ``judge`` (the client's weight x score in [0, 1]); every
result of a judged kind then carries the key (0.0 where the judge did not run). A failing or
late judge scores 0 (counted in :meth:`EnvWorker.judge_stats`) and never fails the step. An
example with ``"judge": False`` (held-out evaluation) is never judged.

What training uses: ``ray.remote(EnvWorker)`` from :class:`learner.trainer.Trainer`, called by the
rollout workers through :class:`actors.env_client.EnvClient`: ``reset``, ``step``, ``fork``,
``close``, ``ping``, and ``judge_stats`` for the step's metrics.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Sequence

from env_workers.env import StepResult, WikiSearchEnv, error_step_result, step_batch
from env_workers.index import BM25Index
from env_workers.judge import judge_component
from env_workers.judge_client import JudgeClient

logger = logging.getLogger(__name__)


class EnvWorker:
    """Holds one index and a table of live :class:`WikiSearchEnv` episodes keyed by id."""

    def __init__(
        self,
        index_dir: str,
        env_kwargs: dict[str, Any] | None = None,
        *,
        mmap: bool = True,
        judge: JudgeClient | None = None,
        step_latency_s: float = 0.0,
    ) -> None:
        """Load the index saved in ``index_dir``; ``env_kwargs`` go to every ``WikiSearchEnv``.

        ``mmap=True`` (default) memory-maps the score arrays and documents: workers on one node
        share the operating system's page cache instead of each holding a copy of the corpus.
        """
        if step_latency_s < 0:
            raise ValueError(f"step_latency_s={step_latency_s}: must be >= 0")
        self.step_latency_s = float(step_latency_s)  # added to every step call: a stand-in for a slow tool
        self.index = BM25Index.load(index_dir, mmap=mmap)
        self.env_kwargs = dict(env_kwargs or {})
        WikiSearchEnv(self.index, **self.env_kwargs)  # fail fast on bad kwargs
        self._episodes: dict[str, WikiSearchEnv] = {}
        self.judge = judge
        self._unjudged: set[str] = set()  # live episodes whose example said "judge": False
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
            if example.get("judge", True) is False:
                self._unjudged.add(eid)
            else:
                self._unjudged.discard(eid)
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
        if self.judge is not None:
            self._add_judge_terms(envs, stepped, [episode_ids[i] not in self._unjudged for i in slots])
        for i, res in zip(slots, stepped):
            results[i] = res
            if res.done:
                del self._episodes[episode_ids[i]]
                self._unjudged.discard(episode_ids[i])
        return [r for r in results if r is not None]

    def _add_judge_terms(self, envs: list[WikiSearchEnv], results: list[StepResult], judged: list[bool]) -> None:
        """Add the ``judge`` component to search turns and/or final answers: one batched judge request."""
        assert self.judge is not None
        wt, wo = self.judge.weight("turn"), self.judge.weight("outcome")
        items: list[tuple[str, dict[str, Any]]] = []
        where: list[tuple[int, str]] = []
        for k, r in enumerate(results):
            env = envs[k]
            if wt > 0 and judged[k] and r.info.get("tool_called"):
                items.append(("turn", {"question": env.question, "answers": env.answers, "action": env.last_action,
                                       "observation": r.observation_text or r.info.get("error") or ""}))
                where.append((k, "turn"))
            if wo > 0 and judged[k] and r.done and r.outcome_reward is not None:
                items.append(("outcome", {"question": env.question, "answers": env.answers,
                                          "response": r.info.get("answer") or ""}))
                where.append((k, "outcome"))
        scores = self.judge.score(items) if items else []
        got = {kw: s for kw, s in zip(where, scores)}
        for k, r in enumerate(results):
            if wt > 0:
                r.turn_reward.update(judge_component(got.get((k, "turn"), 0.0), wt))
                if (k, "turn") in got:
                    r.info["judge_turn_score"] = got[(k, "turn")]
            if wo > 0 and r.outcome_reward is not None:
                r.outcome_reward.update(judge_component(got.get((k, "outcome"), 0.0), wo))
                if (k, "outcome") in got:
                    r.info["judge_outcome_score"] = got[(k, "outcome")]

    def judge_stats(self) -> dict[str, Any]:
        """The judge client's running counts (``{}`` without a judge) and this worker's :attr:`instance_id`
        (counts restart from 0 when a restarted worker has a new one)."""
        return {"instance_id": self.instance_id, **(self.judge.stats() if self.judge is not None else {})}

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
            if parent_id in self._unjudged:
                self._unjudged.add(cid)
        return len(child_ids)

    def close(self, episode_ids: Sequence[str]) -> None:
        """Forget these episodes (unknown ids are ignored)."""
        for eid in episode_ids:
            self._episodes.pop(eid, None)
            self._unjudged.discard(eid)

    def num_live(self) -> int:
        """Number of episodes started and not yet done or closed."""
        return len(self._episodes)
