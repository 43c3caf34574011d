"""Tests for learner.losses: hand-worked aggregation and clipping cases, masking invariance,
gradient accumulation, KL estimators, entropy and token log-probs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from learner.losses import (
    AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    ppo_clip_loss,
    token_logprobs,
)
from tests.learner.helpers import F64, close, t

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# aggregate_loss
# ---------------------------------------------------------------------------------------------

LOSS = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # third sequence has no loss token


def test_token_mean_hand_case() -> None:
    # (1 + 2 + 4) / 3 tokens = 7/3
    close(aggregate_loss(LOSS, MASK, "token-mean"), 7 / 3)
    # with a global token count of 10: 7 / 10
    close(aggregate_loss(LOSS, MASK, "token-mean", norm_tokens=10), 0.7)
    # bool mask is the same as float mask
    close(aggregate_loss(LOSS, MASK.bool(), "token-mean"), 7 / 3)


def test_seq_mean_token_mean_hand_case() -> None:
    # per-sequence means: (1 + 2)/2 = 1.5, 4/1 = 4; the empty sequence is not counted
    # mean over the 2 sequences: (1.5 + 4) / 2 = 2.75
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean"), 2.75)
    # with num_seqs = 5 (global count under accumulation): 5.5 / 5 = 1.1
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean", num_seqs=5), 1.1)


def test_seq_mean_token_sum_norm_hand_case() -> None:
    # per-sequence sums: 1 + 2 = 3, 4; mean over 2 sequences 3.5; / max_len (default T = 3)
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm"), 3.5 / 3)
    # constant max_len 7: 3.5 / 7 = 0.5
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_len=7), 0.5)


def test_float_mask_weights() -> None:
    # weights act per token: (0.5*1 + 2*2) / (0.5 + 2) = 4.5 / 2.5 = 1.8
    loss = t([[1.0, 2.0]])
    close(aggregate_loss(loss, t([[0.5, 2.0]]), "token-mean"), 1.8)


@pytest.mark.parametrize("mode", sorted(AGG_MODES))
def test_all_masked_gives_zero_not_nan(mode) -> None:
    loss = torch.randn(2, 4, dtype=F64, requires_grad=True)
    out = aggregate_loss(loss, torch.zeros(2, 4, dtype=F64), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros_like(loss))


def test_unknown_mode_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        aggregate_loss(LOSS, MASK, "seq-sum")
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert mode in str(err.value)


# ---------------------------------------------------------------------------------------------
# masked positions never matter
# ---------------------------------------------------------------------------------------------


def _random_inputs(gen: torch.Generator, b: int = 4, tlen: int = 6):
    logp = -torch.rand(b, tlen, generator=gen, dtype=F64) * 3
    old = logp + 0.3 * torch.randn(b, tlen, generator=gen, dtype=F64)
    ref = logp + 0.3 * torch.randn(b, tlen, generator=gen, dtype=F64)
    adv = torch.randn(b, tlen, generator=gen, dtype=F64)
    ent = torch.rand(b, tlen, generator=gen, dtype=F64)
    mask = torch.rand(b, tlen, generator=gen) > 0.4
    mask[0] = True
    mask[1, :] = False
    mask[1, 2] = True
    return logp, old, ref, adv, ent, mask


@pytest.mark.parametrize("mode", sorted(AGG_MODES))
@pytest.mark.parametrize("junk", [1e4, -1e4, float("inf"), float("-inf"), float("nan")])
def test_masked_values_change_neither_loss_nor_gradient(mode, junk) -> None:
    gen = torch.Generator().manual_seed(0)
    logp, old, ref, adv, ent, mask = _random_inputs(gen)
    off = ~mask

    def run(lp, od, rf, ad, en):
        lp = lp.clone().requires_grad_(True)
        en = en.clone().requires_grad_(True)
        loss, diag = policy_loss(
            lp, od, ad, mask, ref_logprobs=rf, entropy=en, kl_coef=0.1, entropy_coef=0.01,
            clip_low=0.2, clip_high=0.28, agg_mode=mode,
        )
        loss.backward()
        return loss.detach(), diag, lp.grad, en.grad

    base = run(logp, old, ref, adv, ent)

    def dirty(x):
        x = x.clone()
        x[off] = junk
        return x

    got = run(dirty(logp), dirty(old), dirty(ref), dirty(adv), dirty(ent))
    assert torch.isfinite(base[0])
    assert torch.equal(got[0], base[0])
    assert torch.equal(got[2], base[2])
    assert torch.equal(got[3], base[3])
    assert torch.equal(base[2][off], torch.zeros_like(base[2][off]))
    for key in base[1]:
        assert torch.equal(got[1][key], base[1][key]), key


# ---------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(AGG_MODES))
def test_grad_accumulation_1x8_equals_8x1(mode) -> None:
    gen = torch.Generator().manual_seed(1)
    logp, old, _, adv, _, mask = _random_inputs(gen, b=8, tlen=7)
    mask[5] = False  # one sequence without loss tokens
    # global normalisers, known before the micro-batches are split
    glob = dict(
        norm_tokens=float(mask.sum()),
        num_seqs=float(mask.any(dim=-1).sum()),
        max_len=7.0,
    )

    full = logp.clone().requires_grad_(True)
    loss_full, _ = ppo_clip_loss(full, old, adv, mask, clip_high=0.28, agg_mode=mode)
    loss_full.backward()

    micro = logp.clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    for i in range(8):
        sl = slice(i, i + 1)
        loss_i, _ = ppo_clip_loss(
            micro[sl], old[sl], adv[sl], mask[sl], clip_high=0.28, agg_mode=mode, **glob
        )
        loss_i.backward()
        total += loss_i.detach()
    close(total, loss_full.detach(), atol=1e-12)
    close(micro.grad, full.grad, atol=1e-12)


def test_grad_accumulation_without_global_count_differs() -> None:
    # per-micro-batch token means weight short sequences up: a reminder why norm_tokens exists
    loss = t([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    full = aggregate_loss(loss, mask, "token-mean")  # 7/4
    naive = sum(aggregate_loss(loss[i : i + 1], mask[i : i + 1], "token-mean") for i in range(2))
    close(full, 1.75)
    close(naive, 1.0 + 4.0)  # not 7/4 (and not 7/4 * 2 either)
    fixed = sum(
        aggregate_loss(loss[i : i + 1], mask[i : i + 1], "token-mean", norm_tokens=4)
        for i in range(2)
    )
    close(fixed, 1.75)


# ---------------------------------------------------------------------------------------------
# PPO clip
# ---------------------------------------------------------------------------------------------


def test_ppo_clip_asymmetric_boundaries() -> None:
    # clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]; old logp = 0 so ratio = exp(logp)
    #  tok  A   ratio  -A*ratio  -A*clip(ratio)  max     active   d loss_tok / d logp
    #   0  +1   1.25   -1.25     -1.25           -1.25   unclip   -1.25 (inside range)
    #   1  +1   1.30   -1.30     -1.28           -1.28   CLIP hi  0
    #   2  +1   0.70   -0.70     -0.80           -0.70   unclip   -0.70 (pessimistic side)
    #   3  -1   0.85   +0.85     +0.85           +0.85   unclip   +0.85
    #   4  -1   0.75   +0.75     +0.80           +0.80   CLIP lo  0
    #   5  -1   1.30   +1.30     +1.28           +1.30   unclip   +1.30
    # token-mean over 6: loss = (-1.25 - 1.28 - 0.70 + 0.85 + 0.80 + 1.30) / 6 = -0.28 / 6
    ratios = t([[1.25, 1.30, 0.70, 0.85, 0.75, 1.30]])
    adv = t([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros_like(ratios)
    mask = torch.ones_like(ratios)
    loss, diag = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    close(loss.detach(), -0.28 / 6)
    loss.backward()
    # d(-A * ratio)/d logp = -A * ratio (ratio = exp(logp)); clipped tokens get 0
    close(logp.grad, t([[-1.25, 0.0, -0.70, 0.85, 0.0, 1.30]]) / 6)
    close(diag["clip_frac"], 2 / 6)
    close(diag["clip_frac_high"], 1 / 6)
    close(diag["clip_frac_low"], 1 / 6)
    close(diag["ratio_mean"], (1.25 + 1.30 + 0.70 + 0.85 + 0.75 + 1.30) / 6)
    close(diag["ratio_max"], 1.30)
    close(diag["approx_kl"], -ratios.log().mean())
    assert all(not v.requires_grad for v in diag.values())

    # symmetric 0.2: token 0 (ratio 1.25 > 1.2, A > 0) is now clipped too
    logp2 = ratios.log().requires_grad_(True)
    loss2, diag2 = ppo_clip_loss(logp2, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss2.backward()
    assert logp2.grad[0, 0].item() == 0.0
    close(diag2["clip_frac"], 3 / 6)


def test_dual_clip_caps_negative_advantage_tokens_hand_worked() -> None:
    # c = 3, clip 0.2. Per token: A, ratio, PPO term max(-A r, -A clip(r)), dual cap -A*c (A < 0 only)
    #   tok  A    ratio  PPO term            dual           final  grad d/dlogp
    #   0   -1    5.0    +5.0 (unclipped)    min(5, 3) = 3   3.0   0 (capped)
    #   1   -1    2.0    +2.0                min(2, 3) = 2   2.0   +2.0 (= -A r)
    #   2   -2    0.5    +1.6 (clip lo 0.8)  min(1.6, 6)     1.6   0 (PPO clipped)
    #   3   +1    5.0    -1.2 (clip hi)      -- (A > 0)     -1.2   0
    #   4   +1    0.5    -0.5                --             -0.5   -0.5
    # token-mean over 5: (3 + 2 + 1.6 - 1.2 - 0.5) / 5 = 4.9 / 5
    ratios = t([[5.0, 2.0, 0.5, 5.0, 0.5]])
    adv = t([[-1.0, -1.0, -2.0, 1.0, 1.0]])
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros_like(ratios)
    mask = torch.ones_like(ratios)
    loss, diag = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0)
    close(loss.detach(), 4.9 / 5)
    loss.backward()
    close(logp.grad, t([[0.0, 2.0, 0.0, 0.0, -0.5]]) / 5)
    close(diag["clip_frac_dual"], 1 / 5)
    close(diag["clip_frac"], 2 / 5)  # tokens 2 and 3; the dual-capped token 0 is counted apart
    # without the dual clip token 0 keeps its unbounded term and gradient -A * r = 5
    logp2 = ratios.log().requires_grad_(True)
    loss2, diag2 = ppo_clip_loss(logp2, old, adv, mask, clip_low=0.2, clip_high=0.2)
    close(loss2.detach(), 6.9 / 5)
    loss2.backward()
    close(logp2.grad, t([[5.0, 2.0, 0.0, 0.0, -0.5]]) / 5)
    close(diag2["clip_frac_dual"], 0.0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_clip_loss(logp2, old, adv, mask, clip_ratio_c=1.0)


def test_log_ratio_clamp_keeps_exp_finite() -> None:
    # a log-ratio of 200 would overflow exp in float32; clamped at 20 it is e^20, and the k3 KL is finite
    logp = torch.tensor([[200.0, 0.5]], dtype=torch.float32, requires_grad=True)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones_like(logp)
    loss, diag = ppo_clip_loss(logp, old, adv, mask, clip_ratio_c=3.0)
    assert torch.isfinite(loss) and torch.isfinite(diag["approx_kl_k3"])
    close(diag["ratio_max"], torch.tensor(math.exp(20.0), dtype=torch.float32), atol=1e3)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 0].item() == 0.0  # outside the clamp: no gradient
    # k3 = (r - 1) - log r: 0 on policy, > 0 otherwise; here for token 1 alone
    _, d1 = ppo_clip_loss(logp.detach()[:, 1:], old[:, 1:], adv[:, 1:], mask[:, 1:])
    close(d1["approx_kl_k3"], torch.tensor(math.exp(0.5) - 1.0 - 0.5, dtype=torch.float32), atol=1e-6)


def test_ppo_on_policy_is_plain_policy_gradient() -> None:
    # ratio 1 everywhere: loss = -mean(A) over loss tokens, grad = -A / n_tokens
    logp = t([[-1.0, -2.0, -3.0]]).requires_grad_(True)
    adv = t([[2.0, -1.0, 5.0]])
    mask = t([[1.0, 1.0, 0.0]])
    loss, diag = ppo_clip_loss(logp, logp.detach(), adv, mask)
    close(loss.detach(), -(2.0 - 1.0) / 2)
    loss.backward()
    close(logp.grad, t([[-1.0, 0.5, 0.0]]))
    close(diag["clip_frac"], 0.0)
    close(diag["approx_kl"], 0.0)
    close(diag["ratio_max"], 1.0)


# ---------------------------------------------------------------------------------------------
# KL, entropy, policy_loss
# ---------------------------------------------------------------------------------------------


def test_kl_values_by_hand() -> None:
    # logp = [ln .5, ln .25, ln .3], ref = [ln .25, ln .5, ln .3] -> d = logp - ref = [ln2, -ln2, 0]
    logp = t([[0.5, 0.25, 0.3]]).log()
    ref = t([[0.25, 0.5, 0.3]]).log()
    # k1 = d
    close(kl_penalty(logp, ref, "k1"), [[LN2, -LN2, 0.0]])
    # k2 = d^2 / 2
    close(kl_penalty(logp, ref, "k2"), [[LN2**2 / 2, LN2**2 / 2, 0.0]])
    # k3 = exp(-d) + d - 1: d = ln2 -> 0.5 + ln2 - 1 = ln2 - 0.5 (~0.193)
    #                       d = -ln2 -> 2 - ln2 - 1 = 1 - ln2 (~0.307);  d = 0 -> 0
    close(kl_penalty(logp, ref, "k3"), [[LN2 - 0.5, 1 - LN2, 0.0]])
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k4")


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_are_unbiased_in_expectation(kind) -> None:
    # over x ~ p, E[k1] = E[k3] = KL(p || q) exactly (enumerate a 4-way categorical)
    p = t([0.1, 0.2, 0.3, 0.4])
    q = t([0.4, 0.3, 0.2, 0.1])
    kl = (p * (p / q).log()).sum()
    est = kl_penalty(p.log()[None], q.log()[None], kind)[0]
    close((p * est).sum(), kl)


def test_entropy_from_logits() -> None:
    # uniform over V = 4 -> ln 4; the [0, ln3] case is p = [1/4, 3/4]
    logits = torch.zeros(1, 2, 4, dtype=F64)
    logits[0, 1] = t([0.0, math.log(3.0), -1e9, -1e9])
    h = entropy_from_logits(logits)
    close(h, [[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, 11, generator=gen, dtype=F64)
    pr = z.softmax(-1)
    close(entropy_from_logits(z), -(pr * pr.log()).sum(-1))


def test_policy_loss_combines_terms() -> None:
    # on-policy, ref == policy: pg = -(1 - 1)/2 = 0, kl = 0; entropy token-mean = (1 + 2)/2 = 1.5
    # total = 0 + 0.5 * 0 - 0.1 * 1.5 = -0.15
    logp = t([[-1.0, -2.0]])
    adv = t([[1.0, -1.0]])
    mask = t([[1.0, 1.0]])
    ent = t([[1.0, 2.0]])
    loss, diag = policy_loss(
        logp, logp, adv, mask, ref_logprobs=logp, entropy=ent, kl_coef=0.5, entropy_coef=0.1
    )
    close(loss, -0.15)
    close(diag["kl"], 0.0)
    close(diag["entropy"], 1.5)
    close(diag["pg_loss"], 0.0)
    close(diag["loss"], -0.15)
    # with a KL: ref differs by ln2 on token 0 -> k3 = ln2 - 0.5 there, 0 on token 1
    ref = logp - t([[LN2, 0.0]])
    loss, diag = policy_loss(logp, logp, adv, mask, ref_logprobs=ref, kl_coef=0.5)
    close(diag["kl"], (LN2 - 0.5) / 2)
    close(loss, 0.5 * (LN2 - 0.5) / 2)
    assert "entropy" not in diag
    # without extras: just the clip loss, no kl / entropy keys
    loss, diag = policy_loss(logp, logp, adv, mask)
    assert "kl" not in diag and "entropy" not in diag
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, logp, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp, adv, mask, entropy_coef=0.1)


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_token_logprobs_matches_manual_softmax(temperature) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 13, generator=gen, dtype=F64) * 3
    labels = torch.randint(0, 13, (2, 5), generator=gen)
    z = logits / temperature
    probs = z.exp() / z.exp().sum(-1, keepdim=True)
    manual = probs.gather(-1, labels[..., None]).squeeze(-1).log()
    close(token_logprobs(logits, labels, temperature), manual, atol=1e-12)


def test_token_logprobs_gradient_and_padding() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 7, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4), generator=gen)
    labels[1, 3] = -100  # padding label
    out = token_logprobs(logits, labels)
    assert out[1, 3].item() == 0.0
    valid = labels != -100
    out.sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(ref_logits.reshape(-1, 7), labels.reshape(-1), reduction="sum")
    (-ce).backward()
    close(logits.grad, ref_logits.grad, atol=1e-12)
    close(out[valid], -F.cross_entropy(logits.detach()[valid], labels[valid], reduction="none"))


def test_token_logprobs_float32_large_logits_stable() -> None:
    logits = torch.tensor([[[1000.0, 0.0, -1000.0]]])
    out = token_logprobs(logits, torch.tensor([[0]]))
    assert torch.isfinite(out).all() and abs(out.item()) < 1e-6


# ---------------------------------------------------------------------------------------------
# behaviour_weights (off-policy correction)
# ---------------------------------------------------------------------------------------------


def test_behaviour_weights_hand_worked() -> None:
    from learner.losses import behaviour_weights

    # w_raw = exp(prox - behaviour) = [0.5, 1, 1.5, 4] (token 4 masked out); cap 2
    prox = t([[math.log(0.5), 0.0, math.log(1.5), math.log(4.0), 7.0]])
    behaviour = torch.zeros_like(prox)
    mask = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    w, d = behaviour_weights(prox, behaviour, mask, "tis", cap=2.0)
    close(w, t([[0.5, 1.0, 1.5, 2.0, 0.0]]))  # truncated at the cap
    close(d["is_weight_mean"], (0.5 + 1.0 + 1.5 + 2.0) / 4)
    close(d["is_capped_frac"], 1 / 4)
    w, d = behaviour_weights(prox, behaviour, mask, "decoupled", cap=2.0)
    close(w, t([[0.5, 1.0, 1.5, 0.0, 0.0]]))  # dropped past the cap
    w, _ = behaviour_weights(prox, behaviour, mask, "none")
    close(w, mask)
    with pytest.raises(ValueError, match="off-policy mode"):
        behaviour_weights(prox, behaviour, mask, "bogus")
