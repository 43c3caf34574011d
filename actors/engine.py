"""The ``hf`` decoding engine: token ids in, token ids + log-probs out.

Batched decoding with a KV cache over a Hugging Face causal LM. The engine never
sees text it has to tokenise: it takes the exact token ids of each conversation
and returns the sampled action ids with the log-probability of each sampled token
under the generating weights (after temperature scaling, which is what the learner
uses too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

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
    version: int


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

    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.version = 0
        self.eos_ids = {i for i in [tokenizer.eos_token_id] if i is not None}
        self._stop_cache: dict[tuple[str, ...], tuple[set[int], list[str]]] = {}
        # transformers 5 renamed `past_key_values` to `cache`; support both
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _stops(self, stop: list[str]) -> tuple[set[int], list[str]]:
        """Split stop strings into single-token ids (fast path) and multi-token strings."""
        key = tuple(stop)
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

    @staticmethod
    def _cache_of(out):
        cache = out.get("cache") if hasattr(out, "get") else None
        return cache if cache is not None else out.past_key_values

    def _hit_string(self, ids: list[int], stops: list[str]) -> bool:
        tail = self.tokenizer.decode(ids[-8:], skip_special_tokens=False)
        return any(tail.endswith(s) for s in stops)

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Apply (part of) a state dict in place; bump the version when given."""
        missing = self.model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise KeyError(f"weight update has unknown tensors: {missing.unexpected_keys[:5]}")
        self.version = version
