"""One episode of the Wikipedia-search environment (the stable ``reset``/``step`` interface).

``env.reset(example) -> messages``; ``env.step(action_text) -> StepResult``. A step is split
into :meth:`WikiSearchEnv.prepare` (parse; returns the query to run, if any) and
:meth:`WikiSearchEnv.finish` (takes the hits, computes rewards) so that :func:`step_batch`
can run the searches of many episodes in one batched BM25 call.

Rules per assistant turn (turn ``t`` of ``max_turns``):

* valid tool call: search, observation = formatted result, turn reward = tool_execution +
  result_contains_answer; done (``truncated``) only on the episode's last turn;
* malformed tool call: observation = the error inside the result tags, zero turn reward;
  done (``truncated``) only on the episode's last turn;
* ``<answer>``: done, zero turn reward, outcome computed;
* neither: done, zero turn reward, outcome computed with no answer.

When an episode ends the observation is ``""`` (nothing follows the last action) and
``outcome_reward`` is set. ``truncated`` means the episode ran out of turns without an answer; it
is not the same as a wrong answer.

The episode's last turn is turn ``max_turns``, or an earlier one the caller marks ``final``
(the rollout worker does when ``generation.max_tokens_per_episode`` is spent): both end the same
way, through :meth:`WikiSearchEnv._end`, so the outcome (format terms included) is scored alike
whichever budget ran out.
"""

from __future__ import annotations

import copy

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from env_workers.index import BM25Index, Hit
from env_workers.protocol import ParsedAction, format_result, get_protocol, parse_action, result_content
from env_workers.rewards import (
    AnswerMatch,
    RewardWeights,
    contains_answer,
    outcome_reward,
    turn_reward,
    zero_turn_reward,
)

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You answer questions using a Wikipedia search tool. First think inside "
    "<reasoning>...</reasoning>. To search, write "
    '<tool>{"name": "wiki_search", "args": {"query": "..."}}</tool> '
    "and the result comes back inside <result>...</result>. "
    "Give the final answer inside <answer>...</answer>."
)
SEARCH_R1_SYSTEM_PROMPT = (
    "You answer questions using a Wikipedia search tool. First think inside "
    "<think>...</think>. To search, write <search>query</search> and the result comes back "
    "inside <information>...</information>. Give the final answer inside <answer>...</answer>."
)
SYSTEM_PROMPTS = {"paper": DEFAULT_SYSTEM_PROMPT, "search_r1": SEARCH_R1_SYSTEM_PROMPT}


@dataclass
class StepResult:
    """What one ``step`` returns.

    ``info`` holds at least: ``tool_called``, ``tool_success``, ``result_contains_answer``,
    ``truncated``, ``query``, ``answer``, ``error`` (plus ``turn_index``, ``action_kind``).
    """

    observation_text: str
    turn_reward: dict[str, float]
    done: bool
    outcome_reward: dict[str, float] | None
    info: dict[str, Any] = field(default_factory=dict)


def error_step_result(message: str, code: str = "error") -> StepResult:
    """A terminal StepResult for a step that could not run (unknown episode, ...).

    ``info["error_code"]`` says why in a machine-readable way (``"unknown_episode"``,
    ``"duplicate_id"``, ...).
    """
    return StepResult(
        observation_text="",
        turn_reward=zero_turn_reward(),
        done=True,
        outcome_reward=None,
        info={
            "tool_called": False, "tool_success": False, "result_contains_answer": False,
            "truncated": False, "query": None, "answer": None, "error": message,
            "turn_index": -1, "action_kind": "none", "error_code": code,
        },
    )


class WikiSearchEnv:
    """A multi-turn search-and-answer episode over a :class:`BM25Index`."""

    def __init__(
        self,
        index: BM25Index,
        *,
        system_prompt: str | None = None,
        protocol: str = "paper",
        max_turns: int = 2,
        top_k: int = 1,
        max_result_chars: int = 400,
        weights: RewardWeights = RewardWeights(),
        answer_match: AnswerMatch = "normalized",
        max_query_chars: int = 512,
    ) -> None:
        """``system_prompt=None`` picks the protocol's default (``DEFAULT_SYSTEM_PROMPT`` for paper)."""
        get_protocol(protocol)  # validate the name
        if max_turns < 1 or top_k < 1 or max_result_chars < 1:
            raise ValueError("max_turns, top_k and max_result_chars must be >= 1")
        if answer_match not in ("normalized", "strict"):
            raise ValueError(f"answer_match must be 'normalized' or 'strict', got {answer_match!r}")
        self.index = index
        self.system_prompt = SYSTEM_PROMPTS[protocol] if system_prompt is None else system_prompt
        self.protocol = protocol
        self.max_turns = max_turns
        self.top_k = top_k
        self.max_result_chars = max_result_chars
        self.weights = weights
        self.answer_match: AnswerMatch = answer_match
        self.max_query_chars = max_query_chars
        self._example: dict[str, Any] | None = None
        self._answers: list[str] = []
        self._turns: list[str] = []
        self._pending: ParsedAction | None = None
        self._final = False  # the pending turn is the episode's last (prepare's ``final``)
        self.done = True

    # ----------------------------------------------------------------- episode

    @property
    def turn_index(self) -> int:
        """Number of actions taken so far."""
        return len(self._turns)

    @property
    def question(self) -> str:
        """The question of the current episode (``""`` before :meth:`reset`)."""
        return self._example.get("question", "") if self._example else ""

    @property
    def answers(self) -> list[str]:
        """The answer aliases of the current episode."""
        return list(self._answers)

    @property
    def last_action(self) -> str:
        """The latest action text (``""`` before the first step)."""
        return self._turns[-1] if self._turns else ""

    def reset(self, example: dict[str, Any]) -> list[dict[str, str]]:
        """Start an episode for ``example`` (needs ``question`` and ``answers`` or ``answer``)."""
        question = example.get("question")
        if not isinstance(question, str):
            raise ValueError(f"example needs a string 'question', got keys {sorted(example)}")
        answers = example.get("answers", example.get("answer", []))
        if isinstance(answers, str):
            answers = [answers]
        self._example = example
        self._answers = [a for a in answers if isinstance(a, str)]
        self._turns = []
        self._pending = None
        self.done = False
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": question},
        ]

    def clone(self) -> "WikiSearchEnv":
        """An independent copy of this episode at its current turn (tree rollouts fork here); the index and
        the settings are shared, the episode state is not."""
        if self._pending is not None:
            raise RuntimeError("clone() between prepare() and finish()")
        twin = copy.copy(self)
        twin._answers, twin._turns = list(self._answers), list(self._turns)
        return twin

    def prepare(self, action_text: str, final: bool = False) -> str | None:
        """Parse ``action_text``; returns the search query to run, or ``None`` if no search.

        ``final``: this is the episode's last turn whatever ``max_turns`` says (its token budget is spent).
        """
        if self.done:
            raise RuntimeError("step() on a finished episode; call reset() first")
        if self._pending is not None:
            raise RuntimeError("prepare() called twice without finish()")
        text = action_text if isinstance(action_text, str) else ""
        self._turns.append(text)
        self._final = bool(final)
        self._pending = parse_action(text, self.protocol, max_query_chars=self.max_query_chars)
        return self._pending.query if self._pending.is_valid_tool_call else None

    def finish(self, hits: Sequence[Hit] | None, search_error: str | None = None) -> StepResult:
        """Complete the step begun by :meth:`prepare` with the search ``hits`` for its query."""
        action = self._pending
        if action is None:
            raise RuntimeError("finish() without prepare()")
        self._pending = None
        t = self.turn_index
        last_turn = t >= self.max_turns or self._final
        info: dict[str, Any] = {
            "tool_called": action.kind == "tool", "tool_success": False,
            "result_contains_answer": False, "truncated": False, "query": action.query,
            "answer": action.answer, "error": action.error, "turn_index": t - 1,
            "action_kind": action.kind,
        }
        if action.kind == "tool":
            error = action.error if action.error is not None else search_error
            success = error is None
            passages = list(hits or []) if success else None
            content = result_content(passages, error, self.max_result_chars)
            observation = format_result(passages, error, self.protocol, self.max_result_chars)
            reward = turn_reward(
                tool_called=True, tool_success=success, result_text=content if success else "",
                answers=self._answers, weights=self.weights, answer_match=self.answer_match,
            )
            info.update(
                tool_success=success, error=error,
                result_contains_answer=success and contains_answer(content, self._answers, self.answer_match),
                num_hits=len(hits or []) if success else 0,
            )
            if not last_turn:
                return StepResult(observation, reward, False, None, info)
            info["truncated"] = True
            return self._end(reward, None, info)
        return self._end(zero_turn_reward(), action.answer if action.kind == "answer" else None, info)

    def step(self, action_text: str) -> StepResult:
        """Take one assistant action (parse, search if asked, reward)."""
        return step_batch([self], [action_text])[0]

    def _end(self, reward: dict[str, float], answer: str | None, info: dict[str, Any]) -> StepResult:
        self.done = True
        outcome = outcome_reward(
            answer=answer, answers=self._answers, assistant_turns=self._turns,
            protocol=self.protocol, weights=self.weights, answer_match=self.answer_match,
        )
        return StepResult("", reward, True, outcome, info)


def step_batch(envs: Sequence[WikiSearchEnv], actions: Sequence[str],
               final: Sequence[bool] | None = None) -> list[StepResult]:
    """Step many episodes at once with one batched search per distinct index.

    ``final[i]``: episode i's turn is its last (see :meth:`WikiSearchEnv.prepare`); default none is.

    Parsing and rewards never raise on model output; a failing search turns into an error
    observation for the episodes that asked for it.
    """
    if len(envs) != len(actions):
        raise ValueError(f"{len(envs)} envs but {len(actions)} actions")
    final = [False] * len(envs) if final is None else [bool(f) for f in final]
    if len(final) != len(envs):
        raise ValueError(f"{len(envs)} envs but {len(final)} final flags")
    if len({id(e) for e in envs}) != len(envs):
        raise ValueError("the same env appears twice in one step_batch call")
    for env in envs:
        if env.done:
            raise RuntimeError("step on a finished episode; call reset() first")
    queries = [env.prepare(a, f) for env, a, f in zip(envs, actions, final)]
    hits: list[list[Hit] | None] = [None] * len(envs)
    errors: list[str | None] = [None] * len(envs)
    groups: dict[int, list[int]] = {}
    for i, (env, q) in enumerate(zip(envs, queries)):
        if q is not None:
            groups.setdefault(id(env.index), []).append(i)
    for members in groups.values():
        index, top_k = envs[members[0]].index, max(envs[i].top_k for i in members)
        try:
            found = index.search([queries[i] for i in members], k=top_k)
        except Exception as exc:  # noqa: BLE001 - a search failure must not kill the rollout
            logger.exception("batched search failed for %d queries", len(members))
            for i in members:
                errors[i] = f"search failed ({type(exc).__name__})"
            continue
        for i, h in zip(members, found):
            hits[i] = h[: envs[i].top_k]
    return [env.finish(h, e) for env, h, e in zip(envs, hits, errors)]
