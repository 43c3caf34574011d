"""A lean forward pass for Llama-family decoders (Qwen2, Llama) over the engine's KV slots.

The transformers modules spend most of a small model's decode step in Python: module
call wrappers, output capturing, kwargs plumbing, mask preparation, ~15 module calls per
layer. On the demo policy (4 layers, hidden 128) that is ~7 ms of fixed cost per forward
on one CPU core, more than the arithmetic of a 64-row decode step. :class:`LeanForward`
runs the same tensor operations, in the same order, on the model's own parameters, with
none of that around them: for the supported architectures its logits equal those of
``model(...)`` with :class:`actors.kv_slots.SlotForwardCache` bit for bit
(``tests/actors/test_lean_forward.py``), so it changes speed, not results.

Mirrored from transformers (5.x) ``Qwen2``/``Llama`` ``*RMSNorm``, ``*Attention`` (rotary
embedding through the model's own ``rotary_emb`` module, so every RoPE variant behaves
as in transformers), ``integrations.sdpa_attention.sdpa_attention_forward`` (decode: the
query heads packed per key/value head; prefill: ``repeat_kv``) and ``*MLP``. Anything else
(other architectures, eager attention, q/k norms, sliding windows) keeps the module path:
:meth:`LeanForward.build` returns ``None``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from actors.kv_slots import KVSlots

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Qwen2RMSNorm`` / ``LlamaRMSNorm``: w * (x / sqrt(mean(x^2) + eps)), computed in float32."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LayerWeights:
    __slots__ = ("q", "qb", "k", "kb", "v", "vb", "o", "ob", "ln1", "eps1", "ln2", "eps2", "gate", "gb", "up", "ub",
                 "down", "db", "act")

    def __init__(self, layer) -> None:
        a, m = layer.self_attn, layer.mlp
        self.q, self.qb = a.q_proj.weight, a.q_proj.bias
        self.k, self.kb = a.k_proj.weight, a.k_proj.bias
        self.v, self.vb = a.v_proj.weight, a.v_proj.bias
        self.o, self.ob = a.o_proj.weight, a.o_proj.bias
        self.ln1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.gate, self.gb = m.gate_proj.weight, m.gate_proj.bias
        self.up, self.ub = m.up_proj.weight, m.up_proj.bias
        self.down, self.db = m.down_proj.weight, m.down_proj.bias
        self.act = m.act_fn


def unsupported_reason(model) -> str | None:
    """Why the lean functions of this module cannot mirror ``model`` (None: they can)."""
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r}"
    if (getattr(cfg, "_attn_implementation", None) or "sdpa") != "sdpa":
        return f"attention implementation {cfg._attn_implementation!r}"
    if set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return "sliding-window layers"
    base = getattr(model, "model", None)
    layer = base.layers[0] if base is not None and len(base.layers) else None
    attn = getattr(layer, "self_attn", None)
    if attn is None or hasattr(attn, "q_norm") or not hasattr(getattr(layer, "mlp", None), "gate_proj"):
        return "an unexpected module layout"
    return None


class LeanForward:
    """``forward(ids, qpos, lo, hi, read, mask) -> logits`` of the last column, writing K/V into the slots."""

    def __init__(self, model, slots: KVSlots):
        cfg = model.config.get_text_config(decoder=True)
        base = model.model
        self.slots = slots
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.norm, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.head = model.lm_head.weight
        self.head_bias = model.lm_head.bias
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.scaling = base.layers[0].self_attn.scaling
        self.layers = [LayerWeights(layer) for layer in base.layers[: cfg.num_hidden_layers]]

    @classmethod
    def build(cls, model, slots: KVSlots) -> "LeanForward | None":
        """A lean forward for ``model`` if its architecture is one this module mirrors, else ``None``."""
        reason = unsupported_reason(model)
        if reason is not None:
            log.info("lean forward off (%s): using the transformers modules", reason)
            return None
        return cls(model, slots)

    def __call__(self, ids: torch.Tensor, qpos: torch.Tensor, lo: int, hi: int, read: int,
                 mask: torch.Tensor) -> torch.Tensor:
        """Tokens ``ids`` long[B, Q] at positions/columns ``qpos`` long[B, Q] of slots ``[lo, hi)``;
        attention reads ``read`` columns under ``mask`` bool[B, 1, Q, read]. Returns float[B, V]."""
        b, q = ids.shape
        hd, kvh = self.head_dim, self.kv_heads
        rows = torch.arange(b, device=ids.device)[:, None]  # [B, 1]
        h = self.embed(ids)  # [B, Q, H]
        cos, sin = self.rotary(h, qpos)  # [B, Q, hd]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, Q, hd]
        # the additive form SDPA would build from the bool mask in every layer, built once
        mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        for i, L in enumerate(self.layers):
            residual = h
            x = rms_norm(h, L.ln1, L.eps1)
            qs = F.linear(x, L.q, L.qb).view(b, q, -1, hd).transpose(1, 2)  # [B, heads, Q, hd]
            ks = F.linear(x, L.k, L.kb).view(b, q, -1, hd).transpose(1, 2)  # [B, kvh, Q, hd]
            vs = F.linear(x, L.v, L.vb).view(b, q, -1, hd).transpose(1, 2)
            qs = (qs * cos) + (rotate_half(qs) * sin)
            ks = (ks * cos) + (rotate_half(ks) * sin)
            k_slab = self.slots.keys[i][lo:hi]  # [B, kvh, W, hd]
            v_slab = self.slots.values[i][lo:hi]
            k_slab[rows, :, qpos] = ks.permute(0, 2, 1, 3).to(k_slab.dtype)
            v_slab[rows, :, qpos] = vs.permute(0, 2, 1, 3).to(v_slab.dtype)
            key, value = k_slab[:, :, :read], v_slab[:, :, :read]
            if self.groups > 1:
                if q == 1:  # pack the query heads of each key/value head (no K/V copy)
                    qs = qs.reshape(b, kvh, self.groups, hd)
                else:
                    key = key[:, :, None].expand(b, kvh, self.groups, read, hd).reshape(b, self.heads, read, hd)
                    value = value[:, :, None].expand(b, kvh, self.groups, read, hd).reshape(b, self.heads, read, hd)
            out = F.scaled_dot_product_attention(qs, key, value, attn_mask=mask, dropout_p=0.0, scale=self.scaling,
                                                 is_causal=False)
            out = out.reshape(b, -1, q, hd).transpose(1, 2).contiguous()  # [B, Q, heads, hd]
            h = residual + F.linear(out.reshape(b, q, -1).contiguous(), L.o, L.ob)
            residual = h
            x = rms_norm(h, L.ln2, L.eps2)
            h = residual + F.linear(L.act(F.linear(x, L.gate, L.gb)) * F.linear(x, L.up, L.ub), L.down, L.db)
        h = rms_norm(h[:, -1:], self.norm, self.norm_eps)
        return F.linear(h, self.head, self.head_bias)[:, -1, :]
