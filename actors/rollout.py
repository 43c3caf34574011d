"""Rollout worker: drives episodes turn by turn and streams one Arrow row per finished turn.

For each turn it asks the generators for the next action of every live episode (token ids in,
token ids + log-probs out), hands the actions to the env workers (batched BM25 search, rewards),
appends the env reply as observation tokens rendered by the model's chat template, and sends the
finished turns to the replay queue as a RecordBatch. What one turn does to an episode is
:class:`actors.episode.Episode`'s; this module only schedules.

Every episode is a session on one generator (:meth:`Generator.generate_turns` through a
:class:`actors.pool.GeneratorPool`): the generator keeps the episode's KV cache between turns and
prefills only the new tokens; episodes stick to one generator, new ones go to the least-loaded; a
generator that dies is waited for and the turn replayed from the token history kept here. Seeds are
per (run seed, episode, turn), so sampled episodes do not depend on how they were batched.

Two schedules drive the same episodes:

* turn-synchronous (default): every live episode's turn is generated, then all of them step their
  envs, round after round;
* ``streaming``: each episode's next turn is queued on its generator (``Generator.submit``) as soon
  as its env step returns and joins the running batch there (``Generator.poll``), so generation of
  some episodes overlaps the env steps of others and no turn waits for the slowest episode.

Greedy decoding gives the same tokens as re-prefilling the whole history every turn; seeded
sampling gives the same tokens with and without streaming (tests/actors/test_generators.py).

A weight push can land between two turns of an episode (asynchronous mode; generators apply
updates at turn boundaries). ``partial_rollouts`` says what happens to such an episode:

* ``finish``: it goes on; its later turns come from the new weights, and every row keeps the
  version that produced it (the queue's lag bound uses the oldest).
* ``abort``: when a turn comes back from a newer version than the episode's first turn, the
  episode is thrown away and restarted from its prompt (a fresh env episode, a fresh generator
  session, new seeds), so every trained episode comes from one version. Its rows are held here
  and reach the queue only when it ends, so the queue never sees an aborted episode's rows.
  After ``max_aborts_per_episode`` restarts it finishes on mixed versions instead (counted).

Tree rollouts (``tree_branch_turns``, ``tree_children``; rollout.tree): a question's ``group_size``
episodes are the leaves of a tree (:meth:`RolloutWorker._plant`). Only the roots start from the prompt;
when a root reaches a branch turn, the leaves due there fork from it (:meth:`RolloutWorker._branch`):
env state, generator session (shared KV) and a copy of the shared path's rows under the leaf's own
episode id (same node ids), then each draws its own turns. Both schedules drive trees the same way.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

import ray

from actors.engine import SamplingParams
from actors.env_client import EnvClient
from actors.episode import Episode, by_env
from actors.fault_injection import KillSwitch
from actors.pool import GeneratorPool
from common import schema as S
from common.modeling import load_tokenizer
from common.replay import register_arrow_serializers

log = logging.getLogger(__name__)

#: one generated turn waiting for (or back from) its env step: (episode, generator output, decoded action)
Item = tuple[Episode, Any, str]


class RolloutWorker:
    """Plain class; the driver wraps it with ``ray.remote``."""

    def __init__(self, model_path: str, generators: list, env_workers: list, queue=None, *,
                 run_id: str = "run", max_tokens_per_turn: int = 64, max_tokens_per_episode: int = 512,
                 streaming: bool = False, env_restart_wait_s: float = 120.0,
                 partial_rollouts: str = "finish", max_aborts_per_episode: int = 2,
                 tree_branch_turns: tuple[int, ...] = (), tree_children: int = 2):
        register_arrow_serializers()  # batches put into the queue travel as one Arrow IPC buffer
        self.tokenizer = load_tokenizer(model_path)
        self.generators = generators
        self.env_workers = env_workers
        self.queue = queue
        self.run_id = run_id
        self.max_tokens_per_turn = max_tokens_per_turn
        self.max_tokens_per_episode = max_tokens_per_episode
        self.streaming = streaming
        if partial_rollouts not in ("finish", "abort"):
            raise ValueError(f"partial_rollouts={partial_rollouts!r}: use 'finish' or 'abort'")
        self.partial_rollouts, self.max_aborts_per_episode = partial_rollouts, max_aborts_per_episode
        self.tree_branch_turns, self.tree_children = tuple(sorted(set(tree_branch_turns))), int(tree_children)
        if self.tree_branch_turns and (partial_rollouts != "finish" or min(self.tree_branch_turns) < 1
                                       or self.tree_children < 2):
            raise ValueError("tree rollouts need partial_rollouts='finish', branch turns >= 1 and >= 2 children")
        self._aborted = self._aborted_tokens = self._mixed = 0  # counts of the current run
        self._reused = self._prefilled = 0  # history tokens whose KV the generators reused / prefilled (this run)
        self.pool = GeneratorPool(generators)
        self.envs = EnvClient(env_workers, restart_wait_s=env_restart_wait_s)  # replays episodes a restarted env worker lost
        self._by_id: dict[str, Episode] = {}
        self._kills = KillSwitch()  # fault injection (arm_kill)
        self._runs = 0
        self._instance = uuid.uuid4().hex[:12]  # sessions on shared generators never collide with another worker's

    def ping(self) -> bool:
        return True

    def arm_kill(self, role: str, index: int = 0) -> None:
        """Fault injection: kill ``role`` actor ``index`` (``env_worker``, ``generator``, or ``rollout`` = this
        worker) with ``ray.kill(no_restart=False)`` during the next ``run``, after its first turn's rows are in
        the queue, i.e. mid-episode. Ray restarts it (``max_restarts``)."""
        self._kills.arm(role, index)

    def _history(self, episode_id: str) -> tuple[dict, list[str]]:
        """(example, actions already taken) of a live episode, to replay it on a restarted env worker."""
        e = self._by_id[episode_id]
        return e.example, e.actions()

    def run(self, examples: list[dict], *, group_size: int, first_group_id: int, first_episode_id: int,
            params: SamplingParams, to_queue: bool = True, tree: bool = True) -> dict[str, Any]:
        """Run ``group_size`` episodes of every example; return per-episode summaries and counts.

        With tree branch turns configured and ``tree`` (evaluation passes False), the ``group_size`` episodes
        of a question are the leaves of a tree (:meth:`_plant`)."""
        t0 = time.time()
        episodes: list[Episode] = []
        for q, ex in enumerate(examples):
            for g in range(group_size):
                eid = first_episode_id + q * group_size + g
                episodes.append(Episode(eid, first_group_id + q, int(ex.get("prompt_id", first_group_id + q)),
                                        group_size, ex, eid % len(self.env_workers)))
        if tree and self.tree_branch_turns:
            for q in range(len(examples)):
                self._plant(episodes[q * group_size:(q + 1) * group_size])
        self._by_id = {e.key: e for e in episodes}
        replayed_before = self.envs.replayed
        self._aborted = self._aborted_tokens = self._mixed = self._forked = 0
        self._reused = self._prefilled = 0
        self._reset([e for e in episodes if e.active])
        self._runs += 1
        self._session_prefix = f"{self.run_id}/{self._instance}/{self._runs}"  # unique across workers and restarts
        schedule = self._run_streaming if self.streaming else self._run_turn_sync
        rows_sent, action_tokens = schedule(episodes, params, to_queue)
        self.pool.flush_releases()
        return {
            "episodes": [e.summary for e in episodes],
            "rows": rows_sent,
            "action_tokens": action_tokens,
            "seconds": time.time() - t0,
            "env_replayed": self.envs.replayed - replayed_before,  # episodes rebuilt on a restarted env worker
            "aborted_episodes": self._aborted,  # partial_rollouts: abort -- restarts after a mid-episode push
            "aborted_action_tokens": self._aborted_tokens,  # sampled tokens those restarts threw away
            "mixed_version_episodes": self._mixed,  # episodes whose turns came from more than one version
            "reused_tokens": self._reused,  # history tokens of kept turns whose KV the generator reused
            "prefilled_tokens": self._prefilled,  # history tokens of kept turns it prefilled
            "forked_episodes": self._forked,  # rollout.tree: leaves forked from a live parent mid-episode
        }

    # -- the two schedules --------------------------------------------------------------
    def _run_turn_sync(self, episodes: list[Episode], params: SamplingParams, to_queue: bool) -> tuple[int, int]:
        """Round after round: every live episode's turn, then every env step. Returns (rows sent, action tokens)."""
        rows_sent = action_tokens = 0
        while live := [e for e in episodes if e.active and not e.done]:
            t_start = time.time()
            outputs = self.pool.generate_turns([self._request(e, params) for e in live])
            items = [(e, o, self._decode(o)) for e, o in zip(live, outputs)]
            results = self._env_step(items)
            rows, generated, _ = self._end_turns(items, results, lambda e: t_start, time.time())
            action_tokens += generated
            if to_queue and rows:
                rows_sent += self._send(rows)
            self._kills.fire(self.env_workers, self.generators)
        return rows_sent, action_tokens

    def _run_streaming(self, episodes: list[Episode], params: SamplingParams, to_queue: bool) -> tuple[int, int]:
        """Continuous batching across turns: an episode's next turn is queued on its generator as
        soon as its env step returns, and joins the running batch there; turns of other episodes
        keep decoding meanwhile. Rows go to the queue in batches. Returns (rows sent, action tokens)."""
        pool = self.pool
        by_request: dict[str, Episode] = {}
        t_submit: dict[int, float] = {}

        def submit(eps: list[Episode]) -> None:
            reqs = [self._request(e, params) for e in eps]
            for e, r in zip(eps, reqs):
                by_request[r.request_id] = e
                t_submit[e.episode_id] = time.time()
            pool.submit(reqs)

        submit([e for e in episodes if e.active])
        polls: dict[Any, int] = {}  # poll ref -> generator
        envs: dict[Any, list[Item]] = {}  # env ref -> its items
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
                    outs = pool.collect(polls.pop(ref), ref)
                    items = [(by_request.pop(o.request_id), o, self._decode(o)) for o in outs]
                    for i, its in by_env(items, lambda it: it[0]).items():
                        envs[self.envs.submit_step(i, *self._step_args(its))] = its
                else:
                    items = envs.pop(ref)
                    results = self.envs.finish_step(items[0][0].env_index, ref, *self._step_args(items),
                                                    self._history)
                    rows, generated, forked = self._end_turns(items, results, lambda e: t_submit[e.episode_id],
                                                              time.time())
                    action_tokens += generated
                    pending_rows += rows
                    remaining = sum(1 for e in episodes if not e.done)
                    # the restarted ones too, and the leaves forked from these (rollout.tree)
                    submit([e for e, _, _ in items if not e.done] + forked)
            flush = len(pending_rows) >= flush_at or not remaining
            if to_queue and pending_rows and flush:
                rows_sent += self._send(pending_rows)
                pending_rows = []
                self._kills.fire(self.env_workers, self.generators)
        return rows_sent, action_tokens

    # -- phases both schedules share --------------------------------------------------------
    def _reset(self, episodes: list[Episode]) -> None:
        """Start ``episodes`` on their env workers (one call per worker) and begin them from the prompts."""
        groups = by_env(episodes)
        args = {i: ([e.key for e in eps], [e.example for e in eps]) for i, eps in groups.items()}
        refs = {i: self.env_workers[i].reset.remote(*a) for i, a in args.items()}
        for i, eps in groups.items():
            for e, messages in zip(eps, self.envs.finish_reset(i, refs[i], *args[i])):
                e.begin(messages, self.tokenizer)

    def _request(self, e: Episode, params: SamplingParams):
        return e.request(self._session_id(e), params, e.cap(self.max_tokens_per_turn, self.max_tokens_per_episode))

    def _decode(self, out) -> str:
        return self.tokenizer.decode(out.token_ids, skip_special_tokens=True)

    def _step_args(self, items: list[Item]) -> tuple[list[str], list[str], list[bool]]:
        """``(episode ids, actions, final flags)`` of one env worker's ``step``: a turn that spends the
        episode's token budget is its last, and the env ends it as it would at max turns."""
        return ([e.key for e, _, _ in items], [a for _, _, a in items],
                [e.out_of_budget(o, self.max_tokens_per_episode) for e, o, _ in items])

    def _env_step(self, items: list[Item]) -> list:
        """Step every item's env (one call per env worker, all in flight at once); results in item order."""
        groups = by_env(list(range(len(items))), lambda k: items[k][0])
        args = {i: self._step_args([items[k] for k in ks]) for i, ks in groups.items()}
        refs = {i: self.envs.submit_step(i, *a) for i, a in args.items()}
        results: list = [None] * len(items)
        for i, ks in groups.items():
            for k, r in zip(ks, self.envs.finish_step(i, refs[i], *args[i], self._history)):
                results[k] = r
        return results

    def _end_turns(self, items: list[Item], results: list, t_start: Callable[[Episode], float],
                   t_end: float) -> tuple[list[dict], int, list[Episode]]:
        """Close the turns whose env steps came back. Returns the rows to send now (with the copies of the
        forked leaves' shared turns), the action tokens these turns generated, and the tree leaves forked
        from them that take turns of their own now (:meth:`_branch`).

        Episodes that ended are forgotten by their env workers and generators; an episode caught by a
        weight push mid-episode under ``partial_rollouts: abort`` starts again from its prompt.
        """
        rows: list[dict] = []
        ended, aborted, closed = [], [], []
        for (e, out, action), res in zip(items, results):
            if self._must_abort(e, out):
                aborted.append(e)
                continue
            self._reused += out.cached_tokens
            self._prefilled += out.prefill_tokens
            row = e.close_turn(out, action, res, tokenizer=self.tokenizer, run_id=self.run_id,
                               max_tokens_per_episode=self.max_tokens_per_episode, t_start=t_start(e), t_end=t_end)
            rows += self._rows_to_send(e, row)
            closed.append(e)
            if e.done:
                ended.append(e)
        generated = sum(len(r[S.ACTION_TOKEN_IDS]) for r in rows)
        forked, copies = self._branch(closed)
        rows += copies
        self._forget(ended)
        if aborted:
            self._aborted += len(aborted)
            log.info("partial_rollouts=abort: %d episode(s) restarted after a weight push mid-episode", len(aborted))
            self._forget(aborted)
            for e in aborted:
                e.restart()
            self._reset(aborted)
        return rows, generated, forked

    # -- tree rollouts (rollout.tree) -------------------------------------------------------
    def _plant(self, leaves: list[Episode]) -> None:
        """Make one question's episodes the leaves of a tree: ``c = tree_children`` children at each branch
        turn ``t_1 < ... < t_m``, so ``len(leaves) / c^m`` roots start from the prompt as independent episodes.

        With block sizes ``B_j = c^(m-j)``, leaf ``g`` is a root when ``B_0`` divides it; otherwise it is forked
        at turn ``t_j`` (the smallest ``j`` with ``B_j | g``) from leaf ``g - g mod B_(j-1)``, i.e. it shares the
        path of that leaf up to turn ``t_j - 1`` and draws its own turns from ``t_j`` on.
        """
        c, turns = self.tree_children, self.tree_branch_turns
        blocks = [c ** (len(turns) - j) for j in range(len(turns) + 1)]
        if len(leaves) % blocks[0]:
            raise ValueError(f"group_size {len(leaves)} is not a multiple of tree_children^len(branch_turns) = "
                             f"{blocks[0]}")
        for g, leaf in enumerate(leaves):
            if g % blocks[0] == 0:
                continue
            j = next(j for j in range(1, len(blocks)) if g % blocks[j] == 0)
            leaves[g - g % blocks[j - 1]].spawns.append((turns[j - 1], leaf))
            leaf.active = False

    def _branch(self, closed: list[Episode]) -> tuple[list[Episode], list[dict]]:
        """Fork the tree leaves that are due from episodes whose turn just closed.

        A leaf due at branch turn ``t`` forks when its parent reaches turn ``t``: env state, generator session
        (KV shared, :meth:`HFEngine.fork`) and the rows of the shared path. If the parent ends before ``t``, all
        its pending leaves (and theirs) are finished copies of its path. Returns (leaves that now take turns,
        the rows copied for all forked leaves).
        """
        started: list[Episode] = []
        copies: list[dict] = []
        todo = [e for e in closed if e.spawns]
        while todo:
            e = todo.pop()
            due = [c for t, c in e.spawns if e.done or t == e.turn]
            if not due:
                continue
            e.spawns = [(t, c) for t, c in e.spawns if not (e.done or t == e.turn)]
            for child in due:
                copies += self._rows_to_send(child, None, e.fork(child))
            if e.done:
                todo += [c for c in due if c.spawns]
                continue
            self.env_workers[e.env_index].fork.remote(e.key, [c.key for c in due])
            self.pool.fork(self._session_id(e), [self._session_id(c) for c in due])
            self._forked += len(due)
            started += due
        return started, copies

    def _forget(self, episodes: list[Episode]) -> None:
        """Free these episodes on their env workers and their generator sessions (fire and forget)."""
        for i, eps in by_env(episodes).items():
            self.env_workers[i].close.remote([e.key for e in eps])
        self.pool.release([self._session_id(e) for e in episodes])

    def _send(self, rows: list[dict]) -> int:
        if self.queue is None:
            return 0
        ray.get(self.queue.put.remote(S.transitions_to_batch(rows)))
        return len(rows)

    # -- partial rollouts (a weight push mid-episode) -----------------------------------
    def _must_abort(self, e: Episode, out) -> bool:
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

    def _rows_to_send(self, e: Episode, row: dict | None, copied: list[dict] | None = None) -> list[dict]:
        """``finish``: the row now (or a forked leaf's ``copied`` rows). ``abort``: an episode's rows are held
        until its last turn, then all sent (trees need ``finish``)."""
        if self.partial_rollouts == "finish":
            return [row] if row is not None else list(copied or [])
        e.held.append(row)
        if not e.done:
            return []
        rows, e.held = e.held, []
        return rows

    def _session_id(self, e: Episode) -> str:
        return f"{self._session_prefix}/{e.episode_id}" + (f"~{e.aborts}" if e.aborts else "")
