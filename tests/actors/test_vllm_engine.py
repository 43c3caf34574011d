"""The optional vllm backend: clear failure without vLLM/GPU; behaviour checks on a GPU with vLLM."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from common.config import ConfigError, load_config

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_GPU = torch.cuda.is_available()


@pytest.mark.skipif(HAS_VLLM and HAS_GPU, reason="vLLM and a GPU are present")
def test_selecting_vllm_without_it_fails_clearly(tiny_policy):
    from actors.vllm_engine import VLLMEngine

    with pytest.raises(ConfigError, match="generators.backend"):
        load_config(None, ["generators.backend=vllm"])
    with pytest.raises(RuntimeError, match="turnrl\\[vllm\\]|CUDA GPU"):
        VLLMEngine(str(tiny_policy), None)


@pytest.fixture(scope="module")
def vllm_policy(tmp_path_factory):
    """A tiny Qwen2 whose head size vLLM's attention kernels support (64)."""
    from common.modeling import build_demo_model, train_demo_tokenizer

    out = tmp_path_factory.mktemp("vllm_policy")
    tok = train_demo_tokenizer(["Karo Velmin is a baker from Ralomek. <tool>{}</tool>"] * 20, 300, out)
    model = build_demo_model(len(tok), hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, seed=0)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and HAS_GPU), reason="needs vLLM and a CUDA GPU")
def test_vllm_backend_tokens_logprobs_and_weight_updates(vllm_policy):
    from actors.engine import HFEngine, Request, SamplingParams
    from actors.vllm_engine import VLLMEngine
    from common.modeling import load_model, load_tokenizer

    tok = load_tokenizer(vllm_policy)
    ref = HFEngine(load_model(vllm_policy), tok, device="cuda")
    eng = VLLMEngine(str(vllm_policy), tok, dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True)
    ref.eos_ids = eng.eos_ids = set()
    prompt = tok.encode("Karo Velmin is", add_special_tokens=False)
    greedy = SamplingParams(greedy=True, max_new_tokens=8)
    a = eng.generate_turns([Request("s", prompt, greedy)])[0]
    b = ref.generate_turns([Request("s", prompt, greedy)])[0]
    assert a.token_ids[:4] == b.token_ids[:4]  # different kernels: compare the first steps exactly
    sampled = eng.generate_turns([Request("t", prompt, SamplingParams(temperature=0.8, max_new_tokens=6), seed=1)])[0]
    seq = torch.tensor([prompt + sampled.token_ids], device="cuda")
    with torch.no_grad():
        logits = ref.model(seq).logits[0, len(prompt) - 1:-1].float() / 0.8
    fresh = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sampled.token_ids, device="cuda")[:, None])
    assert torch.allclose(torch.tensor(sampled.logprobs), fresh.squeeze(-1).cpu(), atol=2e-2)
    # a weight update through vLLM's load_weights changes outputs and the version
    new = {k: v + 0.5 * torch.randn_like(v) for k, v in ref.model.state_dict().items()}
    eng.update_weights([{k: v.cpu() for k, v in new.items()}], version=3)
    c = eng.generate_turns([Request("s", prompt, greedy)])[0]
    assert c.version == 3 and (c.token_ids != a.token_ids or c.logprobs != a.logprobs)
