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
  (and the one-request helpers ``start`` / ``continue_``): the continuous-batching
  scheduler for multi-turn episodes of :mod:`actors.scheduler` (KV kept per session
  between turns, only new tokens prefilled, token budget, versioned weight updates at
  turn boundaries).

The session path runs the model through :meth:`HFEngine._forward` over the KV slots
of :mod:`actors.kv_slots`; for Llama-family models (Qwen2, Llama) that is the lean
forward of :mod:`actors.lean_forward` (the same operations as the transformers
modules, bit for bit, without their per-module Python cost), else the modules.
"""

from __future__ import annotations

import inspect
import logging
from typing import Iterable

import torch

from actors.kv_slots import SlotForwardCache
from actors.lean_forward import LeanForward
from actors.messages import GenerationOutput, Request, SamplingParams  # noqa: F401 - re-exported
from actors.sampling import sample, split_seed
from actors.scheduler import SessionScheduler, _Session
from actors.weights import PackedBucket, apply_bucket
from common.hashing import stable_seed

log = logging.getLogger(__name__)


class HFEngine(SessionScheduler):
    """Batched KV-cache decoding over a transformers causal LM (CPU or GPU)."""

    def __init__(self, model, tokenizer, device: str = "cpu", *, kv_budget_tokens: int = 262144,
                 keep_kv_across_versions: bool = False, max_prefill_tokens: int = 8192, lean_forward: bool = True,
                 cuda_graphs: bool = False):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.version = 0
        self.eos_ids = {i for i in [tokenizer.eos_token_id] if i is not None}
        self._stop_cache: dict[tuple[str, ...], tuple[set[int], list[str]]] = {}
        self._params: dict[str, torch.Tensor] | None = None  # name -> parameter, for packed buckets
        cfg = self.model.config.get_text_config(decoder=True)
        self._attn_impl = getattr(cfg, "_attn_implementation", "sdpa") or "sdpa"
        signature = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in signature else "past_key_values"  # transformers 5 renamed it
        self._keep_kw = "logits_to_keep" in signature
        self._init_sessions(kv_budget_tokens, keep_kv_across_versions, max_prefill_tokens)
        self._lean = LeanForward.build(self.model, self._kv) if lean_forward else None
        self.lean_forward = self._lean is not None
        self._graphs = None  # decode steps replayed as CUDA graphs (actors/cuda_graphs.py)
        if cuda_graphs and (self._lean is None or torch.device(device).type != "cuda"):
            log.info("cuda_graphs off: it needs the lean forward on a CUDA device (device %s, lean forward %s)",
                     device, self.lean_forward)
        elif cuda_graphs:
            from actors.cuda_graphs import DecodeGraphs

            self._graphs = DecodeGraphs(self._lean, self._kv, device)

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps are replayed as CUDA graphs (off after a failed capture)."""
        return self._graphs is not None

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
        # the session path's sampler and counter-based RNG (actors/sampling.py); row i's seed from (seed, i)
        seeds = [split_seed(stable_seed(params.seed, i) if params.seed is not None else self._rng.getrandbits(64))
                 for i in range(b)]

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
            tok, lp = sample(logits, [params] * b, seeds, [step] * b)
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

    def fork(self, session_id: str, child_ids: Iterable[str], *, copy_kv: bool = False) -> int:
        """Children that continue from session ``session_id``: its history, and its cached KV.

        ``copy_kv=False`` (default): the children hold the *same* compact KV tensors as the parent (copy on
        write: a session's cache is never written in place, admission copies it into a KV slot), so a fork
        costs no memory traffic; ``copy_kv=True`` clones them. Each child's next turn prefills only the tokens
        after the shared prefix, and children with identical next histories prefill those once (the prefill's
        prefix sharing). The budget counts each child's cache in full (an upper bound when shared).

        A parent that is unknown, running or holds no KV (evicted, stale weights) forks nothing: the children's
        requests carry their full histories, so they are prefilled as new sessions. Returns the KV tokens
        given to the children.
        """
        children = [c for c in child_ids if c != session_id]
        parent = self._sessions.get(session_id) if self._session_ok else None
        if parent is None or parent.running:
            return 0
        given = 0
        for cid in children:
            self.free([cid])
            kv = parent.kv
            if kv is not None and copy_kv:
                kv = [(k.clone(), v.clone()) for k, v in kv]
            child = self._sessions[cid] = _Session(list(parent.history), list(parent.tokens), kv, parent.version)
            if kv is not None:
                self._cached_tokens += len(child.tokens)
                given += len(child.tokens)
        self._counters["forked_sessions"] += len(children)
        self._counters["forked_tokens"] += given
        if self._reserved + self._cached_tokens > self.kv_budget_tokens:
            self._evict_for(0, None)
        return given

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
                "slab_bytes": self._kv.nbytes(), "staged_updates": len(self._staged), **self._counters,
                "graph_captures": self._graphs.captures if self._graphs else 0,
                "graph_replays": self._graphs.replays if self._graphs else 0}

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
    def _forward(self, ids: torch.Tensor, qpos: torch.Tensor, lo: int, hi: int, read: int) -> torch.Tensor:
        """Run the model on slots [lo, hi): token ``ids[b, j]`` at position/column ``qpos[b, j]``.

        Returns the logits float[B, V] of each row's last column.
        """
        ids, qpos = ids.to(self.device), qpos.to(self.device)
        if self._graphs is not None and ids.shape[1] == 1 and lo == 0:  # a decode step of the running batch
            try:
                logits = self._graphs(ids, qpos)
            except RuntimeError as err:  # e.g. an op that cannot be captured: stay eager from now on
                log.warning("cuda_graphs off after a failed capture or replay: %s", err)
                self._graphs, logits = None, None
            if logits is not None:
                self._counters["forwards"] += 1
                return logits
        cols = torch.arange(read, device=self.device)
        allowed = cols[None, None, :] <= qpos[:, :, None]  # [B, Q, read] causal by position
        self._counters["forwards"] += 1
        if self._lean is not None:
            return self._lean(ids, qpos, lo, hi, read, allowed[:, None])
        if self._attn_impl == "eager":
            mask = torch.zeros(allowed.shape, dtype=self._kv.dtype, device=self.device)
            mask = mask.masked_fill(~allowed, torch.finfo(self._kv.dtype).min)[:, None]
        else:
            mask = allowed[:, None]  # [B, 1, Q, read] (True = attend)
        cache = SlotForwardCache(self._kv, lo, hi, qpos, read)
        kw = {"logits_to_keep": 1} if self._keep_kw else {}
        out = self.model(input_ids=ids, attention_mask={"full_attention": mask}, position_ids=qpos,
                         use_cache=True, **{self._cache_kw: cache}, **kw)
        return out.logits[:, -1, :]

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

