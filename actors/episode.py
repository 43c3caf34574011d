"""One episode of a rollout, as a state machine that every schedule drives the same way.

    begin(prompt messages)                      turn 0, context = the chat-templated prompt
      -> per turn: request  (the full token history; the generator reuses the session's KV)
                   close_turn(output, action, env result) -> the turn's Arrow row
                       done: the env ended it (an answer, max turns, or the token budget marked final)
                       else: observation tokens appended, state hash extended, turn += 1
      -> restart()                             (partial_rollouts: abort) back to begin, new session

The turn-synchronous schedule and the streaming one (actors/rollout.py) differ only in *when* they
call these; what a turn produces is decided here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.messages import GenerationOutput, Request, SamplingParams
from common import schema as S
from common.hashing import stable_hash
from common.modeling import observation_glue, scrub_special_tokens


@dataclass
class Episode:
    episode_id: int
    group_id: int
    prompt_id: int
    group_size: int
    example: dict
    env_index: int
    messages: list[dict] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the full token history the generator has seen
    context: list[int] = field(default_factory=list)  # turn 0's prompt tokens
    turn: int = 0
    state_hash: int = 0  # of the prompt and every observation so far (GiGPO's anchor states)
    done: bool = False
    summary: dict = field(default_factory=dict)
    first_version: int = -1  # policy version of turn 0 (partial_rollouts: abort)
    aborts: int = 0  # restarts after a weight push mid-episode
    held: list = field(default_factory=list)  # rows kept until the episode ends (partial_rollouts: abort)
    node: int = -1  # node id of the last closed turn on this episode's path (rollout.tree); -1 before turn 0
    path_rows: list = field(default_factory=list)  # rows of this path so far, kept while leaves are to fork from it
    active: bool = True  # False: a tree leaf not yet forked from its parent (it takes no turns until then)
    spawns: list = field(default_factory=list)  # rollout.tree: (turn, child Episode) to fork from this one

    @property
    def key(self) -> str:
        """The id env workers and the replay history know the episode by."""
        return str(self.episode_id)

    def begin(self, messages: list[dict], tokenizer) -> None:
        """Turn 0 from the env's prompt messages."""
        self.messages = messages
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        self.context = tokenizer.encode(text, add_special_tokens=False)
        self.tokens = list(self.context)
        self.state_hash = stable_hash(self.context)

    def restart(self) -> None:
        """Throw this attempt away (``begin`` again follows); the next attempt has its own session and seeds."""
        self.aborts += 1
        self.turn, self.done, self.held, self.summary, self.first_version = 0, False, [], {}, -1
        self.node, self.path_rows = -1, []

    def fork(self, child: "Episode") -> list[dict]:
        """``child`` continues from this episode's state (rollout.tree): same history, observations, env
        worker and summary; the rows of the shared path are copied under the child's episode id (same node
        ids) and returned, to be sent as the child's own. Its later turns draw its own seeds."""
        child.messages, child.tokens, child.context = list(self.messages), list(self.tokens), list(self.context)
        child.turn, child.state_hash, child.done = self.turn, self.state_hash, self.done
        child.summary = {**self.summary, "episode_id": child.episode_id, "actions": list(self.actions())}
        child.first_version, child.node, child.env_index = self.first_version, self.node, self.env_index
        child.path_rows = [{**r, S.EPISODE_ID: child.episode_id} for r in self.path_rows]
        child.active = True
        return list(child.path_rows)

    def actions(self) -> list[str]:
        """The actions taken so far (to replay the episode on a restarted env worker)."""
        return list(self.summary.get("actions", []))

    def cap(self, max_tokens_per_turn: int, max_tokens_per_episode: int) -> int:
        """This turn's token cap: the per-turn cap, or what is left of the episode's budget (at least 1)."""
        return max(1, min(max_tokens_per_turn, max_tokens_per_episode - len(self.tokens)))

    def out_of_budget(self, out: GenerationOutput, max_tokens_per_episode: int) -> bool:
        """This turn spends the episode's token budget: it is the last (the env is told ``final``)."""
        return len(self.tokens) + len(out.token_ids) >= max_tokens_per_episode

    def request(self, session_id: str, params: SamplingParams, cap: int) -> Request:
        """This turn for the generator's session API; the seed is per (run seed, episode, turn, attempt)."""
        key = (params.seed, self.episode_id, self.turn) + ((self.aborts,) if self.aborts else ())
        seed = None if params.seed is None else stable_hash(key)
        return Request(session_id, list(self.tokens), params, max_new_tokens=cap, seed=seed,
                       request_id=f"{session_id}#{self.turn}")

    def close_turn(self, out: GenerationOutput, action: str, res: Any, *, tokenizer, run_id: str,
                   max_tokens_per_episode: int, t_start: float, t_end: float) -> dict:
        """The Arrow row of this finished turn; advances the episode, or marks it done.

        ``res`` is the env's ``StepResult``. Either budget ends an episode through the env (the token
        budget by the ``final`` flag), so its outcome is scored the same way; ``truncated`` is the env's
        (out of turns) or a cut mid-action by the token budget.
        """
        info = res.info or {}
        done = bool(res.done)
        budget_spent = self.out_of_budget(out, max_tokens_per_episode)
        if budget_spent and not done:
            raise RuntimeError(f"env worker {self.env_index} did not end episode {self.episode_id} on the turn "
                               "marked final (its token budget is spent); EnvWorker.step must honour `final`")
        truncated = bool(info.get("truncated", False)) or (budget_spent and out.finish_reason == "length")
        obs_ids: list[int] = []
        obs_text = scrub_special_tokens(tokenizer, res.observation_text or "")  # env text never spells a control token
        if not done:
            glue = observation_glue(tokenizer, self.messages, action, obs_text,
                                    bool(out.token_ids) and out.token_ids[-1] == tokenizer.eos_token_id)
            obs_ids = tokenizer.encode(glue, add_special_tokens=False)
        outcome = (res.outcome_reward or {}) if done else {}
        turn_components = {k: float(v) for k, v in (res.turn_reward or {}).items()}
        row = {
            S.RUN_ID: run_id, S.GROUP_ID: self.group_id, S.EPISODE_ID: self.episode_id,
            S.PROMPT_ID: self.prompt_id, S.TURN_INDEX: self.turn, S.POLICY_VERSION: out.version,
            S.CONTEXT_TOKEN_IDS: self.context if self.turn == 0 else [],
            S.ACTION_TOKEN_IDS: out.token_ids, S.ACTION_LOGPROBS: out.logprobs,
            S.OBSERVATION_TOKEN_IDS: obs_ids, S.STATE_HASH: self.state_hash,
            S.TURN_REWARD: sum(turn_components.values()), S.TURN_REWARD_COMPONENTS: turn_components,
            S.IS_LAST_TURN: done, S.OUTCOME_REWARD: sum(outcome.values()),
            S.OUTCOME_REWARD_COMPONENTS: {k: float(v) for k, v in outcome.items()},
            S.TRUNCATED: truncated, S.TOOL_CALLED: bool(info.get("tool_called", False)),
            S.TOOL_SUCCESS: bool(info.get("tool_success", False)),
            S.RESULT_CONTAINS_ANSWER: bool(info.get("result_contains_answer", False)),
            S.GROUP_SIZE: self.group_size, S.T_START: t_start, S.T_END: t_end,
            S.NODE_ID: S.node_id(self.episode_id, self.turn), S.PARENT_NODE_ID: self.node,
        }
        self.node = row[S.NODE_ID]
        if self.spawns:  # only an episode that will fork needs its path's rows (its leaves start from copies)
            self.path_rows.append(row)
        self._summarise(row, action, info)
        if self.turn == 0:
            self.first_version = out.version
        if done:
            self.done = True
        else:
            self.tokens += out.token_ids + obs_ids
            self.messages = self.messages + [{"role": "assistant", "content": action},
                                             {"role": "user", "content": obs_text}]
            self.state_hash = stable_hash((self.state_hash, res.observation_text))  # the prompt and every observation
            self.turn += 1
        return row

    def _summarise(self, row: dict, action: str, info: dict) -> None:
        s = self.summary
        s.setdefault("episode_id", self.episode_id)
        s.setdefault("group_id", self.group_id)
        s["turns"] = self.turn + 1
        s["tool_calls"] = s.get("tool_calls", 0) + int(row[S.TOOL_CALLED])
        s["tool_successes"] = s.get("tool_successes", 0) + int(row[S.TOOL_SUCCESS])
        s["answer_in_result"] = s.get("answer_in_result", False) or row[S.RESULT_CONTAINS_ANSWER]
        s["turn_reward"] = s.get("turn_reward", 0.0) + row[S.TURN_REWARD]
        s["action_tokens"] = s.get("action_tokens", 0) + len(row[S.ACTION_TOKEN_IDS])
        s.setdefault("actions", []).append(action)
        if row[S.IS_LAST_TURN]:
            comps = row[S.OUTCOME_REWARD_COMPONENTS]
            s["outcome_reward"] = row[S.OUTCOME_REWARD]
            s["exact_match"] = float(comps.get("exact_match", 0.0) > 0)
            s["format"] = float(comps.get("format", 0.0))
            s["truncated"] = row[S.TRUNCATED]
            s["answer"] = info.get("answer")


def by_env(items: list, episode_of=lambda x: x) -> dict[int, list]:
    """``items`` grouped by their episode's env worker, in order (one env call per worker)."""
    out: dict[int, list] = {}
    for it in items:
        out.setdefault(episode_of(it).env_index, []).append(it)
    return out
