"""Policy-gradient losses: PPO-clip with asymmetric clipping, KL and entropy terms, and one
loss-aggregation function shared by all of them.

All functions are pure tensor functions on ``[B, T]`` token grids (B sequences, T tokens);
``mask`` marks the tokens that carry loss (action tokens; never prompt, tool-output or
padding tokens). Values at masked-out positions never change a loss or its gradient, even
when they are inf or NaN: inputs are replaced with ``torch.where`` before any arithmetic, so
no ``0 * inf`` reaches the forward pass or the backward pass.

Losses return ``(loss, diagnostics)``: a scalar to call ``backward()`` on and a dict of
detached scalars for logging (``train/clip_frac`` and friends).

References: Schulman et al. 2017 (PPO); DAPO, Yu et al. 2025, arXiv 2503.14476 (asymmetric
"clip-higher"); Dr.GRPO, Liu et al. 2025, arXiv 2503.20783 (constant length normalisation);
J. Schulman, "Approximating KL Divergence" (2020) for the k1/k2/k3 estimators.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "register_agg_mode",
    "aggregate_loss",
    "ppo_clip_loss",
    "kl_penalty",
    "entropy_from_logits",
    "policy_loss",
    "token_logprobs",
    "OFF_POLICY_MODES",
    "behaviour_weights",
]


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

AggFn = Callable[..., Tensor]

AGG_MODES: dict[str, AggFn] = {}
"""Loss aggregation modes by name; dispatched by :func:`aggregate_loss`."""


def register_agg_mode(name: str) -> Callable[[AggFn], AggFn]:
    """Decorator adding an aggregation function to :data:`AGG_MODES` under ``name``."""

    def decorator(fn: AggFn) -> AggFn:
        if name in AGG_MODES and AGG_MODES[name] is not fn:
            raise ValueError(f"aggregation mode {name!r} is already registered")
        AGG_MODES[name] = fn
        return fn

    return decorator


def _masked_values(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` where the mask is non-zero, exactly 0 elsewhere (inf/NaN-proof)."""
    return torch.where(mask != 0, x * mask, torch.zeros_like(x))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with a zero denominator replaced by 1 (the numerator is then 0)."""
    return num / torch.where(den != 0, den, torch.ones_like(den))


def _num_seqs(mask: Tensor, num_seqs: float | None, like: Tensor) -> Tensor:
    """Sequences to average over: ``num_seqs`` if given, else those with a loss token."""
    if num_seqs is not None:
        return torch.as_tensor(float(num_seqs)).to(like)
    return (mask != 0).any(dim=-1).sum().to(like)


@register_agg_mode("token-mean")
def _agg_token_mean(
    loss_mat: Tensor,
    mask: Tensor,
    *,
    norm_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> Tensor:
    """``sum_{b,t} loss * mask / sum_{b,t} mask`` (or ``/ norm_tokens`` when given)."""
    total = _masked_values(loss_mat, mask).sum()  # []
    den = mask.sum() if norm_tokens is None else torch.as_tensor(float(norm_tokens))  # []
    return _safe_div(total, den.to(total))


@register_agg_mode("seq-mean-token-mean")
def _agg_seq_mean_token_mean(
    loss_mat: Tensor,
    mask: Tensor,
    *,
    norm_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> Tensor:
    """Mean over sequences of each sequence's token mean."""
    seq_sum = _masked_values(loss_mat, mask).sum(dim=-1)  # [B]
    seq_mean = _safe_div(seq_sum, mask.sum(dim=-1).to(seq_sum))  # [B]
    return _safe_div(seq_mean.sum(), _num_seqs(mask, num_seqs, seq_sum))


@register_agg_mode("seq-mean-token-sum-norm")
def _agg_seq_mean_token_sum_norm(
    loss_mat: Tensor,
    mask: Tensor,
    *,
    norm_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> Tensor:
    """Mean over sequences of each sequence's token *sum*, divided by a constant ``max_len``."""
    seq_sum = _masked_values(loss_mat, mask).sum(dim=-1)  # [B]
    length = float(loss_mat.shape[-1]) if max_len is None else float(max_len)
    n = _num_seqs(mask, num_seqs, seq_sum)  # []
    return _safe_div(seq_sum.sum(), n) / length


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    norm_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> Tensor:
    """Reduce a per-token loss ``float[B, T]`` to a scalar.

    Modes (``m`` = mask)::

        "token-mean"               sum_{b,t} l*m / sum_{b,t} m          (or / norm_tokens)
        "seq-mean-token-mean"      (1/N) sum_b [ sum_t l*m / sum_t m ]
        "seq-mean-token-sum-norm"  (1/N) sum_b [ sum_t l*m ] / max_len  (Dr.GRPO)

    ``N`` is the number of sequences with at least one loss token, or ``num_seqs`` when
    given. For gradient accumulation over micro-batches pass the *global* counts
    (``norm_tokens`` = loss tokens in the whole batch, ``num_seqs`` = sequences in the whole
    batch) and a constant ``max_len``; the summed micro-batch losses then equal the
    full-batch loss and so do their gradients. ``max_len`` defaults to T, which is only a
    constant when every micro-batch is padded to the same T.

    Args:
        loss_mat: float[B, T] per-token loss.
        mask: bool or float[B, T]; float values act as token weights.
        mode: one of :data:`AGG_MODES`.
        norm_tokens: denominator for "token-mean" instead of ``mask.sum()``.
        num_seqs: sequence count for the "seq-mean-*" modes.
        max_len: constant length for "seq-mean-token-sum-norm".

    Returns:
        Scalar tensor. An all-zero mask gives 0 (never NaN).

    Raises:
        ValueError: unknown ``mode`` (the message lists the valid ones) or shape mismatch.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {sorted(AGG_MODES)}")
    if loss_mat.shape != mask.shape:
        raise ValueError(
            f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must match"
        )
    if not mask.is_floating_point():
        mask = mask.to(loss_mat.dtype)
    return AGG_MODES[mode](
        loss_mat, mask, norm_tokens=norm_tokens, num_seqs=num_seqs, max_len=max_len
    )


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Token mean over ``mask`` (diagnostics)."""
    return _safe_div(_masked_values(x, mask).sum(), mask.sum().to(x))


# --------------------------------------------------------------------------------------------
# PPO-clip
# --------------------------------------------------------------------------------------------


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    log_ratio_clamp: float = 20.0,
    agg_mode: str = "token-mean",
    norm_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss with asymmetric clip range and optional dual clip.

    Per token::

        rho = exp(clamp(logp - logp_old, -log_ratio_clamp, log_ratio_clamp))
        l   = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))
        l   = min(l, -A * c)            where A < 0, when c = clip_ratio_c is given (dual clip)

    then :func:`aggregate_loss` with ``agg_mode``. ``clip_high > clip_low`` is DAPO's
    "clip-higher".

    Why the dual clip (Ye et al. 2020, arXiv 1912.09729; verl's ``clip_ratio_c``): the
    pessimistic ``max`` bounds rho only on the side that would raise the objective. For a
    token with A < 0 whose probability has *risen* since it was sampled (rho > 1 + clip_high),
    ``-A * rho`` is unbounded, so on stale rows (asynchronous training, several epochs) a few
    such tokens can carry the update: on the demo task at policy lag 1, rho reached 133 and
    those tokens ~8 % of the gradient weight (docs/benchmarks.md, "Async learning"). Capping the
    loss at ``-A * c`` (c > 1) zeroes their gradient past rho = c. On fresh rows (rho = 1) it
    changes nothing. The clamp keeps ``exp`` finite for any log-ratio.

    Args:
        logprobs: float[B, T] log-probs of the taken tokens under the current policy (grad).
        old_logprobs: float[B, T] log-probs under the behaviour policy (no grad needed).
        advantages: float[B, T] per-token advantages (see ``credit.broadcast_to_tokens``).
        mask: bool or float[B, T] loss tokens.
        clip_low, clip_high: ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        clip_ratio_c: dual-clip constant c > 1 (None: off): the loss of a token with A < 0 is at
            most ``-A * c``.
        log_ratio_clamp: bound on ``|logp - logp_old|`` before ``exp``.
        agg_mode, norm_tokens, num_seqs, max_len: see :func:`aggregate_loss`.

    Returns:
        ``(loss, diagnostics)``; diagnostics are detached scalars over the loss tokens:
        ``pg_loss``, ``clip_frac`` (share of tokens whose clipped term is the active one),
        ``clip_frac_low`` / ``clip_frac_high`` (clipped at the lower / upper bound),
        ``clip_frac_dual`` (capped by the dual clip), ``approx_kl`` (k1: mean of
        ``logp_old - logp``), ``approx_kl_k3`` (mean of ``(rho - 1) - log rho``, never
        negative), ``ratio_mean``, ``ratio_max``.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError(
            "logprobs, old_logprobs, advantages and mask must share one [B, T] shape; got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, "
            f"{tuple(advantages.shape)}, {tuple(mask.shape)}"
        )
    if clip_low < 0 or clip_high < 0 or clip_low >= 1:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1:
        raise ValueError(f"clip_ratio_c must be > 1 (or None); got {clip_ratio_c}")
    if log_ratio_clamp <= 0:
        raise ValueError(f"log_ratio_clamp must be > 0; got {log_ratio_clamp}")
    fmask = mask.to(logprobs.dtype)  # [B, T]
    on = fmask != 0  # [B, T]
    zero = torch.zeros_like(logprobs)  # [B, T]
    logp = torch.where(on, logprobs, zero)  # [B, T] masked-out values never reach exp()
    old = torch.where(on, old_logprobs.to(logprobs.dtype), zero)  # [B, T]
    adv = torch.where(on, advantages.to(logprobs.dtype), zero)  # [B, T]

    log_ratio = torch.clamp(logp - old, -log_ratio_clamp, log_ratio_clamp)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    pg_unclipped = -adv * ratio  # [B, T]
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    pg_mat = torch.maximum(pg_unclipped, pg_clipped)  # [B, T]
    dual = torch.zeros_like(on)  # [B, T] tokens capped by the dual clip
    if clip_ratio_c is not None:
        cap = -adv * clip_ratio_c  # [B, T] > 0 where A < 0
        dual = (adv < 0) & (pg_mat > cap)  # [B, T]
        pg_mat = torch.where(adv < 0, torch.minimum(pg_mat, cap), pg_mat)  # [B, T]
    loss = aggregate_loss(
        pg_mat, fmask, agg_mode, norm_tokens=norm_tokens, num_seqs=num_seqs, max_len=max_len
    )  # []

    with torch.no_grad():
        clipped = ((pg_clipped > pg_unclipped) & ~dual).to(logprobs.dtype)  # [B, T]
        clipped_low = clipped * (ratio < 1.0 - clip_low).to(logprobs.dtype)  # [B, T]
        clipped_high = clipped * (ratio > 1.0 + clip_high).to(logprobs.dtype)  # [B, T]
        diagnostics = {
            "pg_loss": loss.detach(),
            "clip_frac": _masked_mean(clipped, fmask),
            "clip_frac_low": _masked_mean(clipped_low, fmask),
            "clip_frac_high": _masked_mean(clipped_high, fmask),
            "clip_frac_dual": _masked_mean(dual.to(logprobs.dtype), fmask),
            "approx_kl": _masked_mean(-log_ratio, fmask),
            "approx_kl_k3": _masked_mean((ratio - 1.0) - log_ratio, fmask),
            "ratio_mean": _masked_mean(ratio, fmask),
            "ratio_max": torch.where(on, ratio, zero).amax() if ratio.numel() else zero.sum(),
        }
    diagnostics = {k: v.detach() for k, v in diagnostics.items()}
    return loss, diagnostics


# --------------------------------------------------------------------------------------------
# Off-policy correction (stale rows: asynchronous training, a sampler that is not the learner)
# --------------------------------------------------------------------------------------------

OFF_POLICY_MODES = ("none", "tis", "decoupled")


def behaviour_weights(
    prox_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    mode: str,
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights from the behaviour policy (the generator that sampled a token) to the
    proximal policy (the learner's weights when the update starts), per token.

    With them the PPO ratio is taken against the proximal policy, rho = pi_theta / pi_prox, and the
    advantage is multiplied by the weight w (AReaL's decoupled PPO, Fu et al. 2025, arXiv 2505.24298;
    truncated IS, Yao et al. 2025): the trust region is around the policy being updated, however stale
    the rows, and the staleness is corrected by w::

        w_raw = exp(logp_prox - logp_behaviour)
        "tis":       w = min(w_raw, cap)                  (truncate)
        "decoupled": w = w_raw if w_raw <= cap else 0      (drop tokens too far off-policy)
        "none":      w = 1

    Args:
        prox_logprobs: float[B, T] log-probs under the proximal policy (no grad).
        behaviour_logprobs: float[B, T] log-probs the generator recorded.
        mask: bool or float[B, T] loss tokens.
        mode: one of :data:`OFF_POLICY_MODES`.
        cap: C > 0, the truncation / drop threshold.

    Returns:
        ``(w float[B, T], diagnostics)``: 0 off the mask; ``is_weight_mean`` over the loss tokens and
        ``is_capped_frac`` (share of loss tokens truncated or dropped).
    """
    if mode not in OFF_POLICY_MODES:
        raise ValueError(f"off-policy mode {mode!r}: use one of {OFF_POLICY_MODES}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0; got {cap}")
    on = mask != 0  # [B, T]
    zero = torch.zeros_like(prox_logprobs)
    if mode == "none":
        w = torch.where(on, torch.ones_like(zero), zero)  # [B, T]
        capped = torch.zeros_like(on)
    else:
        log_w = torch.where(on, prox_logprobs - behaviour_logprobs.to(prox_logprobs.dtype), zero)  # [B, T]
        raw = torch.exp(torch.clamp(log_w, max=math.log(cap) + 1.0))  # [B, T] finite; above cap either way
        capped = on & (raw > cap)  # [B, T]
        w = torch.where(capped, torch.full_like(raw, cap) if mode == "tis" else zero, raw)
        w = torch.where(on, w, zero)
    fmask = mask.to(prox_logprobs.dtype)
    return w.detach(), {"is_weight_mean": _masked_mean(w, fmask).detach(),
                        "is_capped_frac": _masked_mean(capped.to(fmask.dtype), fmask).detach()}


# --------------------------------------------------------------------------------------------
# KL and entropy
# --------------------------------------------------------------------------------------------


def _kl_k1(log_ratio: Tensor) -> Tensor:
    return log_ratio  # [B, T]


def _kl_k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio * log_ratio  # [B, T]


def _kl_k3(log_ratio: Tensor) -> Tensor:
    neg = -log_ratio  # [B, T] ref - logp
    return torch.exp(neg) - neg - 1.0  # [B, T] >= 0


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}
"""Per-token estimators of KL(pi || pi_ref) from ``log_ratio = logp - ref_logp``."""


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens.

    With ``d = logp - ref`` (tokens sampled from pi)::

        k1 = d                          unbiased, high variance, can be negative
        k2 = d^2 / 2                    biased, low variance
        k3 = exp(-d) - (-d) - 1         unbiased, always >= 0 (GRPO's choice)

    Args:
        logprobs: float[B, T] current policy log-probs of the taken tokens.
        ref_logprobs: float[B, T] reference policy log-probs of the same tokens.
        kind: "k1", "k2" or "k3".

    Returns:
        float[B, T]; aggregate with :func:`aggregate_loss`.

    Reference: J. Schulman, "Approximating KL Divergence", 2020.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {sorted(KL_ESTIMATORS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "must match"
        )
    return KL_ESTIMATORS[kind](logprobs - ref_logprobs.to(logprobs.dtype))  # [B, T]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at every position.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``

    Args:
        logits: float[B, T, V].

    Returns:
        float[B, T].
    """
    probs = F.softmax(logits, dim=-1)  # [B, T, V]
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # [B, T]


# --------------------------------------------------------------------------------------------
# Combined policy loss
# --------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    log_ratio_clamp: float = 20.0,
    agg_mode: str = "token-mean",
    norm_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total policy loss ``L = L_clip + kl_coef * agg(KL) - entropy_coef * agg(H)``.

    Every term is aggregated with the same ``agg_mode`` (and global counts), so gradient
    accumulation stays exact for the sum.

    Args:
        logprobs, old_logprobs, advantages, mask: see :func:`ppo_clip_loss` (all [B, T]).
        ref_logprobs: float[B, T] reference-policy log-probs; needed when ``kl_coef != 0``.
        entropy: float[B, T] per-token entropy (:func:`entropy_from_logits`); needed when
            ``entropy_coef != 0``.
        kl_coef: weight of the KL penalty (0 turns it off).
        kl_kind: "k1", "k2" or "k3" (see :func:`kl_penalty`).
        entropy_coef: weight of the entropy bonus (0 turns it off).
        clip_low, clip_high, clip_ratio_c, log_ratio_clamp, agg_mode, norm_tokens, num_seqs,
            max_len: as in :func:`ppo_clip_loss`.

    Returns:
        ``(loss, diagnostics)``: the diagnostics of :func:`ppo_clip_loss` plus ``loss``, and
        ``kl`` / ``entropy`` (aggregated, detached) whenever the tensor was given.
    """
    agg = dict(norm_tokens=norm_tokens, num_seqs=num_seqs, max_len=max_len)
    loss, diagnostics = ppo_clip_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        clip_ratio_c=clip_ratio_c,
        log_ratio_clamp=log_ratio_clamp,
        agg_mode=agg_mode,
        **agg,
    )  # []
    fmask = mask.to(logprobs.dtype)  # [B, T]
    on = fmask != 0  # [B, T]
    zero = torch.zeros_like(logprobs)  # [B, T]

    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if ref_logprobs is not None:
        logp = torch.where(on, logprobs, zero)  # [B, T]
        ref = torch.where(on, ref_logprobs.to(logprobs.dtype), zero)  # [B, T]
        kl = aggregate_loss(kl_penalty(logp, ref, kl_kind), fmask, agg_mode, **agg)  # []
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
        diagnostics["kl"] = kl.detach()

    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if entropy is not None:
        ent = torch.where(on, entropy.to(logprobs.dtype), zero)  # [B, T]
        ent_agg = aggregate_loss(ent, fmask, agg_mode, **agg)  # []
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * ent_agg
        diagnostics["entropy"] = ent_agg.detach()

    diagnostics["loss"] = loss.detach()
    return loss, diagnostics


# --------------------------------------------------------------------------------------------
# Log-probs of taken tokens
# --------------------------------------------------------------------------------------------


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    ``out[b, t] = logits[b, t, labels[b, t]] / tau - logsumexp_v(logits[b, t, v] / tau)``

    Computed as gather minus logsumexp, so no full ``[B, T, V]`` log-softmax output is kept
    beyond what autograd needs. Use the temperature the generator sampled with, so that the
    learner's log-probs match the behaviour policy's. Labels outside ``[0, V)`` (padding such
    as -100) give 0.

    Args:
        logits: float[B, T, V] (position t predicts ``labels[b, t]``; shift beforehand).
        labels: long[B, T].
        temperature: sampling temperature, > 0.

    Returns:
        float[B, T] in the dtype of ``logits``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + [V]"
        )
    vocab = logits.shape[-1]
    if temperature != 1.0:
        logits = logits / temperature  # [B, T, V]
    valid = (labels >= 0) & (labels < vocab)  # [B, T]
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()  # [B, T]
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, T]
    out = picked - torch.logsumexp(logits, dim=-1)  # [B, T]
    return torch.where(valid, out, torch.zeros_like(out))  # [B, T]
