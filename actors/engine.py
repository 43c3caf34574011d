"""The ``hf`` decoding engine: token ids in, token ids + log-probs out.

Batched decoding with a KV cache over a Hugging Face causal LM. The engine never
sees text it has to tokenise: it takes the exact token ids of each conversation
and returns the sampled action ids with the log-probability of each sampled token
under the generating weights (after temperature scaling, which is what the learner
uses too).

Two ways in:

* ``generate(prompts, params, max_new_tokens)`` -- one static batch, left padded,
  everything prefilled from scratch (the original path, kept as is).
* the **session API** -- ``submit(requests)`` / ``step()`` / ``generate_turns(requests)``
  (and the one-request helpers ``start`` / ``continue_``): a continuous-batching
  scheduler for multi-turn episodes.

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
    and nothing cached (a GRPO group's G copies of one prompt) are prefilled once.
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

import hashlib
import logging
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable

import torch

from actors.kv_slots import KVSlots, SlotForwardCache
from actors.sampling import sample_rows, split_seed
from actors.weights import PackedBucket, apply_bucket

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    greedy: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationOutput:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (stop string or EOS) | "length"
    version: int  # weight version that produced every token of this output
    session_id: str | None = None  # session API only
    cached_tokens: int = 0  # history tokens whose KV was reused instead of prefilled
    prefill_tokens: int = 0  # history tokens prefilled for this turn
    request_id: str | None = None  # the Request's request_id (session API only)


@dataclass
class Request:
    """One turn of one episode for the session API.

    ``token_ids`` is the *full* history of the episode (prompt, earlier actions and
    observations); the engine prefills only what the session's cache lacks.
    """

    session_id: str  # one per episode; KV of the session is kept between its turns
    token_ids: list[int]  # full token history so far (never re-tokenised text)
    params: SamplingParams  # temperature / top-p / top-k / greedy / stop / max_new_tokens
    max_new_tokens: int | None = None  # this turn's cap (also capped by params.max_new_tokens)
    max_total_tokens: int | None = None  # episode cap: len(token_ids) + new tokens <= this
    seed: int | None = None  # None: derived from params.seed and the history, or random
    request_id: str | None = None  # echoed in the output (callers match replies to requests with it)


def stable_seed(*parts) -> int:
    """A process-independent 64-bit seed from any repr-able parts."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (token ids [B], log-probs [B]).

    The log-prob is that of the temperature-scaled *unfiltered* distribution
    log softmax(z / T), which is what the learner recomputes; top-k / top-p only
    restrict which tokens may be drawn.
    """
    scaled = logits.float() / max(p.temperature, 1e-6)  # [B, V]
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V]
    if p.greedy:
        tok = scaled.argmax(dim=-1)
    else:
        filt = scaled
        if p.top_k and p.top_k < filt.shape[-1]:
            kth = torch.topk(filt, p.top_k, dim=-1).values[:, -1:]
            filt = filt.masked_fill(filt < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_z, idx = torch.sort(filt, descending=True, dim=-1)
            probs = torch.softmax(sorted_z, dim=-1)
            cum = probs.cumsum(-1) - probs  # mass strictly before each token
            sorted_z = sorted_z.masked_fill(cum > p.top_p, float("-inf"))
            filt = torch.full_like(filt, float("-inf")).scatter(-1, idx, sorted_z)
        probs = torch.softmax(filt, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class HFEngine:
    """Batched KV-cache decoding over a transformers causal LM (CPU or GPU)."""

    def __init__(self, model, tokenizer, device: str = "cpu", *, kv_budget_tokens: int = 262144,
                 keep_kv_across_versions: bool = False, max_prefill_tokens: int = 8192):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.version = 0
        self.eos_ids = {i for i in [tokenizer.eos_token_id] if i is not None}
        self._stop_cache: dict[tuple[str, ...], tuple[set[int], list[str]]] = {}
        # transformers 5 renamed `past_key_values` to `cache`; support both
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._init_sessions(kv_budget_tokens, keep_kv_across_versions, max_prefill_tokens)

    def _stops(self, stop: list[str]) -> tuple[set[int], list[str]]:
        """Split stop strings into single-token ids (fast path) and multi-token strings."""
        key = (tuple(stop), tuple(sorted(self.eos_ids)))
        if key not in self._stop_cache:
            ids, strings = set(self.eos_ids), []
            for s in stop:
                enc = self.tokenizer.encode(s, add_special_tokens=False)
                if len(enc) == 1:
                    ids.add(enc[0])
                else:
                    strings.append(s)
            self._stop_cache[key] = (ids, strings)
        return self._stop_cache[key]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[GenerationOutput]:
        """Decode a batch of token-id prompts. ``max_new_tokens`` optionally caps each row."""
        if not prompts:
            return []
        b = len(prompts)
        caps = max_new_tokens or [params.max_new_tokens] * b
        caps = [max(0, min(c, params.max_new_tokens)) for c in caps]
        stop_ids, stop_strings = self._stops(params.stop)
        pad = self.tokenizer.pad_token_id or 0
        lens = [len(p) for p in prompts]
        width = max(lens)
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(params.seed))

        out_ids: list[list[int]] = [[] for _ in range(b)]
        out_lp: list[list[float]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        active = torch.tensor([c > 0 for c in caps], device=self.device)
        cap_t = torch.tensor(caps, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, logits = self._cache_of(out), out.logits[:, -1, :]
        next_pos = pos[:, -1:] + 1
        step = 0
        while bool(active.any()):
            tok, lp = sample_next(logits, params, gen)
            tok_l, lp_l, act_l = tok.tolist(), lp.tolist(), active.tolist()
            step += 1
            for i in range(b):
                if not act_l[i]:
                    continue
                out_ids[i].append(tok_l[i])
                out_lp[i].append(lp_l[i])
                if tok_l[i] in stop_ids or (stop_strings and self._hit_string(out_ids[i], stop_strings)):
                    reasons[i] = "stop"
                    act_l[i] = False
            active = torch.tensor(act_l, device=self.device) & (cap_t > step)
            if not bool(active.any()):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], dim=-1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                             use_cache=True, **{self._cache_kw: cache})
            cache, logits = self._cache_of(out), out.logits[:, -1, :]
            next_pos = next_pos + 1
        return [GenerationOutput(out_ids[i], out_lp[i], reasons[i], self.version) for i in range(b)]

    # == session API: continuous batching with KV kept across turns ===================
    def submit(self, requests: Iterable[Request]) -> None:
        """Queue turns; they join the running batch at the next ``step`` the budget allows."""
        rows = [self._new_row(r, k) for k, r in enumerate(requests)]
        for row in rows:
            row.queued_at = self._tick
        self._waiting.extend(rows)

    def has_work(self) -> bool:
        return bool(self._waiting or self._rows)

    def step(self) -> list[GenerationOutput]:
        """One scheduler iteration: admit + prefill waiting turns, then one decode step.

        Returns the outputs of the turns that finished in this iteration (and of
        turns that finished during an earlier ``generate_turns`` but were not its own).
        """
        out = [o for _, o in self._outbox] + [o for _, o in self._step()]
        self._outbox.clear()
        return out

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

    def generate_turns(self, requests: list[Request]) -> list[GenerationOutput]:
        """Blocking: run these turns to completion (other queued turns progress too); outputs in order."""
        requests = list(requests)
        if not self._session_ok:
            return self._generate_turns_stateless(requests)
        rows = [self._new_row(r, k) for k, r in enumerate(requests)]
        for row in rows:
            row.queued_at = self._tick
        self._waiting.extend(rows)
        index = {id(row): k for k, row in enumerate(rows)}
        out: list[GenerationOutput | None] = [None] * len(rows)
        left = len(rows)
        while left:
            if not self.has_work():
                raise RuntimeError("session engine ran out of work with turns unfinished")
            for row, o in self._step():
                k = index.get(id(row))
                if k is None:
                    self._outbox.append((row, o))
                else:
                    out[k] = o
                    left -= 1
        return out  # type: ignore[return-value]

    def _generate_turns_stateless(self, requests: list[Request]) -> list[GenerationOutput]:
        """Fallback for models the slot cache does not support (sliding-window layers): every turn
        is prefilled in full through ``generate``, grouped by sampling parameters."""
        out: list[GenerationOutput | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for k, r in enumerate(requests):
            groups.setdefault(id(r.params), []).append(k)
        for ks in groups.values():
            p = requests[ks[0]].params
            caps = []
            for k in ks:
                r = requests[k]
                cap = p.max_new_tokens if r.max_new_tokens is None else min(r.max_new_tokens, p.max_new_tokens)
                if r.max_total_tokens is not None:
                    cap = min(cap, r.max_total_tokens - len(r.token_ids))
                caps.append(max(0, cap))
            for k, o in zip(ks, self.generate([requests[k].token_ids for k in ks], p, caps)):
                o.session_id, o.request_id, o.prefill_tokens = requests[k].session_id, requests[k].request_id, len(
                    requests[k].token_ids)
                out[k] = o
        return out  # type: ignore[return-value]

    def start(self, session_id: str, prompt_ids: list[int], params: SamplingParams, **kw) -> GenerationOutput:
        """First turn of a session (any cached state of that id is dropped)."""
        self.free([session_id])
        return self.generate_turns([Request(session_id, list(prompt_ids), params, **kw)])[0]

    def continue_(self, session_id: str, observation_ids: list[int], params: SamplingParams,
                  **kw) -> GenerationOutput:
        """Next turn: the session's history (all earlier turns' tokens) + ``observation_ids``."""
        if session_id not in self._sessions:
            raise KeyError(f"unknown session {session_id!r} (freed, or never started on this engine)")
        history = self._sessions[session_id].history
        return self.generate_turns([Request(session_id, history + list(observation_ids), params, **kw)])[0]

    def history(self, session_id: str) -> list[int]:
        """All tokens of a session so far (prompt, actions, observations)."""
        return list(self._sessions[session_id].history)

    def free(self, session_ids: Iterable[str]) -> None:
        """Forget sessions (episode over). Running turns of those sessions still finish."""
        for sid in session_ids:
            s = self._sessions.pop(sid, None)
            if s is not None:
                self._drop_kv(s)

    def session_stats(self) -> dict[str, int]:
        return {"sessions": len(self._sessions), "cached_tokens": self._cached_tokens,
                "reserved_tokens": self._reserved, "running": len(self._rows), "waiting": len(self._waiting),
                "kv_budget_tokens": self.kv_budget_tokens, "evictions": self._evictions,
                "slab_bytes": self._kv.nbytes(), "staged_updates": len(self._staged), **self._counters}

    def update_weights(self, states: Iterable[dict[str, torch.Tensor]], version: int) -> bool:
        """Apply a versioned update now if no row is running, else at the end of the running turns.

        Returns True when applied now. ``states`` are state-dict slices (buckets).
        """
        if not self._rows:
            for s in states:
                self._load_tensors(s)
            self._set_version(version)
            return True
        self._staged.append((version, list(states)))
        return False

    # -- internals ---------------------------------------------------------------------
    def _init_sessions(self, kv_budget_tokens: int, keep_kv_across_versions: bool, max_prefill_tokens: int) -> None:
        cfg = self.model.config.get_text_config(decoder=True)
        types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        self._session_ok = types <= {"full_attention"}
        self._attn_impl = getattr(cfg, "_attn_implementation", "sdpa") or "sdpa"
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
        self._counters = {"prefill_tokens": 0, "reused_tokens": 0, "shared_prompt_rows": 0, "decode_steps": 0,
                          "forwards": 0}
        self._rng = random.Random()
        self._tok_text: dict[int, str] = {}
        self._params: dict[str, torch.Tensor] | None = None  # name -> parameter, for packed buckets
        import inspect

        self._keep_kw = "logits_to_keep" in inspect.signature(self.model.forward).parameters

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

        Rows with identical histories and nothing cached (the G copies of a GRPO group's
        prompt) are prefilled once; the others copy that KV row (prefix sharing).
        """
        unique: list[_Row] = []
        first: dict[tuple[int, ...], int] = {}
        src_of: list[int] = []  # for each row, the index in ``unique`` whose logits/KV it takes
        for r in rows:
            key = tuple(r.ids) if r.reuse == 0 else None
            if key is not None and key in first:
                src_of.append(first[key])
                continue
            if key is not None:
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

    def _forward(self, ids: torch.Tensor, qpos: torch.Tensor, lo: int, hi: int, read: int) -> torch.Tensor:
        """Run the model on slots [lo, hi): token ``ids[b, j]`` at position/column ``qpos[b, j]``."""
        ids, qpos = ids.to(self.device), qpos.to(self.device)
        cols = torch.arange(read, device=self.device)
        allowed = cols[None, None, :] <= qpos[:, :, None]  # [B, Q, read] causal by position
        if self._attn_impl == "eager":
            mask = torch.zeros(allowed.shape, dtype=self._kv.dtype, device=self.device)
            mask = mask.masked_fill(~allowed, torch.finfo(self._kv.dtype).min)[:, None]
        else:
            mask = allowed[:, None]  # [B, 1, Q, read] (True = attend)
        cache = SlotForwardCache(self._kv, lo, hi, qpos, read)
        self._counters["forwards"] += 1
        kw = {"logits_to_keep": 1} if self._keep_kw else {}
        out = self.model(input_ids=ids, attention_mask={"full_attention": mask}, position_ids=qpos,
                         use_cache=True, **{self._cache_kw: cache}, **kw)
        return out.logits[:, -1, :]

    def _sample(self, rows: list["_Row"], logits: torch.Tensor) -> None:
        live = [b for b, r in enumerate(rows) if not r.finished]
        if len(live) < len(rows):
            logits = logits[live]
        act = [rows[b] for b in live]
        dev = logits.device
        f = torch.float32
        temp = torch.tensor([max(r.params.temperature, 1e-6) for r in act], dtype=f, device=dev)
        greedy = torch.tensor([r.params.greedy for r in act], device=dev)
        top_k = torch.tensor([r.params.top_k for r in act], dtype=torch.long, device=dev)
        top_p = torch.tensor([r.params.top_p for r in act], dtype=f, device=dev)
        filtering = any((r.params.top_k and r.params.top_k < logits.shape[-1]) or r.params.top_p < 1.0
                        for r in act if not r.params.greedy)
        lo32 = torch.tensor([r.seed_lo for r in act], dtype=torch.long, device=dev)
        hi32 = torch.tensor([r.seed_hi for r in act], dtype=torch.long, device=dev)
        ctr = torch.tensor([len(r.out_ids) for r in act], dtype=torch.long, device=dev)
        tok, lp = sample_rows(logits, temp, greedy, top_k, top_p, lo32, hi32, ctr, filtering)
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

    @staticmethod
    def _cache_of(out):
        cache = out.get("cache") if hasattr(out, "get") else None
        return cache if cache is not None else out.past_key_values

    def _hit_string(self, ids: list[int], stops: list[str]) -> bool:
        """A stop string ends within the last token (it may also span earlier tokens)."""
        tail = self.tokenizer.decode(ids[-8:], skip_special_tokens=False)
        if not any(s in tail for s in stops):
            return False
        before = self.tokenizer.decode(ids[-8:-1], skip_special_tokens=False)
        return any(s in tail and s not in before for s in stops)

    def load_state_dict(self, state: "dict[str, torch.Tensor] | PackedBucket", version: int) -> None:
        """Apply (part of) a state dict or a packed bucket in place, now; set the version.

        Use ``update_weights`` while session turns may be running (it defers the update).
        """
        self._load_tensors(state)
        self._set_version(version)

    def _load_tensors(self, state: "dict[str, torch.Tensor] | PackedBucket") -> None:
        if isinstance(state, PackedBucket):
            if self._params is None:
                self._params = dict(self.model.state_dict(keep_vars=True))
            apply_bucket(self._params, state)
            return
        missing = self.model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise KeyError(f"weight update has unknown tensors: {missing.unexpected_keys[:5]}")


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
