"""The session scheduler of the ``hf`` engine: continuous batching with KV kept across turns.

:class:`SessionScheduler` is mixed into :class:`actors.engine.HFEngine`, which provides the
model side: ``_forward`` (one forward over KV slots), ``_stops`` / ``_hit_string`` (stop
strings), ``_load_tensors`` (weights), ``tokenizer``, ``device``, ``model`` and ``version``.
This module keeps the bookkeeping: sessions, waiting and running turns, the KV token budget.

- A :class:`Request` carries a session id (one per episode) and the *full* token
  history of the episode. The engine keeps each session's KV cache between
  turns and prefills only the tokens its cache does not hold (the last action
  token + the observation), after checking that the cached tokens are a prefix
  of the history it was sent. A session it does not hold (evicted, freed, lost
  with a restarted actor, computed under older weights) is simply prefilled in
  full: the history in the request is the fallback, so correctness never
  depends on the cache.
- Running rows live in KV slots (:mod:`actors.kv_slots`): decode steps write in
  place, rows leave the batch the step their turn ends (stop string, EOS, turn
  cap, episode cap) and waiting requests join at the next step, as long as the
  KV token budget allows: running rows reserve ``len(history) + cap + 1`` tokens,
  idle sessions hold their cached length, and when a new row needs room idle
  sessions are evicted: first those with no queued turn (least recently used
  first), then queued ones from the back of the queue. While rows are decoding,
  admissions are batched (a quarter of the batch queued, or 8 steps waited)
  because each admission costs a prefill forward. Rows with identical histories
  and as many tokens cached (a GRPO group's G copies of one prompt; later turns of
  episodes that acted alike so far) are prefilled once.
- Sampling is per row (temperature, top-p, top-k, greedy, seed) with
  counter-based randomness (:mod:`actors.sampling`), so a seeded request draws
  the same tokens whatever it is batched with.
- Weight updates (``update_weights``) apply at once when no row is running;
  otherwise they are staged, admission pauses, the running rows finish their
  turn under the weights they started with, and the update applies before the
  next admission. So a turn is always produced by exactly one weight version,
  recorded in its output. By default the cached KV of every session is dropped
  when the version changes (the next turn re-prefills the history under the new
  weights, so log-probs are exactly those of the new policy); set
  ``keep_kv_across_versions`` to reuse stale KV instead (faster, slightly off-policy).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from actors.kv_slots import KVSlots
from actors.messages import GenerationOutput, Request, SamplingParams
from actors.sampling import sample, split_seed
from common.hashing import stable_seed

log = logging.getLogger(__name__)


class SessionScheduler:
    """Scheduler state and steps of the session API (see the module docstring)."""

    @torch.no_grad()
    def _step(self) -> list[tuple["_Row", GenerationOutput]]:
        done: list[tuple[_Row, GenerationOutput]] = []
        if self._staged and not self._rows:
            self._apply_staged()
        if not self._staged and self._waiting and self._admission_due():
            self._admit(done)
        if self._rows:
            self._decode()
            self._retire(done)
        self._tick += 1
        if not self._rows and not self._waiting and self._kv.slots * self._kv.width > self.kv_budget_tokens:
            self._kv.release()  # idle with an oversized slab: give the memory back (sessions keep copies)
        return done

    def _init_sessions(self, kv_budget_tokens: int, keep_kv_across_versions: bool, max_prefill_tokens: int) -> None:
        """Scheduler state; the KV slabs are shaped after the model's (text) config."""
        cfg = self.model.config.get_text_config(decoder=True)
        types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        self._session_ok = types <= {"full_attention"}
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        dtype = next(self.model.parameters()).dtype
        self._kv = KVSlots(cfg.num_hidden_layers, kv_heads, head_dim, dtype, self.device)
        self.kv_budget_tokens = int(kv_budget_tokens)
        self.keep_kv_across_versions = bool(keep_kv_across_versions)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # LRU order: oldest first
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []  # running; row i lives in KV slot i
        self._staged: list[tuple[int, list[dict[str, torch.Tensor]]]] = []
        self._outbox: list[tuple[_Row, GenerationOutput]] = []  # finished, not yet returned
        self._reserved = 0  # tokens reserved by running rows
        self._cached_tokens = 0  # tokens held by idle sessions' compact caches
        self._evictions = 0
        self._tick = 0  # scheduler steps so far
        self.admit_wait_steps = 8
        self._counters = {"prefill_tokens": 0, "prefill_padded_tokens": 0, "reused_tokens": 0,
                          "shared_prompt_rows": 0, "decode_steps": 0, "forwards": 0, "forked_sessions": 0,
                          "forked_tokens": 0}
        self._rng = random.Random()
        self._tok_text: dict[int, str] = {}

    def _set_version(self, version: int) -> None:
        if version != self.version and not self.keep_kv_across_versions:
            for s in self._sessions.values():  # stale KV: the next turn re-prefills the history
                self._drop_kv(s)
        self.version = version

    def _apply_staged(self) -> None:
        for version, states in self._staged:
            for s in states:
                self._load_tensors(s)
            self._set_version(version)
        self._staged.clear()

    def _new_row(self, r: Request, k: int) -> "_Row":
        if not self._session_ok:
            raise NotImplementedError("the session scheduler supports full-attention models only (this one has "
                                      "sliding-window layers): use generate_turns (stateless fallback) or generate()")
        p = r.params
        ids = [int(t) for t in r.token_ids]
        if not ids:
            raise ValueError(f"request for session {r.session_id!r} has no tokens")
        cap = p.max_new_tokens if r.max_new_tokens is None else min(r.max_new_tokens, p.max_new_tokens)
        if r.max_total_tokens is not None:
            cap = min(cap, r.max_total_tokens - len(ids))
        seed = r.seed
        if seed is None:
            seed = stable_seed(p.seed, r.session_id, len(ids)) if p.seed is not None else self._rng.getrandbits(64)
        stop_ids, stop_strings = self._stops(p.stop)
        row = _Row(r.session_id, ids, p, max(0, cap), seed, stop_ids, stop_strings, k)
        row.request_id = r.request_id
        return row

    def _admission_due(self) -> bool:
        """Batch admissions: each one costs a prefill forward of its own, so while rows are
        decoding, wait until a quarter of the batch's worth of turns is queued or the oldest
        has waited ``admit_wait_steps`` steps."""
        if not self._rows:
            return True
        if len(self._waiting) >= max(1, len(self._rows) // 4):
            return True
        return self._tick - self._waiting[0].queued_at >= self.admit_wait_steps

    def _evict_for(self, need: int, keep: str | None) -> None:
        """Drop idle sessions' caches until ``need`` more tokens fit in the budget.

        Victims: first sessions with no queued turn (least recently used first), then
        queued ones from the back of the queue (needed last). Plain LRU would evict
        exactly the session needed next when every episode takes one turn in turn.
        """
        if self._reserved + self._cached_tokens + need <= self.kv_budget_tokens:
            return
        queued: dict[str, int] = {}
        for k, row in enumerate(self._waiting):
            queued.setdefault(row.sid, k)
        order = [(sid in queued, -queued.get(sid, 0), age) for age, sid in enumerate(self._sessions)]
        victims = sorted(zip(order, self._sessions.items()), key=lambda x: x[0])
        for _, (sid, s) in victims:
            if self._reserved + self._cached_tokens + need <= self.kv_budget_tokens:
                return
            if sid != keep and s.kv is not None and not s.running:
                self._drop_kv(s)
                self._evictions += 1

    def _drop_kv(self, s: "_Session") -> None:
        if s.kv is not None:
            self._cached_tokens -= len(s.tokens)
        s.kv, s.tokens = None, []

    def _admit(self, done: list[tuple["_Row", GenerationOutput]]) -> None:
        """Move waiting turns into the running batch, in order, while the KV budget allows."""
        admitted: list[_Row] = []
        later: deque[_Row] = deque()  # turns of sessions whose previous turn is still running
        while self._waiting:
            row = self._waiting[0]
            s = self._sessions.get(row.sid)
            if s is not None and s.running:
                later.append(self._waiting.popleft())
                continue
            if row.cap == 0:  # nothing to generate (episode cap reached): the cache stays as it is
                self._waiting.popleft()
                done.append((row, self._output(row, "length")))
                continue
            reuse = 0
            if s is not None and s.kv is not None:
                n = len(s.tokens)
                fresh = s.version == self.version or self.keep_kv_across_versions
                if fresh and n <= len(row.ids) and row.ids[:n] == s.tokens:
                    reuse = min(n, len(row.ids) - 1)  # at least one token must be fed to get logits
                else:  # history diverged or stale weights: the cache is useless
                    self._drop_kv(s)
            need = len(row.ids) + row.cap + 1
            own = len(s.tokens) if reuse else 0  # the session's cache moves into the slot
            if self._reserved + self._cached_tokens - own + need > self.kv_budget_tokens:
                self._evict_for(need - own, row.sid)
                if self._reserved + self._cached_tokens - own + need > self.kv_budget_tokens:
                    if self._rows or admitted:
                        break  # first come, first served: wait for running rows to leave
                    log.warning("turn of session %s needs %d KV tokens, over the budget of %d: running it alone",
                                row.sid, need, self.kv_budget_tokens)
            self._waiting.popleft()
            if s is None:
                s = self._sessions[row.sid] = _Session()
            self._sessions.move_to_end(row.sid)
            s.history = list(row.ids)
            row.kv, row.reuse = (s.kv if reuse else None), reuse  # the cache moves into the slot
            self._drop_kv(s)
            s.running = True
            row.reserve = need
            self._reserved += need
            admitted.append(row)
        self._waiting.extendleft(reversed(later))
        if admitted:
            self._prefill(admitted, done)

    def _prefill(self, rows: list["_Row"], done: list[tuple["_Row", GenerationOutput]]) -> None:
        rows.sort(key=lambda r: len(r.ids) - r.reuse)
        i = 0
        while i < len(rows):  # chunks of at most max_prefill_tokens (padded)
            j = i + 1
            while j < len(rows) and (j + 1 - i) * (len(rows[j].ids) - rows[j].reuse) <= self.max_prefill_tokens:
                j += 1
            self._prefill_chunk(rows[i:j])
            i = j
        self._retire(done)

    def _prefill_chunk(self, rows: list["_Row"]) -> None:
        """Prefill the uncached tokens of ``rows`` in one forward; sample each row's first token.

        Rows with identical histories and as many tokens cached are prefilled once; the others copy
        that KV row (prefix sharing): the G copies of a GRPO group's prompt on the first turn, and on
        later turns the episodes of a group that acted alike so far (same search, same result). Their
        cached prefixes are the same tokens under the same weights (a cache is reused only at its
        version), so the copy is the KV they would have computed.
        """
        unique: list[_Row] = []
        first: dict[tuple, int] = {}
        src_of: list[int] = []  # for each row, the index in ``unique`` whose logits/KV it takes
        for r in rows:
            key = (r.reuse, tuple(r.ids))
            if key in first:
                src_of.append(first[key])
                continue
            first[key] = len(unique)
            src_of.append(len(unique))
            unique.append(r)
        lo = len(self._rows)
        n_new = [len(r.ids) - r.reuse for r in unique]
        q = max(n_new)
        width = max(max(len(r.ids) + r.cap, r.reuse + q) + 1 for r in rows)
        width = max(width, max((len(r.ids) + r.cap + 1 for r in self._rows), default=0))
        self._kv.ensure(lo + len(rows), width, used=lo)
        ids = torch.full((len(unique), q), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        qpos = torch.empty((len(unique), q), dtype=torch.long)
        for b, r in enumerate(unique):
            if r.kv is not None and r.reuse:
                self._kv.write_row(lo + b, [(k[:, : r.reuse], v[:, : r.reuse]) for k, v in r.kv])
            n, c, pad = n_new[b], r.reuse, q - n_new[b]
            # new tokens right-aligned so the last real token sits in column q-1 for every row;
            # the pad tokens in front write their junk after the real ones (columns >= c + n)
            ids[b, pad:] = torch.tensor(r.ids[c:], dtype=torch.long)
            qpos[b, pad:] = torch.arange(c, c + n)
            qpos[b, :pad] = torch.arange(c + n, c + n + pad)
        logits = self._forward(ids, qpos, lo, lo + len(unique), int(qpos.max()) + 1)  # [U, V]
        self._counters["prefill_tokens"] += sum(n_new)
        self._counters["prefill_padded_tokens"] += len(unique) * q
        self._counters["reused_tokens"] += sum(r.reuse for r in unique)
        self._counters["shared_prompt_rows"] += len(rows) - len(unique)
        placed = {id(r): lo + b for b, r in enumerate(unique)}
        slot = lo + len(unique)
        for r, u in zip(rows, src_of):
            r.kv = None
            r.length = len(r.ids)
            if id(r) not in placed:  # a duplicate: copy the shared prompt's KV
                self._kv.move_row(lo + u, slot, r.length)
                placed[id(r)], slot = slot, slot + 1
            r.slot = placed[id(r)]
        src_by_row = {id(r): u for r, u in zip(rows, src_of)}
        order = sorted(rows, key=lambda r: r.slot)
        self._rows.extend(order)
        index = torch.tensor([src_by_row[id(r)] for r in order], dtype=torch.long, device=logits.device)
        self._sample(order, logits.index_select(0, index))

    def _decode(self) -> None:
        """Feed every running row its last sampled token (all rows here are unfinished)."""
        ids = torch.tensor([[r.out_ids[-1]] for r in self._rows], dtype=torch.long)  # [B, 1]
        qpos = torch.tensor([[r.length] for r in self._rows], dtype=torch.long)  # [B, 1]
        logits = self._forward(ids, qpos, 0, len(self._rows), int(qpos.max()) + 1)
        self._counters["decode_steps"] += 1
        for r in self._rows:
            r.length += 1
        self._sample(self._rows, logits)

    def _sample(self, rows: list["_Row"], logits: torch.Tensor) -> None:
        live = [b for b, r in enumerate(rows) if not r.finished]
        if len(live) < len(rows):
            logits = logits[live]
        act = [rows[b] for b in live]
        tok, lp = sample(logits, [r.params for r in act], [(r.seed_lo, r.seed_hi) for r in act],
                         [len(r.out_ids) for r in act])
        for r, t, l in zip(act, tok.tolist(), lp.tolist()):
            r.out_ids.append(t)
            r.out_lp.append(l)
            if t in r.stop_ids or (r.stop_strings and self._stop_string_hit(r.out_ids, r.stop_strings)):
                r.finished, r.reason = True, "stop"
            elif len(r.out_ids) >= r.cap:
                r.finished, r.reason = True, "length"

    def _retire(self, done: list[tuple["_Row", GenerationOutput]]) -> None:
        """Move finished rows out of the running batch (last row fills the hole)."""
        k = 0
        while k < len(self._rows):
            r = self._rows[k]
            if not r.finished:
                k += 1
                continue
            s = self._sessions.get(r.sid)
            self._reserved -= r.reserve
            if s is not None and s.running:
                s.running = False
                s.history = r.ids + r.out_ids
                s.tokens = r.ids + r.out_ids[:-1]  # the last sampled token was never fed
                assert len(s.tokens) == r.length
                s.kv = self._kv.read_row(k, r.length)
                s.version = self.version
                self._cached_tokens += len(s.tokens)
            done.append((r, self._output(r, r.reason)))
            last = len(self._rows) - 1
            if k != last:
                moved = self._rows[last]
                self._kv.move_row(last, k, moved.length)
                moved.slot = k
                self._rows[k] = moved
            self._rows.pop()
        if self._reserved + self._cached_tokens > self.kv_budget_tokens:
            self._evict_for(0, None)

    def _output(self, r: "_Row", reason: str) -> GenerationOutput:
        return GenerationOutput(r.out_ids, r.out_lp, reason, self.version, session_id=r.sid,
                                cached_tokens=r.reuse, prefill_tokens=len(r.ids) - r.reuse if r.cap else 0,
                                request_id=r.request_id)

    def _stop_string_hit(self, ids: list[int], stops: list[str]) -> bool:
        """True when a stop string ends inside the last token (it may span several tokens)."""
        last = ids[-1]
        text = self._tok_text.get(last)
        if text is None:
            text = self._tok_text[last] = self.tokenizer.decode([last], skip_special_tokens=False)
        if "\ufffd" not in text and not any(s[-1] in text for s in stops):
            return False
        return self._hit_string(ids, stops)


@dataclass
class _Session:
    history: list[int] = field(default_factory=list)  # every token of the episode so far
    tokens: list[int] = field(default_factory=list)  # the prefix whose KV is cached in ``kv``
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [kv_heads, len(tokens), head_dim]
    version: int = 0  # weights that computed ``kv``
    running: bool = False  # a turn of this session is in the running batch


class _Row:
    """One turn in the scheduler (waiting, then running in KV slot ``slot``)."""

    def __init__(self, sid: str, ids: list[int], params: SamplingParams, cap: int, seed: int,
                 stop_ids: set[int], stop_strings: list[str], order: int):
        self.sid, self.ids, self.params, self.cap = sid, ids, params, cap
        self.seed_lo, self.seed_hi = split_seed(seed)
        self.stop_ids, self.stop_strings, self.order = stop_ids, stop_strings, order
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.reuse = 0  # history tokens taken from the session cache
        self.reserve = 0  # KV tokens reserved against the budget
        self.slot = -1
        self.length = 0  # tokens in the slot's KV
        self.out_ids: list[int] = []
        self.out_lp: list[float] = []
        self.finished = False
        self.reason = "length"
        self.queued_at = 0  # scheduler tick when it was queued
        self.request_id: str | None = None

