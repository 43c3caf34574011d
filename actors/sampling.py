"""Row-wise token sampling for the session engine: per-row parameters, counter-based seeds.

Every running row of the continuous batch may carry its own temperature, top-k, top-p,
greedy flag and seed, so sampling is vectorised over rows with per-row parameter
tensors. Randomness is *counter based*: the uniform number that picks token ``t`` of a
request is a hash of ``(request seed, t)``, so a seeded request draws the same tokens
whatever else shares the batch, whichever generator serves it and however the
scheduler interleaves it (``torch.multinomial`` with one generator per batch cannot
promise that once rows join and leave the batch).

Log-probabilities are those of the temperature-scaled, *unfiltered* distribution
``log softmax(z / T)`` (what the learner recomputes); top-k / top-p only restrict which
tokens may be drawn. Greedy rows take ``argmax z`` and report ``log softmax(z / T)`` of it.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27, so a 32-bit value times it fits in int64 without overflow


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer avalanche hash on int64 tensors holding values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * _MIX) & _M32
    x = (((x >> 16) ^ x) * _MIX) & _M32
    return (x >> 16) ^ x


def split_seed(seed: int) -> tuple[int, int]:
    """Fold any Python int into two 32-bit words (the low and high halves of its 64 bits)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s & _M32, s >> 32


def counter_uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64 [B], a pure function of (seed, counter) per row."""
    h = _mix32((_mix32(seed_lo) + counter) & _M32)  # [B]
    h = _mix32(h ^ seed_hi)  # [B]
    return (h.double() + 0.5) / 4294967296.0


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, seed_lo: torch.Tensor, seed_hi: torch.Tensor, counter: torch.Tensor,
                filtering: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (token ids long[B], log-probs float[B]).

    Shapes: ``logits`` [B, V]; every other tensor [B] (``top_k`` 0 = off, ``top_p`` 1 = off).
    ``filtering`` is False when no row uses top-k / top-p (skips the sort).
    """
    scaled = logits.float() / temperature[:, None]  # [B, V]
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V]
    sampled = ~greedy
    any_greedy = bool(greedy.any())
    tok = scaled.argmax(dim=-1) if any_greedy else None  # [B]
    if bool(sampled.any()):
        u = counter_uniform(seed_lo, seed_hi, counter)  # [B]
        if filtering:
            z, order = torch.sort(scaled, dim=-1, descending=True)  # [B, V]
            rank = torch.arange(z.shape[-1], device=z.device)[None, :]  # [1, V]
            k = torch.where(top_k > 0, top_k, z.shape[-1])[:, None]  # [B, 1]
            z = z.masked_fill(rank >= k, float("-inf"))
            probs = torch.softmax(z, dim=-1)  # [B, V]
            before = probs.cumsum(-1) - probs  # mass strictly before each token
            z = z.masked_fill(before > top_p[:, None], float("-inf"))
            probs = torch.softmax(z, dim=-1).double()  # [B, V], sorted order
        else:
            order = None
            probs = logp.double().exp()  # [B, V] the same distribution, without a second softmax pass
        cdf = probs.cumsum(-1)  # [B, V]
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # [B]
        pick = pick.clamp(max=cdf.shape[-1] - 1)
        # a zero-probability token can only be hit at the very top through rounding: step back
        if bool((probs.gather(-1, pick[:, None]) == 0).any()):
            last = (probs > 0).long().cumsum(-1).argmax(-1)  # [B] index of the last token with mass
            pick = torch.minimum(pick, last)
        drawn = pick if order is None else order.gather(-1, pick[:, None]).squeeze(-1)
        tok = torch.where(sampled, drawn, tok) if any_greedy else drawn
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def sample(logits: torch.Tensor, params: list, seeds: list[tuple[int, int]], counters: list[int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_rows` for rows given as ``SamplingParams`` each (``params[b]``), their split seeds
    (:func:`split_seed`) and token counters: the one sampler of both engine paths.

    Shapes: ``logits`` [B, V]; returns (token ids long[B], log-probs float[B]).
    """
    dev, f = logits.device, torch.float32
    temp = torch.tensor([max(p.temperature, 1e-6) for p in params], dtype=f, device=dev)
    greedy = torch.tensor([p.greedy for p in params], device=dev)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=f, device=dev)
    filtering = any((p.top_k and p.top_k < logits.shape[-1]) or p.top_p < 1.0 for p in params if not p.greedy)
    lo32 = torch.tensor([s[0] for s in seeds], dtype=torch.long, device=dev)
    hi32 = torch.tensor([s[1] for s in seeds], dtype=torch.long, device=dev)
    ctr = torch.tensor(counters, dtype=torch.long, device=dev)
    return sample_rows(logits, temp, greedy, top_k, top_p, lo32, hi32, ctr, filtering)
