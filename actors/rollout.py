"""Rollout worker: drives episodes turn by turn and streams one Arrow row per finished turn.

For each turn it asks the generators for the next action of every live episode
(token ids in, token ids + log-probs out, spread over the generators), hands the
actions to the env workers (batched BM25 search, rewards), appends the env reply
as observation tokens rendered by the model's chat template, and sends the
finished turns to the replay queue as a RecordBatch.

Two ways to ask the generators (``session_kv``):

* ``True`` (default): one session per episode (:meth:`Generator.generate_turns` through a
  :class:`actors.pool.GeneratorPool`): the generator keeps the episode's KV cache
  between turns and prefills only the new tokens; episodes stick to one generator,
  new ones go to the least-loaded; a generator that dies is waited for and the
  turn replayed from the token history kept here. Seeds are per (run seed,
  episode, turn), so sampled episodes do not depend on how they were batched.
* ``False``: the original stateless path (:meth:`Generator.generate`): the whole
  history is re-sent and re-prefilled every turn, split in contiguous chunks.

``streaming`` (needs ``session_kv``): instead of turn-synchronous rounds, each episode's
next turn is queued on its generator (``Generator.submit``) as soon as its env step
returns and joins the running batch there (``Generator.poll``), so generation of some
episodes overlaps the env steps of others and no turn waits for the slowest episode.

Greedy decoding gives the same tokens on all three; seeded sampling gives the same tokens
with and without streaming (tests/actors/test_generators.py).

A weight push can land between two turns of an episode (asynchronous mode; generators apply
updates at turn boundaries). ``partial_rollouts`` says what happens to such an episode:

* ``finish``: it goes on; its later turns come from the new weights, and every row keeps the
  version that produced it (the queue's lag bound uses the oldest).
* ``abort``: when a turn comes back from a newer version than the episode's first turn, the
  episode is thrown away and restarted from its prompt (a fresh env episode, a fresh generator
  session, new seeds), so every trained episode comes from one version. Its rows are held here
  and reach the queue only when it ends, so the queue never sees an aborted episode's rows.
  After ``max_aborts_per_episode`` restarts it finishes on mixed versions instead (counted).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.engine import Request, SamplingParams
from actors.env_client import EnvClient
from actors.pool import GeneratorPool
from common import schema as S
from common.hashing import stable_hash
from common.modeling import load_tokenizer, observation_glue, scrub_special_tokens
from common.replay import register_arrow_serializers

log = logging.getLogger(__name__)


@dataclass
class _Episode:
    episode_id: int
    group_id: int
    prompt_id: int
    group_size: int
    example: dict
    env_index: int
    messages: list[dict] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    turn: int = 0
    state_hash: int = 0
    done: bool = False
    summary: dict = field(default_factory=dict)
    first_version: int = -1  # policy version of turn 0 (partial_rollouts: abort)
    aborts: int = 0  # restarts after a weight push mid-episode
    held: list = field(default_factory=list)  # rows kept until the episode ends (partial_rollouts: abort)


class RolloutWorker:
    """Plain class; the driver wraps it with ``ray.remote``."""

    def __init__(self, model_path: str, generators: list, env_workers: list, queue=None, *,
                 run_id: str = "run", max_tokens_per_turn: int = 64, max_tokens_per_episode: int = 512,
                 session_kv: bool = True, streaming: bool = False, env_restart_wait_s: float = 120.0,
                 partial_rollouts: str = "finish", max_aborts_per_episode: int = 2):
        register_arrow_serializers()  # batches put into the queue travel as one Arrow IPC buffer
        self.tokenizer = load_tokenizer(model_path)
        self.generators = generators
        self.env_workers = env_workers
        self.queue = queue
        self.run_id = run_id
        self.max_tokens_per_turn = max_tokens_per_turn
        self.max_tokens_per_episode = max_tokens_per_episode
        self._next_gen = 0
        if streaming and not session_kv:
            raise ValueError("streaming rollouts need session_kv=True")
        self.session_kv, self.streaming = session_kv, streaming
        if partial_rollouts not in ("finish", "abort"):
            raise ValueError(f"partial_rollouts={partial_rollouts!r}: use 'finish' or 'abort'")
        self.partial_rollouts, self.max_aborts_per_episode = partial_rollouts, max_aborts_per_episode
        self._aborted = self._aborted_tokens = self._mixed = 0  # counts of the current run
        self._reused = self._prefilled = 0  # history tokens whose KV the generators reused / prefilled (this run)
        self.pool = GeneratorPool(generators) if session_kv else None
        self.envs = EnvClient(env_workers, restart_wait_s=env_restart_wait_s)  # replays episodes a restarted env worker lost
        self._by_id: dict[str, _Episode] = {}
        self._armed: list[tuple[str, int]] = []  # fault injection (arm_kill)
        self._runs = 0
        self._instance = uuid.uuid4().hex[:12]  # sessions on shared generators never collide with another worker's

    def ping(self) -> bool:
        return True

    def arm_kill(self, role: str, index: int = 0) -> None:
        """Fault injection: kill ``role`` actor ``index`` (``env_worker``, ``generator``, or ``rollout`` = this
        worker) with ``ray.kill(no_restart=False)`` during the next ``run``, after its first turn's rows are in
        the queue, i.e. mid-episode. Ray restarts it (``max_restarts``)."""
        if role not in ("env_worker", "generator", "rollout"):
            raise ValueError(f"arm_kill: unknown role {role!r}")
        self._armed.append((role, index))

    def _fire_armed(self) -> None:
        armed, self._armed = self._armed, []
        for role, index in armed:
            log.warning("fault injection: killing %s %d mid-episode", role, index)
            if role == "rollout":
                ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
                time.sleep(3600)  # the kill lands while we wait; nothing more is sent
            ray.kill((self.env_workers if role == "env_worker" else self.generators)[index], no_restart=False)

    def _history(self, episode_id: str) -> tuple[dict, list[str]]:
        """(example, actions already taken) of a live episode, to replay it on a restarted env worker."""
        e = self._by_id[episode_id]
        return e.example, list(e.summary.get("actions", []))

    def run(self, examples: list[dict], *, group_size: int, first_group_id: int, first_episode_id: int,
            params: SamplingParams, to_queue: bool = True) -> dict[str, Any]:
        """Run ``group_size`` episodes of every example; return per-episode summaries and counts."""
        t0 = time.time()
        episodes: list[_Episode] = []
        for q, ex in enumerate(examples):
            for g in range(group_size):
                eid = first_episode_id + q * group_size + g
                episodes.append(_Episode(eid, first_group_id + q, int(ex.get("prompt_id", first_group_id + q)),
                                         group_size, ex, eid % len(self.env_workers)))
        self._by_id = {str(e.episode_id): e for e in episodes}
        replayed_before = self.envs.replayed
        self._aborted = self._aborted_tokens = self._mixed = 0
        self._reused = self._prefilled = 0
        self._reset(episodes)
        self._runs += 1
        self._session_prefix = f"{self.run_id}/{self._instance}/{self._runs}"  # unique across workers and restarts
        rows_sent, action_tokens, call = 0, 0, 0
        if self.streaming:
            rows_sent, action_tokens = self._run_streaming(episodes, params, to_queue)
        else:
            while True:
                live = [e for e in episodes if not e.done]
                if not live:
                    break
                call += 1
                rows = self._turn(live, params, call)
                action_tokens += sum(len(r[S.ACTION_TOKEN_IDS]) for r in rows)
                if to_queue and rows and self.queue is not None:
                    ray.get(self.queue.put.remote(S.transitions_to_batch(rows)))
                    rows_sent += len(rows)
                self._fire_armed()
        if self.pool is not None:
            self.pool.flush_releases()
        elapsed = time.time() - t0
        return {
            "episodes": [e.summary for e in episodes],
            "rows": rows_sent,
            "action_tokens": action_tokens,
            "seconds": elapsed,
            "env_replayed": self.envs.replayed - replayed_before,  # episodes rebuilt on a restarted env worker
            "aborted_episodes": self._aborted,  # partial_rollouts: abort -- restarts after a mid-episode push
            "aborted_action_tokens": self._aborted_tokens,  # sampled tokens those restarts threw away
            "mixed_version_episodes": self._mixed,  # episodes whose turns came from more than one version
            "reused_tokens": self._reused,  # history tokens of kept turns whose KV the generator reused
            "prefilled_tokens": self._prefilled,  # history tokens of kept turns it prefilled
        }

    # -- phases --------------------------------------------------------------------
    def _reset(self, episodes: list[_Episode]) -> None:
        by_env: dict[int, list[_Episode]] = {}
        for e in episodes:
            by_env.setdefault(e.env_index, []).append(e)
        args = {i: ([str(e.episode_id) for e in eps], [e.example for e in eps]) for i, eps in by_env.items()}
        refs = {i: self.env_workers[i].reset.remote(*a) for i, a in args.items()}
        for i, eps in by_env.items():
            for e, messages in zip(eps, self.envs.finish_reset(i, refs[i], *args[i])):
                e.messages = messages
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                e.context = self.tokenizer.encode(text, add_special_tokens=False)
                e.tokens = list(e.context)
                e.state_hash = stable_hash(e.context)

    def _turn(self, live: list[_Episode], params: SamplingParams, call: int) -> list[dict]:
        t_start = time.time()
        caps = [self._cap(e) for e in live]
        if self.pool is not None:
            outputs = self._generate_sessions(live, params, caps)
        else:
            outputs = self._generate([e.tokens for e in live], params, caps, call)
        actions = [self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs]
        results = self._env_step(live, outputs, actions)
        t_end = time.time()
        rows, aborted = [], []
        for e, out, action, res in zip(live, outputs, actions, results):
            if self._must_abort(e, out):
                aborted.append(e)
            else:
                rows += self._close_turn(e, out, action, res, t_start, t_end)
        done_ids: dict[int, list[int]] = {}
        for e in live:
            if e.done:
                done_ids.setdefault(e.env_index, []).append(str(e.episode_id))
        for i, ids in done_ids.items():
            self.env_workers[i].close.remote(ids)
        if self.pool is not None:
            self.pool.release([self._session_id(e) for e in live if e.done])
        self._restart(aborted)
        return rows

    # -- partial rollouts (a weight push mid-episode) -----------------------------------
    def _must_abort(self, e: _Episode, out) -> bool:
        """Whether this turn's output ends the episode's attempt (``partial_rollouts: abort``)."""
        if e.turn == 0 or out.version == e.first_version:
            return False
        if self.partial_rollouts == "abort" and e.aborts < self.max_aborts_per_episode:
            self._aborted_tokens += len(out.token_ids) + sum(len(r[S.ACTION_TOKEN_IDS]) for r in e.held)
            return True
        if not e.summary.get("mixed_versions"):
            e.summary["mixed_versions"] = True
            self._mixed += 1
        return False

    def _restart(self, episodes: list[_Episode]) -> None:
        """Throw away the attempts of ``episodes`` and start them again from their prompts."""
        if not episodes:
            return
        by_env: dict[int, list[str]] = {}
        for e in episodes:
            by_env.setdefault(e.env_index, []).append(str(e.episode_id))
            self._aborted += 1
        for i, ids in by_env.items():
            self.env_workers[i].close.remote(ids)
        if self.pool is not None:
            self.pool.release([self._session_id(e) for e in episodes])
        log.info("partial_rollouts=abort: %d episode(s) restarted after a weight push mid-episode", len(episodes))
        for e in episodes:
            e.aborts += 1
            e.turn, e.done, e.held, e.summary, e.first_version = 0, False, [], {}, -1
        self._reset(episodes)

    def _close_turn(self, e: _Episode, out, action: str, res, t_start: float, t_end: float) -> list[dict]:
        """The Arrow row of a finished turn, as the rows to send now; advances the episode (or marks it done).

        ``partial_rollouts: abort`` holds an episode's rows until its last turn, then sends them all.
        """
        eos = self.tokenizer.eos_token_id
        self._reused += out.cached_tokens
        self._prefilled += out.prefill_tokens
        info = res.info or {}
        done = bool(res.done)
        if self._out_of_budget(e, out) and not done:
            raise RuntimeError(f"env worker {e.env_index} did not end episode {e.episode_id} on the turn marked final "
                               "(its token budget is spent); EnvWorker.step must honour `final`")
        # truncated: out of turns (the env says) or cut mid-action by the token budget
        truncated = bool(info.get("truncated", False)) or (self._out_of_budget(e, out) and out.finish_reason == "length")
        obs_ids: list[int] = []
        obs_text = scrub_special_tokens(self.tokenizer, res.observation_text or "")  # env text never spells a control token
        if not done:
            glue = observation_glue(self.tokenizer, e.messages, action, obs_text,
                                    bool(out.token_ids) and out.token_ids[-1] == eos)
            obs_ids = self.tokenizer.encode(glue, add_special_tokens=False)
        outcome = (res.outcome_reward or {}) if res.done else {}
        turn_components = {k: float(v) for k, v in (res.turn_reward or {}).items()}
        row = {
            S.RUN_ID: self.run_id, S.GROUP_ID: e.group_id, S.EPISODE_ID: e.episode_id,
            S.PROMPT_ID: e.prompt_id, S.TURN_INDEX: e.turn, S.POLICY_VERSION: out.version,
            S.CONTEXT_TOKEN_IDS: e.context if e.turn == 0 else [],
            S.ACTION_TOKEN_IDS: out.token_ids, S.ACTION_LOGPROBS: out.logprobs,
            S.OBSERVATION_TOKEN_IDS: obs_ids, S.STATE_HASH: e.state_hash,
            S.TURN_REWARD: sum(turn_components.values()), S.TURN_REWARD_COMPONENTS: turn_components,
            S.IS_LAST_TURN: done, S.OUTCOME_REWARD: sum((outcome or {}).values()),
            S.OUTCOME_REWARD_COMPONENTS: {k: float(v) for k, v in (outcome or {}).items()},
            S.TRUNCATED: truncated, S.TOOL_CALLED: bool(info.get("tool_called", False)),
            S.TOOL_SUCCESS: bool(info.get("tool_success", False)),
            S.RESULT_CONTAINS_ANSWER: bool(info.get("result_contains_answer", False)),
            S.GROUP_SIZE: e.group_size, S.T_START: t_start, S.T_END: t_end,
        }
        self._summarise(e, row, action, info)
        if e.turn == 0:
            e.first_version = out.version
        if done:
            e.done = True
        else:
            e.tokens += out.token_ids + obs_ids
            e.messages = e.messages + [{"role": "assistant", "content": action},
                                       {"role": "user", "content": obs_text}]
            e.state_hash = stable_hash((e.state_hash, res.observation_text))  # the prompt and every observation so far
            e.turn += 1
        if self.partial_rollouts == "finish":
            return [row]
        e.held.append(row)
        if not done:
            return []
        rows, e.held = e.held, []
        return rows

    def _session_id(self, e: _Episode) -> str:
        return f"{self._session_prefix}/{e.episode_id}" + (f"~{e.aborts}" if e.aborts else "")

    def _request(self, e: _Episode, params: SamplingParams, cap: int) -> Request:
        key = (params.seed, e.episode_id, e.turn) + ((e.aborts,) if e.aborts else ())
        seed = None if params.seed is None else stable_hash(key)
        return Request(self._session_id(e), list(e.tokens), params, max_new_tokens=cap, seed=seed,
                       request_id=f"{self._session_id(e)}#{e.turn}")

    def _cap(self, e: _Episode) -> int:
        return max(1, min(self.max_tokens_per_turn, self.max_tokens_per_episode - len(e.tokens)))

    def _generate_sessions(self, live: list[_Episode], params: SamplingParams, caps: list[int]):
        """One request per live episode; its generator reuses the episode's KV cache."""
        return self.pool.generate_turns([self._request(e, params, cap) for e, cap in zip(live, caps)])

    def _run_streaming(self, episodes: list[_Episode], params: SamplingParams, to_queue: bool) -> tuple[int, int]:
        """Continuous batching across turns: an episode's next turn is queued on its generator as
        soon as its env step returns, and joins the running batch there; turns of other episodes
        keep decoding meanwhile. Rows go to the queue in batches. Returns (rows sent, action tokens)."""
        pool = self.pool
        by_request: dict[str, _Episode] = {}
        t_submit: dict[int, float] = {}

        def submit(eps: list[_Episode]) -> None:
            reqs = []
            for e in eps:
                r = self._request(e, params, self._cap(e))
                by_request[r.request_id] = e
                t_submit[e.episode_id] = time.time()
                reqs.append(r)
            pool.submit(reqs)

        submit(episodes)
        polls: dict[Any, int] = {}  # poll ref -> generator
        envs: dict[Any, list] = {}  # env ref -> [(episode, output, action)]
        pending_rows: list[dict] = []
        rows_sent = action_tokens = 0
        flush_at = max(8, len(episodes) // 4)
        remaining = len(episodes)
        while remaining:
            for g in pool.busy():
                if g not in polls.values():
                    polls[pool.poll(g)] = g
            if not polls and not envs:
                raise RuntimeError("streaming rollout stalled: no generator or env work in flight")
            ready, _ = ray.wait(list(polls) + list(envs), num_returns=1)
            for ref in ready:
                if ref in polls:
                    g = polls.pop(ref)
                    outs = pool.collect(g, ref)
                    by_env: dict[int, list] = {}
                    for o in outs:
                        e = by_request.pop(o.request_id)
                        action = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
                        by_env.setdefault(e.env_index, []).append((e, o, action))
                    for i, items in by_env.items():
                        envs[self.envs.submit_step(i, *self._step_args(items))] = items
                else:
                    items = envs.pop(ref)
                    results = self.envs.finish_step(items[0][0].env_index, ref, *self._step_args(items), self._history)
                    t_end = time.time()
                    nxt, ended, aborted = [], [], []
                    for (e, o, action), res in zip(items, results):
                        if self._must_abort(e, o):
                            aborted.append(e)
                            continue
                        action_tokens += len(o.token_ids)
                        pending_rows += self._close_turn(e, o, action, res, t_submit[e.episode_id], t_end)
                        (ended if e.done else nxt).append(e)
                    self._restart(aborted)
                    nxt += aborted
                    if ended:
                        remaining -= len(ended)
                        by_env_done: dict[int, list[str]] = {}
                        for e in ended:
                            by_env_done.setdefault(e.env_index, []).append(str(e.episode_id))
                        for i, ids in by_env_done.items():
                            self.env_workers[i].close.remote(ids)
                        pool.release([self._session_id(e) for e in ended])
                    submit(nxt)
            flush = len(pending_rows) >= flush_at or not remaining
            if to_queue and self.queue is not None and pending_rows and flush:
                ray.get(self.queue.put.remote(S.transitions_to_batch(pending_rows)))
                rows_sent += len(pending_rows)
                pending_rows = []
                self._fire_armed()
        return rows_sent, action_tokens

    def _generate(self, prompts: list[list[int]], params: SamplingParams, caps: list[int], call: int):
        """Spread the batch over the generators in contiguous, balanced chunks."""
        n = len(self.generators)
        chunk = -(-len(prompts) // n)
        refs = []
        for j in range(n):
            lo, hi = j * chunk, min(len(prompts), (j + 1) * chunk)
            if lo >= hi:
                continue
            p = SamplingParams(**{**params.__dict__})
            if p.seed is not None:
                p.seed = p.seed + 1_000_003 * call + j
            gen = self.generators[(self._next_gen + j) % n]
            refs.append(gen.generate.remote(prompts[lo:hi], p, caps[lo:hi]))
        self._next_gen = (self._next_gen + 1) % n
        return [o for chunk_out in ray.get(refs) for o in chunk_out]

    def _env_step(self, live: list[_Episode], outputs: list, actions: list[str]) -> list:
        by_env: dict[int, list[int]] = {}
        for k, e in enumerate(live):
            by_env.setdefault(e.env_index, []).append(k)
        args = {i: self._step_args([(live[k], outputs[k], actions[k]) for k in ks]) for i, ks in by_env.items()}
        refs = {i: self.envs.submit_step(i, *a) for i, a in args.items()}
        results: list = [None] * len(live)
        for i, ks in by_env.items():
            for k, r in zip(ks, self.envs.finish_step(i, refs[i], *args[i], self._history)):
                results[k] = r
        return results

    def _out_of_budget(self, e: _Episode, out) -> bool:
        """This turn spends the episode's token budget (``generation.max_tokens_per_episode``): it is the last."""
        return len(e.tokens) + len(out.token_ids) >= self.max_tokens_per_episode

    def _step_args(self, items: list) -> tuple[list[str], list[str], list[bool]]:
        """``(episode ids, actions, final flags)`` of one env worker's ``step`` for ``[(episode, output, action)]``."""
        return ([str(e.episode_id) for e, _, _ in items], [a for _, _, a in items],
                [self._out_of_budget(e, o) for e, o, _ in items])

    @staticmethod
    def _summarise(e: _Episode, row: dict, action: str, info: dict) -> None:
        s = e.summary
        s.setdefault("episode_id", e.episode_id)
        s.setdefault("group_id", e.group_id)
        s["turns"] = e.turn + 1
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
