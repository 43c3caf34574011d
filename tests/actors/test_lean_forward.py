"""The lean forward (actors/lean_forward.py) computes exactly what the transformers modules compute.

Same tiny models, same KV slots, same tokens: the logits of a ragged prefill and of decode steps
are equal bit for bit with and without it (Qwen2, the demo policy's architecture, with grouped-query
attention); whole multi-turn sampled sessions through the engine give identical tokens and
log-probs; Llama sessions (which only the lean forward can run) match transformers' own generate.
Architectures it does not mirror keep the module path.
"""

from __future__ import annotations

import pytest
import torch

from actors.engine import HFEngine, Request, SamplingParams
from actors.lean_forward import LeanForward
from common.modeling import load_model, load_tokenizer


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attention_bias=True, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok(tiny_policy):
    return load_tokenizer(tiny_policy)


def test_lean_logits_equal_the_modules_bit_for_bit(tiny_policy, tok, device):
    model = load_model(tiny_policy)
    lean, mods = HFEngine(model, tok, device=device), HFEngine(model, tok, device=device, lean_forward=False)
    assert lean.lean_forward and not mods.lean_forward
    g = torch.Generator().manual_seed(1)
    lens = [7, 12, 3]
    for eng in (lean, mods):
        eng._kv.ensure(3, 40, used=0)
    q = max(lens)
    ids = torch.randint(5, len(tok), (3, q), generator=g)
    qpos = torch.stack([torch.arange(q) - (q - n) for n in lens])  # ragged, right-aligned
    qpos = torch.where(qpos < 0, torch.arange(q) + 20, qpos)  # pad columns write beyond the real tokens
    ids, qpos = ids.to(device), qpos.to(device)
    with torch.no_grad():
        a = lean._forward(ids, qpos, 0, 3, int(qpos.max()) + 1)  # prefill [3, V]
        b = mods._forward(ids, qpos, 0, 3, int(qpos.max()) + 1)
        assert torch.equal(a, b)
        pos = torch.tensor([[n] for n in lens], device=device)
        for _ in range(3):  # decode steps read what the prefill wrote
            nxt = a.argmax(-1)[:, None]
            a = lean._forward(nxt, pos, 0, 3, int(pos.max()) + 1)
            b = mods._forward(nxt, pos, 0, 3, int(pos.max()) + 1)
            assert torch.equal(a, b)
            pos = pos + 1
    for i in range(len(lean._kv.keys)):
        assert torch.equal(lean._kv.keys[i][:3, :, :15], mods._kv.keys[i][:3, :, :15])
        assert torch.equal(lean._kv.values[i][:3, :, :15], mods._kv.values[i][:3, :, :15])


def test_llama_sessions_through_the_lean_forward_equal_hf_generate(tok, device):
    """Llama's modules take no per-layer mask mapping, so sessions need the lean forward; greedy
    turns across KV reuse equal the static path (transformers' own cache), log-probs within 1e-5."""
    model = _llama(len(tok))
    eng = HFEngine(model, tok, device=device)
    assert eng.lean_forward
    eng.eos_ids = set()
    greedy = SamplingParams(greedy=True, max_new_tokens=6)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Where is Karo", "Who is Karo Velmin?")]
    hist = [list(p) for p in prompts]
    for turn in range(2):
        got = eng.generate_turns([Request(f"l{i}", h, greedy) for i, h in enumerate(hist)])
        ref = eng.generate(hist, greedy)
        for o, r in zip(got, ref):
            assert o.token_ids == r.token_ids
            assert torch.allclose(torch.tensor(o.logprobs), torch.tensor(r.logprobs), atol=1e-5)
            assert (o.cached_tokens > 0) == (turn > 0)
        hist = [h + o.token_ids + prompts[1 - i] for i, (h, o) in enumerate(zip(hist, got))]


def test_sampled_sessions_identical_with_and_without_the_lean_forward(tiny_policy, tok, device):
    model = load_model(tiny_policy)
    engines = [HFEngine(model, tok, device=device), HFEngine(model, tok, device=device, lean_forward=False)]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Where is Karo", "Who is Karo Velmin?", "<tool>")]
    outs = []
    for eng in engines:
        eng.eos_ids = set()
        hist = [list(p) for p in prompts]
        got = []
        for turn in range(3):
            res = eng.generate_turns([Request(f"s{i}", h, params) for i, h in enumerate(hist)])
            got.append([(o.token_ids, o.logprobs, o.cached_tokens) for o in res])
            hist = [h + o.token_ids + prompts[(i + turn) % 3] for i, (h, o) in enumerate(zip(hist, res))]
        outs.append(got)
    assert outs[0] == outs[1]
    assert any(c > 0 for turn in outs[0][1:] for _, _, c in turn)  # later turns reused the KV cache


def test_other_architectures_keep_the_module_path(tiny_policy, tok):
    model = load_model(tiny_policy)
    model.config._attn_implementation = "eager"
    assert LeanForward.build(model, HFEngine(model, tok, lean_forward=False)._kv) is None
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).eval()
    assert LeanForward.build(gpt2, None) is None
